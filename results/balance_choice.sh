#!/usr/bin/env bash
# How meta.outer_balance 0.5 was chosen (results/ml1m-subset-findings.md, "The rare ratings"):
# SASRec, seed 0, MAML and MELO at outer-loss powers 0 (plain MSE), 0.25 and 0.5, 1,000
# meta-iterations as results/plans/ml1m-tuned.yaml, each scored on the validation users.
#   bash results/balance_choice.sh DATA [OUT] [BASIC]   (DATA: the ML-1M subset, --protocol melo)
# POWERS="0 0.25" picks the powers; TARGETS=10 also compares MELO with MAML at each power on
# every validation user's 10 last interactions (results/paired.py --targets), a stronger judge.
# BASIC: the basic SASRec checkpoint whose embeddings start MAML and MELO. The findings' figures
# used the earlier study's (2ffbba2's plan: runs/study/ml1m-subset/basic-sasrec-s0/best.pt);
# without it the script trains one with the shipped config, which starts them elsewhere.
set -euo pipefail
data=${1:?usage: balance_choice.sh DATA [OUT] [BASIC]}
out=${2:-runs/balance-choice}
basic=${3:-$out/basic-sasrec/best.pt}
bin=.venv/bin/melo-dist
common=(--config configs/ml1m-subset.yaml --set "data.path=$data" --set run.threads=1
  --set data.valid_users=0 --set data.valid_targets=3 --set run.validate_every=50 --set run.seed=0)
if [ ! -f "$basic" ]; then
  $bin train "${common[@]}" --set meta.regime=basic --set optim.iterations=1500 \
    --set "run.out=$out/basic-sasrec"
fi
for power in ${POWERS:-0 0.25 0.5}; do
  if [ "$power" = 0 ]; then loss=(--set meta.outer_loss=mse)
  else loss=(--set meta.outer_loss=class_balanced --set "meta.outer_balance=$power"); fi
  for regime in maml melo; do
    $bin train "${common[@]}" --set optim.iterations=1000 --set meta.multi_step_iterations=500 \
      --set "run.init_from=$basic" --set "meta.regime=$regime" "${loss[@]}" \
      --set "run.out=$out/$regime-p$power"
  done
  $bin evaluate --checkpoint "$out/maml-p$power" --checkpoint "$out/melo-p$power" --split valid
  if [ -n "${TARGETS:-}" ]; then
    .venv/bin/python results/paired.py --split valid --targets "$TARGETS" \
      --a "$out/melo-p$power" --b "$out/maml-p$power"
  fi
done
