#!/usr/bin/env bash
# `ray job submit` for real: start a local head, submit a short 2-worker training job and a
# 2-trial sweep job, wait for SUCCEEDED, check the artifacts, stop the head. Run by `make test`
# before pytest (the head must not share the machine with the test session's Ray: `ray stop`
# stops every Ray process).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
export PATH=$BIN:$PATH  # the job's `python` is the project's environment
export RAY_AUTH_MODE=disabled  # the same on both ends: head and job CLI (DESIGN §4)
work=$(mktemp -d)
address=http://127.0.0.1:8275
cleanup() { ray stop --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

echo "[job-submit smoke] preparing a small dataset in $work"
melo-dist prepare --source synthetic --synthetic-users 300 --min-item-ratings 10 \
  --test-users 40 --out "$work/data" >/dev/null
ray start --head --port=6390 --dashboard-port=8275 --num-cpus=2 --include-dashboard=true \
  --disable-usage-stats >/dev/null
id=melo-smoke-$$
ray job submit --address "$address" --submission-id "$id" \
  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", ".git", "runs", "data"]}' \
  -- python jobs/train.py --workers 2 --set data.path="$work/data" --set run.out="$work/run" \
  --set model.backbone=gru4rec --set model.dim=8 --set meta.tasks_per_batch=4 \
  --set meta.inner_steps=1 --set optim.iterations=4 --set run.validate_every=2 \
  --set data.valid_users=30 > "$work/job.log" 2>&1 || { tail -n 40 "$work/job.log"; exit 1; }
status=$(ray job status --address "$address" "$id" 2>&1)
echo "$status" | grep -q "Job '$id' succeeded" || { echo "$status"; tail -n 40 "$work/job.log"; exit 1; }
echo "[job-submit smoke] ray job status: SUCCEEDED"
for artifact in best.pt last.pt metrics.jsonl; do
  test -s "$work/run/$artifact" || { echo "missing artifact $artifact"; exit 1; }
done
test "$(tail -n 1 "$work/run/metrics.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["iteration"])')" = 4
echo "[job-submit smoke] ok: job $id succeeded and wrote best.pt, last.pt, metrics.jsonl"

# The sweep entry point as a job: two tiny trials of the smoke space.
ray job submit --address "$address" --submission-id "$id-sweep" \
  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", ".git", "runs", "data"]}' \
  -- python tune/sweep.py --space tune/spaces/smoke.yaml --trials 2 \
  --set data.path="$work/data" --out "$work/sweep" > "$work/sweep.log" 2>&1 \
  || { tail -n 40 "$work/sweep.log"; exit 1; }
for artifact in results.csv best.yaml valid_rmse.png parameters.png; do
  test -s "$work/sweep/$artifact" || { echo "missing sweep output $artifact"; exit 1; }
done
test "$(tail -n +2 "$work/sweep/results.csv" | wc -l)" = 2
echo "[job-submit smoke] ok: sweep job $id-sweep ran 2 trials and wrote its table, best.yaml and plots"
