"""`melo-dist bench train`: seconds per meta-iteration of real training, as users run it.

Each (backbone, regime) runs the training loop itself (`melo_dist.training.loop.train`):
sampling and window cutting, the meta-step with the configured MAML++ multi-step phase,
optimiser steps — everything but validation and checkpoint writing. Reference sizes (16 tasks,
up to 25 support windows of 30, 3 second-order steps) unless the config says otherwise, on a
prepared dataset (`--data`) or the embedded synthetic default. Each variant runs in its own
spawned process, so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from melo_dist.bench import in_fresh_process
from melo_dist.config import load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.sampler import EpochSampler
from melo_dist.data.synthetic import SyntheticSpec, generate_ratings
from melo_dist.runtime import prepare_process, training_device
from melo_dist.training.loop import train
from melo_dist.training.run import TrainingRun


def measure(
    overrides: list[str], warmup: int, iterations: int, use_gpu: bool
) -> tuple[float, float | None]:
    """(seconds per training iteration after `warmup` iterations (first calls are slower),
    the GPU's peak allocated MiB or None on the CPU). The loop reads each iteration's loss,
    which waits for the GPU, so the clock sees its work."""
    config = load_config(None, overrides)
    prepare_process(config.run.threads)
    data = load_dataset(config.data)
    run = TrainingRun(config, data, device=training_device(use_gpu))
    sampler = EpochSampler(data.train, data.spec, config.run.seed, config.meta.tasks_per_batch)
    stamps = []

    def timed(batches):
        for batch in batches:
            stamps.append(time.perf_counter())
            yield batch
        stamps.append(time.perf_counter())

    batches = itertools.islice(sampler.batches(0), warmup + iterations)
    train(run, timed(batches), save=lambda losses, seconds: None, log=lambda message: None)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if use_gpu else None
    return (stamps[-1] - stamps[warmup]) / iterations, gpu_peak


def embedded_default(folder: Path) -> Path:
    out = folder / "synthetic"
    settings = PrepareSettings(min_item_ratings=20, test_users=400)
    prepare(generate_ratings(SyntheticSpec()), out, settings, {"family": "synthetic"})
    return out


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench train")
    parser.add_argument("--data", help="prepared dataset (default: the embedded synthetic one)")
    parser.add_argument("--backbones", default="sasrec,gru4rec")
    parser.add_argument("--regimes", default="melo")
    parser.add_argument("--iterations", type=int, default=10, help="timed meta-iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--multi-step", default="on", choices=("on", "off"), help="the MAML++ multi-step phase"
    )
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--use-gpu", action="store_true", help="train on the GPU")
    args = parser.parse_args(options)
    device = training_device(args.use_gpu).type  # no GPU: say so before preparing anything
    table = []
    figures = {"threads": args.threads, "multi_step": args.multi_step, "device": device}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(embedded_default(Path(tmp)))
        for backbone, regime in itertools.product(
            args.backbones.split(","), args.regimes.split(",")
        ):
            overrides = [
                f"data.path={data}",
                f"model.backbone={backbone}",
                f"meta.regime={regime}",
                f"run.threads={args.threads}",
                f"run.out={Path(tmp) / 'unused'}",
                # on: iterations 0..N lie inside the reference's 1000-iteration phase
                f"meta.multi_step_iterations={1000 if args.multi_step == 'on' else 0}",
                *args.set,
            ]
            (seconds, gpu_peak), peak = in_fresh_process(
                measure, overrides, args.warmup, args.iterations, args.use_gpu
            )
            tasks = load_config(None, overrides).meta.tasks_per_batch
            name = f"{backbone}_{regime}"
            gpu = "" if gpu_peak is None else f"  GPU peak {gpu_peak:,.0f} MiB"
            table.append(
                (
                    f"{backbone} {regime}",
                    f"{seconds:.3f} s/iteration  {tasks / seconds:6.2f} users/s  "
                    f"peak {peak:,.0f} MiB{gpu}",
                )
            )
            figures.update(
                {
                    f"s_per_iteration_{name}": round(seconds, 4),
                    f"users_per_s_{name}": round(tasks / seconds, 3),
                    f"peak_mib_{name}": round(peak),
                }
            )
            if gpu_peak is not None:
                figures[f"gpu_peak_mib_{name}"] = round(gpu_peak)
    title = (
        f"bench train: {args.iterations} meta-iterations after {args.warmup} warm-up, "
        f"{args.threads} thread(s), {device}, multi-step phase {args.multi_step}, no validation; "
        f"data {args.data or 'embedded synthetic default'}"
    )
    return title, table, figures
