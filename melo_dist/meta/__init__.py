"""The meta-learner (`melo.py`: inner loop, weighted loss, outer step) and its inner-loss
weightings (`weighting.py`); `reference.py` is the same algorithm as a per-task loop. Pure torch."""

from __future__ import annotations

from torch import nn

from melo_dist.config import Config
from melo_dist.meta.basic import BasicLearner
from melo_dist.meta.melo import MetaLearner, meta_step
from melo_dist.meta.weighting import build_weighting
from melo_dist.models import build_backbone

__all__ = [
    "BasicLearner",
    "MetaLearner",
    "build_learner",
    "learner_from_state",
    "meta_step",
    "scored_weights",
]


def build_learner(config: Config, num_items: int, levels: list[float]) -> nn.Module:
    """The regime's learner: `BasicLearner` for `basic`, else a `MetaLearner` with the regime's
    inner-loss weighting. Predictions are compared with rating / the top rating level."""
    backbone = build_backbone(config.model, num_items)
    scale = float(max(levels))
    if config.meta.regime == "basic":
        return BasicLearner(backbone, scale)
    model = config.model
    weighting = build_weighting(
        config.meta.regime,
        levels,
        model.encoder_embed,
        model.encoder_hidden,
        model.encoder_output,
        model.encoder_error,
    )
    return MetaLearner(backbone, weighting, config.meta, scale, levels)


def learner_from_state(state: dict) -> nn.Module:
    """The learner a checkpoint's state (`training.checkpoint.load_checkpoint`) holds."""
    learner = build_learner(
        Config.from_dict(state["config"]), state["num_items"], state["rating_levels"]
    )
    learner.load_state_dict(scored_weights(state))
    return learner


def scored_weights(state: dict) -> dict:
    """A checkpoint's weights to predict with: the parameters' moving average where training
    kept one (optim.average), else the parameters."""
    return state.get("averaged", state["learner"])
