"""2D-3D fusion: add a point's sampled CLIP image feature to its 3D feature through a learned gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedFusion(nn.Module):
    """``f = normalize(f3d + g(f3d, f2d) * f2d)`` for points seen by a camera, ``f3d`` elsewhere.

    g is a per-channel sigmoid gate computed from both features, so the network learns when the
    (noisy, patch-resolution) CLIP feature should override the 3D one. The gate starts mostly
    closed (bias -2, g ~ 0.12) so a model trained without images degrades gracefully with them.
    """

    def __init__(self, embed_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim)
        )
        nn.init.constant_(self.gate[-1].bias, -2.0)

    def forward(self, f3d: Tensor, f2d: Tensor, mask: Tensor) -> Tensor:
        """f3d, f2d [N, D]; mask [N] bool (the point has a CLIP feature). Rows of ``f2d`` where the
        mask is False are never read, so they may hold anything (zeros, NaN)."""
        if f3d.shape != f2d.shape or mask.shape != f3d.shape[:1]:
            raise ValueError(
                f"f3d {tuple(f3d.shape)}, f2d {tuple(f2d.shape)}, mask {tuple(mask.shape)} disagree"
            )
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return f3d
        a, b = f3d.index_select(0, idx), F.normalize(f2d.index_select(0, idx), dim=-1)
        fused = F.normalize(a + torch.sigmoid(self.gate(torch.cat((a, b), dim=-1))) * b, dim=-1)
        return f3d.index_copy(0, idx, fused)
