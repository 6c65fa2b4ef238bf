"""One training run's state: the learner, its optimisers, the iteration, the best validation.

Three optimisers, one per parameter group: the recommender (Adam, cosine decay, grad-norm
clipping; AdamW on the sequence model's weights with optim.weight_decay), the inner-loss
weight net (Adam, cosine decay) and the inner learning rates (Adam).
`gradients` and `apply` are the two halves of a meta-iteration; a distributed worker averages
the gradients across ranks in between.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from melo_dist.config import Config
from melo_dist.data.dataset import Dataset
from melo_dist.data.seeds import derive_seed
from melo_dist.data.tasks import TaskBatch
from melo_dist.errors import InputError
from melo_dist.meta import build_learner, meta_step, scored_weights
from melo_dist.models import decayed_weights
from melo_dist.storage import local_folder
from melo_dist.training.baselines import bias_statistics, item_factors
from melo_dist.training.checkpoint import (
    BEST,
    LAST,
    append_metrics,
    load_checkpoint,
    manifest_hash,
    save_checkpoint,
)
from melo_dist.training.evaluation import collect_targets, eval_batches, evaluate_learner

GROUPS = ("backbone", "weight_net", "inner_lrs")  # one optimiser each, by parameter prefix


TENSORBOARD = "tensorboard"  # run.out's folder of TensorBoard event files
EVENT_SCALARS = ("loss", "valid_rmse", "valid_mae", "best_valid_rmse", "seconds_per_iteration")


class TrainingRun:
    def __init__(
        self, config: Config, data: Dataset, rank: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        self.config, self.data, self.rank, self.device = config, data, rank, torch.device(device)
        self.events = None  # the TensorBoard writer (`write_events`)
        torch.manual_seed(config.run.seed)
        self.learner = build_learner(config, data.num_items, data.levels)
        if config.model.head == "bias":  # every rank computes the same values
            init_bias_head(self.learner, data, config.model.user_factors)
        if config.run.init_from:
            init_embeddings(self.learner, config.run.init_from)
        if hasattr(self.learner, "outer_weights"):
            power = config.meta.outer_balance
            self.learner.outer_weights.copy_(class_balanced_weights(data, power))
        self.learner.to(self.device)
        # optim.average: validation scores the parameters' moving average, which checkpoints
        # keep (its parameters require gradients: the inner loop differentiates through them)
        self.averaged = copy.deepcopy(self.learner) if config.optim.average else None
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
                if group == "backbone" and optim.weight_decay:
                    groups = decay_groups(params, self.learner.backbone, optim.weight_decay)
                    self.optimizers[group] = torch.optim.AdamW(groups, lr=lr)
                else:
                    self.optimizers[group] = torch.optim.Adam(params, lr=lr)
                if floor is not None:
                    self.schedulers[group] = torch.optim.lr_scheduler.CosineAnnealingLR(
                        self.optimizers[group], T_max=optim.iterations, eta_min=floor
                    )
        self.iteration, self.best_rmse = 0, math.inf
        valid_batches = list(eval_batches(data.valid, data.spec, config.data.eval_seed))
        self.valid_targets = collect_targets(valid_batches)
        self.valid_batches = [batch.to(self.device) for batch in valid_batches]

    def gradients(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # dropout masks from (seed, iteration, rank): reproducible, so no RNG state to save
        torch.manual_seed(derive_seed(self.config.run.seed, self.iteration, self.rank))
        return meta_step(self.learner, batch.to(self.device), self.iteration)

    def apply(self, grads: dict[str, torch.Tensor], loss: float) -> None:
        """One optimiser step with the (all-reduced) gradients. A non-finite meta-loss or
        gradient stops the run before any parameter moves: every later step, checkpoint and
        validation would be silently meaningless."""
        broken = [name for name, grad in grads.items() if not torch.isfinite(grad).all()]
        problem = f"the meta-loss became {loss}" if not math.isfinite(loss) else None
        if broken and problem is None:
            problem = f"the gradient of {broken[0]} became non-finite"
        if problem:
            raise FloatingPointError(
                f"{problem} at iteration {self.iteration + 1}; "
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
        if self.averaged is not None:
            average_into(self.averaged, self.learner, self.config.optim.average, self.iteration)

    @property
    def scored(self) -> torch.nn.Module:
        """What validation scores and a checkpoint's users load: the averaged parameters with
        optim.average, else the learner itself."""
        return self.learner if self.averaged is None else self.averaged

    def at_checkpoint(self) -> bool:
        return (
            self.iteration % self.config.run.validate_every == 0
            or self.iteration == self.config.optim.iterations
        )

    def validate(self) -> dict:
        return evaluate_learner(self.scored, self.valid_batches, self.valid_targets)

    def checkpoint(self, out: Path, losses: list[float], seconds: float) -> dict:
        """Validate, append the metrics record to `out`, then write last.pt (and best.pt when
        validation RMSE improved); returns the record. `seconds`: the training time of `losses`.
        Record first: a crash in between leaves a record past last.pt, which a resume drops
        (`agree_with_checkpoint`), never a checkpoint without its record."""
        metrics = self.validate()
        improved = metrics["rmse"] < self.best_rmse
        self.best_rmse = min(self.best_rmse, metrics["rmse"])
        record = {
            "iteration": self.iteration,
            "loss": float(np.mean(losses)),
            "valid_rmse": metrics["rmse"],
            "valid_mae": metrics["mae"],
            "best_valid_rmse": self.best_rmse,
            "seconds_per_iteration": seconds / len(losses),
        }
        append_metrics(out, record)
        self.write_events(record)
        state = self.state_dict()
        save_checkpoint(out / LAST, state)
        if improved:
            save_checkpoint(out / BEST, state)
        return record

    def write_events(self, record: dict) -> None:
        """The record as TensorBoard scalars in run.out/tensorboard (`tensorboard --logdir
        runs/`), written by the rank that validates, beside the run's own files."""
        if self.events is None:  # opened by the first record: only the validating rank writes
            from tensorboardX import SummaryWriter

            folder = local_folder(self.config.run.out) / TENSORBOARD  # pushed with the run
            self.events = SummaryWriter(str(folder), flush_secs=5)
        for key in EVENT_SCALARS:
            self.events.add_scalar(key.replace("_", "/", 1), record[key], record["iteration"])

    def close(self) -> None:
        """Write out what the event writer still holds (it writes in the background)."""
        if self.events is not None:
            self.events.close()
            self.events = None

    def state_dict(self) -> dict:
        averaged = {} if self.averaged is None else {"averaged": self.averaged.state_dict()}
        return {
            "learner": self.learner.state_dict(),
            **averaged,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "iteration": self.iteration,
            "best_rmse": self.best_rmse,
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
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        for key, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][key])
        self.iteration, self.best_rmse = state["iteration"], state["best_rmse"]


