"""Evaluation loops: run a predictor over held-out frames (with full ground truth) and accumulate
one confusion matrix, sharded over DDP processes and summed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from clip3d_core.checkpoint import load_checkpoint
from clip3d_core.clip import load_clip
from clip3d_core.data import Frame, ZeroShotSplit
from clip3d_core.evaluation import ConfusionMatrix, EvaluationReport
from clip3d_core.geometry import project_points
from clip3d_core.pseudo_labels import classify
from clip3d_core.teacher import Teacher, frame_point_targets
from clip3d_core.training.config import TrainConfig
from clip3d_core.training.data import build_datasets, build_split, build_text, build_vocabulary
from clip3d_core.training.distributed import DistInfo, all_reduce_sum_

log = logging.getLogger(__name__)

# frame -> predicted class per point (-1 = no prediction), numpy or tensor [N]
Predictor = Callable[[Frame], "Tensor | np.ndarray"]


def model_predictor(model: nn.Module, text: Tensor, device: torch.device) -> Predictor:
    """Argmax of cos(F3d, text) per point; points outside the model's range get no prediction."""

    @torch.no_grad()
    def predict(frame: Frame) -> Tensor:
        points = torch.as_tensor(frame.points, dtype=torch.float32, device=device)
        out = model(points)
        labels = model.logits(out.features.float(), text).argmax(1)
        return torch.where(out.valid, labels, -1).cpu()

    return predict


def teacher_predictor(teacher: Teacher, text: Tensor, temperature: float = 0.01) -> Predictor:
    """The 2D teacher's labels projected onto the points (first camera that sees a point); points no
    camera sees get no prediction."""

    @torch.no_grad()
    def predict(frame: Frame) -> Tensor:
        _, targets = frame_point_targets(teacher, frame, text)
        labels, _ = classify(targets.features, text.to(targets.features), temperature=temperature)
        return torch.where(targets.visible, labels, -1).cpu()

    return predict


def camera_visible(frame: Frame) -> Tensor:
    """[N] bool: points some camera sees (occlusion-tested), for camera-view-only metrics."""
    if not frame.cameras:
        return torch.zeros(frame.num_points, dtype=torch.bool)
    xyz = torch.as_tensor(np.asarray(frame.points)[:, :3], dtype=torch.float32)
    cam, _ = project_points(xyz, frame.cameras).first_visible()
    return cam >= 0


def evaluate(
    predictors: dict[str, Predictor],
    dataset: Dataset[Frame],
    class_names: Sequence[str],
    unseen: Sequence[int],
    *,
    info: DistInfo | None = None,
    visible_only: bool = False,
    progress: bool = False,
) -> dict[str, EvaluationReport]:
    """One report per predictor over every frame of `dataset` (each process takes every
    world_size-th frame; confusion matrices are summed). `visible_only`: score only points a camera
    sees (the region a 2D teacher can label)."""
    info = info or DistInfo()
    matrices = {name: ConfusionMatrix(len(class_names)) for name in predictors}
    indices = range(info.rank, len(dataset), info.world_size)  # type: ignore[arg-type]
    for i in tqdm(indices, desc="evaluate", disable=not (progress and info.is_main), leave=False):
        frame = dataset[i]
        if frame.labels is None:
            raise ValueError(f"evaluation frame {frame.frame_id} has no labels")
        target = torch.from_numpy(frame.labels)
        if visible_only:
            target = torch.where(camera_visible(frame), target, -1)
        for name, predict in predictors.items():
            matrices[name].update(predict(frame), target)
    reports = {}
    for name, cm in matrices.items():
        all_reduce_sum_(cm.counts, info)
        reports[name] = cm.report(list(class_names), unseen=list(unseen))
    return reports


def load_for_evaluation(
    checkpoint: str | Path, cfg: TrainConfig, device: torch.device
) -> tuple[nn.Module, Tensor, ZeroShotSplit, Dataset[Frame], Dataset[Frame]]:
    """(model in eval mode, text [C, D], split, training frames, evaluation frames).

    Text embeddings come from the checkpoint's own bank when it covers the vocabulary (exactly
    the vectors it was trained against), else from its CLIP's text tower with the config's
    templates."""
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model(device)
    split = build_split(cfg.data)
    vocab = build_vocabulary(cfg, split)
    phrases = [s for e in vocab.entries for s in e.synonyms]
    if ckpt.text_bank is not None and all(p in ckpt.text_bank for p in phrases):
        text = ckpt.text_bank.lookup(vocab)
    else:
        loaded = load_clip(ckpt.clip_config, device)
        ckpt.check_identity(loaded.identity, "the CLIP loaded for the text embeddings")
        text, _ = build_text(cfg, loaded, vocab)
    train, val = build_datasets(cfg.data, split)
    return model, text.to(device), split, train, val


def summary(report: EvaluationReport) -> dict[str, float | None]:
    return {"miou": report.miou, "miou_seen": report.miou_seen, "miou_unseen": report.miou_unseen,
            "hiou": report.hiou, "accuracy": report.accuracy}
