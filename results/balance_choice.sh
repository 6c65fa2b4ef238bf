#!/usr/bin/env bash
# How the outer loss's class-balancing power is chosen (results/ml1m-subset-findings.md, "The
# rare ratings"): MAML and MELO at outer-loss powers 0 (plain MSE), 0.25 and 0.5, 1,000
# meta-iterations as the shipped recipe, each scored on the validation users.
#   bash results/balance_choice.sh DATA [OUT] [BASIC]   (DATA: the ML-1M subset, --protocol melo)
# POWERS="0 0.25" picks the powers, BACKBONES="sasrec gru4rec" and SEEDS="0 1 2" the runs (default
# SASRec, seed 0); JOBS=N trains N runs at once (each on one thread). TARGETS=10 also compares
# MELO with MAML at each power on every validation user's 10 last interactions
# (results/paired.py --targets, the seeds of a side pooled), a stronger judge; SCORE=0 trains only.
# BASIC: the basic checkpoint whose embeddings start MAML and MELO, `{backbone}` standing for the
# backbone (a study's `runs/study/ml1m-subset/basic-{backbone}-s0/best.pt`); without it the
# script trains one a backbone with the shipped config, which starts them elsewhere.
# Where the package is not installed in .venv: MELO_DIST=COMMAND, PYTHON=COMMAND; GPU="sasrec"
# trains those backbones with --use-gpu (a device check; the CPU's runs differ by float noise).
set -euo pipefail
data=${1:?usage: balance_choice.sh DATA [OUT] [BASIC]}
out=${2:-runs/balance-choice}
basic=${3:-"$out/basic-{backbone}/best.pt"}
if [[ $basic != *"{backbone}"* && ${BACKBONES:-sasrec} == *" "* ]]; then
  echo "balance_choice.sh: several backbones need a BASIC with {backbone} in it" >&2; exit 2
fi
bin=${MELO_DIST:-.venv/bin/melo-dist}
python=${PYTHON:-.venv/bin/python}
powers=${POWERS:-0 0.25 0.5} backbones=${BACKBONES:-sasrec} seeds=${SEEDS:-0}
common=(--config configs/ml1m-subset.yaml --set "data.path=$data" --set run.threads=1
  --set data.valid_users=0 --set data.valid_targets=3 --set run.validate_every=50)

train_one() {  # BACKBONE REGIME POWER SEED
  local backbone=$1 regime=$2 power=$3 seed=$4 loss=(--set meta.outer_loss=mse) device=()
  if [ "$power" != 0 ]; then
    loss=(--set meta.outer_loss=class_balanced --set "meta.outer_balance=$power")
  fi
  if [[ " ${GPU:-} " == *" $backbone "* ]]; then device=(--use-gpu); fi
  $bin train "${common[@]}" ${device[@]+"${device[@]}"} --set "model.backbone=$backbone" \
    --set "run.seed=$seed" --set optim.iterations=1000 --set meta.multi_step_iterations=500 \
    --set "run.init_from=$(basic_of "$backbone")" --set "meta.regime=$regime" \
    "${loss[@]}" --set "run.out=$out/$regime-$backbone-p$power-s$seed" \
    > "$out/$regime-$backbone-p$power-s$seed.log" 2>&1
}

basic_of() {  # BACKBONE: the basic checkpoint its runs start from (trained here if missing)
  local given=${basic//\{backbone\}/$1}
  if [ -f "$given" ]; then echo "$given"; else echo "$out/basic-$1/best.pt"; fi
}

mkdir -p "$out"
for backbone in $backbones; do
  if [ ! -f "$(basic_of "$backbone")" ]; then
    $bin train "${common[@]}" --set "model.backbone=$backbone" --set run.seed=0 \
      --set meta.regime=basic --set optim.iterations=1500 --set "run.out=$out/basic-$backbone"
  fi
done
pids=()
for backbone in $backbones; do for power in $powers; do for regime in maml melo; do
  for seed in $seeds; do
    while [ "$(jobs -pr | wc -l)" -ge "${JOBS:-1}" ]; do wait -n || true; done
    train_one "$backbone" "$regime" "$power" "$seed" &
    pids+=($!)
  done
done; done; done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done  # every run ends before the verdict
if [ "$failed" = 1 ]; then echo "balance_choice.sh: a run failed; see $out/*.log" >&2; exit 1; fi
[ "${SCORE:-1}" = 0 ] && exit 0
for backbone in $backbones; do for power in $powers; do
  runs() { for seed in $seeds; do echo "$out/$1-$backbone-p$power-s$seed"; done; }
  mapfile -t maml < <(runs maml)
  mapfile -t melo < <(runs melo)
  $bin evaluate "${maml[@]/#/--checkpoint=}" "${melo[@]/#/--checkpoint=}" --split valid
  if [ -n "${TARGETS:-}" ]; then
    $python results/paired.py --split valid --targets "$TARGETS" --a "${melo[@]}" --b "${maml[@]}"
  fi
done; done
