#!/usr/bin/env bash
# The GPU check of issue 10: training on a GPU equals training on the CPU (tests/test_gpu.py),
# then `melo-dist bench train --use-gpu` on a prepared dataset (default settings), at the
# reference's 16 tasks a meta-iteration and at larger meta-batches, beside the machine's CPU.
#
#   bash scripts/gpu_check.sh DATA [OUT]
#
# Made for a GPU machine whose python3 already holds torch with CUDA, pandas, pyarrow, numpy,
# pyyaml and pytest, but not melo-dist (it runs from this checkout) nor Ray: nothing here
# needs Ray. Wheels in .whl/ (tensorboardX) are installed into a scratch folder first.
# Each step's output goes to OUT (default /tmp/gpu-check); a failing step does not stop
# the later ones, and the script exits non-zero if any failed.
set -uo pipefail
data=${1:?usage: bash scripts/gpu_check.sh DATA [OUT]}
out=${2:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/melo-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/melo-site"
fi
failed=0
step() {  # step NAME COMMAND...: run, keep its output in OUT/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt" || { failed=1; echo "== $name FAILED"; }
}
melo() { python3 -c 'import sys; from melo_dist.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

step machine bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import torch; print(\"torch\", torch.__version__, torch.cuda.get_device_name())";
    nproc'
step tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step bench-gpu-16 melo bench train --data "$data" --use-gpu --backbones sasrec,gru4rec,narm,bert4rec \
    --warmup 3 --iterations 10
for tasks in 64 256; do
    step "bench-gpu-$tasks" melo bench train --data "$data" --use-gpu --backbones sasrec,gru4rec \
        --warmup 2 --iterations 5 --set "meta.tasks_per_batch=$tasks"
done
step bench-cpu-16 melo bench train --data "$data" --backbones sasrec,gru4rec --threads "$(nproc)" \
    --warmup 2 --iterations 5
exit $failed
