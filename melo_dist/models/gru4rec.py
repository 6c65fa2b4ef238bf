"""GRU4Rec (Hidasi et al., ICLR 2016) as a per-position rating regressor.

Item embedding -> dropout -> 2-layer GRU with learnable initial state -> linear -> rating.
"""

from __future__ import annotations

import torch
from torch import nn

from melo_dist.config import ModelConfig
from melo_dist.models.heads import SequenceRegressor, build_head
from melo_dist.models.layers import GRU


class GRU4Rec(SequenceRegressor):
    def __init__(self, config: ModelConfig, num_items: int) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.item_embedding = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.gru = GRU(config.dim, config.dim, num_layers=config.gru_layers)
        self.head = build_head(config, config.dim, num_items)

    def features(self, item_seq: torch.Tensor, skipped: int = 0) -> torch.Tensor:
        """[..., L] item ids (0 = padding) -> [..., L, D] GRU states."""
        return self.gru(self.embed(item_seq), skipped)

    def score_candidates(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The GRU reads the context once; each candidate is one more step from its state."""
        _, states = self.gru.branch(self.embed(context), self.embed(candidates))
        return self.head(states, candidates)
