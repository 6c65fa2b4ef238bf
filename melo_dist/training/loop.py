"""The meta-training loop: the same function trains in-process and on every Ray worker.

    for batch in batches:                    # local: a seeded sampler; Ray: the worker's shard
        loss, grads = run.gradients(batch)   # the meta-step (melo_dist.meta.melo)
        grads, loss = reduce(grads, loss)    # local: as is; Ray: averaged across workers
        run.apply(grads, loss)               # optimiser steps
        every run.validate_every: save(...)  # validate + checkpoint (Ray: rank 0, then report)
        if stop(): save(...) and return      # in-process: Ctrl-C, SIGTERM, --max-minutes

`train_local` is the in-process caller; `melo_dist.distributed.train` is the Ray one.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from melo_dist.config import Config
from melo_dist.console import format_progress
from melo_dist.data.dataset import load_dataset
from melo_dist.data.sampler import EpochSampler
from melo_dist.data.tasks import TaskBatch
from melo_dist.runtime import log as log_to_stderr
from melo_dist.runtime import prepare_process
from melo_dist.storage import checked_out, publish
from melo_dist.training.checkpoint import (
    agree_with_checkpoint,
    best_record,
    resumable_state,
    write_config,
)
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
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[dict], None] | None = None,
) -> None:
    """Meta-train `run` until optim.iterations, or until `stop()` says so after an iteration
    (then its checkpoint is written first). `save(losses, seconds)` validates and writes a
    checkpoint (returning its record, or None on ranks that do not write); `seconds` is the
    training time since the last checkpoint, validation excluded. Every run.log_every
    iterations and at every checkpoint, `progress` gets an event (iteration, total, loss,
    seconds_per_iteration, and the validation record's fields at a checkpoint); without it,
    `log` gets the event as a line."""
    total, log_every = run.config.optim.iterations, run.config.run.log_every
    show = progress or (lambda event: log(format_progress(event)))
    losses, started = [], time.perf_counter()
    if run.iteration >= total:
        return

    def checkpoint() -> None:
        record = save(losses, time.perf_counter() - started)
        if record is not None:
            show({"event": "validation", "total": total, **record})

    try:
        for batch in batches:
            loss, grads = run.gradients(batch)
            grads, loss = reduce(grads, loss)
            run.apply(grads, loss)
            losses.append(loss)
            if run.at_checkpoint():
                checkpoint()
                losses, started = [], time.perf_counter()
            elif run.iteration % log_every == 0:
                show(
                    {
                        "event": "iteration",
                        "iteration": run.iteration,
                        "total": total,
                        "loss": float(np.mean(losses[-log_every:])),
                        "seconds_per_iteration": (time.perf_counter() - started) / len(losses),
                    }
                )
            if run.iteration >= total:
                return
            if stop():
                if losses:  # not just written at a checkpoint
                    checkpoint()
                return
    finally:
        run.close()


class Interrupted(Exception):
    """Training stopped on a signal after writing the checkpoint of its last iteration."""

    def __init__(self, signum: int, iteration: int, out: str | Path) -> None:
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at iteration {iteration}, checkpoint "
            f"written to {out}; run the same command again to resume"
        )


class StopRequest:
    """Asks the loop to stop after the current iteration: on the first SIGINT or SIGTERM (a
    second one aborts at once), or once `max_minutes` of wall time have passed."""

    def __init__(self, max_minutes: float | None = None) -> None:
        self.max_minutes = max_minutes
        self.deadline = None if not max_minutes else time.monotonic() + 60 * max_minutes
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None or (
            self.deadline is not None and time.monotonic() >= self.deadline
        )

    def conclude(
        self, iteration: int, total: int, out: str | Path, log: Callable[[str], None]
    ) -> None:
        """After training: a signal raises `Interrupted`; a stop on the budget is logged."""
        if self.signum is not None:
            raise Interrupted(self.signum, iteration, out)
        if iteration < total:
            log(f"stopped at iteration {iteration}: --max-minutes {self.max_minutes} reached")

    @contextmanager
    def signals(self) -> Iterator[None]:
        def request(signum: int, frame) -> None:
            if self.signum is not None:
                raise KeyboardInterrupt  # asked twice: stop now
            self.signum = signum

        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train_local(
    config: Config,
    log: Callable[[str], None] = log_to_stderr,
    max_minutes: float | None = None,
    progress: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Meta-train in this process, on `device`, into config.run.out (resuming the run there);
    returns the best validation record. SIGINT/SIGTERM (in the main thread) and `max_minutes`
    stop it after the current iteration with its checkpoint written; a signal then raises
    `Interrupted`. `log` and `progress`: as `train` takes them."""
    config.check_training()
    prepare_process(config.run.threads)
    data = load_dataset(config.data)
    run = TrainingRun(config, data, device=device)
    out = checked_out(config.run.out)  # a URI: its files in a local working copy
    state = resumable_state(config.run.out, config.to_dict())
    if state is not None:
        run.load_state_dict(state)
        log(f"resuming {config.run.out} at iteration {run.iteration}")
    agree_with_checkpoint(out, state)
    sampler = EpochSampler(data.train, data.spec, config.run.seed, config.meta.tasks_per_batch)
    write_config(out, config.to_dict())
    stop = StopRequest(max_minutes)

    def save(losses: list[float], seconds: float) -> dict:
        record = run.checkpoint(out, losses, seconds)
        publish(config.run.out, log)
        return record

    main_thread = threading.current_thread() is threading.main_thread()
    with stop.signals() if main_thread else nullcontext():
        train(
            run,
            sampler.batches(run.iteration),
            save=save,
            log=log,
            stop=stop,
            progress=progress,
        )
    publish(config.run.out)  # with the TensorBoard events written out at the end
    stop.conclude(run.iteration, config.optim.iterations, config.run.out, log)
    return best_record(out)
