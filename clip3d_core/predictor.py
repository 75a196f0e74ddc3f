"""The one path from points (and, for fusion models, CLIP features at the points) to a label per
point: used by `Segmenter` (what ships), evaluation, threshold calibration and self-training
targets, so what is evaluated is exactly what runs on the vehicle.

`predict` runs voxelise -> 3D network -> [fusion] -> cosine classification against the text
embeddings -> softmax score -> optional score threshold, and returns a `Prediction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.model import Clip3DNet
from clip3d_core.model.panoptic import PanopticNet, mask_pooled_clip, point_embeddings, pooled_clip_probs
from clip3d_core.model.panoptic_merge import panoptic_merge


@dataclass
class CameraFeatures:
    """Frozen CLIP image features at the points: features [N, D] (rows where ``mask`` is False are
    never read), mask [N] bool (a camera sees the point)."""

    features: Tensor
    mask: Tensor


class CameraSource(Protocol):
    """Camera features made while the model runs: ``start()`` is called once the points are
    voxelised (the image tower may then overlap the 3D network), ``features(valid)`` after the
    3D network, with the points it kept (None: no camera after all)."""

    def start(self) -> None: ...

    def features(self, valid: Tensor) -> CameraFeatures | None: ...


@dataclass
class Prediction:
    """One row per input point, input order.

    features: [N, D] unit point features (after fusion), zero where not ``valid`` (None when the
        caller did not ask a panoptic model for them: see `predict_panoptic`).
    logits: [N, C] cosine logits at the model's temperature (None for predictors without any,
        e.g. the 2D teacher projected onto the points).
    labels: [N] long class ids, `IGNORE_INDEX` where not valid or scoring below the threshold.
    scores: [N] float softmax probability of the argmax class (0 where not valid; kept below the
        threshold).
    valid: [N] bool, finite and inside the model's range.
    extras: further per-point outputs (e.g. instance ids of a panoptic head).
    """

    features: Tensor | None
    logits: Tensor | None
    labels: Tensor
    scores: Tensor
    valid: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def restricted_logits(logits: Tensor, allowed: Sequence[int] | None) -> Tensor:
    """Logits with the classes outside `allowed` at -inf (the softmax then runs over `allowed`)."""
    if allowed is None:
        return logits
    mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    mask[list(allowed)] = False
    return logits.masked_fill(mask, float("-inf"))


def predict(
    model: Clip3DNet,
    points: Tensor,
    text: Tensor,
    *,
    batch_index: Tensor | None = None,
    camera: CameraFeatures | CameraSource | None = None,
    score_threshold: float | None = None,
    allowed: Sequence[int] | None = None,
    lap: Callable[[str], None] | None = None,
) -> Prediction:
    """Label every point of ``points`` [N, >= in_channels] against ``text`` [C, D].

    ``camera``: CLIP features at the points (or a `CameraSource` making them), fused by fusion
    models and ignored by others. ``allowed``: classes the argmax may pick (others -inf).
    ``lap(stage)`` is called after "voxelise", "backbone" and "image" (when fused), for stage
    timings (the caller laps "classify" once it has read the results). Runs under the caller's grad
    mode (call it in ``torch.inference_mode()``)."""
    mark = lap or (lambda _stage: None)
    fuse = camera is not None and model.fusion is not None
    vox = model.voxelize(points, batch_index)
    mark("voxelise")
    if fuse and not isinstance(camera, CameraFeatures):
        camera.start()
    out = model.encode(points, vox)
    mark("backbone")
    if fuse:
        feats = camera if isinstance(camera, CameraFeatures) else camera.features(out.valid)
        if feats is not None:
            out = model.fuse(out, feats.features.to(out.features), feats.mask.to(out.valid.device))
            mark("image")
    # Point features are unit rows (zero where invalid); the text is made unit once here.
    unit_text = F.normalize(text.to(out.features.device).float(), dim=-1)
    logits = restricted_logits(model.logits(out.features.float(), unit_text, normalized=True), allowed)
    scores, labels = logits.softmax(dim=1).max(dim=1)
    labels = torch.where(out.valid, labels, IGNORE_INDEX)
    scores = torch.where(out.valid, scores, torch.zeros_like(scores))
    if score_threshold is not None:
        labels = torch.where(scores < score_threshold, IGNORE_INDEX, labels)
    return Prediction(features=out.features, logits=logits, labels=labels, scores=scores, valid=out.valid)


def predict_panoptic(
    model: PanopticNet,
    points: Tensor,
    text: Tensor,
    thing: Tensor,
    *,
    min_points: int,
    instance_gap: float = 0.0,
    batch_index: Tensor | None = None,
    camera: CameraFeatures | CameraSource | None = None,
    name_class: Tensor | None = None,
    score_threshold: float | None = None,
    features: bool = True,
    lap: Callable[[str], None] | None = None,
) -> list[Prediction]:
    """A panoptic model's output per sample (one `Prediction` each, in ``batch_index`` order): labels
    and scores from the panoptic merge, instance ids (0 = stuff / none) in ``extras["instances"]``,
    features = the per-point embedding rebuilt from the queries, no logits.

    ``text`` [T, D] holds one row per name (``name_class`` [T] their classes; None = one per
    class), ``thing`` [C] marks thing classes; segments under ``min_points`` points are dropped;
    ``instance_gap`` > 0 splits thing segments into spatially connected components (`panoptic_merge`).
    ``camera``: CLIP features at the points (or a `CameraSource` making them; it is asked for the
    points inside the grid, known only after voxelising), used by fusion heads and by the PFC
    baseline's fixed classifier (each query scored by the CLIP features pooled in its mask,
    `pooled_clip_probs`; without a camera such a model names base classes only). Points scoring
    below ``score_threshold`` lose their label and instance. ``features=False`` skips the point
    embeddings (features None): [N, D] floats rebuilt from every query, several times the merge's
    own cost on a large cloud, which serving only needs when asked. ``lap`` as in `predict`:
    "voxelise", "image" (when fused, before the network), "backbone", "decoder" (queries -> masks
    and class embeddings) and "merge" (class logits, point embeddings, the merge)."""
    mark = lap or (lambda _stage: None)
    if batch_index is None:
        batch_index = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    head = model.cfg.head
    if camera is not None and not head.reads_camera:
        camera = None
    vox = None
    if camera is not None and not isinstance(camera, CameraFeatures):
        vox = model.voxelize(points, batch_index)  # the camera source needs the points in the grid
        mark("voxelise")
        camera.start()
        camera = camera.features(vox.valid)
        mark("image")
    clip = None if camera is None else camera.features
    out = model(points, batch_index, clip, None if camera is None else camera.mask, vox=vox, lap=mark)
    mark("decoder")
    text = text.to(out.class_embed)
    logits = model.class_logits(out, text, name_class, int(thing.shape[0]))
    embeddings = point_embeddings(out) if features else None
    results = []
    for b in range(out.vox.batch_size):
        sel = batch_index == b
        p2v = out.sample_point_to_voxel(batch_index, b)
        class_logits = logits[b]
        if head.classifier == "fixed":
            v0, v1 = int(out.voxel_offsets[b]), int(out.voxel_offsets[b + 1])
            if out.clip is None or out.clip_mask is None:  # no camera: nothing pooled, base classes only
                pooled = torch.zeros_like(out.class_embed[b])
                has = torch.zeros(pooled.shape[0], dtype=torch.bool, device=pooled.device)
            else:
                pooled, has = mask_pooled_clip(out.mask_logits[b], out.clip[v0:v1], out.clip_mask[v0:v1])
            probs = pooled_clip_probs(class_logits, pooled, has, text, name_class, alpha=head.pool_alpha,
                                      scale=head.pool_scale)
            class_logits = torch.logit(probs, eps=1e-6)  # the merge reads sigmoid scores
        merged = panoptic_merge(out.mask_logits[b], class_logits, thing, p2v, min_points=min_points,
                                points=points[sel], instance_gap=instance_gap)
        labels, instances = merged.semantic, merged.instance
        if score_threshold is not None:
            low = merged.score < score_threshold
            labels = torch.where(low, IGNORE_INDEX, labels)
            instances = torch.where(low, 0, instances)
        results.append(Prediction(features=None if embeddings is None else embeddings[sel], logits=None,
                                  labels=labels, scores=merged.score, valid=out.vox.valid[sel],
                                  extras={"instances": instances}))
    mark("merge")
    return results