def decay_groups(
    params: list[torch.nn.Parameter], backbone: torch.nn.Module, weight_decay: float
) -> list[dict]:
    """The recommender's parameters in two AdamW groups: the sequence model's weights decayed
    (`decayed_weights`), the rest not."""
    decayed = {id(backbone.get_parameter(name)) for name in decayed_weights(backbone)}
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def average_into(
    averaged: torch.nn.Module, learner: torch.nn.Module, decay: float, step: int
) -> None:
    """One step of the parameters' exponential moving average. Its decay ramps up as
    (1 + step) / (10 + step) (as TensorFlow's ExponentialMovingAverage), so the first
    iterations' parameters do not linger in it."""
    rate = 1 - min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for mean, param in zip(averaged.parameters(), learner.parameters()):
            mean.lerp_(param, rate)


def class_balanced_weights(data: Dataset, power: float = 1.0) -> torch.Tensor:
    """share^-power per rating level, from the training users' ratings, scaled so that the mean
    weight over the training ratings is 1: power 1 gives 1 / (K * share), every level weighing
    the same; power 0 gives plain MSE."""
    ratings = torch.from_numpy(data.train.ratings)
    counts = torch.stack([(ratings == level).sum() for level in data.levels]).double()
    share = (counts / counts.sum()).clamp(min=1e-12)
    return (share**-power / (share ** (1 - power)).sum()).float()


def init_bias_head(learner: torch.nn.Module, data: Dataset, factors: int) -> None:
    """The bias head starts as the bias model of the training ratings (and their item factors)."""
    mean, item_bias = bias_statistics(data.train, data.num_items)
    head, scale = learner.backbone.head, learner.scale
    head.init_from_ratings(mean / scale, torch.tensor(item_bias / scale, dtype=torch.float32))
    if factors:
        start = item_factors(data.train, data.num_items, factors)
        head.item_factors.weight.data.copy_(torch.tensor(start, dtype=torch.float32))


def init_embeddings(learner: torch.nn.Module, checkpoint: str) -> None:
    """Start item (and position) embeddings from a trained `basic` model, as the reference."""
    state = scored_weights(load_checkpoint(checkpoint))
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
