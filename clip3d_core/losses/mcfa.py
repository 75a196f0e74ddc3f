"""Multi-granularity cross-modal feature alignment (MCFA) between 3D point features and CLIP features.

Two pure losses, both InfoNCE on cosine similarities with a temperature tau:

- semantic (global) alignment: 3D point features against class prototypes of the 2D (CLIP) features
  of the batch;
- spatial (local) alignment: 3D features mean-pooled per image patch against the CLIP feature of
  that patch, the other patches of the batch being the negatives.

The 2D side is a fixed target (the CLIP teacher is frozen): it is detached here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip3d_core.labels import IGNORE_INDEX


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: expected [*, D] tensors sharing D, got {a.shape} and {b.shape}")


def _zero(like: Tensor) -> Tensor:
    # A loss of exactly 0 that keeps the graph (DDP needs every parameter to receive a gradient).
    return like.sum() * 0.0


def _max_label(labels: Tensor, ignore_index: int) -> int:
    labels = labels[labels != ignore_index]
    return int(labels.max()) if labels.numel() else -1


def class_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-class prototypes ``p_c = normalise(mean_{i : y_i = c} f_i)``.

    Args:
        features: [M, D] features (2D CLIP features of pixels or of the points' pixels).
        labels: [M] class ids in [0, num_classes) or ``ignore_index``.

    Returns:
        prototypes [num_classes, D] (zero rows for absent classes), present [num_classes] bool.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features [M,D] and labels [M] expected, got {features.shape} and {labels.shape}")
    keep = labels != ignore_index
    labels = labels[keep].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index={ignore_index}")
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features[keep])
    counts = torch.bincount(labels, minlength=num_classes)
    return F.normalize(sums, dim=1), counts > 0


def semantic_alignment_loss(
    feat3d: Tensor,
    labels: Tensor,
    feat2d: Tensor,
    labels2d: Tensor | None = None,
    *,
    num_classes: int | None = None,
    temperature: float = 0.07,
    balance: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Global (semantic) alignment of 3D point features with class prototypes of 2D features.

    With prototypes ``p_c`` of the 2D features (`class_prototypes`, over the classes P present on
    the 2D side) and ``s_ic = cos(f_i, p_c) / tau``::

        l_i = -log( exp(s_{i, y_i}) / sum_{c in P} exp(s_ic) )
        L   = mean_{i in V} l_i                       (balance=False)
        L   = mean_{c} mean_{i in V, y_i = c} l_i      (balance=True: each class weighs the same)

    V = points whose label is not ignored and whose class has a prototype. Labels come from the
    label source of the setting (GT for seen classes, CLIP pseudo labels elsewhere).

    Args:
        feat3d: [N, D] 3D point features (gradients flow).
        labels: [N] class ids of the points, ``ignore_index`` for none.
        feat2d: [M, D] 2D CLIP features used for the prototypes (detached: a fixed target).
        labels2d: [M] class ids of ``feat2d``; default ``labels`` (then feat2d are the points' own
            2D features, M = N).
        num_classes: size of the label space; default ``max label + 1``.
        temperature: tau.
        balance: average per class first (driving scenes are dominated by road/vegetation).

    Returns:
        scalar loss (0 when no point has a prototype; with a single prototype it is 0 too).
    """
    _check_pair(feat3d, feat2d, "semantic_alignment_loss")
    if labels.shape != feat3d.shape[:1]:
        raise ValueError(f"labels must be [N]={feat3d.shape[:1]}, got {labels.shape}")
    if labels2d is None:
        if feat2d.shape[0] != feat3d.shape[0]:
            raise ValueError("labels2d is required when feat2d does not hold one row per point")
        labels2d = labels
    labels = labels.long()
    if num_classes is None:
        num_classes = max(_max_label(labels, ignore_index), _max_label(labels2d, ignore_index)) + 1
        if num_classes == 0:
            return _zero(feat3d)
    labelled = labels != ignore_index
    if bool(((labels[labelled] < 0) | (labels[labelled] >= num_classes)).any()):
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index={ignore_index}")
    protos, present = class_prototypes(feat2d.detach(), labels2d, num_classes, ignore_index=ignore_index)
    valid = labelled & present[labels.clamp(0, num_classes - 1)]
    if not bool(valid.any()):
        return _zero(feat3d)
    classes = present.nonzero().squeeze(1)
    # Target position of each point's class inside the list of present classes.
    position = torch.full((num_classes,), -1, dtype=torch.long, device=feat3d.device)
    position[classes] = torch.arange(classes.numel(), device=feat3d.device)
    logits = F.normalize(feat3d[valid], dim=1) @ protos[classes].t() / temperature
    target = position[labels[valid]]
    per_point = F.cross_entropy(logits, target, reduction="none")
    if not balance:
        return per_point.mean()
    per_class = per_point.new_zeros(classes.numel()).index_add_(0, target, per_point)
    counts = torch.bincount(target, minlength=classes.numel())
    hit = counts > 0
    return (per_class[hit] / counts[hit]).mean()


