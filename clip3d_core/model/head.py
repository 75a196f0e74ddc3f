"""CLIP-space heads: point MLP, projection into the joint embedding, cosine classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip3d_core.similarity import cosine_logits


def mlp(
    in_channels: int, hidden: int, out_channels: int, bn_eps: float = 1e-3, bn_momentum: float = 0.01
) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: the shape of every small per-point network here."""
    return nn.Sequential(
        nn.Linear(in_channels, hidden, bias=False),
        nn.BatchNorm1d(hidden, eps=bn_eps, momentum=bn_momentum),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_channels),
    )


class ProjectionHead(nn.Module):
    """Per-point features -> L2-normalised vectors in CLIP's joint image-text space."""

    def __init__(self, in_channels: int, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.net = mlp(in_channels, hidden, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class CosineClassifier(nn.Module):
    """``logits = cos(f, t) / T`` against text embeddings t, with a learnable log temperature.

    The temperature is clamped to [min_temperature, max_temperature] (CLIP caps its logit scale
    at 100, i.e. T >= 0.01) so it cannot collapse to zero and blow up the logits.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learn: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)), requires_grad=learn)
        self.log_min = math.log(min_temperature)
        self.log_max = math.log(max_temperature)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.clamp(self.log_min, self.log_max).exp()

    def forward(self, features: Tensor, text: Tensor, normalized: bool = False) -> Tensor:
        """features [N, D], text [C, D] -> logits [N, C] (zero rows of ``features`` give zero logits).
        ``normalized=True`` promises unit (or zero) rows on both sides and skips renormalising them:
        at inference that pass over [N, D] costs more than the product itself."""
        if normalized:
            return features @ text.to(features.dtype).t() / self.temperature
        return cosine_logits(features, text.to(features.dtype), self.temperature)
