"""The method's stages: which label supervises each point, and the per-batch loss.

- CLIP-guided (stage 1): seen-class ground truth where present; elsewhere the 2D teacher's
  confidence-filtered pseudo label (zero-shot: unseen-class GT is hidden first, and a point
  without seen GT keeps a teacher label only if it names an unseen class). Loss = the configured
  terms (`clip3d_core.losses.registry`; by default CE(cos(F3d, text) / tau) + semantic MCFA +
  spatial MCFA).
- Self-training (stage 2): a frozen copy of the stage-1 model labels the points without GT where
  it is confident (per-class thresholds calibrated on training frames); training continues with
  the same loss.
- Annotation-free: the same stages with no ground truth at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.model import Clip3DNet
from clip3d_core.predictor import CameraFeatures, Prediction, predict
from clip3d_core.pseudo_labels import (
    merge_labels,
    per_class_thresholds,
    point_pseudo_labels,
    self_training_labels,
)
from clip3d_core.teacher import PointTargets
from clip3d_core.training.config import PseudoConfig, SelfTrainingConfig, TrainConfig

log = logging.getLogger(__name__)

CLIP_GUIDED, SELF_TRAINING = "clip_guided", "self_training"
PANOPTIC = "panoptic"  # the panoptic setting's one stage (base labels + distillation)

# Where a point's training label came from (logged as label-source fractions).
SOURCE_NONE, SOURCE_GT, SOURCE_TEACHER, SOURCE_SELF = 0, 1, 2, 3


@dataclass(frozen=True)
class Stage:
    """Iterations [start, end) of one stage; `lr_scale` multiplies the base learning rate."""

    name: str
    start: int
    end: int
    lr_scale: float = 1.0

    @property
    def iterations(self) -> int:
        return self.end - self.start


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    stages = [Stage(PANOPTIC if cfg.setting == "panoptic" else CLIP_GUIDED, 0, cfg.trainer.iterations)]
    if cfg.self_training.enabled:
        end = cfg.trainer.iterations + cfg.self_training.iterations
        stages.append(Stage(SELF_TRAINING, cfg.trainer.iterations, end, cfg.self_training.lr_scale))
    return stages


def stage_at(stages: list[Stage], iteration: int) -> Stage | None:
    """The stage iteration `iteration` belongs to (None once training is over)."""
    for stage in stages:
        if stage.start <= iteration < stage.end:
            return stage
    return None


@dataclass(frozen=True)
class LabelSpace:
    """The training-side view of the classes: what ground truth may be used, which classes a point
    without ground truth can be."""

    num_classes: int
    unseen: tuple[int, ...]
    setting: str  # zero_shot | annotation_free | supervised

    def training_gt(self, labels: Tensor | None) -> Tensor | None:
        """GT the setting allows: unseen classes hidden (zero-shot), none (annotation-free)."""
        if labels is None or self.setting == "annotation_free":
            return None
        if self.setting == "zero_shot" and self.unseen:
            hidden = torch.isin(labels, torch.as_tensor(self.unseen, device=labels.device))
            labels = torch.where(hidden, torch.full_like(labels, IGNORE_INDEX), labels)
        return labels.long()

    def unlabelled_candidates(self, restrict: bool) -> tuple[int, ...] | None:
        """Classes a point without (seen) GT may take; None = all."""
        if restrict and self.setting == "zero_shot" and self.unseen:
            return self.unseen
        return None


@dataclass
class Targets:
    labels: Tensor  # [N] long, -1 = no label
    source: Tensor  # [N] uint8 SOURCE_*

    def fractions(self) -> dict[str, float]:
        n = max(1, self.labels.numel())
        return {
            f"labels/{name}": float((self.source == s).sum()) / n
            for name, s in (("gt", SOURCE_GT), ("teacher", SOURCE_TEACHER), ("self", SOURCE_SELF))
        }


def _targets(gt: Tensor | None, filled: Tensor, fill_source: int) -> Targets:
    labels = merge_labels(gt, filled)
    source = torch.full_like(labels, SOURCE_NONE, dtype=torch.uint8)
    source[labels >= 0] = fill_source
    if gt is not None:
        source[gt >= 0] = SOURCE_GT
    return Targets(labels, source)


def teacher_labels(point_targets: PointTargets, text: Tensor, cfg: PseudoConfig, space: LabelSpace) -> Tensor:
    """Teacher pseudo labels of a batch (-1 where invisible or not confident)."""
    allowed = space.unlabelled_candidates(cfg.restrict_to_unseen)
    return point_pseudo_labels(point_targets.features, point_targets.visible, text.to(point_targets.features),
                               cfg.labels, restrict_to=allowed).labels


def clip_guided_targets(
    gt: Tensor | None,
    point_targets: PointTargets | None,
    text: Tensor,
    cfg: PseudoConfig,
    space: LabelSpace,
    num_points: int,
) -> Targets:
    """Stage-1 labels: allowed GT, then teacher pseudo labels where there is none."""
    gt = space.training_gt(gt)
    if not cfg.enabled or point_targets is None:
        empty = torch.full((num_points,), IGNORE_INDEX, dtype=torch.long)
        return _targets(gt, empty if gt is None else torch.full_like(gt, IGNORE_INDEX), SOURCE_TEACHER)
    pseudo = teacher_labels(point_targets, text, cfg, space)
    return _targets(None if gt is None else gt.to(pseudo.device), pseudo, SOURCE_TEACHER)


def self_training_targets(
    gt: Tensor | None,
    prediction: Prediction,
    thresholds: Tensor | None,
    cfg: SelfTrainingConfig,
    space: LabelSpace,
    fallback: Tensor | None = None,
) -> Targets:
    """Stage-2 labels: allowed GT, else the stage-1 model's confident prediction (`predict` with
    ``allowed`` = the classes a point without GT can be), else (optionally) the teacher's pseudo
    label `fallback`."""
    assert prediction.logits is not None
    logits = prediction.logits
    gt = space.training_gt(gt)
    gt = None if gt is None else gt.to(logits.device)
    own = self_training_labels(
        logits.float(),
        valid=prediction.valid,
        top_fraction=None,
        min_confidence=cfg.min_confidence,
        class_thresholds=None if thresholds is None else thresholds.to(logits.device),
    ).labels
    out = _targets(gt, own, SOURCE_SELF)
    if fallback is not None:
        fill = (out.labels < 0) & (fallback.to(out.labels.device) >= 0)
        out.labels[fill] = fallback.to(out.labels.device)[fill]
        out.source[fill] = SOURCE_TEACHER
    return out


@torch.no_grad()
def calibrate_thresholds(
    model: Clip3DNet,
    batches: Iterable[tuple[Tensor, Tensor | None, CameraFeatures | None]],
    text: Tensor,
    cfg: SelfTrainingConfig,
    space: LabelSpace,
    restrict: bool,
) -> Tensor:
    """Per-class confidence thresholds of the frozen stage-1 model: the (1 - top_fraction)
    quantile of each class's confidences over the points without allowed GT, floored at
    `min_confidence`. `batches` yields one frame's (points, gt, camera features) on the model's
    device; the model runs as it does in self-training (`predict`, fused where it has fusion)."""
    labels_all, conf_all = [], []
    for points, gt, camera in batches:
        pred = predict(model, points, text, camera=camera, allowed=space.unlabelled_candidates(restrict))
        conf, labels = pred.scores, pred.labels
        keep = pred.valid.clone()
        gt = space.training_gt(gt)
        if gt is not None:
            keep &= gt.to(keep.device) < 0
        labels_all.append(labels[keep].cpu())
        conf_all.append(conf[keep].cpu())
    labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)
    conf = torch.cat(conf_all) if conf_all else torch.zeros(0)
    thresholds = per_class_thresholds(labels, conf, space.num_classes, cfg.top_fraction)
    return thresholds.clamp(min=cfg.min_confidence)
