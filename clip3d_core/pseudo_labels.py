"""Output-level supervision: CLIP pseudo labels for points, confidence filtering, merging with GT,
and the self-training labels of stage 2.

Labels are long tensors with -1 (`IGNORE_INDEX`) for "no label". Every function is pure; the
teacher side (which features each point gets) lives in `clip3d_core.teacher`.

Zero-shot setting: the caller maps the GT of unseen classes to -1 before merging (those points are
unannotated by definition of the setting); `merge_labels` then keeps the seen-class GT and fills only
the unlabelled points with pseudo labels. Annotation-free setting: no GT, pseudo labels everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX

CONFIDENCE_KINDS = ("prob", "margin")


class PseudoLabelError(ValueError):
    """Invalid pseudo-label settings or inconsistent label tensors."""


@dataclasses.dataclass
class PseudoLabelConfig:
    """How CLIP features become point labels (the training config embeds this)."""

    temperature: float = 0.01  # softmax temperature on cosines (CLIP's logit scale is 100)
    confidence: str = "prob"  # "prob": top-1 softmax probability; "margin": top-1 minus top-2 probability
    min_confidence: float = 0.0  # global threshold on the confidence
    top_fraction: float | None = None  # per class, keep only this fraction of the most confident points

    def validate(self) -> PseudoLabelConfig:
        if self.temperature <= 0:
            raise PseudoLabelError(f"temperature must be > 0, got {self.temperature}")
        if self.confidence not in CONFIDENCE_KINDS:
            raise PseudoLabelError(f"confidence must be one of {CONFIDENCE_KINDS}, got {self.confidence!r}")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise PseudoLabelError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        return self


@dataclasses.dataclass
class PseudoLabels:
    """Per-point labels (-1 = none) with their confidence (0 where none)."""

    labels: Tensor  # [N] long
    confidence: Tensor  # [N] float


def classify(
    features: Tensor, text: Tensor, *, temperature: float = 0.01, confidence: str = "prob"
) -> tuple[Tensor, Tensor]:
    """Zero-shot classification of features against text embeddings.

    ``p = softmax(cos(f, t_c) / temperature)``; label = argmax_c p (= argmax of the cosine);
    confidence = max p ("prob") or p_top1 - p_top2 ("margin").

    Args:
        features: [..., D] (e.g. [N, D] point features or [gh, gw, D] dense features).
        text: [C, D] text embeddings of the vocabulary.

    Returns:
        labels [...] long, confidence [...] float.
    """
    if features.shape[-1] != text.shape[-1] or text.ndim != 2:
        raise PseudoLabelError(
            f"features [..., D] and text [C, D] must share D: {tuple(features.shape)}, {tuple(text.shape)}"
        )
    if confidence not in CONFIDENCE_KINDS:
        raise PseudoLabelError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    logits = F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    probs = logits.softmax(dim=-1)
    if confidence == "prob" or text.shape[0] == 1:
        conf, labels = probs.max(dim=-1)
        return labels, conf if confidence == "prob" else torch.ones_like(conf)
    top2, idx = probs.topk(2, dim=-1)
    return idx[..., 0], top2[..., 0] - top2[..., 1]


def dense_pseudo_labels(
    features: Tensor,
    text: Tensor,
    *,
    out_hw: tuple[int, int] | None = None,
    temperature: float = 0.01,
    confidence: str = "prob",
) -> tuple[Tensor, Tensor]:
    """Per-patch (or, with ``out_hw``, per-pixel after bilinear upsampling of the features) labels.

    Args:
        features: [D, gh, gw] dense CLIP features of one image.
        out_hw: (H, W) to upsample to (MaskCLIP-style per-pixel labels), None to stay per patch.

    Returns:
        labels [h, w] long, confidence [h, w].
    """
    if features.ndim != 3:
        raise PseudoLabelError(f"dense features must be [D, gh, gw], got {tuple(features.shape)}")
    if out_hw is not None:
        features = F.interpolate(features[None], size=out_hw, mode="bilinear", align_corners=False)[0]
    return classify(features.permute(1, 2, 0), text, temperature=temperature, confidence=confidence)


def per_class_thresholds(labels: Tensor, confidence: Tensor, num_classes: int, top_fraction: float) -> Tensor:
    """Confidence threshold per class keeping its ``top_fraction`` most confident points.

    ``thr_c = quantile_{1 - top_fraction}({conf_i : label_i = c})``; 0 for classes with no point
    (nothing to filter). Compute it over a whole pass of the data for dataset-level thresholds,
    or per batch.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise PseudoLabelError(f"top_fraction must be in (0, 1], got {top_fraction}")
    thresholds = torch.zeros(num_classes, dtype=confidence.dtype, device=confidence.device)
    keep = labels >= 0
    labels, confidence = labels[keep], confidence[keep]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise PseudoLabelError(f"label {int(labels.max())} outside the {num_classes} classes")
    # One sort by (class, confidence) instead of a quantile call per class.
    order = torch.argsort(confidence)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    # Within each class (ascending confidence) the threshold is the confidence of the first of
    # the round(n * top_fraction) kept points (at least one); ties may keep a few more.
    kept = (counts.double() * top_fraction).round().long().clamp(min=1)
    first = starts + counts - kept
    sorted_conf = confidence[order]
    thresholds[present] = sorted_conf[first[present]]
    return thresholds


