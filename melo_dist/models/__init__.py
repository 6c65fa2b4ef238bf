"""Backbones: item sequence [..., L] -> per-position rating / scale [..., L]."""

from __future__ import annotations

from torch import nn

from melo_dist.config import ModelConfig
from melo_dist.models.gru4rec import GRU4Rec
from melo_dist.models.narm import NARM
from melo_dist.models.transformer import BERT4Rec, SASRec

BACKBONE_CLASSES = {"gru4rec": GRU4Rec, "narm": NARM, "sasrec": SASRec, "bert4rec": BERT4Rec}

# Parameters that hold embeddings: excluded when only the rest adapts (meta.adapt).
EMBEDDING_PREFIXES = ("item_embedding.", "position_embedding.")
# The bias head's per-user parameters: they start at 0 and the inner loop fits them.
USER_PARAMETERS = ("head.user_bias", "head.user_factors")
# Parameters indexed by item id: each task adapts only the rows its windows use.
ITEM_TABLES = ("item_embedding.weight", "head.item_bias.weight", "head.item_factors.weight")
# The bias head's bias model (started from the training ratings' fit): optim.weight_decay
# leaves them alone; it shrinks the sequence model's weights.
BIAS_MODEL_PARAMETERS = ("head.item_bias.weight", "head.item_factors.weight", *USER_PARAMETERS)


def decayed_weights(backbone: nn.Module) -> list[str]:
    """The sequence model's weight matrices and embeddings: what optim.weight_decay shrinks
    (not biases, norms, or the bias head's bias model)."""
    return [
        name
        for name, param in backbone.named_parameters()
        if param.dim() >= 2 and name not in BIAS_MODEL_PARAMETERS
    ]


def build_backbone(config: ModelConfig, num_items: int) -> nn.Module:
    return BACKBONE_CLASSES[config.backbone](config, num_items)
