"""Local meta-training: build from config -> one explicit loop -> validate, checkpoint, resume.

`TrainingRun` owns the learner, its three optimisers (recommender: Adam + cosine decay and
grad-norm clipping; weight net: Adam + cosine decay; inner learning rates: Adam), the task
sampler's RNG and the iteration. Its `gradients` / `apply` halves are what a Ray worker calls
around its all-reduce; `train_local` is the in-process loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from melo_dist.config import Config
from melo_dist.data.prepare import load_manifest
from melo_dist.data.tasks import TaskBatch, TaskRows, WindowSpec, sample_tasks
from melo_dist.errors import InputError
from melo_dist.meta import build_learner
from melo_dist.meta.step import meta_step
from melo_dist.training.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    manifest_hash,
    save_checkpoint,
)
from melo_dist.training.evaluate import collect_targets, eval_batches, evaluate_learner

GROUPS = ("backbone", "weight_net", "inner_lrs")  # one optimiser each, by parameter prefix
METRICS = "metrics.jsonl"


@dataclass
class Dataset:
    path: Path
    manifest: dict
    spec: WindowSpec
    train: TaskRows | None  # None on Ray workers: their training users come from Ray Data
    valid: TaskRows

    @property
    def num_items(self) -> int:
        return self.manifest["vocab_size"] - 1

    @property
    def levels(self) -> list[float]:
        return self.manifest["rating_levels"]


def load_dataset(config: Config, with_train: bool = True) -> Dataset:
    path = Path(config.data.path)
    manifest = load_manifest(path)
    valid = TaskRows.from_parquet(str(path / "tasks-valid.parquet"))
    if config.data.valid_users and len(valid) > config.data.valid_users:
        valid = valid.take(np.arange(config.data.valid_users))
    spec = WindowSpec(config.data.window, config.data.support, config.data.query)
    train = TaskRows.from_parquet(str(path / "tasks-train.parquet")) if with_train else None
    return Dataset(path, manifest, spec, train, valid)


def cosine(optimizer: torch.optim.Optimizer, iterations: int, floor: float):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=floor)


class TrainingRun:
    def __init__(
        self, config: Config, data: Dataset, rank: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        self.config, self.data, self.rank, self.device = config, data, rank, torch.device(device)
        torch.manual_seed(config.run.seed)
        self.learner = build_learner(config, data.num_items, data.levels)
        if config.run.init_from:
            init_embeddings(self.learner, config.run.init_from)
        self.learner.to(self.device)
        optim = config.optim
        self.params = {
            group: [p for n, p in self.learner.named_parameters() if n.startswith(group + ".")]
            for group in GROUPS
        }
        settings = {
            "backbone": (optim.lr, optim.lr_min),
            "weight_net": (optim.encoder_lr, optim.encoder_lr_min),
            "inner_lrs": (optim.lslr_lr, None),
        }
        self.optimizers, self.schedulers = {}, {}
        for group, params in self.params.items():
            if params:
                lr, floor = settings[group]
                self.optimizers[group] = torch.optim.Adam(params, lr=lr)
                if floor is not None:
                    self.schedulers[group] = cosine(self.optimizers[group], optim.iterations, floor)
        self.iteration, self.best_rmse = 0, math.inf
        self.valid_batches = list(eval_batches(data.valid, data.spec, config.data.eval_seed))
        self.valid_targets = collect_targets(self.valid_batches)
        self.valid_batches = [batch.to(self.device) for batch in self.valid_batches]
        self.epoch, self.cursor = 0, 0  # the local sampler's place in its user permutations

    # -- one meta-iteration, in two halves so distributed workers can all-reduce in between --
    def gradients(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        meta = self.config.meta
        # dropout masks from (seed, iteration, rank): reproducible, so no RNG state to save
        torch.manual_seed(self.batch_seed() * 4099 + self.rank)
        return meta_step(
            self.learner,
            batch.to(self.device),
            self.iteration,
            meta.multi_step_iterations,
            meta.first_order,
        )

    def apply(self, grads: dict[str, torch.Tensor], loss: float) -> None:
        """One optimiser step with the (all-reduced) gradients. A non-finite meta-loss stops the
        run: every later step, checkpoint and validation would be silently meaningless."""
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the meta-loss became {loss} at iteration {self.iteration + 1}; "
                "the learning rates (optim.lr, meta.inner_lr, optim.encoder_lr) are too high"
            )
        for name, param in self.learner.named_parameters():
            param.grad = grads[name]
        torch.nn.utils.clip_grad_norm_(self.params["backbone"], self.config.optim.clip)
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.iteration += 1

    def sample_batch(self, tasks: int) -> TaskBatch:
        """The next `tasks` training users, in epochs of seeded permutations (local training;
        Ray workers get their users from their Ray Data shard instead)."""
        users: list[int] = []
        while len(users) < tasks:
            order = np.random.default_rng([self.config.run.seed, self.epoch]).permutation(
                len(self.data.train)
            )
            taken = order[self.cursor : self.cursor + tasks - len(users)]
            users.extend(taken)
            self.cursor += len(taken)
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        rows = self.data.train.take(np.array(users))
        return sample_tasks(rows, self.data.spec, seed=self.batch_seed(), train=True)

    def batch_seed(self) -> int:
        """This iteration's window seed: the same on every worker, new every iteration."""
        return self.config.run.seed * 1_000_003 + self.iteration

    def validate(self) -> dict:
        return evaluate_learner(self.learner, self.valid_batches, self.valid_targets)

    # -- checkpoints --
    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "iteration": self.iteration,
            "best_rmse": self.best_rmse,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "config": self.config.to_dict(),
            "manifest_sha256": manifest_hash(self.data.path),
            "num_items": self.data.num_items,
            "rating_levels": self.data.levels,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["manifest_sha256"] != manifest_hash(self.data.path):
            raise InputError(
                "checkpoint was trained on a different dataset (manifest differs)",
                path=self.data.path,
            )
        self.learner.load_state_dict(state["learner"])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        for key, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][key])
        self.iteration, self.best_rmse = state["iteration"], state["best_rmse"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]

    def resume_from(self, out: Path) -> bool:
        """Continue the run saved in `out` (last.pt), if any; refuse one of another config."""
        if not (out / LAST).exists():
            return False
        state = load_checkpoint(out / LAST)
        if same_run_settings(state["config"]) != same_run_settings(self.config.to_dict()):
            raise InputError(
                "holds a run with a different config; choose another run.out", path=out
            )
        self.load_state_dict(state)
        keep_metrics_until(out / METRICS, self.iteration)
        return True

    def at_checkpoint(self) -> bool:
        return (
            self.iteration % self.config.run.validate_every == 0
            or self.iteration == self.config.optim.iterations
        )

    def checkpoint(self, out: Path, losses: list[float], seconds: float) -> dict:
        """Validate, write last.pt (and best.pt when validation RMSE improved) and append the
        record to metrics.jsonl in `out`; returns the record, with a log message."""
        metrics = self.validate()
        improved = metrics["rmse"] < self.best_rmse
        self.best_rmse = min(self.best_rmse, metrics["rmse"])
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        save_checkpoint(out / LAST, state)
        if improved:
            save_checkpoint(out / BEST, state)
        record = {
            "iteration": self.iteration,
            "loss": float(np.mean(losses)),
            "valid_rmse": metrics["rmse"],
            "valid_mae": metrics["mae"],
            "best_valid_rmse": self.best_rmse,
            "seconds_per_iteration": seconds / len(losses),
        }
        with open(out / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        message = (
            f"iter {self.iteration}/{self.config.optim.iterations} "
            f"loss {record['loss']:.4f} valid RMSE {metrics['rmse']:.4f} "
            f"MAE {metrics['mae']:.4f} (best {self.best_rmse:.4f}) "
            f"{record['seconds_per_iteration']:.2f} s/it"
        )
        return {**record, "message": message}


def init_embeddings(learner: torch.nn.Module, checkpoint: str) -> None:
    """Start item (and position) embeddings from a trained `basic` model, as the reference."""
    state = load_checkpoint(checkpoint)["learner"]
    own = learner.state_dict()
    names = [n for n in own if n.endswith("embedding.weight") and n in state]
    if not names:
        raise InputError("checkpoint has no embeddings to initialise from", path=checkpoint)
    for name in names:
        if state[name].shape != own[name].shape:
            raise InputError(
                f"{name} has shape {tuple(state[name].shape)} in the checkpoint, "
                f"{tuple(own[name].shape)} here",
                path=checkpoint,
            )
        own[name].copy_(state[name])


def prepare_process(config: Config) -> None:
    """Per-process numerics: thread count, and flushed denormals (they slowed the reference's
    CPU meta-iterations almost 3x as training went on; DESIGN §4)."""
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    torch.set_flush_denormal(True)


def log_to_stderr(message: str) -> None:
    print(f"[melo-dist] {message}", file=sys.stderr, flush=True)


def train_local(config: Config, log: Callable[[str], None] = log_to_stderr) -> dict:
    """Meta-train in this process; returns the best validation record."""
    prepare_process(config)
    run = TrainingRun(config, load_dataset(config))
    out = Path(config.run.out)
    if run.resume_from(out):
        log(f"resuming {out} at iteration {run.iteration}")
    total, tasks = config.optim.iterations, config.meta.tasks_per_batch
    losses, started = [], time.perf_counter()
    while run.iteration < total:
        loss, grads = run.gradients(run.sample_batch(tasks))
        run.apply(grads, float(loss))
        losses.append(float(loss))
        if run.at_checkpoint():
            log(run.checkpoint(out, losses, time.perf_counter() - started)["message"])
            losses, started = [], time.perf_counter()
        elif run.iteration % config.run.log_every == 0:
            log(f"iter {run.iteration}/{total} loss {np.mean(losses[-config.run.log_every :]):.4f}")
    return best_record(out)


def same_run_settings(config: dict) -> dict:
    """The settings a resumed run must share: all but where things are (paths may move; the
    dataset itself is checked by its manifest hash)."""
    return {
        section: {k: v for k, v in values.items() if k not in ("path", "out")}
        for section, values in config.items()
    }


def best_record(out: Path) -> dict:
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return min(records, key=lambda record: record["valid_rmse"])


def keep_metrics_until(path: Path, iteration: int) -> None:
    """On resume, drop metric lines past the checkpoint so no iteration is counted twice."""
    if path.exists():
        lines = [
            line
            for line in path.read_text().splitlines()
            if json.loads(line)["iteration"] <= iteration
        ]
        path.write_text("".join(line + "\n" for line in lines))
