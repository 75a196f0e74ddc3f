"""Semantic (global) MCFA term: 3D point features against class prototypes of the teacher's 2D
features at the camera-visible points (see `semantic_alignment_loss`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.losses.mcfa import semantic_alignment_loss
from clip3d_core.losses.registry import BaseTerm, LossInputs, register_loss


@register_loss("semantic")
class SemanticAlignmentTerm(BaseTerm):
    @dataclass
    class Options:
        temperature: float = 0.07
        balance: bool = True  # every class weighs the same

    needs_teacher: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> Tensor:
        pt = inputs.point_targets
        assert pt is not None
        labels = inputs.labels
        labels2d = torch.where(pt.visible.to(labels.device), labels, IGNORE_INDEX)
        return semantic_alignment_loss(
            inputs.features, labels, pt.features.to(inputs.features.device), labels2d,
            num_classes=inputs.num_classes, temperature=self.options.temperature,
            balance=self.options.balance,
        )
