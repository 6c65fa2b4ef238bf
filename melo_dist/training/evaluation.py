"""Evaluation: RMSE/MAE on the last position of each query, aggregated per user, then over users;
scoring checkpoints on a split next to the reference points, as a table.

Every regime and every reference point is scored on the same targets: the fixed evaluation
windows of a split (`sample_tasks(seed=data.eval_seed, train=False)`), the last position of
each query suffix, on the rating scale. Per user, the squared (absolute) errors of its queries
are averaged; RMSE is the square root of the mean over users of those per-user MSEs, MAE the
mean of per-user MAEs (the reference's aggregation).

Reference points any model must beat, computed from the same tasks:
- global mean: the mean training rating;
- item mean: the target item's mean training rating (global mean for unseen items);
- support mean: the mean of the ratings in the user's support windows;
- bias model: global mean + item bias (from training, shrunk) + user bias fitted on the support;
- factor model: the bias model's residuals fitted on the support by a user bias and user
  factors against item factors of a matrix factorisation of the training ratings (ridge
  fold-in: collaborative filtering's answer to a new user);
- factor + recency: the factor model with each support rating weighted by its recency,
  RECENCY_DECAY ** (age - 1), what `meta.recency` gives the meta-learners' inner loss;
- factor + recency, once: the same fold-in on each support rating once (the windows hold a
  rating as many times as they overlap it), with the shrinks divided by ONCE_SCALE: the
  strongest fold-in found on the validation users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from melo_dist.config import Config
from melo_dist.data.dataset import Dataset, load_dataset, window_spec
from melo_dist.data.tasks import TaskBatch, TaskRows, WindowSpec, sample_tasks
from melo_dist.errors import InputError
from melo_dist.meta import learner_from_state
from melo_dist.training.baselines import (
    ONCE_SCALE,
    RECENCY_DECAY,
    USER_SHRINK,
    bias_statistics,
    factor_design,
    recency_weights,
    ridge,
)
from melo_dist.training.checkpoint import load_checkpoint, manifest_hash


@dataclass
class Targets:
    """The scored positions of a split: per user Q query targets (some invalid)."""

    rating: np.ndarray  # [U, Q] true rating of each query's last position
    item: np.ndarray  # [U, Q] its item id
    valid: np.ndarray  # [U, Q] bool
    support_sum: np.ndarray  # [U] sum of support ratings (repeats counted)
    support_count: np.ndarray  # [U]
    support_items: list[np.ndarray]  # per user, items of its support positions
    support_ratings: list[np.ndarray]
    support_ages: list[np.ndarray]  # interactions before the target (1: the one before it)


def eval_batches(rows: TaskRows, spec: WindowSpec, seed: int, batch_size: int = 64):
    """The split's users in fixed order and fixed windows, `batch_size` tasks at a time."""
    for start in range(0, len(rows), batch_size):
        users = np.arange(start, min(start + batch_size, len(rows)))
        yield sample_tasks(rows.take(users), spec, seed=seed, train=False)


def split_targets(
    config: Config, split: str, targets_per_user: int = 1
) -> tuple[Dataset, list[TaskBatch], Targets]:
    """The dataset of `config`, the fixed evaluation windows of every user of `split` (each
    scored on its last interaction; with `targets_per_user` K, on each of its K last
    interactions, one task a target: `TaskRows.with_earlier_targets`) and their targets: what
    every model is scored on."""
    data = load_dataset(config.data)
    rows = data.split(split).with_earlier_targets(targets_per_user)
    batches = list(eval_batches(rows, reference_spec(data.spec), config.data.eval_seed))
    return data, batches, collect_targets(batches)


def reference_spec(spec: WindowSpec) -> WindowSpec:
    """The reference protocol's windows, whatever support a model samples: the reference points
    fit these supports, so their figures do not move with a model's data.support_windows."""
    return replace(spec, support_windows="sampled")


def model_batches(
    config: Config, data: Dataset, split: str, batches: list[TaskBatch], targets_per_user: int = 1
) -> list[TaskBatch]:
    """A model's evaluation windows: `batches` (split_targets'), or, where its config samples
    other support windows (data.support_windows), the same users' with those supports; the
    query windows, and so the targets, are the same either way."""
    spec = window_spec(config.data)
    if spec == reference_spec(spec):
        return batches
    rows = data.split(split).with_earlier_targets(targets_per_user)
    return list(eval_batches(rows, spec, config.data.eval_seed))


