"""`melo-dist bench meta-step`: batched meta-step vs the per-task loop, reference sizes.

16 tasks, up to 25 support windows of 30, 3 second-order inner steps, MELO loss, for SASRec and
GRU4Rec. Each variant runs in its own spawned process, so its peak memory (max RSS) is its own
and the two never share caches; they run one after the other in the same invocation.
"""

from __future__ import annotations

import argparse
import time

import torch

from melo_dist.bench import in_fresh_process
from melo_dist.config import Config
from melo_dist.data.synthetic import random_task_rows
from melo_dist.data.tasks import WindowSpec, sample_tasks
from melo_dist.meta import build_learner
from melo_dist.meta.melo import meta_step
from melo_dist.meta.reference import reference_meta_step
from melo_dist.runtime import prepare_process


def reference_batch(tasks: int, items: int, seed: int = 0):
    """Tasks with 30+ interactions each, so every task has 25 support and 3 query windows."""
    rows = random_task_rows(tasks, items, (30, 120), seed)
    return sample_tasks(rows, WindowSpec(), seed=seed, train=True)


def measure(
    backbone: str, variant: str, repeats: int, threads: int, tasks: int, items: int, multi: int
) -> float:
    """Seconds per meta-step of one variant (batched or the per-task loop)."""
    prepare_process(threads)
    config = Config()
    config.model.backbone, config.meta.regime = backbone, "melo"
    config.meta.multi_step_iterations = multi
    torch.manual_seed(0)
    learner = build_learner(config, items, [1.0, 2.0, 3.0, 4.0, 5.0])
    batch = reference_batch(tasks, items)
    step = meta_step if variant == "batched" else reference_meta_step
    step(learner, batch, 0)  # warm-up: first-call overheads are not steady-state speed
    started = time.perf_counter()
    for iteration in range(repeats):
        step(learner, batch, iteration + 1)
    return (time.perf_counter() - started) / repeats


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench meta-step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--items", type=int, default=3000, help="catalogue size")
    parser.add_argument("--backbones", default="sasrec,gru4rec")
    parser.add_argument(
        "--multi-step", default="on", choices=("on", "off"), help="the MAML++ multi-step phase"
    )
    parser.add_argument(
        "--loop", default="on", choices=("on", "off"), help="also time the per-task loop"
    )
    args = parser.parse_args(options)
    multi = 1000 if args.multi_step == "on" else 0  # on: the reference's first 1000 iterations
    table, figures = [], {"threads": args.threads, "tasks": args.tasks}
    for backbone in args.backbones.split(","):
        results = {}
        for variant in ("batched", "loop") if args.loop == "on" else ("batched",):
            results[variant] = in_fresh_process(
                measure,
                *(backbone, variant, args.repeats, args.threads, args.tasks, args.items, multi),
            )
            seconds, peak = results[variant]
            table.append(
                (
                    f"{backbone} {variant}",
                    f"{seconds:.3f} s/step  {args.tasks / seconds:6.2f} tasks/s  "
                    f"peak {peak:,.0f} MiB",
                )
            )
        figures.update(
            {
                f"tasks_per_s_batched_{backbone}": round(args.tasks / results["batched"][0], 3),
                f"peak_mib_batched_{backbone}": round(results["batched"][1]),
            }
        )
        if "loop" in results:
            speedup = results["loop"][0] / results["batched"][0]
            table.append((f"{backbone} speedup", f"{speedup:.2f}x"))
            figures.update(
                {
                    f"speedup_{backbone}": round(speedup, 3),
                    f"tasks_per_s_loop_{backbone}": round(args.tasks / results["loop"][0], 3),
                    f"peak_mib_loop_{backbone}": round(results["loop"][1]),
                }
            )
    title = (
        f"bench meta-step: {args.tasks} tasks, 25x30 support, 3 second-order steps, MELO, "
        f"multi-step phase {args.multi_step}, {args.threads} thread(s), {args.items:,} items, "
        f"mean of {args.repeats} steps"
    )
    return title, table, figures
