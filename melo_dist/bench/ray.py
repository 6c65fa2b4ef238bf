"""`melo-dist bench ray`: meta-training tasks/s in-process vs Ray Train with 1 and 2 workers.

The same config (reference sizes: 16 tasks, 25 support windows of 30, 3 second-order steps,
MELO) on the embedded synthetic dataset, one torch thread per worker and in-process, so the
ratios show what the Ray layer costs and what a second worker buys. Steady state only: each
run's first measured segment (start-up, first calls) is dropped, and validation time is not
counted (the trainer's own seconds_per_iteration).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from melo_dist.config import Config
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.synthetic import SyntheticSpec, generate_ratings
from melo_dist.training.checkpoint import read_metrics
from melo_dist.training.loop import train_local


def steady_seconds(out: Path) -> float:
    records = read_metrics(out)
    steady = records[1:] or records
    return sum(r["seconds_per_iteration"] for r in steady) / len(steady)


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench ray")
    parser.add_argument("--backbone", default="sasrec")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--segment", type=int, default=10, help="iterations per measurement")
    args = parser.parse_args(options)

    import ray

    from melo_dist.distributed.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            generate_ratings(SyntheticSpec()),
            data,
            PrepareSettings(min_item_ratings=20, test_users=400),
            {"family": "synthetic"},
        )

        def config(name: str) -> Config:
            c = Config()
            c.data.path, c.data.valid_users = str(data), 64
            c.model.backbone = args.backbone
            c.optim.iterations, c.run.validate_every = args.iterations, args.segment
            c.run.out, c.run.threads = str(Path(tmp) / name), 1
            return c.validate()

        seconds = {"in-process": None, "ray 1 worker": None, "ray 2 workers": None}
        train_local(config("local"), log=lambda message: None)
        seconds["in-process"] = steady_seconds(Path(tmp) / "local")
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 workers + data
        try:
            for workers, name in ((1, "ray 1 worker"), (2, "ray 2 workers")):
                fit(config(f"ray{workers}"), workers, cpus_per_worker=1.0)
                seconds[name] = steady_seconds(Path(tmp) / f"ray{workers}")
        finally:
            ray.shutdown()
    tasks = Config().meta.tasks_per_batch
    rate = {name: tasks / s for name, s in seconds.items()}
    table = [
        (name, f"{seconds[name]:.3f} s/iteration  {rate[name]:6.2f} tasks/s") for name in seconds
    ]
    figures = {
        "tasks_per_s_inprocess": round(rate["in-process"], 3),
        "tasks_per_s_ray1": round(rate["ray 1 worker"], 3),
        "tasks_per_s_ray2": round(rate["ray 2 workers"], 3),
        "ray1_vs_inprocess": round(rate["ray 1 worker"] / rate["in-process"], 3),
        "ray2_vs_ray1": round(rate["ray 2 workers"] / rate["ray 1 worker"], 3),
    }
    table += [
        ("ray 1 worker / in-process", f"{figures['ray1_vs_inprocess']:.2f}x"),
        ("ray 2 workers / 1 worker", f"{figures['ray2_vs_ray1']:.2f}x"),
    ]
    title = (
        f"bench ray: {args.backbone}, {tasks} tasks/iteration, 1 thread per worker, "
        f"mean s/iteration after the first {args.segment}"
    )
    return title, table, figures
