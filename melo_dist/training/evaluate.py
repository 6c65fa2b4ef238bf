"""Evaluation: RMSE/MAE on the last position of each query, aggregated per user, then over users.

Every regime and every reference point is scored on the same targets: the fixed evaluation
windows of a split (`sample_tasks(seed=data.eval_seed, train=False)`), the last position of
each query suffix, on the rating scale. Per user, the squared (absolute) errors of its queries
are averaged; RMSE is the square root of the mean over users of those per-user MSEs, MAE the
mean of per-user MAEs (the reference's aggregation).

Reference points any model must beat, computed from the same tasks:
- global mean: the mean training rating;
- item mean: the target item's mean training rating (global mean for unseen items);
- support mean: the mean of the ratings in the user's support windows;
- bias model: global mean + item bias (from training, shrunk) + user bias fitted on the support.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from melo_dist.data.tasks import TaskBatch, TaskRows, WindowSpec, sample_tasks
from melo_dist.meta.adapt import MetaLearner
from melo_dist.meta.step import predict_targets

ITEM_SHRINK, USER_SHRINK = 25.0, 10.0  # Koren-style baseline-predictor regularisation


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


def eval_batches(rows: TaskRows, spec: WindowSpec, seed: int, batch_size: int = 64):
    """The split's users in fixed order and fixed windows, `batch_size` tasks at a time."""
    for start in range(0, len(rows), batch_size):
        users = np.arange(start, min(start + batch_size, len(rows)))
        yield sample_tasks(rows.take(users), spec, seed=seed, train=False)


def collect_targets(batches: list[TaskBatch]) -> Targets:
    rating = torch.cat([b.query_ratings[..., -1] for b in batches]).numpy()
    item = torch.cat([b.query_items[..., -1] for b in batches]).numpy()
    valid = torch.cat([b.query_mask[..., -1] for b in batches]).numpy()
    support_items, support_ratings = [], []
    for b in batches:
        for items, ratings, mask in zip(b.support_items, b.support_ratings, b.support_mask):
            support_items.append(items[mask].numpy())
            support_ratings.append(ratings[mask].numpy())
    return Targets(
        rating=rating,
        item=item,
        valid=valid,
        support_sum=np.array([r.sum() for r in support_ratings], dtype=np.float64),
        support_count=np.array([len(r) for r in support_ratings], dtype=np.float64),
        support_items=support_items,
        support_ratings=support_ratings,
    )


def score(pred: np.ndarray, targets: Targets) -> dict[str, float]:
    """RMSE and MAE (per user, then over users), with the per-rating-class breakdown."""
    error = np.where(targets.valid, pred - targets.rating, 0.0)
    count = targets.valid.sum(1)
    user_mse = (error**2).sum(1) / count
    user_mae = np.abs(error).sum(1) / count
    metrics = {
        "rmse": float(np.sqrt(user_mse.mean())),
        "mae": float(user_mae.mean()),
        "users": len(count),
    }
    user_class = targets.rating[:, 0]  # all queries of a user end at the same target
    for level in np.unique(user_class):
        chosen = user_class == level
        metrics[f"rmse_{level:g}"] = float(np.sqrt(user_mse[chosen].mean()))
        metrics[f"users_{level:g}"] = int(chosen.sum())
    return metrics


def evaluate_learner(learner: MetaLearner, batches: list[TaskBatch], targets: Targets) -> dict:
    was_training = learner.training
    learner.eval()
    try:
        pred = torch.cat([predict_targets(learner, batch).cpu() for batch in batches]).numpy()
    finally:
        learner.train(was_training)
    return score(pred, targets)


def reference_points(train: TaskRows, targets: Targets, num_items: int) -> dict[str, dict]:
    """Scores of the four reference predictors on the same targets."""
    mu = float(train.ratings.mean())
    item_count = np.bincount(train.items, minlength=num_items + 1)
    item_sum = np.bincount(train.items, weights=train.ratings, minlength=num_items + 1)
    item_mean = np.where(item_count > 0, item_sum / np.maximum(item_count, 1), mu)
    item_bias = (item_sum - mu * item_count) / (ITEM_SHRINK + item_count)
    user_bias = np.array(
        [
            (ratings - mu - item_bias[items]).sum() / (USER_SHRINK + len(ratings))
            for items, ratings in zip(targets.support_items, targets.support_ratings)
        ]
    )
    support_mean = np.where(
        targets.support_count > 0, targets.support_sum / np.maximum(targets.support_count, 1), mu
    )
    predictions = {
        "global mean": np.full(targets.rating.shape, mu),
        "item mean": item_mean[targets.item],
        "support mean": np.broadcast_to(support_mean[:, None], targets.rating.shape),
        "bias model": mu + item_bias[targets.item] + user_bias[:, None],
    }
    return {name: score(pred, targets) for name, pred in predictions.items()}
