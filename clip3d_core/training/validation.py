"""Evaluation loops: run predictors over held-out frames (with full ground truth) and update the
configured metrics, sharded over DDP processes and merged.

A predictor maps a frame to a `Prediction`. `FramePredictor` is the model's: the same `predict`
the segmenter runs, with the frame's camera features for fusion models and the score threshold,
so the numbers describe what ships."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from clip3d_core.checkpoint import load_checkpoint
from clip3d_core.clip import load_clip
from clip3d_core.clip.dense import DenseClipEncoder
from clip3d_core.clip.text import NameEmbeddings
from clip3d_core.data import Frame, ZeroShotSplit
from clip3d_core.geometry import project_points
from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.metrics import (
    GroundTruth,
    Metric,
    MetricConfig,
    MetricContext,
    build_metrics,
    default_metrics_config,
    merged_results,
)
from clip3d_core.model import Clip3DNet
from clip3d_core.model.panoptic import PanopticInfo, PanopticNet
from clip3d_core.predictor import CameraFeatures, CameraSource, Prediction, predict, predict_panoptic
from clip3d_core.pseudo_labels import classify
from clip3d_core.teacher import ClipTeacher, Teacher, frame_point_targets
from clip3d_core.training.config import TrainConfig
from clip3d_core.training.data import (
    build_datasets,
    build_split,
    build_teacher,
    build_text,
    build_vocabulary,
)
from clip3d_core.training.distributed import DistInfo, all_reduce_sum_

log = logging.getLogger(__name__)

Predictor = Callable[[Frame], Prediction]


def camera_features(teacher: Teacher, frame: Frame, text: Tensor,
                    select: Tensor | None = None) -> CameraFeatures:
    """The teacher's CLIP features at the frame's points (`frame_point_targets`) as fusion input."""
    _, targets = frame_point_targets(teacher, frame, text, select=None if select is None else select.cpu())
    return CameraFeatures(targets.features, targets.visible)


class FramePredictor:
    """The model on one frame, as the segmenter runs it: `predict` with the frame's camera features
    (fusion models with a ``teacher``; the segmenter's is `ClipTeacher`) and ``score_threshold``."""

    def __init__(self, model: Clip3DNet, text: Tensor, device: torch.device, *,
                 teacher: Teacher | None = None, score_threshold: float | None = None) -> None:
        self.model, self.text, self.device = model, text, device
        self.teacher = teacher if model.fusion is not None else None
        self.score_threshold = score_threshold

    @torch.no_grad()
    def __call__(self, frame: Frame) -> Prediction:
        points = torch.as_tensor(frame.points, dtype=torch.float32, device=self.device)
        camera = None
        if self.teacher is not None and frame.cameras:
            camera = _FrameCameras(self.teacher, frame, self.text)  # teacher text: one row per class
        return self._predict(points, camera)

    def _predict(self, points: Tensor, camera: CameraSource | None) -> Prediction:
        return predict(self.model, points, self.text, camera=camera, score_threshold=self.score_threshold)


class PanopticFramePredictor(FramePredictor):
    """A panoptic model on one frame, as the segmenter runs it: `predict_panoptic` with every name's
    text row (a class scores the maximum over its names), the merge settings of ``info`` (the
    checkpoint's `PanopticInfo`), the frame's camera features for fusion heads (made by ``teacher``
    against ``text``, one row per class) and ``score_threshold``."""

    def __init__(self, model: PanopticNet, names: NameEmbeddings, thing: Tensor, info: PanopticInfo,
                 device: torch.device, *, teacher: Teacher | None = None, text: Tensor | None = None,
                 score_threshold: float | None = None) -> None:
        self.model, self.names, self.device = model, names.to(device), device
        self.text = self.names.class_vectors() if text is None else text
        self.thing, self.info = thing.to(device), info
        self.teacher = teacher if model.cfg.head.reads_camera else None
        self.score_threshold = score_threshold

    def _predict(self, points: Tensor, camera: CameraSource | None) -> Prediction:
        return predict_panoptic(self.model, points, self.names.text, self.thing,
                                min_points=self.info.min_points, instance_gap=self.info.instance_gap,
                                camera=camera, name_class=self.names.name_class,
                                score_threshold=self.score_threshold)[0]


@dataclass
class _FrameCameras:
    """A dataset frame's camera features for `predict` (`frame_point_targets` at the valid points)."""

    teacher: Teacher
    frame: Frame
    text: Tensor

    def start(self) -> None:
        pass

    def features(self, valid: Tensor) -> CameraFeatures:
        return camera_features(self.teacher, self.frame, self.text, valid)


def teacher_predictor(teacher: Teacher, text: Tensor, temperature: float = 0.01) -> Predictor:
    """The 2D teacher's labels projected onto the points (first camera that sees a point); points no
    camera sees get no prediction."""

    @torch.no_grad()
    def run(frame: Frame) -> Prediction:
        _, targets = frame_point_targets(teacher, frame, text)
        labels, conf = classify(targets.features, text.to(targets.features), temperature=temperature)
        visible = targets.visible
        return Prediction(features=targets.features, logits=None,
                          labels=torch.where(visible, labels, IGNORE_INDEX),
                          scores=torch.where(visible, conf, torch.zeros_like(conf)), valid=visible)

    return run


def camera_visible(frame: Frame) -> Tensor:
    """[N] bool: points some camera sees (occlusion-tested), for camera-view-only metrics."""
    if not frame.cameras:
        return torch.zeros(frame.num_points, dtype=torch.bool)
    xyz = torch.as_tensor(np.asarray(frame.points)[:, :3], dtype=torch.float32)
    cam, _ = project_points(xyz, frame.cameras).first_visible()
    return cam >= 0


def evaluate(
    predictors: Mapping[str, Predictor],
    dataset: Dataset[Frame],
    class_names: Sequence[str],
    unseen: Sequence[int],
    *,
    metrics: Mapping[str, MetricConfig] | None = None,
    info: DistInfo | None = None,
    visible_only: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Metric]]:
    """Per predictor, the configured metrics (default: "semantic") over every frame of `dataset`
    (each process takes every world_size-th frame; the metrics' states are summed over processes).
    `visible_only`: score only points a camera sees (the region a 2D teacher can label)."""
    info = info or DistInfo()
    context = MetricContext(tuple(class_names), tuple(unseen))
    entries = metrics if metrics is not None else default_metrics_config()
    results = {name: build_metrics(entries, context) for name in predictors}
    indices = range(info.rank, len(dataset), info.world_size)  # type: ignore[arg-type]
    for i in tqdm(indices, desc="evaluate", disable=not (progress and info.is_main), leave=False):
        frame = dataset[i]
        truth = GroundTruth.from_frame(frame, camera_visible(frame) if visible_only else None)
        for name, run in predictors.items():
            prediction = run(frame)
            for metric in results[name].values():
                metric.update(prediction, truth)
    for per_predictor in results.values():
        for metric in per_predictor.values():
            for tensor in metric.state():
                all_reduce_sum_(tensor, info)
    return results


