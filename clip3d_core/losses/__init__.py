"""Training losses: MCFA feature alignment (semantic + spatial) and output-level cosine cross-entropy."""

from clip3d_core.losses.classification import (
    class_frequency_weights,
    cosine_cross_entropy,
    masked_cross_entropy,
)
from clip3d_core.losses.mcfa import (
    class_prototypes,
    pool_by_index,
    semantic_alignment_loss,
    spatial_alignment_loss,
)
from clip3d_core.losses.registry import (
    LOSSES,
    BaseTerm,
    LossInputs,
    LossParts,
    LossTerm,
    LossTermConfig,
    build_loss_terms,
    combine_losses,
    register_loss,
)

__all__ = [
    "LOSSES",
    "BaseTerm",
    "LossInputs",
    "LossParts",
    "LossTerm",
    "LossTermConfig",
    "build_loss_terms",
    "class_frequency_weights",
    "class_prototypes",
    "combine_losses",
    "cosine_cross_entropy",
    "masked_cross_entropy",
    "pool_by_index",
    "register_loss",
    "semantic_alignment_loss",
    "spatial_alignment_loss",
]
