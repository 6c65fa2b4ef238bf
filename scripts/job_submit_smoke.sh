#!/usr/bin/env bash
# `ray job submit` for real: start a local head, submit a short 2-worker training job and a
# 2-trial sweep job, wait for SUCCEEDED, check the artifacts, stop the head. Run by `make test`
# before pytest. A shared machine may run other Ray clusters: this head gets its own temp dir
# and free ports, and only its own processes are stopped (never `ray stop`, which stops all).
# Token authentication stays on: a fresh token, the same on the head and the job CLI; requests
# without it, or with another token, are shown to be refused.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
export PATH=$BIN:$PATH  # the job's `python` is the project's environment
work=$(mktemp -d)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$work/auth_token
python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH"
read -r gcs_port dashboard_port agent_port agent_grpc_port metrics_port runtime_env_port \
  client_port < <(python -c '
import socket
sockets = [socket.socket() for _ in range(7)]
for s in sockets:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in sockets))')
address=http://127.0.0.1:$dashboard_port
cleanup() {  # this head's processes, and its jobs' entry points, name the work folder
  pkill -TERM -f "$work/" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do pgrep -f "$work/" >/dev/null || break; sleep 1; done
  pkill -KILL -f "$work/" 2>/dev/null || true
  rm -rf "$work"
}
# A job normally finishes in about a minute; one that hangs (a starved machine) fails the
# smoke test after this long, with its log, instead of holding the test run forever.
job_timeout=${SMOKE_JOB_TIMEOUT:-900}
submit() {  # submit LOG ARGS...: `ray job submit ARGS` within job_timeout, its log on failure
  local log=$1 code=0
  shift
  timeout "$job_timeout" ray job submit "$@" > "$log" 2>&1 || code=$?
  if [ "$code" -ne 0 ]; then
    [ "$code" -eq 124 ] && echo "[job-submit smoke] the job did not finish in ${job_timeout} s"
    tail -n 40 "$log"
    exit 1
  fi
}
trap cleanup EXIT

echo "[job-submit smoke] preparing a small dataset in $work"
melo-dist prepare --source synthetic --synthetic-users 300 --min-item-ratings 10 \
  --test-users 40 --out "$work/data" >/dev/null
ray start --head --port="$gcs_port" --dashboard-port="$dashboard_port" --num-cpus=2 \
  --dashboard-agent-listen-port="$agent_port" --dashboard-agent-grpc-port="$agent_grpc_port" \
  --metrics-export-port="$metrics_port" --runtime-env-agent-port="$runtime_env_port" \
  --ray-client-server-port="$client_port" --include-dashboard=true --temp-dir="$work/ray" \
  --disable-usage-stats >/dev/null
for _ in $(seq 60); do  # the job agent starts a little after the head
  ray job list --address "$address" >/dev/null 2>&1 && break
  sleep 1
done
# Token auth is on: the job API refuses a request without the token, and one with another.
python - "$address" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"{sys.argv[1]}/api/jobs/", timeout=30)
    sys.exit("[job-submit smoke] the job API answered a request without the token")
except urllib.error.HTTPError as error:
    assert error.code in (401, 403), error.code
PY
python -c 'import secrets; print(secrets.token_hex(32))' > "$work/other_token"
if RAY_AUTH_TOKEN_PATH=$work/other_token ray job list --address "$address" >/dev/null 2>&1; then
  echo "[job-submit smoke] the job API accepted another token"; exit 1
fi
echo "[job-submit smoke] ok: requests without the token or with another one are refused"
id=melo-smoke-$$
submit "$work/job.log" --address "$address" --submission-id "$id" \
  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", ".git", "runs", "data"]}' \
  -- python jobs/train.py --workers 2 --set data.path="$work/data" --set run.out="$work/run" \
  --set model.backbone=gru4rec --set model.dim=8 --set meta.tasks_per_batch=4 \
  --set meta.inner_steps=1 --set optim.iterations=4 --set meta.multi_step_iterations=2 \
  --set run.validate_every=2 \
  --set data.valid_users=30
status=$(ray job status --address "$address" "$id" 2>&1)
echo "$status" | grep -q "Job '$id' succeeded" || { echo "$status"; tail -n 40 "$work/job.log"; exit 1; }
echo "[job-submit smoke] ray job status: SUCCEEDED"
for artifact in best.pt last.pt metrics.jsonl; do
  test -s "$work/run/$artifact" || { echo "missing artifact $artifact"; exit 1; }
done
test "$(tail -n 1 "$work/run/metrics.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["iteration"])')" = 4
echo "[job-submit smoke] ok: job $id succeeded and wrote best.pt, last.pt, metrics.jsonl"

# The sweep entry point as a job: two tiny trials of the smoke space.
submit "$work/sweep.log" --address "$address" --submission-id "$id-sweep" \
  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", ".git", "runs", "data"]}' \
  -- python tune/sweep.py --space tune/spaces/smoke.yaml --trials 2 \
  --set data.path="$work/data" --out "$work/sweep"
for artifact in results.csv best.yaml valid_rmse.png parameters.png; do
  test -s "$work/sweep/$artifact" || { echo "missing sweep output $artifact"; exit 1; }
done
test "$(tail -n +2 "$work/sweep/results.csv" | wc -l)" = 2
echo "[job-submit smoke] ok: sweep job $id-sweep ran 2 trials and wrote its table, best.yaml and plots"