@dataclass
class EvaluationInputs:
    """A checkpoint made ready for `evaluate` with a training config's data section."""

    model: Clip3DNet
    text: Tensor  # [C, D]
    split: ZeroShotSplit
    train_set: Dataset[Frame]
    val_set: Dataset[Frame]
    teacher: Teacher | None  # camera features for a fusion model (None: LiDAR only)


def load_for_evaluation(checkpoint: str | Path, cfg: TrainConfig, device: torch.device, *,
                        cameras: bool = True) -> EvaluationInputs:
    """Load the model (eval mode), its text embeddings, the split and the frames.

    Text embeddings come from the checkpoint's own bank when it covers the vocabulary (exactly
    the vectors it was trained against), else from its CLIP's text tower with the config's
    templates. A fusion model gets (with ``cameras``) the camera features the segmenter would give
    it: dense CLIP made as its checkpoint records (`Checkpoint.dense`), or the config's simulated
    teacher on synthetic frames."""
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model(device)
    split = build_split(cfg.data)
    vocab = build_vocabulary(cfg, split)
    phrases = [s for e in vocab.entries for s in e.synonyms]
    loaded = None
    if ckpt.text_bank is not None and all(p in ckpt.text_bank for p in phrases):
        text = ckpt.text_bank.lookup(vocab)
    else:
        loaded = load_clip(ckpt.clip_config, device)
        ckpt.check_identity(loaded.identity, "the CLIP loaded for the text embeddings")
        text, _ = build_text(cfg, loaded, vocab)
    teacher = None
    if cameras and ckpt.model_config.fusion:
        if loaded is None:
            loaded = load_clip(ckpt.clip_config, device)
            ckpt.check_identity(loaded.identity, "the CLIP loaded for the image features")
        if cfg.teacher.kind == "simulated":
            teacher = build_teacher(cfg.teacher, loaded)
        else:
            dense = DenseClipEncoder(loaded, ckpt.dense.last_block)
            teacher = ClipTeacher(dense, short_side=ckpt.dense.short_side)
    train, val = build_datasets(cfg.data, split)
    return EvaluationInputs(model, text.to(device), split, train, val, teacher)


def summary(metrics: Mapping[str, Metric]) -> dict[str, Any]:
    """The metrics' results in one flat dict (mIoU, seen, unseen, hIoU, accuracy, ...)."""
    return merged_results(metrics)
