"""Training losses: MCFA feature alignment (semantic + spatial) and output-level cosine cross-entropy."""

from clip3d_core.losses.classification import (
    IGNORE_INDEX,
    class_frequency_weights,
    cosine_cross_entropy,
    cosine_logits,
    masked_cross_entropy,
)
from clip3d_core.losses.mcfa import (
    class_prototypes,
    pool_by_index,
    semantic_alignment_loss,
    spatial_alignment_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "class_frequency_weights",
    "class_prototypes",
    "cosine_cross_entropy",
    "cosine_logits",
    "masked_cross_entropy",
    "pool_by_index",
    "semantic_alignment_loss",
    "spatial_alignment_loss",
]