def collect_targets(batches: list[TaskBatch]) -> Targets:
    rating = torch.cat([b.query_ratings[..., -1] for b in batches]).numpy()
    item = torch.cat([b.query_items[..., -1] for b in batches]).numpy()
    valid = torch.cat([b.query_mask[..., -1] for b in batches]).numpy()
    support_items, support_ratings, support_ages = [], [], []
    for b in batches:
        for items, ratings, ages, mask in zip(
            b.support_items, b.support_ratings, b.support_age, b.support_mask
        ):
            support_items.append(items[mask].numpy())
            support_ratings.append(ratings[mask].numpy())
            support_ages.append(ages[mask].numpy())
    return Targets(
        rating=rating,
        item=item,
        valid=valid,
        support_sum=np.array([r.sum() for r in support_ratings], dtype=np.float64),
        support_count=np.array([len(r) for r in support_ratings], dtype=np.float64),
        support_items=support_items,
        support_ratings=support_ratings,
        support_ages=support_ages,
    )


def user_errors(pred: np.ndarray, targets: Targets) -> tuple[np.ndarray, np.ndarray]:
    """Each user's mean squared and mean absolute error over its valid queries [U]."""
    error = np.where(targets.valid, pred - targets.rating, 0.0)
    count = targets.valid.sum(1)
    return (error**2).sum(1) / count, np.abs(error).sum(1) / count


def score(pred: np.ndarray, targets: Targets, per_user: bool = False) -> dict:
    """RMSE and MAE (per user, then over users), with the per-rating-class breakdown; with
    `per_user`, also each user's MSE and target rating [U] (`user_mse`, `user_rating`)."""
    user_mse, user_mae = user_errors(pred, targets)
    metrics = {
        "rmse": float(np.sqrt(user_mse.mean())),
        "mae": float(user_mae.mean()),
        "users": len(user_mse),
    }
    user_class = targets.rating[:, 0]  # all queries of a user end at the same target
    for level in np.unique(user_class):
        chosen = user_class == level
        metrics[f"rmse_{level:g}"] = float(np.sqrt(user_mse[chosen].mean()))
        metrics[f"users_{level:g}"] = int(chosen.sum())
    if per_user:
        metrics.update(user_mse=user_mse, user_rating=user_class)
    return metrics


