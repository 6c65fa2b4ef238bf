#!/usr/bin/env bash
# A lever of the shipped recipe, judged on validation only: train it as the main study trains its
# runs (results/plans/ml1m-subset.yaml: same data, same basic start `basic-{backbone}-s0`, same
# budget and checkpoint choice), then compare it with the study's MELO and MAML runs of the same
# seeds on every validation user's 10 last interactions (results/paired.py --targets 10, the
# seeds of a side pooled).
#   bash results/lever_probe.sh STUDY NAME SETTING...
#   e.g. bash results/lever_probe.sh runs/study/ml1m-subset error model.encoder_error=true
# STUDY: the study's run folder (its data/ and runs); NAME names the lever's runs
# (OUT/NAME-BACKBONE-sSEED, OUT default runs/levers); each SETTING is a `--set` of the runs
# (meta.regime=melo unless one sets it). BACKBONES="sasrec gru4rec" and SEEDS="0 1 2" pick the
# runs; JOBS=N trains N at once (default 2, one thread each); SCORE=0 trains only. Run it again
# and each run resumes from its last checkpoint (a finished one at once).
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: lever_probe.sh STUDY NAME [SETTING...]" >&2; exit 2; fi
study=$1 name=$2
shift 2
if [ ! -d "$study/data" ]; then echo "lever_probe.sh: $study has no data/ (a study's run folder?)" >&2; exit 2; fi
bin=${MELO_DIST:-.venv/bin/melo-dist}
python=${PYTHON:-.venv/bin/python}
out=${OUT:-runs/levers} backbones=${BACKBONES:-sasrec gru4rec} seeds=${SEEDS:-0 1 2}
settings=(--set meta.regime=melo)
for setting in "$@"; do settings+=(--set "$setting"); done
mkdir -p "$out"
for backbone in $backbones; do for seed in $seeds; do
  while [ "$(jobs -pr | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || true; done
  run="$out/$name-$backbone-s$seed"
  rm -f "$run.failed"
  { $bin train --config configs/ml1m-subset.yaml --set "data.path=$study/data" \
    --set run.threads=1 --set data.valid_users=0 --set data.valid_targets=3 \
    --set run.validate_every=50 --set "model.backbone=$backbone" --set "run.seed=$seed" \
    --set "run.init_from=$study/basic-$backbone-s0/best.pt" "${settings[@]}" \
    --set "run.out=$run" > "$run.log" 2>&1 || touch "$run.failed"; } &
done; done
wait
if compgen -G "$out/$name-*.failed" > /dev/null; then
  echo "lever_probe.sh: a run failed: $(ls "$out/$name"-*.failed); see its .log" >&2; exit 1
fi
[ "${SCORE:-1}" = 0 ] && exit 0
for backbone in $backbones; do
  lever=() melo=() maml=()
  for seed in $seeds; do
    lever+=("$out/$name-$backbone-s$seed")
    melo+=("$study/melo-$backbone-s$seed") maml+=("$study/maml-$backbone-s$seed")
  done
  echo "== $name $backbone (seeds $seeds) against the study's MELO, then its MAML"
  $python results/paired.py --split valid --targets 10 --a "${lever[@]}" --b "${melo[@]}"
  $python results/paired.py --split valid --targets 10 --a "${lever[@]}" --b "${maml[@]}"
done
