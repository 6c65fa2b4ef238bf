"""How the inner loss weights each support position: the `w` of MELO's weighted loss.

Every regime is one `InnerWeighting`, chosen once when the learner is built:
- `forward(ratings, mask, error)` runs once per task, at the inner loop's first step, and returns
  the task's weights [..., S, L] (None: every position counts the same); `error` is the
  initialisation's error on each support position (prediction - rating, over the top level),
  which only MELO's encoder with `model.encoder_error` reads;
- `at_step(weights, error)` gives the weights of one inner step from the task's weights and the
  current error (the default keeps the task's weights).

MELO's task-state encoder and the statistics net are meta-learned; they read a task's support
ratings (0 = padding), are shared across tasks, and the inner loop never adapts them.
"""

from __future__ import annotations

import torch
from torch import nn

from melo_dist.config import ENCODER_OUTPUTS
from melo_dist.models.layers import LSTM


class InnerWeighting(nn.Module):
    """Uniform weights: the plain MSE inner loss of MAML."""

    def forward(
        self, ratings: torch.Tensor, mask: torch.Tensor, error: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return None

    def at_step(self, weights: torch.Tensor | None, error: torch.Tensor) -> torch.Tensor | None:
        return weights


class Focal(InnerWeighting):
    """w = |e|, so w * e^2 = |e|^3: the focal inner loss."""

    def at_step(self, weights: torch.Tensor | None, error: torch.Tensor) -> torch.Tensor:
        return error.abs()


class ClassBalanced(InnerWeighting):
    """Inverse frequency of each position's rating among the task's support positions,
    normalised so that a task whose ratings are balanced gets weight 1 everywhere."""

    def __init__(self, levels: list[float]) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))

    def forward(
        self, ratings: torch.Tensor, mask: torch.Tensor, error: torch.Tensor | None = None
    ) -> torch.Tensor:
        levels = self.levels.to(ratings.dtype)
        one_hot = ((ratings.unsqueeze(-1) == levels) & mask.unsqueeze(-1)).to(ratings.dtype)
        counts = one_hot.sum((-3, -2))  # [..., K] over the task's support
        count = (one_hot * counts[..., None, None, :]).sum(-1).clamp(min=1)  # per position
        total = counts.sum(-1)[..., None, None]
        distinct = (counts > 0).sum(-1)[..., None, None].clamp(min=1)
        return torch.where(mask, total / (distinct * count), torch.zeros_like(count))


def rating_levels_index(ratings: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Map rating values to 1..K by their level (0 stays 0 = padding); half stars work too."""
    index = torch.searchsorted(levels, ratings.contiguous()) + 1
    return torch.where(ratings > 0, index, torch.zeros_like(index))


class TaskStateEncoder(InnerWeighting):
    """MELO: rating embedding -> LSTM (learnable h0/c0) -> linear -> abs (or softmax, or abs
    divided by the task's mean weight).

    `reads_error` (model.encoder_error, beyond the paper): each step of the LSTM also reads the
    initialisation's error at that position in rating units, so a rating can weigh by how far
    it is from what the meta-model expects of the item, not only by its level."""

    def __init__(
        self,
        levels: list[float],
        embed: int = 16,
        hidden: int = 32,
        output: str = "abs",
        reads_error: bool = False,
    ) -> None:
        super().__init__()
        if output not in ENCODER_OUTPUTS:
            raise ValueError(f"encoder output must be one of {ENCODER_OUTPUTS}, got {output!r}")
        self.output, self.reads_error = output, reads_error
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        self.embedding = nn.Embedding(len(levels) + 1, embed, padding_idx=0)
        self.lstm = LSTM(embed + int(reads_error), hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(
        self, ratings: torch.Tensor, mask: torch.Tensor, error: torch.Tensor | None = None
    ) -> torch.Tensor:
        index = rating_levels_index(ratings, self.levels.to(ratings.dtype))
        inputs = self.embedding(index)
        if self.reads_error:
            if error is None:
                raise ValueError("this encoder reads the initialisation's error: pass `error`")
            error = error * self.levels.max().to(error.dtype) * mask  # rating units; padding 0
            inputs = torch.cat([inputs, error.unsqueeze(-1).to(inputs.dtype)], -1)
        raw = self.out(self.lstm(inputs)).squeeze(-1)
        if self.output == "abs":
            return raw.abs()
        if self.output == "task_mean":  # only redistributes: the task's mean weight is 1
            weights = raw.abs() * mask
            count = mask.sum((-2, -1), keepdim=True).clamp(min=1)
            return weights / (weights.sum((-2, -1), keepdim=True) / count).clamp(min=1e-6)
        # softmax over each window's real positions, rescaled so a window's weights sum to its
        # length: a constant output then means plain MSE.
        weights = raw.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return weights * mask.sum(-1, keepdim=True)


class StatsWeightNet(InnerWeighting):
    """The reference's statistics weight net: MLP([rating one-hot, task histogram, mean, std]).

    The task statistics come from all the task's support positions, so a position's weight
    depends on how common its rating is for this user.
    """

    def __init__(self, levels: list[float], hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        k = len(levels)
        self.mlp = nn.Sequential(nn.Linear(2 * k + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(
        self, ratings: torch.Tensor, mask: torch.Tensor, error: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = len(self.levels)
        one_hot = nn.functional.one_hot(rating_levels_index(ratings, self.levels), k + 1)[..., 1:]
        one_hot = one_hot.to(ratings.dtype)
        counts = one_hot.sum(dim=(-3, -2))  # [..., K] over the task's support
        total = counts.sum(-1, keepdim=True).clamp(min=1)
        top = self.levels.max()
        mean = (ratings.sum(dim=(-2, -1)) / total.squeeze(-1) / top).unsqueeze(-1)
        sq = ((ratings / top) ** 2).sum(dim=(-2, -1)).unsqueeze(-1) / total
        std = (sq - mean**2).clamp(min=0).sqrt()
        task = torch.cat([counts / total, mean, std], dim=-1)  # [..., K + 2]
        task = task[..., None, None, :].expand(*one_hot.shape[:-1], -1)
        return self.mlp(torch.cat([one_hot, task], dim=-1)).squeeze(-1).abs()


def build_weighting(
    regime: str,
    levels: list[float],
    embed: int,
    hidden: int,
    output: str,
    reads_error: bool = False,
) -> InnerWeighting:
    """The inner-loss weighting of a meta-learning regime (config meta.regime)."""
    if regime == "melo":
        return TaskStateEncoder(levels, embed, hidden, output, reads_error)
    if regime == "stats_mlp":
        return StatsWeightNet(levels, hidden)
    if regime == "focal":
        return Focal()
    if regime == "class_balanced":
        return ClassBalanced(levels)
    return InnerWeighting()
