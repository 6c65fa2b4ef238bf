#!/usr/bin/env bash
# Seconds per training iteration of an older commit vs this checkout, side by side in one run:
# the same `train` command and config (configs/ml1m-subset.yaml, MELO, validation excluded:
# metrics.jsonl's seconds_per_iteration), 2 threads, and peak RSS. Four variants per backbone:
# `old` (the commit, its defaults: reference head, all parameters adapted, the reference's
# sampled support windows), `new` (this checkout in the same setting), `new-history` (the same
# with one support window a task: data.support_windows=history, another algorithm) and
# `new-shipped` (this checkout's config as it ships). Each line
# also gives the validation RMSE after the N iterations: `old` and `new` run the same algorithm
# from the same seed, so they agree where dropout draws no random numbers (SETTINGS below).
#   bash scripts/compare_speed.sh be1857a data/ml1m 12 sasrec gru4rec
#   SETTINGS="--set model.dropout=0" bash scripts/compare_speed.sh be1857a data/ml1m 20 sasrec
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 DATA=$(realpath "$2") N=$3; shift 3
HERE=$(pwd) WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/old" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/old" "$OLD" >/dev/null 2>&1
for backbone in "$@"; do
  for variant in old new new-history new-shipped; do
    reference=(--set model.head=reference --set meta.adapt=all)
    case $variant in
      old) root=$WORK/old extra=();;
      new) root=$HERE extra=("${reference[@]}" --set data.support_windows=sampled);;
      new-history) root=$HERE extra=("${reference[@]}" --set data.support_windows=history);;
      new-shipped) root=$HERE extra=();;
    esac
    out=$WORK/$variant-$backbone
    (cd "$root" && PYTHONPATH=$root /usr/bin/time -f %M -o "$out.kib" "$HERE/.venv/bin/python" \
      -m melo_dist.cli train --config configs/ml1m-subset.yaml --set data.path="$DATA" \
      --set data.valid_users=50 --set model.backbone="$backbone" --set meta.regime=melo \
      --set optim.iterations="$N" --set meta.multi_step_iterations=$((N - 1)) \
      --set run.validate_every="$N" --set run.threads=2 \
      --set run.out="$out" "${extra[@]}" ${SETTINGS:-} > "$out.log" 2>&1)
    figures=$("$HERE/.venv/bin/python" -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(r['seconds_per_iteration'], r['valid_rmse'])" "$out/metrics.jsonl")
    read -r seconds rmse <<< "$figures"
    printf '%-8s %-12s %.3f s/iteration  peak %d MiB  valid RMSE %.6f\n' "$backbone" "$variant" "$seconds" $(($(cat "$out.kib") / 1024)) "$rmse"
  done
done
