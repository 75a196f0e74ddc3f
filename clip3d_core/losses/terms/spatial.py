"""Spatial (local) MCFA term: 3D features pooled per image patch against that patch's 2D feature
(see `spatial_alignment_loss`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from clip3d_core.losses.mcfa import spatial_alignment_loss
from clip3d_core.losses.registry import BaseTerm, LossInputs, register_loss


@register_loss("spatial")
class SpatialAlignmentTerm(BaseTerm):
    @dataclass
    class Options:
        temperature: float = 0.07
        max_pairs: int = 2048  # cap on point-group <-> patch pairs per batch
        symmetric: bool = True
        min_points: int = 1

    needs_teacher: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> Tensor:
        pt = inputs.point_targets
        assert pt is not None
        device = inputs.features.device
        index = torch.where(inputs.valid, pt.patch_index.to(device), -1)
        o = self.options
        return spatial_alignment_loss(
            inputs.features, index, pt.patch_features.to(device), temperature=o.temperature,
            symmetric=o.symmetric, max_pairs=o.max_pairs, min_points=o.min_points,
            generator=inputs.generator,
        )