def pool_by_index(features: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of ``features`` rows sharing an index; rows with index < 0 are skipped.

    Returns:
        pooled [K, D] (unnormalised means), keys [K] the sorted distinct indices, counts [K].
    """
    keep = index >= 0
    keys, inverse, counts = torch.unique(index[keep], return_inverse=True, return_counts=True)
    sums = features.new_zeros(keys.numel(), features.shape[1]).index_add_(0, inverse, features[keep])
    return sums / counts.unsqueeze(1).to(features.dtype), keys, counts


def spatial_alignment_loss(
    feat3d: Tensor,
    patch_index: Tensor,
    patch_features: Tensor,
    *,
    temperature: float = 0.07,
    symmetric: bool = True,
    max_pairs: int | None = 4096,
    min_points: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Local (spatial) alignment of pooled 3D features with the CLIP feature of their image patch.

    Points falling in the same (frame, camera, patch) are mean-pooled: ``g_k = mean_{i in k} f_i``;
    ``h_k`` is that patch's 2D feature. With ``s_kj = cos(g_k, h_j) / tau`` over the K pairs::

        L_3d->2d = -1/K sum_k log( exp(s_kk) / sum_j exp(s_kj) )
        L_2d->3d = -1/K sum_k log( exp(s_kk) / sum_j exp(s_jk) )
        L = (L_3d->2d + L_2d->3d) / 2   if symmetric, else L_3d->2d

    Args:
        feat3d: [N, D] 3D point features (gradients flow).
        patch_index: [N] long row of ``patch_features`` each point projects into, -1 for points
            seen by no camera (global over the batch: see `clip3d_core.teacher.PointTargets`).
        patch_features: [P, D] 2D CLIP patch features (detached: a fixed target).
        temperature: tau.
        symmetric: add the 2D->3D direction.
        max_pairs: cap on K (a random subset of the patches is kept), bounding the K x K logits.
        min_points: patches hit by fewer points are dropped (their pooled feature is noisy).
        generator: for the subsampling (reproducible runs).

    Returns:
        scalar loss (0 when fewer than two pairs remain: there would be no negative).
    """
    _check_pair(feat3d, patch_features, "spatial_alignment_loss")
    if patch_index.shape != feat3d.shape[:1]:
        raise ValueError(f"patch_index must be [N]={feat3d.shape[:1]}, got {patch_index.shape}")
    patch_index = patch_index.long()
    if patch_index.numel() and int(patch_index.max()) >= patch_features.shape[0]:
        raise ValueError(f"patch_index beyond the {patch_features.shape[0]} patch features")
    pooled, keys, counts = pool_by_index(feat3d, patch_index)
    if min_points > 1:
        enough = counts >= min_points
        pooled, keys = pooled[enough], keys[enough]
    if max_pairs is not None and keys.numel() > max_pairs:
        device = generator.device if generator is not None else keys.device
        pick = torch.randperm(keys.numel(), generator=generator, device=device)[:max_pairs].to(keys.device)
        pooled, keys = pooled[pick], keys[pick]
    if keys.numel() < 2:
        return _zero(feat3d)
    g = F.normalize(pooled, dim=1)
    h = F.normalize(patch_features.detach()[keys], dim=1)
    logits = g @ h.t() / temperature
    target = torch.arange(keys.numel(), device=feat3d.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target))
    return loss
