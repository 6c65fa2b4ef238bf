"""Where a meta-step's time goes: torch profiler over one training meta-step of the ML-1M
recipe in the reference setting (reference head, every parameter adapted), after two warm-up
steps. Prints seconds per step (mean of 6, unprofiled), floating-point work, operator calls,
the matrix products' self time (an estimate of the step's floor were every other operator
free) and the operators with the most self time.

    .venv/bin/python scripts/profile_meta_step.py data/ml1m sasrec --threads 1
    .venv/bin/python scripts/profile_meta_step.py data/ml1m gru4rec --set meta.adapt=head
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.data.sampler import EpochSampler
from melo_dist.meta import meta_step
from melo_dist.training.run import TrainingRun

MATRIX_PRODUCTS = {
    "aten::bmm",
    "aten::mm",
    "aten::addmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::mv",
    "aten::addmv",
    "aten::dot",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("backbone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [
        f"data.path={args.data}",
        f"model.backbone={args.backbone}",
        "model.head=reference",
        "meta.adapt=all",
        "data.valid_users=10",
        *args.set,
    ]
    config = load_config("configs/ml1m-subset.yaml", overrides)
    data = load_dataset(config.data)
    learner = TrainingRun(config, data).learner.train()
    sampler = EpochSampler(data.train, data.spec, 0, config.meta.tasks_per_batch)
    batches = list(itertools.islice(sampler.batches(0), 9))
    for batch in batches[:2]:
        meta_step(learner, batch, 0)
    started = time.perf_counter()
    for batch in batches[2:8]:
        meta_step(learner, batch, 0)
    seconds = (time.perf_counter() - started) / 6
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiled:
        started = time.perf_counter()
        meta_step(learner, batches[8], 0)
        profiled_seconds = time.perf_counter() - started
    events = profiled.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print(
        f"{args.backbone}, {args.threads} thread(s): {seconds:.3f} s a meta-step; "
        f"{sum(e.flops for e in events) / 1e9:.2f} GFLOP; "
        f"{sum(e.count for e in events):,} operator calls"
    )
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS) / 1e6
    print(
        f"  matrix products: {products:.3f} s of the profiled step's {profiled_seconds:.3f} s "
        f"({products / profiled_seconds:.1%}), an estimate of the step's floor were every "
        "other operator free (the profiler's own cost per call inflates the small operators)"
    )
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        share = event.self_cpu_time_total / total
        print(f"  {event.key:32} {share:6.1%}  {event.count:7,} calls")


if __name__ == "__main__":
    main()
