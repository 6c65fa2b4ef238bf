"""The meta-learner: functional inner loop, inner losses, LSLR and the meta-step. Pure torch."""

from __future__ import annotations

from melo_dist.config import Config
from melo_dist.meta.adapt import MetaLearner
from melo_dist.models import build_backbone, build_weight_net


def build_learner(config: Config, num_items: int, levels: list[float]) -> MetaLearner:
    """The backbone, the regime's weight net and the inner learning rates, from the config."""
    backbone = build_backbone(config.model, num_items)
    weight_net = build_weight_net(config.model, config.meta.regime, levels)
    return MetaLearner(backbone, weight_net, config.meta, levels)
