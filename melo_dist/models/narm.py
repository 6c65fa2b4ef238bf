"""NARM (Li et al., CIKM 2017) as a per-position rating regressor.

A 1-layer GRU encodes the sequence; at every position t an attention over the states h_1..h_t
(scored against h_t) gives the local context, which is concatenated with h_t (the global
context) and mapped to a rating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_dist.config import ModelConfig
from melo_dist.models.heads import SequenceRegressor, build_head
from melo_dist.models.layers import GRU, attention_mask
from melo_dist.models.packing import even_runs

ROW_BLOCKS = 8  # fewer masked pairs, more calls: 8 ran faster than 3 or 5 (bench train)


class NARM(SequenceRegressor):
    window_groups = 2  # padding slots against calls: 2 ran faster than 1 or 3 (bench train)

    def __init__(self, config: ModelConfig, num_items: int) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.item_embedding = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.gru = GRU(config.dim, config.dim, num_layers=1)
        self.key_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.query_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.score = nn.Linear(config.dim, 1, bias=False)
        self.head = build_head(config, 2 * config.dim, num_items)

    def features(self, item_seq: torch.Tensor, skipped: int = 0) -> torch.Tensor:
        """[..., L] item ids (0 = padding) -> [..., L, 2D] local and global context."""
        states = self.gru(self.embed(item_seq), skipped)  # [..., L, D]
        # scores[..., t, j] = v . sigmoid(A1 h_t + A2 h_j), over real positions j <= t. The
        # [..., L, L, D] pairs are the costly part: positions run in row blocks, each against
        # the keys up to its last row only ((B + 1) / 2B of the pairs for B blocks), the rest 0.
        queries, keys = self.query_proj(states), self.key_proj(states)
        length = states.shape[-2]
        rows = []
        for start, end in even_runs(length, ROW_BLOCKS):
            mixed = queries[..., start:end, None, :] + keys[..., None, :end, :]
            block = self.score(torch.sigmoid(mixed)).squeeze(-1)  # [..., rows, end]
            rows.append(F.pad(block, (0, length - end)))
        scores = torch.cat(rows, dim=-2)  # [..., L, L]
        mask = attention_mask(item_seq, causal=True)
        weights = scores.masked_fill(~mask, 0.0)  # NARM's attention is not normalised
        local = weights @ states
        return F.dropout(torch.cat([local, states], dim=-1), self.dropout, self.training)

    def score_candidates(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The GRU reads the context once; each candidate is one more step from its state, and
        its attention runs over the context's real states and its own (`features` at a
        window's last position)."""
        states, branch = self.gru.branch(self.embed(context), self.embed(candidates))
        shape = (*candidates.shape, context.shape[-1], states.shape[-1])  # [..., C, L - 1, D]
        keys = torch.cat([states.unsqueeze(-3).expand(shape), branch.unsqueeze(-2)], -2)
        mixed = self.query_proj(branch).unsqueeze(-2) + self.key_proj(keys)  # [..., C, L, D]
        scores = self.score(torch.sigmoid(mixed)).squeeze(-1)
        real = torch.cat([context > 0, torch.ones_like(context[..., :1], dtype=torch.bool)], -1)
        weights = scores.masked_fill(~real.unsqueeze(-2), 0.0)
        local = (weights.unsqueeze(-2) @ keys).squeeze(-2)
        features = torch.cat([local, branch], dim=-1)
        return self.head(F.dropout(features, self.dropout, self.training), candidates)
