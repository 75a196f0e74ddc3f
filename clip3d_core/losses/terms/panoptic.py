"""Open-vocabulary panoptic loss terms (arXiv 2401.02402), one registered name each::

    loss:
      panoptic_class: {weight: 2.0}             # focal over base classes on the cosine logits
      panoptic_mask:  {weight: 5.0}             # binary focal of the matched masks
      panoptic_dice:  {weight: 5.0}             # dice of the matched masks
      object_distill: {weight: 1.0}             # L_O
      voxel_distill:  {weight: 1.0}             # L_V

They read the batch's `PanopticLossState` from ``inputs.extras["panoptic"]``: the panoptic training
step matches queries to segments once per batch and every term shares that matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from clip3d_core.losses.panoptic import (
    PanopticLossState,
    class_term,
    dice_term,
    mask_term,
    object_term,
    voxel_term,
)
from clip3d_core.losses.registry import BaseTerm, LossInputs, LossTermConfig, register_loss

PANOPTIC_KEY = "panoptic"


def default_panoptic_loss() -> dict[str, LossTermConfig]:
    """The paper's objective: focal classification + mask focal + dice (Mask2Former's 2 / 5 / 5)
    + L_O + L_V."""
    return {"panoptic_class": LossTermConfig(2.0), "panoptic_mask": LossTermConfig(5.0),
            "panoptic_dice": LossTermConfig(5.0), "object_distill": LossTermConfig(1.0),
            "voxel_distill": LossTermConfig(1.0)}


def _state(inputs: LossInputs) -> PanopticLossState:
    state = inputs.extras.get(PANOPTIC_KEY)
    if not isinstance(state, PanopticLossState):
        raise ValueError("panoptic loss terms need extras['panoptic'] (a PanopticLossState): "
                         "use them with a panoptic model")
    return state


@register_loss("panoptic_class")
class PanopticClassTerm(BaseTerm):
    @dataclass
    class Options:
        alpha: float = 0.25  # most (query, class) pairs are negatives
        gamma: float = 2.0

    def __call__(self, inputs: LossInputs) -> Tensor:
        return class_term(_state(inputs), alpha=self.options.alpha, gamma=self.options.gamma)


@register_loss("panoptic_mask")
class PanopticMaskTerm(BaseTerm):
    @dataclass
    class Options:
        alpha: float = -1.0  # < 0: no positive/negative balancing of the voxels (as BCE in Mask2Former)
        gamma: float = 2.0

    def __call__(self, inputs: LossInputs) -> Tensor:
        return mask_term(_state(inputs), alpha=self.options.alpha, gamma=self.options.gamma)


@register_loss("panoptic_dice")
class PanopticDiceTerm(BaseTerm):
    def __call__(self, inputs: LossInputs) -> Tensor:
        return dice_term(_state(inputs))


@register_loss("object_distill")
class ObjectDistillTerm(BaseTerm):
    needs_teacher: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> Tensor:
        return object_term(_state(inputs))


@register_loss("voxel_distill")
class VoxelDistillTerm(BaseTerm):
    needs_teacher: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> Tensor:
        return voxel_term(_state(inputs))
