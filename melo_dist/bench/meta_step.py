"""`melo-dist bench meta-step`: batched meta-step vs the per-task loop, reference sizes.

16 tasks, up to 25 support windows of 30, 3 second-order inner steps, MELO loss, for SASRec and
GRU4Rec. Each variant runs in its own spawned process, so its peak memory (max RSS) is its own
and the two never share caches; they run one after the other in the same invocation.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from melo_dist.config import Config
from melo_dist.data.synthetic import random_task_rows
from melo_dist.data.tasks import WindowSpec, sample_tasks
from melo_dist.errors import InputError
from melo_dist.meta import build_learner
from melo_dist.meta.step import meta_step

ORACLE = Path(__file__).resolve().parents[2] / "tests" / "oracle.py"


def load_oracle():
    """The per-task loop lives with the tests (it is their oracle); load it from the checkout."""
    if not ORACLE.is_file():
        raise InputError("the per-task oracle is only in a source checkout", path=ORACLE)
    spec = importlib.util.spec_from_file_location("melo_oracle", ORACLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.oracle_meta_step


def reference_batch(tasks: int, items: int, seed: int = 0):
    """Tasks with 30+ interactions each, so every task has 25 support and 3 query windows."""
    rows = random_task_rows(tasks, items, (30, 120), seed)
    return sample_tasks(rows, WindowSpec(), seed=seed, train=True)


def measure(
    backbone: str, variant: str, repeats: int, threads: int, tasks: int, items: int, queue: mp.Queue
) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    config = Config()
    config.model.backbone, config.meta.regime = backbone, "melo"
    torch.manual_seed(0)
    learner = build_learner(config, items, [1.0, 2.0, 3.0, 4.0, 5.0])
    batch = reference_batch(tasks, items)
    step = meta_step if variant == "batched" else load_oracle()
    step(learner, batch, 0)  # warm-up: first-call overheads are not steady-state speed
    started = time.perf_counter()
    for iteration in range(repeats):
        step(learner, batch, iteration + 1)
    seconds = (time.perf_counter() - started) / repeats
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak_mib))


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench meta-step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--items", type=int, default=3000, help="catalogue size")
    parser.add_argument("--backbones", default="sasrec,gru4rec")
    args = parser.parse_args(options)
    context = mp.get_context("spawn")
    table, figures = [], {"threads": args.threads, "tasks": args.tasks}
    for backbone in args.backbones.split(","):
        results = {}
        for variant in ("batched", "loop"):
            queue = context.Queue()
            worker = context.Process(
                target=measure,
                args=(backbone, variant, args.repeats, args.threads, args.tasks, args.items, queue),
            )
            worker.start()
            results[variant] = queue.get()
            worker.join()
            seconds, peak = results[variant]
            table.append(
                (
                    f"{backbone} {variant}",
                    f"{seconds:.3f} s/step  {args.tasks / seconds:6.2f} tasks/s  "
                    f"peak {peak:,.0f} MiB",
                )
            )
        speedup = results["loop"][0] / results["batched"][0]
        table.append((f"{backbone} speedup", f"{speedup:.2f}x"))
        figures.update(
            {
                f"speedup_{backbone}": round(speedup, 3),
                f"tasks_per_s_batched_{backbone}": round(args.tasks / results["batched"][0], 3),
                f"tasks_per_s_loop_{backbone}": round(args.tasks / results["loop"][0], 3),
                f"peak_mib_batched_{backbone}": round(results["batched"][1]),
                f"peak_mib_loop_{backbone}": round(results["loop"][1]),
            }
        )
    title = (
        f"bench meta-step: {args.tasks} tasks, 25x30 support, 3 second-order steps, MELO, "
        f"{args.threads} thread(s), mean of {args.repeats} steps"
    )
    return title, table, figures
