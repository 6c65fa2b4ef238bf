"""Shared building blocks, written as plain tensor code so they work under torch.func.

`nn.GRU`/`nn.LSTM` have no vmap rule and cuDNN RNNs no double backward, so the recurrent cells
are written out here. The time axis is split once with `unbind`: indexing `x[..., t, :]` per
step writes a full-size zero tensor per step in the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from melo_dist.models.packing import Packing, take_rows


def embed_items(embedding: nn.Embedding, item_seq: torch.Tensor) -> torch.Tensor:
    """Item embeddings with padding (id 0) forced to zero.

    `padding_idx` alone is not enough: under `vmap` with per-task tables the embedding
    backward does not mask the padding row, so it would drift during adaptation (and a GRU
    reads the left padding). Multiplying by the mask keeps it exactly zero in every mode. The
    rows are gathered (`take_rows`), not looked up with `F.embedding`.
    """
    return take_rows(embedding.weight, item_seq) * (item_seq > 0).unsqueeze(-1)


class GRU(nn.Module):
    """A stacked GRU over [..., L, D] with a learnable initial state per layer."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.input_proj = nn.ModuleList(nn.Linear(size, 3 * hidden_size) for size in sizes)
        self.hidden_proj = nn.ModuleList(
            nn.Linear(hidden_size, 3 * hidden_size) for _ in range(num_layers)
        )
        self.h0 = nn.Parameter(torch.zeros(num_layers, hidden_size))

    def forward(self, x: torch.Tensor, skipped: int = 0) -> torch.Tensor:
        """[..., L, D] -> [..., L, H]. `skipped`: left-padding positions dropped before `x`
        (padding reads as zeros); each layer starts from the state reading them would have left,
        computed once for one row instead of for every window."""
        padding = x.new_zeros(skipped, x.shape[-1])
        for layer, (input_proj, hidden_proj) in enumerate(zip(self.input_proj, self.hidden_proj)):
            h0 = self.h0[layer]
            if skipped:
                padding = self.run(input_proj, hidden_proj, padding, h0)
                h0 = padding[-1]
            x = self.run(input_proj, hidden_proj, x, h0.expand(*x.shape[:-2], -1))
        return x

    def branch(
        self, x: torch.Tensor, next_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., L, D] and [..., C, D] -> the top layer's states over x [..., L, H] and after
        each of the C next inputs alone [..., C, H] (C branches from x's end): what `forward`
        on each sequence `x + next input` gives, its last position apart."""
        for input_proj, hidden_proj, h0 in zip(self.input_proj, self.hidden_proj, self.h0):
            x = self.run(input_proj, hidden_proj, x, h0.expand(*x.shape[:-2], -1))
            last = x[..., -1:, :].expand(*next_inputs.shape[:-1], -1)
            next_inputs = self.run(input_proj, hidden_proj, next_inputs.unsqueeze(-2), last)
            next_inputs = next_inputs.squeeze(-2)
        return x, next_inputs

    @staticmethod
    def run(input_proj: nn.Linear, hidden_proj: nn.Linear, x: torch.Tensor, h: torch.Tensor):
        """One layer over the time axis of x [..., L, D] from state h [..., H]. The reset and
        update gates share one sigmoid and the update `(1 - z) n + z h` is written
        `n + z (h - n)`: fewer ops per step, each of which the inner loop's double backward
        pays again."""
        size = h.shape[-1]
        gates_x = input_proj(x).split([2 * size, size], -1)  # all input projections at once
        outputs = []
        for rz_x, n_x in zip(*(gates.unbind(-2) for gates in gates_x)):
            rz_h, n_h = hidden_proj(h).split([2 * size, size], -1)
            r, z = torch.sigmoid(rz_x + rz_h).chunk(2, -1)
            n = torch.tanh(n_x + r * n_h)
            h = n + z * (h - n)
            outputs.append(h)
        return torch.stack(outputs, dim=-2)


class LSTM(nn.Module):
    """A one-layer LSTM over [..., L, D] with learnable initial hidden and cell states."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.h0 = nn.Parameter(torch.zeros(hidden_size))
        self.c0 = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h0.expand(*x.shape[:-2], -1)
        c = self.c0.expand(*x.shape[:-2], -1)
        outputs = []
        for gx in self.input_proj(x).unbind(-2):
            i, f, g, o = (gx + self.hidden_proj(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=-2)


def attention_mask(item_seq: torch.Tensor, causal: bool) -> torch.Tensor:
    """[..., L, L] bool, True where a query position may attend to a key position.

    Padding keys are hidden; every position may always see itself, so an all-padding row
    (left padding) still has one key and softmax never produces NaN.
    """
    length, device = item_seq.shape[-1], item_seq.device
    allowed = (item_seq > 0).unsqueeze(-2).expand(*item_seq.shape[:-1], length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


class TransformerBlock(nn.Module):
    """Post-norm self-attention + feed-forward block (as in SASRec/BERT4Rec in RecBole)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | list[torch.Tensor],
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Windows x [..., L, D] with mask [..., L, L]; or packed tokens x [T, D] with one mask
        per attention group of `packing`."""
        qkv = self.qkv(x)
        if packing is None:
            attended = self.attend(qkv, mask)
        else:
            parts = packing.split(qkv)
            attended = packing.join([self.attend(part, m) for part, m in zip(parts, mask)])
        x = self.norm1(x + F.dropout(self.out(attended), self.dropout, self.training))
        hidden = F.dropout(F.gelu(self.ffn_in(x)), self.dropout, self.training)
        return self.norm2(x + F.dropout(self.ffn_out(hidden), self.dropout, self.training))

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[..., L, 3D] projected queries, keys and values -> [..., L, D] attended values."""
        *batch, length, dim = qkv.shape
        dim //= 3
        q, k, v = qkv.view(*batch, length, 3, self.heads, dim // self.heads).unbind(-3)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # [..., H, L, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(-2, -3).reshape(*batch, length, dim)
