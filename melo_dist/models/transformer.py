"""SASRec (Kang & McAuley, ICDM 2018) and BERT4Rec (Sun et al., CIKM 2019) rating regressors.

Item + learned position embeddings -> blocks of self-attention -> linear -> rating. The two
differ only in the attention: SASRec is causal (position t sees 1..t), BERT4Rec is
bidirectional (every real position sees the whole window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_dist.config import ModelConfig
from melo_dist.models.heads import SequenceRegressor, build_head
from melo_dist.models.layers import TransformerBlock, attention_mask, embed_items


class SelfAttentiveRegressor(SequenceRegressor):
    causal: bool
    window_groups = 3  # compute-bound: fewer padding slots beat fewer calls

    def __init__(self, config: ModelConfig, num_items: int) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.item_embedding = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.input_norm = nn.LayerNorm(config.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.heads, config.ffn, config.dropout)
            for _ in range(config.blocks)
        )
        self.head = build_head(config, config.dim, num_items)

    def features(self, item_seq: torch.Tensor, skipped: int = 0) -> torch.Tensor:
        """[..., L] item ids (0 = padding) -> [..., L, D] last block's states. Padding keys are
        hidden and positions count from the right, so dropped left padding (`skipped`) changes
        nothing."""
        length = item_seq.shape[-1]
        positions = self.position_embedding.weight[-length:]
        return self.attend(item_seq, positions, attention_mask(item_seq, causal=self.causal))

    def attend(
        self, item_seq: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = embed_items(self.item_embedding, item_seq) + positions
        x = F.dropout(self.input_norm(x), self.dropout, self.training)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def score_candidates(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """SASRec: the context's states never see a later position, so one sequence
        `context, candidate 1, ..., candidate C` gives every candidate its window's last
        output: each candidate sits at the last position, sees the context and itself only."""
        if not self.causal:
            return super().score_candidates(context, candidates)
        past, count = context.shape[-1], candidates.shape[-1]
        weight = self.position_embedding.weight
        positions = torch.cat([weight[-past - 1 : -1], weight[-1:].expand(count, -1)])
        sequence = torch.cat([context, candidates], -1)
        mask = attention_mask(sequence, causal=True)
        mask[..., past:, past:] = torch.eye(count, dtype=torch.bool)  # not the other candidates
        states = self.attend(sequence, positions, mask)[..., past:, :]
        return self.head(states, candidates)


class SASRec(SelfAttentiveRegressor):
    causal = True


class BERT4Rec(SelfAttentiveRegressor):
    causal = False
