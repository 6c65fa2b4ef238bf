"""Rating heads: per-position features [..., L, F] (and the item ids) -> rating / scale [..., L].

- `reference`: the MELO reference's `0.1 + sigmoid(linear(features))`.
- `bias`: a baseline-predictor head (Koren): global mean + item bias + user bias
  (+ user factors . item factors, with model.user_factors > 0) + linear(features), unsquashed.
  The global mean and item biases start from the training ratings (`init_from_ratings`: those
  of the bias reference point) and the linear near 0. The user bias and user factors start at
  0 and are what the inner loop fits per task, with their own inner learning rate
  (meta.user_inner_lr). Before adaptation the model predicts like the item-bias baseline;
  adapted on a user's support it is the bias model plus what the sequence adds. One inner step
  sets the user factors to a residual-weighted sum of the support items' factors, so the
  target's rating moves with its similarity to what the user rated: collaborative filtering
  whose item factors the outer loop learns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_dist.config import ModelConfig
from melo_dist.models.layers import embed_items
from melo_dist.models.packing import Packing, take_rows


class ReferenceHead(nn.Linear):
    def __init__(
        self, features: int, num_items: int, sequence_term: bool = True, factors: int = 0
    ) -> None:
        super().__init__(features, 1)

    def forward(self, features: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        return 0.1 + torch.sigmoid(super().forward(features).squeeze(-1))


class BiasHead(nn.Module):
    def __init__(
        self, features: int, num_items: int, sequence_term: bool = True, factors: int = 0
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1) if sequence_term else None  # None: bias model only
        if self.linear is not None:
            with torch.no_grad():  # start as the bias model: the sequence's part near 0
                self.linear.weight.mul_(0.01)
                self.linear.bias.zero_()
        self.item_bias = nn.Embedding(num_items + 1, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.user_bias = nn.Parameter(torch.zeros(()))
        if factors:
            self.item_factors = nn.Embedding(num_items + 1, factors)
            nn.init.normal_(self.item_factors.weight, std=0.1)
            self.user_factors = nn.Parameter(torch.zeros(factors))
        self.register_buffer("global_mean", torch.zeros(()))

    def forward(self, features: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        item_bias = take_rows(self.item_bias.weight, item_seq).squeeze(-1)
        out = self.global_mean + self.user_bias + item_bias
        if hasattr(self, "user_factors"):
            out = out + take_rows(self.item_factors.weight, item_seq) @ self.user_factors
        if self.linear is not None:
            out = out + self.linear(features).squeeze(-1)
        return out

    def init_from_ratings(self, global_mean: float, item_bias: torch.Tensor) -> None:
        """The bias reference point's global mean and item biases [items + 1], in rating /
        scale (`melo_dist.training.evaluation.bias_statistics`)."""
        with torch.no_grad():
            self.global_mean.fill_(global_mean)
            self.item_bias.weight.copy_(item_bias.reshape(-1, 1))


def user_regressors(params: dict[str, torch.Tensor], item_seq: torch.Tensor) -> torch.Tensor:
    """[..., L, P]: what the bias head's user parameters (user bias, then user factors) multiply.
    The prediction is linear in them; `params` are the backbone's (named as in
    `named_parameters`), so the inner loop passes its fast weights."""
    ones = params["head.item_bias.weight"].new_ones(*item_seq.shape, 1)
    if "head.item_factors.weight" not in params:
        return ones
    return torch.cat([ones, take_rows(params["head.item_factors.weight"], item_seq)], -1)


HEADS = {"reference": ReferenceHead, "bias": BiasHead}


class SequenceRegressor(nn.Module):
    """What every backbone shares: `features(item_seq)` [..., L, F] read from the sequence, then
    the rating head. `forward(item_seq)` -> rating / scale [..., L]. `torch.func` calls only
    `forward`, so it also runs the two halves apart: `head=False` returns the features, and
    `features=f` runs only the head on features computed before.

    Windows are left-padded, and a real position's output never depends on how much padding
    precedes it: `skipped` says how many padding columns the caller dropped from the left, and
    the output at the remaining positions is the same. The meta-learner therefore runs windows
    in at most `window_groups` groups of similar length, each without its common padding."""

    head: nn.Module
    item_embedding: nn.Embedding
    dropout: float
    window_groups = 1  # recurrent: every group is another pass over the time steps
    packs_tokens = False  # True: `forward` takes a `Packing` (position-wise layers, see packing.py)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """Item embeddings (padding zeroed) with the backbone's dropout: a GRU's input."""
        return F.dropout(embed_items(self.item_embedding, items), self.dropout, self.training)

    def features(self, item_seq: torch.Tensor, skipped: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        item_seq: torch.Tensor,
        features: torch.Tensor | None = None,
        head: bool = True,
        skipped: int = 0,
        candidates: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        if candidates is not None:  # item_seq is the context
            return self.score_candidates(item_seq, candidates)
        if packing is not None:  # one task's windows, computed on their real tokens only
            features = self.features(item_seq, packing=packing)
            out = self.head(features, packing.pack(item_seq)) if head else features
            return packing.unpack(out)
        if features is None:
            features = self.features(item_seq, skipped)
        return self.head(features, item_seq) if head else features

    def score_candidates(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Context [..., L - 1] and candidates [..., C] -> [..., C]: the last position's output
        of each window `context + candidate` (what scoring a user's candidates needs). Here by
        running every window; causal backbones override it to read the context once."""
        shape = (*candidates.shape, context.shape[-1])
        windows = torch.cat([context.unsqueeze(-2).expand(shape), candidates.unsqueeze(-1)], -1)
        return self(windows)[..., -1]


def build_head(config: ModelConfig, features: int, num_items: int) -> nn.Module:
    return HEADS[config.head](features, num_items, config.sequence_term, config.user_factors)