def rmse_difference(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = 2000
) -> tuple[float, float, float]:
    """RMSE(A) - RMSE(B) from the per-user MSEs [U] of two models on the same users, and the
    2.5 and 97.5 percentiles of the difference over users resampled with replacement: an
    interval that excludes 0 is a difference the users support."""
    picks = rng.integers(0, len(a), (resamples, len(a)))
    diffs = np.sqrt(a[picks].mean(1)) - np.sqrt(b[picks].mean(1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(np.sqrt(a.mean()) - np.sqrt(b.mean())), float(low), float(high)


def learner_predictions(learner: torch.nn.Module, batches: list[TaskBatch]) -> np.ndarray:
    """[U, Q] predicted targets (adapted to each task first, where the learner meta-learns)."""
    was_training = learner.training
    learner.eval()
    try:
        return torch.cat([learner.predict(batch).cpu() for batch in batches]).numpy()
    finally:
        learner.train(was_training)


def evaluate_learner(learner: torch.nn.Module, batches: list[TaskBatch], targets: Targets) -> dict:
    """Score a learner (adapted to each task first, where it meta-learns) on `targets`."""
    return score(learner_predictions(learner, batches), targets)


def reference_points(
    train: TaskRows, targets: Targets, num_items: int, per_user: bool = False
) -> dict[str, dict]:
    """Scores of the reference predictors on the same targets."""
    predictions = reference_predictions(train, targets, num_items)
    return {name: score(pred, targets, per_user) for name, pred in predictions.items()}


def reference_predictions(
    train: TaskRows, targets: Targets, num_items: int
) -> dict[str, np.ndarray]:
    """Each reference predictor's predictions [U, Q] of the targets."""
    mu, item_bias = bias_statistics(train, num_items)
    item_count = np.bincount(train.items, minlength=num_items + 1)
    item_sum = np.bincount(train.items, weights=train.ratings, minlength=num_items + 1)
    item_mean = np.where(item_count > 0, item_sum / np.maximum(item_count, 1), mu)
    count = len(targets.support_items)
    users = np.repeat(np.arange(count), targets.support_count.astype(np.int64))
    items = np.concatenate(targets.support_items).astype(np.int64)
    residual = np.concatenate(targets.support_ratings) - mu - item_bias[items]
    user_bias = np.bincount(users, residual, count) / (USER_SHRINK + targets.support_count)
    design, reg = factor_design(train, num_items)
    ages = np.concatenate(targets.support_ages)
    factor, recent = (  # each user's fitted residual: unweighted, and weighted by recency
        np.einsum(
            "uqk,uk->uq", design[targets.item], ridge(users, count, design[items], residual, reg, w)
        )
        for w in (None, recency_weights(ages, RECENCY_DECAY))
    )
    # each user's first support position of each age
    _, once = np.unique(users * (ages.max(initial=0) + 1) + ages, return_index=True)
    fit = ridge(
        users[once],
        count,
        design[items[once]],
        residual[once],
        reg,
        ONCE_SCALE * recency_weights(ages[once], RECENCY_DECAY),
    )
    recent_once = np.einsum("uqk,uk->uq", design[targets.item], fit)
    support_mean = np.where(
        targets.support_count > 0, targets.support_sum / np.maximum(targets.support_count, 1), mu
    )
    return {
        "global mean": np.full(targets.rating.shape, mu),
        "item mean": item_mean[targets.item],
        "support mean": np.broadcast_to(support_mean[:, None], targets.rating.shape),
        "bias model": mu + item_bias[targets.item] + user_bias[:, None],
        "factor model": mu + item_bias[targets.item] + factor,
        "factor + recency": mu + item_bias[targets.item] + recent,
        "factor + recency, once": mu + item_bias[targets.item] + recent_once,
    }


def evaluate_checkpoints(
    paths: list[str],
    split: str = "test",
    data_path: str | None = None,
    references: bool = True,
    progress: Callable[[str], None] = lambda message: None,
    per_user: bool = False,
) -> dict[str, dict]:
    """{name: metrics} for each checkpoint (named by its run folder and regime) and, optionally,
    the reference points, all on the same targets of `split`; `progress` hears what is being
    scored. With `per_user`, every entry also holds `user_mse` and `user_rating` (each user's
    MSE and target rating, in the split's order), for paired comparisons."""
    states = [load_checkpoint(path) for path in paths]
    config = Config.from_dict(states[0]["config"])
    if data_path:
        config.data.path = data_path
    data, batches, targets = split_targets(config, split)
    results = {}
    for path, state in zip(paths, states):
        run_config = Config.from_dict(state["config"])
        if state["manifest_sha256"] != manifest_hash(config.data.path):
            raise InputError(f"trained on a different dataset than {config.data.path}", path=path)
        learner = learner_from_state(state)
        name = f"{run_config.meta.regime} {run_config.model.backbone} ({Path(path).name})"
        progress(f"scoring {name}: adapting to {len(targets.rating):,} {split} users")
        pred = learner_predictions(learner, model_batches(run_config, data, split, batches))
        results[name] = {**score(pred, targets, per_user), "iteration": state["iteration"]}
    if references:
        progress("fitting the reference points on the same support sets")
        results.update(reference_points(data.train, targets, data.num_items, per_user))
    return results


def format_results(results: dict[str, dict], split: str) -> str:
    """RMSE/MAE per model, then RMSE per rating class (users whose target has that rating)."""
    classes = sorted(
        {k[5:] for m in results.values() for k in m if k.startswith("rmse_")}, key=float
    )
    width = max(len(name) for name in results)
    header = f"{'model':<{width}}  {'RMSE':>7} {'MAE':>7}  " + " ".join(
        f"{'r=' + c:>7}" for c in classes
    )
    lines = [
        f"{split}: {next(iter(results.values()))['users']} users, last query position",
        header,
        "-" * len(header),
    ]
    for name, m in results.items():
        lines.append(
            f"{name:<{width}}  {m['rmse']:7.4f} {m['mae']:7.4f}  "
            + " ".join(f"{m.get('rmse_' + c, float('nan')):7.4f}" for c in classes)
        )
    counts = next(iter(results.values()))
    lines.append(
        f"{'users per class':<{width}}  {'':>15}  "
        + " ".join(f"{counts.get('users_' + c, 0):7d}" for c in classes)
    )
    return "\n".join(lines)
