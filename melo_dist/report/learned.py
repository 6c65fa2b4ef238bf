"""What a trained learner learned, read on a split's users: RMSE after each inner step, the
inner-loss weights per rating level and per position, and the inner learning rates (LSLR)."""

from __future__ import annotations

import torch

from melo_dist.data.tasks import TaskBatch
from melo_dist.training.evaluation import Targets, score


def rmse_by_steps(learner, batches: list[TaskBatch], targets: Targets) -> list[float]:
    """RMSE of each query target after 0..J inner steps (0: the initialisation)."""
    learner.eval()
    per_step = [[] for _ in range(learner.steps + 1)]
    for batch in batches:
        local, rows = batch.with_local_items()
        with torch.enable_grad():
            trajectory = learner.adapt(rows, local, create_graph=False)
        start = learner.task_params(rows)
        with torch.no_grad():
            for step, fast in enumerate([start, *trajectory]):
                pred = learner.forward_tasks(fast, local.query_items)[..., -1] * learner.scale
                per_step[step].append(pred)
    return [score(torch.cat(p).numpy(), targets)["rmse"] for p in per_step]


def relative_weights(learner, batch: TaskBatch) -> torch.Tensor | None:
    """The inner-loss weight of every support position [B, S, L] relative to its task's mean
    weight (1 = average), or None where the weighting has no per-task weights (MAML: all
    equal; focal: they follow each step's error)."""
    learner.eval()
    local, rows = batch.with_local_items()
    with torch.no_grad():  # the weights the inner loop starts from (its first step's error)
        start = learner.forward_tasks(learner.task_params(rows), local.support_items)
        error = start - local.support_ratings / learner.scale
        weights = learner.weight_net(local.support_ratings, local.support_mask, error)
    if weights is None:
        return None
    mask = batch.support_mask
    task_mean = (weights * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp(min=1)
    return weights / task_mean[:, None, None].clamp(min=1e-12)


def weights_by_rating(learner, batches: list[TaskBatch]) -> dict[float, float]:
    """The mean relative inner-loss weight of the support positions of each rating level:
    what the encoder up- or down-weights. Empty where there are no per-task weights."""
    parts: dict[float, list[torch.Tensor]] = {}
    for batch in batches:
        relative = relative_weights(learner, batch)
        if relative is None:
            return {}
        mask = batch.support_mask
        for level in batch.support_ratings[mask].unique().tolist():
            parts.setdefault(level, []).append(relative[mask & (batch.support_ratings == level)])
    return {level: float(torch.cat(p).mean()) for level, p in sorted(parts.items())}


def weights_by_position(learner, batches: list[TaskBatch]) -> list[float]:
    """The mean relative inner-loss weight at each window position (left-padded windows:
    the last position is each support window's latest interaction); NaN where no window
    reaches. Empty where there are no per-task weights."""
    total, count = None, None
    for batch in batches:
        relative = relative_weights(learner, batch)
        if relative is None:
            return []
        mask = batch.support_mask
        sums, counts = (relative * mask).sum((0, 1)), mask.sum((0, 1))
        total = sums if total is None else total + sums
        count = counts if count is None else count + counts
    return (total / count).tolist() if total is not None else []


def inner_learning_rates(learner) -> dict[str, list[float]]:
    """The learned inner learning rate of every adapted parameter, per inner step."""
    rates = getattr(learner, "inner_lrs", {})
    return {
        key.replace("__", "."): values.tolist()
        for key, values in rates.items()
        if key not in ("log_user_damping", "recency_decay")  # not learning rates
    }
