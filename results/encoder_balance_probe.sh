#!/usr/bin/env bash
# Does an encoder that learns from the class-balanced outer loss, beside a recommender that learns
# from plain MSE (meta.outer_loss=encoder_balanced), keep MELO ahead of MAML overall and put it
# ahead on the rare ratings? SASRec MELO, seed 0, powers 0.5 and 1, trained as
# results/balance_choice.sh trains its runs (same BASIC, same budget), then scored on the
# validation users beside that script's plain-MSE MAML and MELO (OUT_MSE: its output folder).
#   bash results/encoder_balance_probe.sh DATA BASIC OUT_MSE [OUT]
set -euo pipefail
data=${1:?usage: encoder_balance_probe.sh DATA BASIC OUT_MSE [OUT]}
basic=${2:?} mse=${3:?} out=${4:-runs/encoder-balance}
bin=.venv/bin/melo-dist
for power in 0.5 1; do
  $bin train --config configs/ml1m-subset.yaml --set "data.path=$data" --set run.threads=1 \
    --set data.valid_users=0 --set data.valid_targets=3 --set run.validate_every=50 \
    --set run.seed=0 --set optim.iterations=1000 --set meta.multi_step_iterations=500 \
    --set "run.init_from=$basic" --set meta.regime=melo --set meta.outer_loss=encoder_balanced \
    --set "meta.outer_balance=$power" --set "run.out=$out/melo-encoder-p$power" &
done
wait
$bin evaluate --split valid --checkpoint "$mse/maml-sasrec-p0-s0" --checkpoint "$mse/melo-sasrec-p0-s0" \
  --checkpoint "$out/melo-encoder-p0.5" --checkpoint "$out/melo-encoder-p1"
