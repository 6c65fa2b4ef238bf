"""Inner-loop losses and their per-position weights; the query loss of the outer loop.

All inner losses share the reference's weighted form (DESIGN §2):
    sum(w * se * mask) / count_nonzero(w * se * mask)
per task over its support windows, with se the squared error on rating / scale. The regimes
differ only in w: 1 (MAML), the task-state encoder (MELO), |e| (focal, i.e. |e|^3), the inverse
frequency of the rating in the user's support (class-balanced), or the statistics net. The
outer loss is a plain masked MSE.
"""

from __future__ import annotations

import torch

WINDOW_DIMS = (-2, -1)  # a task's support/query windows [..., S, L]


def weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """[..., S, L] -> [...]: the reference's weighted inner loss, one value per task."""
    terms = (pred - target) ** 2 * mask
    if weights is not None:
        terms = weights * terms
    count = (terms != 0).sum(WINDOW_DIMS).clamp(min=1)
    return terms.sum(WINDOW_DIMS) / count


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., W, L] -> [...]: mean squared error over a task's masked positions."""
    se = (pred - target) ** 2 * mask
    return se.sum(WINDOW_DIMS) / mask.sum(WINDOW_DIMS).clamp(min=1)


def last_position(mask: torch.Tensor) -> torch.Tensor:
    """Keep only the last position of each (left-padded) window: the query target."""
    return mask & (torch.arange(mask.shape[-1], device=mask.device) == mask.shape[-1] - 1)


def class_balanced_weights(
    ratings: torch.Tensor, mask: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Inverse frequency of each position's rating among the task's support positions,
    normalised so that a task whose ratings are balanced gets weight 1 everywhere."""
    one_hot = ((ratings.unsqueeze(-1) == levels) & mask.unsqueeze(-1)).to(ratings.dtype)
    counts = one_hot.sum((-3, -2))  # [..., K] over the task's support
    count = (one_hot * counts[..., None, None, :]).sum(-1).clamp(min=1)  # per position
    total = counts.sum(-1)[..., None, None]
    distinct = (counts > 0).sum(-1)[..., None, None].clamp(min=1)
    return torch.where(mask, total / (distinct * count), torch.zeros_like(count))
