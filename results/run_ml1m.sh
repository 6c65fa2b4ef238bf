#!/usr/bin/env bash
# Reproduces results/ml1m-subset.md: basic, MAML and MELO for the four backbones on the ML-1M
# subset (reference protocol, 1000 test users), three seeds for SASRec. Two runs at a time,
# one torch thread each (2 cores). Budget: ITERATIONS meta-iterations per run (default 400;
# the reference uses 2000), the MAML++ multi-step phase and cosine decay scaled to it.
#   bash results/run_ml1m.sh            # from the repository root, after `make install`
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
ITERATIONS=${ITERATIONS:-400}
RUNS=${RUNS:-runs/ml1m}
DATA=${DATA:-data/ml1m}
[ -f "$DATA/manifest.json" ] || $BIN/melo-dist prepare --source movielens \
  --path ../shared/data/ml-1m-users1-2999/ratings.dat.gz --out "$DATA"

train() {  # name, then --set overrides
  local name=$1; shift
  $BIN/melo-dist train --config configs/ml1m-subset.yaml --set data.path="$DATA" \
    --set run.out="$RUNS/$name" --set run.threads=1 --set optim.iterations="$ITERATIONS" \
    --set meta.multi_step_iterations=$((ITERATIONS / 2)) "$@" > "$RUNS/$name.log" 2>&1
}
export -f train; export BIN DATA RUNS ITERATIONS
mkdir -p "$RUNS"

# 1. basic per backbone (its embeddings initialise MAML and MELO, as in the reference); it
#    costs ~0.05 s an iteration, so it gets 10x the meta-iterations
printf '%s\n' gru4rec narm sasrec bert4rec | xargs -P 2 -I{} bash -c \
  'train basic-{} --set model.backbone={} --set meta.regime=basic --set optim.iterations=$((ITERATIONS * 10))'
# 2. MAML and MELO (NARM gets NARM_ITERATIONS: its per-position attention makes a
#    second-order meta-step ~4 s on 2 cores)
NARM_ITERATIONS=${NARM_ITERATIONS:-100}
{
  for backbone in sasrec gru4rec narm bert4rec; do
    iterations=$ITERATIONS; [ "$backbone" = narm ] && iterations=$NARM_ITERATIONS
    for regime in melo maml; do echo "$backbone $regime 0 $iterations"; done
  done
  for seed in 1 2; do for regime in melo maml; do echo "sasrec $regime $seed $ITERATIONS"; done; done
} | xargs -P 2 -L 1 bash -c 'train "$1-$0-s$2" --set model.backbone=$0 --set meta.regime=$1 \
    --set run.seed=$2 --set run.init_from=$RUNS/basic-$0/best.pt \
    --set optim.iterations=$3 --set meta.multi_step_iterations=$(($3 / 2))'

# 3. scores on the test users, every model of a backbone on the same targets
for backbone in sasrec gru4rec narm bert4rec; do
  args=(--checkpoint "$RUNS/basic-$backbone")
  for run in "$RUNS"/*-"$backbone"-s*/; do args+=(--checkpoint "${run%/}"); done
  $BIN/melo-dist evaluate "${args[@]}" --split test > "$RUNS/test-$backbone.txt"
done
# the tables of results/ml1m-subset.md (its Findings section is written by hand from them)
$BIN/python results/summarize.py "$RUNS" "$ITERATIONS" > "$RUNS/ml1m-subset.md"
