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
from melo_dist.models.packing import Packing


class SelfAttentiveRegressor(SequenceRegressor):
    causal: bool
    window_groups = 3  # attention's groups; the other layers run on real tokens only
    packs_tokens = True

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

    def features(
        self, item_seq: torch.Tensor, skipped: int = 0, packing: Packing | None = None
    ) -> torch.Tensor:
        """[..., L] item ids (0 = padding) -> [..., L, D] last block's states; or, with
        `packing`, one task's windows [W, L] -> its real tokens' states [T, D]. Padding keys are
        hidden and positions count from the right, so dropped left padding (`skipped`, the
        groups of a packing) changes nothing."""
        length = item_seq.shape[-1]
        positions = self.position_embedding.weight[-length:]
        if packing is None:
            return self.attend(item_seq, positions, attention_mask(item_seq, self.causal))
        masks = [attention_mask(item_seq[g, s:], self.causal) for g, s in packing.groups]
        positions = packing.pack(positions.expand(*item_seq.shape, -1))
        return self.attend(packing.pack(item_seq), positions, masks, packing)

    def attend(
        self,
        item_seq: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | list[torch.Tensor],
        packing: Packing | None = None,
    ) -> torch.Tensor:
        x = embed_items(self.item_embedding, item_seq) + positions
        x = F.dropout(self.input_norm(x), self.dropout, self.training)
        for block in self.blocks:
            x = block(x, mask, packing)
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
        # each candidate sees the context and itself, not the other candidates
        mask[..., past:, past:] = torch.eye(count, dtype=torch.bool, device=mask.device)
        states = self.attend(sequence, positions, mask)[..., past:, :]
        return self.head(states, candidates)


class SASRec(SelfAttentiveRegressor):
    causal = True


class BERT4Rec(SelfAttentiveRegressor):
    causal = False
