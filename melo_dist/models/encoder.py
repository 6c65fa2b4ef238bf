"""Per-position loss weights for the inner loop: MELO's task-state encoder and baselines' nets.

Both read a task's support ratings ([..., S, L], 0 = padding) and return one non-negative weight
per position. They are shared across tasks and meta-learned; the inner loop never adapts them.
"""

from __future__ import annotations

import torch
from torch import nn

from melo_dist.models.layers import LSTM


def rating_levels_index(ratings: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Map rating values to 1..K by their level (0 stays 0 = padding); half stars work too."""
    index = torch.searchsorted(levels, ratings.contiguous()) + 1
    return torch.where(ratings > 0, index, torch.zeros_like(index))


class TaskStateEncoder(nn.Module):
    """MELO: rating embedding -> LSTM (learnable h0/c0) -> linear -> abs (or softmax)."""

    def __init__(
        self, levels: list[float], embed: int = 16, hidden: int = 32, output: str = "abs"
    ) -> None:
        super().__init__()
        if output not in ("abs", "softmax"):
            raise ValueError(f"encoder output must be 'abs' or 'softmax', got {output!r}")
        self.output = output
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        self.embedding = nn.Embedding(len(levels) + 1, embed, padding_idx=0)
        self.lstm = LSTM(embed, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        index = rating_levels_index(ratings, self.levels.to(ratings.dtype))
        raw = self.out(self.lstm(self.embedding(index))).squeeze(-1)
        if self.output == "abs":
            return raw.abs()
        # softmax over each window's real positions, rescaled so a window's weights sum to its
        # length: a constant output then means plain MSE.
        weights = raw.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return weights * mask.sum(-1, keepdim=True)


class StatsWeightNet(nn.Module):
    """The reference's statistics weight net: MLP([rating one-hot, task histogram, mean, std]).

    The task statistics come from all the task's support positions, so a position's weight
    depends on how common its rating is for this user.
    """

    def __init__(self, levels: list[float], hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        k = len(levels)
        self.mlp = nn.Sequential(nn.Linear(2 * k + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
