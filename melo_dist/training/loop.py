"""The meta-training loop: the same function trains in-process and on every Ray worker.

    for batch in batches:                    # local: a seeded sampler; Ray: the worker's shard
        loss, grads = run.gradients(batch)   # the meta-step (melo_dist.meta.melo)
        grads, loss = reduce(grads, loss)    # local: as is; Ray: averaged across workers
        run.apply(grads, loss)               # optimiser steps
        every run.validate_every: save(...)  # validate + checkpoint (Ray: rank 0, then report)

`train_local` is the in-process caller; `melo_dist.distributed.train` is the Ray one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from melo_dist.config import Config
from melo_dist.data.dataset import load_dataset
from melo_dist.data.sampler import EpochSampler
from melo_dist.data.tasks import TaskBatch
from melo_dist.runtime import log as log_to_stderr
from melo_dist.runtime import prepare_process
from melo_dist.training.checkpoint import best_record, keep_metrics_until, resumable_state
from melo_dist.training.run import TrainingRun

Gradients = dict[str, torch.Tensor]
Reduce = Callable[[Gradients, torch.Tensor], tuple[Gradients, float]]
Save = Callable[[list[float], float], dict | None]


def as_is(grads: Gradients, loss: torch.Tensor) -> tuple[Gradients, float]:
    return grads, float(loss)


def train(
    run: TrainingRun,
    batches: Iterable[TaskBatch],
    save: Save,
    reduce: Reduce = as_is,
    log: Callable[[str], None] = log_to_stderr,
) -> None:
    """Meta-train `run` until optim.iterations. `save(losses, seconds)` validates and writes a
    checkpoint (returning its record, or None on ranks that do not write); `seconds` is the
    training time since the last checkpoint, validation excluded."""
    total, log_every = run.config.optim.iterations, run.config.run.log_every
    losses, started = [], time.perf_counter()
    if run.iteration >= total:
        return
    for batch in batches:
        loss, grads = run.gradients(batch)
        grads, loss = reduce(grads, loss)
        run.apply(grads, loss)
        losses.append(loss)
        if run.at_checkpoint():
            record = save(losses, time.perf_counter() - started)
            if record is not None:
                log(format_record(record, total))
            losses, started = [], time.perf_counter()
        elif run.iteration % log_every == 0:
            log(f"iter {run.iteration}/{total} loss {np.mean(losses[-log_every:]):.4f}")
        if run.iteration >= total:
            return


def format_record(record: dict, total: int) -> str:
    return (
        f"iter {record['iteration']}/{total} loss {record['loss']:.4f} "
        f"valid RMSE {record['valid_rmse']:.4f} MAE {record['valid_mae']:.4f} "
        f"(best {record['best_valid_rmse']:.4f}) {record['seconds_per_iteration']:.2f} s/it"
    )


def train_local(config: Config, log: Callable[[str], None] = log_to_stderr) -> dict:
    """Meta-train in this process into config.run.out (resuming the run there); returns the
    best validation record."""
    prepare_process(config.run.threads)
    data = load_dataset(config.data)
    run = TrainingRun(config, data)
    out = Path(config.run.out)
    state = resumable_state(out, config.to_dict())
    if state is not None:
        run.load_state_dict(state)
        keep_metrics_until(out, run.iteration)
        log(f"resuming {out} at iteration {run.iteration}")
    sampler = EpochSampler(data.train, data.spec, config.run.seed, config.meta.tasks_per_batch)
    out.mkdir(parents=True, exist_ok=True)
    train(
        run,
        sampler.batches(run.iteration),
        save=lambda losses, seconds: run.checkpoint(out, losses, seconds),
        log=log,
    )
    return best_record(out)
