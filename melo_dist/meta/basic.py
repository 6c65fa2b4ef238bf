"""The reference's *Basic* model: the backbone trained on every window of a task directly,
without meta-learning. It is a baseline and the source of MAML/MELO's initial embeddings
(`run.init_from`)."""

from __future__ import annotations

import torch
from torch import nn

from melo_dist.data.tasks import TaskBatch
from melo_dist.meta.melo import masked_mse


class BasicLearner(nn.Module):
    def __init__(self, backbone: nn.Module, scale: float) -> None:
        super().__init__()
        self.backbone, self.scale = backbone, scale

    def loss(self, batch: TaskBatch, iteration: int) -> torch.Tensor:
        """Masked MSE over every position of the task's support and query windows."""
        items = torch.cat([batch.support_items, batch.query_items], dim=1)
        ratings = torch.cat([batch.support_ratings, batch.query_ratings], dim=1)
        mask = torch.cat([batch.support_mask, batch.query_mask], dim=1)
        return masked_mse(self.backbone(items), ratings / self.scale, mask).mean()

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """[B, Q] predicted rating of each query's last position (no adaptation)."""
        with torch.no_grad():
            return self.backbone(batch.query_items)[..., -1] * self.scale
