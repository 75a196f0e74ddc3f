"""Point-only augmentation for training (rotation about z, mirror, scale, jitter).

Applied after the teacher's point <-> pixel correspondence has been fixed on the original points,
so images and cameras never need to follow the transform. Every draw comes from the caller's
generator (seeded by run seed, iteration and rank): resumed runs augment identically.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clip3d_core.training.config import AugmentConfig


def augment_points(points: Tensor, batch_index: Tensor, batch_size: int, cfg: AugmentConfig,
                   generator: torch.Generator) -> Tensor:
    """points [N, C] (x, y, z first) -> a transformed copy; one random transform per sample."""
    if not cfg.enabled or points.numel() == 0:
        return points
    b = batch_size
    angle = (torch.rand(b, generator=generator) * 2 - 1) * cfg.rotate_z
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    if cfg.flip:
        mirror = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        rot[:, 1, :] *= mirror.unsqueeze(1)  # y -> -y (left/right mirror)
    lo, hi = cfg.scale
    scale = lo + (hi - lo) * torch.rand(b, generator=generator)
    rot = rot * scale.view(b, 1, 1)
    jitter = cfg.jitter * torch.randn(points.shape[0], 3, generator=generator)
    rot, jitter = rot.to(points), jitter.to(points)
    xyz = torch.einsum("nij,nj->ni", rot[batch_index], points[:, :3]) + jitter
    return torch.cat((xyz, points[:, 3:]), dim=1)

