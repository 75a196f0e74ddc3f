"""Cosine similarity between point (or pixel) features and class text embeddings: the one
classification rule of the open vocabulary, shared by the model, the losses and the pseudo labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_logits(features: Tensor, text: Tensor, temperature: float | Tensor) -> Tensor:
    """Cosine-similarity logits ``cos(f_i, t_c) / tau``.

    Args:
        features: [N, D] point features (normalised here; zero rows give zero logits).
        text: [C, D] class text embeddings (normalised here).
        temperature: tau > 0, a float or a scalar tensor (e.g. a learnable one, gradients flow).

    Returns:
        [N, C] logits.
    """
    if features.ndim != 2 or text.ndim != 2 or features.shape[1] != text.shape[1]:
        raise ValueError(f"features [N,D] and text [C,D] must share D, got {features.shape} and {text.shape}")
    return F.normalize(features, dim=1) @ F.normalize(text, dim=1).t() / temperature
