"""Output-level loss: cross-entropy on cosine logits against text embeddings, with an ignore index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.similarity import cosine_logits


def masked_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy over the points whose label is not ``ignore_index``.

    ``L = -1/|V| sum_{i in V} sum_c q_ic log softmax(z_i)_c`` with V = {i : y_i != ignore_index},
    ``q_i = (1 - eps) onehot(y_i) + eps / C`` (label smoothing eps). With ``class_weight`` w the
    sum is weighted by w_{y_i} and divided by sum_{i in V} w_{y_i} (PyTorch's convention).

    Unlike ``F.cross_entropy`` it returns an exact 0 (still attached to the graph) instead of NaN
    when every label is ignored, which happens for frames without any labelled point in view.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits [N,C] and labels [N] expected, got {logits.shape} and {labels.shape}")
    labels = labels.long()
    num_classes = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index={ignore_index}")
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits[valid], labels[valid], weight=class_weight, label_smoothing=label_smoothing
    )


def cosine_cross_entropy(
    features: Tensor,
    text: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy on ``cos(F3d, text) / tau`` logits (see `cosine_logits`, `masked_cross_entropy`).

    Args:
        features: [N, D] 3D point features.
        text: [C, D] text embeddings of the training vocabulary (seen + unseen names).
        labels: [N] long class ids in [0, C) or ``ignore_index`` (GT for seen classes merged with
            pseudo labels; see `clip3d_core.pseudo_labels`).
        temperature: tau (float or learnable scalar tensor).
    """
    return masked_cross_entropy(
        cosine_logits(features, text, temperature),
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
    )


def class_frequency_weights(labels: Tensor, num_classes: int, *, power: float = 0.5,
                            ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Inverse-frequency class weights ``w_c = (n_c / n)^-power``, normalised to mean 1 over present classes.

    Absent classes get weight 0 (they contribute nothing anyway). ``power=0.5`` is the usual
    square-root balancing for driving scenes where road/vegetation outnumber poles by 100x.
    """
    labels = labels[labels != ignore_index].long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.zeros(num_classes, dtype=torch.float64)
    present = counts > 0
    if bool(present.any()):
        weights[present] = (counts[present] / counts.sum()).pow(-power)
        weights[present] /= weights[present].mean()
    return weights.float()
