"""Semantic segmentation metrics: confusion matrix, per-class IoU, mIoU (all / seen / unseen), hIoU.

Conventions (those of the zero-shot point cloud segmentation literature):
- rows of the confusion matrix are ground truth, columns predictions;
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; a class with an empty union (never in the ground
  truth, never predicted) has IoU NaN and is left out of every mean;
- a labelled point whose prediction is not a class id (e.g. 65535 = unlabelled, or -1) counts as
  a false negative of its class and as nobody's false positive;
- ``hIoU = 2 * mIoU_seen * mIoU_unseen / (mIoU_seen + mIoU_unseen)`` (0 when both are 0).

The confusion-matrix picture is `clip3d_core.viz.confusion_png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX


class EvaluationError(ValueError):
    """Inconsistent inputs to an evaluation (shapes, label ranges, class lists)."""


def _as_long_tensor(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x.astype(np.int64, copy=False))
    return x.long().reshape(-1)


class ConfusionMatrix:
    """Accumulates a [C, C] confusion matrix over batches (plus a column for "no prediction").

    ``counts`` is one int64 tensor [C, C + 1] so a DDP run can ``all_reduce`` it in one call;
    ``matrix`` is its [C, C] class part.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise EvaluationError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    @property
    def matrix(self) -> Tensor:
        return self.counts[:, : self.num_classes]

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one batch: ``pred`` and ``target`` are label arrays of equal size (any shape)."""
        pred, target = _as_long_tensor(pred).cpu(), _as_long_tensor(target).cpu()
        if pred.shape != target.shape:
            raise EvaluationError(f"pred and target sizes differ: {pred.numel()} vs {target.numel()}")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise EvaluationError(
                f"target labels outside [0, {self.num_classes}) that are not ignore_index={self.ignore_index}"
            )
        c = self.num_classes
        pred = torch.where((pred >= 0) & (pred < c), pred, c)  # c = the "no prediction" column
        flat = torch.bincount(target * (c + 1) + pred, minlength=c * (c + 1))
        self.counts += flat.reshape(c, c + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise EvaluationError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.counts += other.counts
        return self

    def iou(self) -> Tensor:
        """[C] float64 per-class IoU, NaN where the union is empty."""
        return per_class_iou(self.counts)

    def report(
        self,
        class_names: Sequence[str],
        unseen: Sequence[int] | None = None,
    ) -> EvaluationReport:
        return EvaluationReport.from_confusion(self, class_names, unseen=unseen)


def per_class_iou(counts: Tensor | np.ndarray) -> Tensor:
    """IoU per class from a [C, C] or [C, C + 1] confusion (extra column = "no prediction")."""
    counts = torch.as_tensor(counts).to(torch.float64)
    c = counts.shape[0]
    if counts.ndim != 2 or counts.shape[1] not in (c, c + 1):
        raise EvaluationError(f"confusion must be [C, C] or [C, C+1], got {tuple(counts.shape)}")
    tp = counts[:, :c].diagonal()
    fp = counts[:, :c].sum(0) - tp
    fn = counts.sum(1) - tp
    union = tp + fp + fn
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(iou: Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean of the non-NaN IoUs (of ``classes`` if given); NaN when none is defined."""
    values = iou if classes is None else iou[list(classes)]
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def harmonic_iou(seen: float, unseen: float) -> float:
    """Harmonic mean of seen and unseen mIoU (the zero-shot headline number)."""
    if math.isnan(seen) or math.isnan(unseen):
        return math.nan
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclasses.dataclass
class EvaluationReport:
    """Metrics of one evaluation; fractions in [0, 1], None where undefined."""

    class_names: list[str]
    iou: list[float | None]
    support: list[int]  # ground-truth points per class
    seen: list[int]
    unseen: list[int]
    miou: float | None
    miou_seen: float | None
    miou_unseen: float | None
    hiou: float | None
    accuracy: float | None  # overall point accuracy over labelled points
    num_points: int  # labelled points evaluated
    confusion: list[list[int]]  # [C, C] rows = ground truth

    @classmethod
    def from_confusion(
        cls,
        cm: ConfusionMatrix | Tensor | np.ndarray,
        class_names: Sequence[str],
        *,
        unseen: Sequence[int] | None = None,
    ) -> EvaluationReport:
        """Build the report. ``unseen`` = ids of the unseen classes (zero-shot split); the others
        are seen. Without ``unseen`` only the overall mIoU is reported."""
        counts = cm.counts if isinstance(cm, ConfusionMatrix) else torch.as_tensor(cm)
        counts = counts.to(torch.int64)
        c = counts.shape[0]
        if len(class_names) != c:
            raise EvaluationError(f"{len(class_names)} class names for a {c}-class confusion matrix")
        unseen_ids = sorted(set(int(i) for i in unseen)) if unseen is not None else []
        if any(i < 0 or i >= c for i in unseen_ids):
            raise EvaluationError(f"unseen class ids {unseen_ids} outside [0, {c})")
        seen_ids = [i for i in range(c) if i not in unseen_ids] if unseen is not None else []
        iou = per_class_iou(counts)
        total = int(counts.sum())
        correct = int(counts[:, :c].diagonal().sum())
        miou_seen = mean_iou(iou, seen_ids) if unseen is not None else math.nan
        miou_unseen = mean_iou(iou, unseen_ids) if unseen is not None else math.nan
        return cls(
            class_names=list(class_names),
            iou=[_nan_to_none(float(v)) for v in iou],
            support=[int(v) for v in counts.sum(1)],
            seen=seen_ids,
            unseen=unseen_ids,
            miou=_nan_to_none(mean_iou(iou)),
            miou_seen=_nan_to_none(miou_seen),
            miou_unseen=_nan_to_none(miou_unseen),
            hiou=_nan_to_none(harmonic_iou(miou_seen, miou_unseen)) if unseen is not None else None,
            accuracy=correct / total if total else None,
            num_points=total,
            confusion=counts[:, :c].tolist(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        return cls(**json.loads(text))

    def to_markdown(self) -> str:
        """Per-class table (IoU in %) followed by the summary metrics."""

        def pct(x: float | None) -> str:
            return "–" if x is None else f"{100 * x:.1f}"

        split = {i: "unseen" for i in self.unseen} | {i: "seen" for i in self.seen}
        lines = ["| class | split | IoU (%) | points |", "|---|---|---:|---:|"]
        for i, name in enumerate(self.class_names):
            lines.append(f"| {name} | {split.get(i, '')} | {pct(self.iou[i])} | {self.support[i]} |")
        lines += ["", "| metric | value (%) |", "|---|---:|", f"| mIoU | {pct(self.miou)} |"]
        if self.unseen:
            lines += [
                f"| mIoU seen | {pct(self.miou_seen)} |",
                f"| mIoU unseen | {pct(self.miou_unseen)} |",
                f"| hIoU | {pct(self.hiou)} |",
            ]
        lines.append(f"| accuracy | {pct(self.accuracy)} |")
        return "\n".join(lines) + "\n"
