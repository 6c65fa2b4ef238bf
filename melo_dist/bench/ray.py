"""`melo-dist bench ray`: meta-training in-process vs Ray Train, and what scaling out would cost.

The same config (reference sizes: 16 tasks, 25 support windows of 30, 3 second-order steps,
MELO, the shipped head) on the embedded synthetic dataset, run five ways: in-process with 1 and
2 torch threads, one Ray worker with 1 and 2 threads, and two Ray workers of 1 thread. Steady
state only: each run's first measured segment (start-up, first calls) is dropped, and
validation time is not counted (the trainer's own seconds_per_iteration).

Then the scaling model (README "Scaling"): every meta-iteration all-reduces one flat float32
buffer of the learner's gradients, once. Its time on this machine is measured with two local
gloo processes, and the model `t(N) = t_compute / N + t_allreduce` predicts the two-worker
speed-up from the one-worker run, next to the measured one. For a cluster the model is weak
scaling (each worker keeps the one-worker run's 16 tasks, the meta-batch grows with N) over a
ring all-reduce on a 10 Gb/s network: 2 (N - 1) / N x bytes / bandwidth + 2 (N - 1) x latency.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from queue import Empty

import torch

from melo_dist.config import Config
from melo_dist.data.dataset import load_dataset
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.synthetic import SyntheticSpec, generate_ratings
from melo_dist.meta import build_learner
from melo_dist.training.checkpoint import read_metrics
from melo_dist.training.loop import train_local

# name: (JSON key, Ray workers, torch threads a process); 0 workers = in-process. The keys
# inprocess, ray1 and ray2 are kept from earlier versions of this bench.
VARIANTS = {
    "in-process 1 thread": ("inprocess", 0, 1),
    "in-process 2 threads": ("inprocess_2threads", 0, 2),
    "ray 1 worker x 1 thread": ("ray1", 1, 1),
    "ray 1 worker x 2 threads": ("ray1_2threads", 1, 2),
    "ray 2 workers x 1 thread": ("ray2", 2, 1),
}
NETWORK_BYTES_PER_S = 10e9 / 8  # 10 Gb/s
HOP_LATENCY_S = 50e-6  # per ring step
CLUSTER_WORKERS = (8, 64, 512)


def steady_seconds(out: Path) -> float:
    records = read_metrics(out)
    steady = records[1:] or records
    return sum(r["seconds_per_iteration"] for r in steady) / len(steady)


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Mean time of one all-reduce of `numel` float32 between two local gloo processes."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{Path(tmp) / 'store'}"  # a file rendezvous: no port to bind
        ranks = [
            context.Process(target=_allreduce_rank, args=(rank, store, numel, repeats, queue))
            for rank in (0, 1)
        ]
        for process in ranks:
            process.start()
        try:
            seconds = queue.get(timeout=120)
        except Empty:
            codes = [process.exitcode for process in ranks]
            raise RuntimeError(
                f"the two gloo processes did not finish (exit codes {codes})"
            ) from None
        finally:
            for process in ranks:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
    return seconds


def _allreduce_rank(rank: int, store: str, numel: int, repeats: int, queue: mp.Queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    flat = torch.ones(numel)
    dist.all_reduce(flat)  # first call sets up the connection
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(flat)
    if rank == 0:
        queue.put((time.perf_counter() - started) / repeats)
    dist.destroy_process_group()


def ring_allreduce_seconds(num_bytes: int, workers: int) -> float:
    steps = 2 * (workers - 1)
    return steps / workers * num_bytes / NETWORK_BYTES_PER_S + steps * HOP_LATENCY_S


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench ray")
    parser.add_argument("--backbone", default="sasrec")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--segment", type=int, default=10, help="iterations per measurement")
    parser.add_argument(
        "--catalogue",
        type=int,
        default=1_000_000,
        help="items of a large catalogue for the scaling model (its item tables' gradients are "
        "all-reduced dense; a task's compute does not depend on the catalogue)",
    )
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

        def config(name: str, threads: int) -> Config:
            c = Config()
            c.data.path, c.data.valid_users = str(data), 64
            c.model.backbone = args.backbone
            c.optim.iterations, c.run.validate_every = args.iterations, args.segment
            c.meta.multi_step_iterations = args.iterations - 1  # on, as in early training
            c.run.out, c.run.threads = str(Path(tmp) / name), threads
            return c.validate()

        seconds = {}
        for name, (key, workers, threads) in VARIANTS.items():
            if not workers:
                train_local(config(key, threads), log=lambda message: None)
                seconds[name] = steady_seconds(Path(tmp) / key)
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 workers + data
        try:
            for name, (key, workers, threads) in VARIANTS.items():
                if workers:
                    fit(config(key, threads), workers, cpus_per_worker=float(threads))
                    seconds[name] = steady_seconds(Path(tmp) / key)
        finally:
            ray.shutdown()
        sized = config("size", 1)
        dataset = load_dataset(sized.data)

    def gradient_floats(items: int) -> int:
        learner = build_learner(sized, items, dataset.levels)
        return sum(p.numel() for p in learner.parameters() if p.requires_grad) + 1  # + loss

    numel = gradient_floats(dataset.num_items)
    allreduce = allreduce_seconds(numel)
    one_worker = seconds["ray 1 worker x 1 thread"]
    predicted_two = one_worker / (one_worker / 2 + allreduce)

    tasks = Config().meta.tasks_per_batch
    rate = {name: tasks / s for name, s in seconds.items()}
    table = [
        (name, f"{seconds[name]:.3f} s/iteration  {rate[name]:6.2f} tasks/s") for name in seconds
    ]
    figures = {f"tasks_per_s_{VARIANTS[name][0]}": round(rate[name], 3) for name in seconds}
    figures |= {
        "ray1_vs_inprocess": round(
            rate["ray 1 worker x 1 thread"] / rate["in-process 1 thread"], 3
        ),
        "ray2_vs_ray1": round(
            rate["ray 2 workers x 1 thread"] / rate["ray 1 worker x 1 thread"], 3
        ),
        "fastest_on_this_machine": max(rate, key=rate.get),
        "allreduce_mib": round(numel * 4 / 2**20, 3),
        "allreduce_ms_local": round(allreduce * 1e3, 3),
        "predicted_ray2_vs_ray1": round(predicted_two, 3),
    }
    table += [
        ("ray 1 worker / in-process (1 thread)", f"{figures['ray1_vs_inprocess']:.2f}x"),
        ("fastest here", figures["fastest_on_this_machine"]),
        (
            "all-reduce per iteration",
            f"{numel:,} floats = {figures['allreduce_mib']:.2f} MiB, "
            f"{figures['allreduce_ms_local']:.2f} ms between 2 local processes",
        ),
        (
            "2 workers / 1 worker",
            f"measured {figures['ray2_vs_ray1']:.2f}x, model {predicted_two:.2f}x",
        ),
    ]
    large = gradient_floats(args.catalogue)
    figures["allreduce_mib_catalogue"] = round(large * 4 / 2**20, 1)
    for label, floats, suffix in (
        (f"{dataset.num_items:,} items", numel, ""),
        (f"{args.catalogue:,} items", large, "_catalogue"),
    ):
        for workers in CLUSTER_WORKERS:
            network = ring_allreduce_seconds(floats * 4, workers)
            efficiency = one_worker / (one_worker + network)
            figures[f"predicted_efficiency_{workers}{suffix}"] = round(efficiency, 4)
            table.append(
                (
                    f"{workers} workers, 10 Gb/s, {label} (model)",
                    f"all-reduce {network * 1e3:.1f} ms vs {one_worker * 1e3:.0f} ms compute: "
                    f"{efficiency:.1%} efficiency, "
                    f"{workers * tasks / (one_worker + network):,.0f} tasks/s",
                )
            )
    title = (
        f"bench ray: {args.backbone}, {tasks} tasks/iteration, "
        f"mean s/iteration after the first {args.segment}"
    )
    return title, table, figures
