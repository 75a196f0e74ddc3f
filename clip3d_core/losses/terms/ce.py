"""Output-level term: cross-entropy on cos(F3d, text) / tau against the training labels."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from clip3d_core.losses.classification import class_frequency_weights, masked_cross_entropy
from clip3d_core.losses.registry import BaseTerm, LossInputs, register_loss


@register_loss("ce")
class CrossEntropyTerm(BaseTerm):
    @dataclass
    class Options:
        class_balance: float = 0.0  # class weights (n_c / n) ** -power per batch; 0 = unweighted
        label_smoothing: float = 0.0

    def __call__(self, inputs: LossInputs) -> Tensor:
        o = self.options
        weight = None
        if o.class_balance > 0:
            weight = class_frequency_weights(inputs.labels, inputs.num_classes, power=o.class_balance)
            weight = weight.to(inputs.features.device)
        return masked_cross_entropy(inputs.logits, inputs.labels, label_smoothing=o.label_smoothing,
                                    class_weight=weight)