def filter_by_confidence(
    labels: Tensor,
    confidence: Tensor,
    *,
    min_confidence: float = 0.0,
    class_thresholds: Tensor | None = None,
    top_fraction: float | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Drop (set to -1) labels below a global threshold, a per-class threshold, or outside the
    per-class top fraction (computed on these points). Returns new labels."""
    labels = labels.clone()
    drop = confidence < min_confidence
    has = labels >= 0
    if class_thresholds is not None:
        drop |= has & (confidence < class_thresholds[labels.clamp(min=0)])
    if top_fraction is not None:
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        thr = per_class_thresholds(labels, confidence, num_classes, top_fraction)
        drop |= has & (confidence < thr[labels.clamp(min=0)])
    labels[drop] = IGNORE_INDEX
    return labels


def _ids(ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(ids if isinstance(ids, Tensor) else list(ids), dtype=torch.long, device=device)


def restrict_labels(labels: Tensor, allowed: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """Labels outside ``allowed`` class ids become -1 (e.g. keep pseudo labels of unseen classes only)."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    mask[_ids(allowed, labels.device)] = True
    return torch.where((labels >= 0) & mask[labels.clamp(min=0, max=num_classes - 1)], labels, IGNORE_INDEX)


def point_pseudo_labels(
    point_features: Tensor,
    visible: Tensor,
    text: Tensor,
    cfg: PseudoLabelConfig | None = None,
    *,
    restrict_to: Sequence[int] | None = None,
) -> PseudoLabels:
    """CLIP pseudo labels for points from their sampled 2D features (`teacher.PointTargets`).

    Points not visible in any camera get -1; then the config's filters apply in this order:
    class restriction, global threshold, per-class top fraction (among the remaining points).

    Args:
        point_features: [N, D] CLIP features at the points' pixels.
        visible: [N] bool, points seen by a camera.
        text: [C, D] text embeddings of the full vocabulary (seen + unseen).
        restrict_to: class ids pseudo labels may take (e.g. the unseen ones; the caller's split
            decides, so it is an argument, not a user setting).
    """
    cfg = (cfg or PseudoLabelConfig()).validate()
    labels, conf = classify(point_features, text, temperature=cfg.temperature, confidence=cfg.confidence)
    num_classes = text.shape[0]
    labels = torch.where(visible, labels, IGNORE_INDEX)
    if restrict_to is not None:
        labels = restrict_labels(labels, restrict_to, num_classes)
    labels = filter_by_confidence(
        labels, conf, min_confidence=cfg.min_confidence, top_fraction=cfg.top_fraction,
        num_classes=num_classes,
    )
    return PseudoLabels(labels=labels, confidence=torch.where(labels >= 0, conf, torch.zeros_like(conf)))


def merge_labels(gt: Tensor | None, pseudo: Tensor) -> Tensor:
    """Training labels: GT where it exists (>= 0), the pseudo label elsewhere.

    ``gt`` must already hold -1 for unseen-class points in the zero-shot setting (`mask_classes`);
    ``gt=None`` is the annotation-free setting (pseudo labels everywhere).
    """
    if gt is None:
        return pseudo.clone()
    if gt.shape != pseudo.shape:
        raise PseudoLabelError(f"gt {tuple(gt.shape)} and pseudo {tuple(pseudo.shape)} differ")
    return torch.where(gt >= 0, gt.long(), pseudo.long())


def mask_classes(labels: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    """Labels of the given classes become -1 (hide unseen-class GT in the zero-shot setting)."""
    hidden = torch.isin(labels, _ids(classes, labels.device))
    return torch.where(hidden, torch.full_like(labels, IGNORE_INDEX), labels)


def self_training_labels(
    logits: Tensor,
    *,
    valid: Tensor | None = None,
    top_fraction: float | None = 0.5,
    min_confidence: float = 0.0,
    class_thresholds: Tensor | None = None,
) -> PseudoLabels:
    """Stage-2 labels from the model's own predictions.

    confidence = max softmax(logits) (logits already carry the model's temperature); each class
    keeps its ``top_fraction`` most confident points (per-class quantile, so rare classes are not
    drowned by a global threshold), and/or those above ``min_confidence`` / ``class_thresholds``
    (e.g. dataset-level thresholds from `per_class_thresholds`).

    Args:
        logits: [N, C] model logits.
        valid: [N] bool, points the model produced features for (others get -1).
    """
    if logits.ndim != 2:
        raise PseudoLabelError(f"logits must be [N, C], got {tuple(logits.shape)}")
    conf, labels = logits.detach().softmax(dim=1).max(dim=1)
    if valid is not None:
        labels = torch.where(valid, labels, IGNORE_INDEX)
    labels = filter_by_confidence(
        labels, conf, min_confidence=min_confidence, class_thresholds=class_thresholds,
        top_fraction=top_fraction, num_classes=logits.shape[1],
    )
    return PseudoLabels(labels=labels, confidence=torch.where(labels >= 0, conf, torch.zeros_like(conf)))


def label_quality(pred: Tensor, target: Tensor) -> dict[str, float]:
    """How good a set of (pseudo) labels is against GT, over the GT-labelled points.

    coverage = share of them that got a label; accuracy = share of the labelled ones that are right.
    """
    has_gt = target >= 0
    n = int(has_gt.sum())
    covered = has_gt & (pred >= 0)
    m = int(covered.sum())
    correct = int((pred[covered] == target[covered]).sum())
    return {
        "coverage": m / n if n else float("nan"),
        "accuracy": correct / m if m else float("nan"),
        "points": float(n),
    }
