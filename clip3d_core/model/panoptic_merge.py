"""Panoptic merge: query masks + class scores -> per-point semantic label, instance id and score.

Each voxel goes to the query maximising ``sigmoid(mask logit) x class score`` (class score = the
query's best class probability); every point inherits its voxel's query. A query predicting a thing
class is one instance; all points of queries predicting the same stuff class merge into one segment
(instance 0). Segments with fewer than ``min_points`` points are dropped (label -1, instance 0, score
0): the evaluators do not count such segments either, so they could only cost a false positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PanopticPoints:
    """One row per input point, input order. semantic -1 = no label; instance 0 = none / stuff."""

    semantic: Tensor  # [N] long
    instance: Tensor  # [N] long
    score: Tensor  # [N] float: class probability of the point's segment


def panoptic_merge(mask_logits: Tensor, class_logits: Tensor, thing: Tensor, point_to_voxel: Tensor, *,
                   min_points: int, min_score: float = 0.0) -> PanopticPoints:
    """One sample. mask_logits [Q, V]; class_logits [Q, C] (sigmoid scores); thing [C] bool;
    point_to_voxel [N] long row into the sample's V voxels, -1 for points outside the grid.
    Queries whose best class probability is <= ``min_score`` take part in nothing."""
    q_count, v = mask_logits.shape
    if class_logits.shape[0] != q_count or thing.shape != class_logits.shape[1:]:
        raise ValueError(f"mask logits {tuple(mask_logits.shape)}, class logits {tuple(class_logits.shape)} "
                         f"and thing {tuple(thing.shape)} disagree")
    n = point_to_voxel.shape[0]
    device = mask_logits.device
    semantic = torch.full((n,), -1, dtype=torch.long, device=device)
    instance = torch.zeros(n, dtype=torch.long, device=device)
    score = torch.zeros(n, dtype=torch.float32, device=device)
    if q_count == 0 or v == 0 or n == 0:
        return PanopticPoints(semantic, instance, score)
    q_score, q_class = class_logits.sigmoid().max(dim=1)
    q_weight = torch.where(q_score > min_score, q_score, torch.zeros_like(q_score))
    weight = mask_logits.sigmoid() * q_weight[:, None]
    best_w, best_q = weight.max(dim=0)  # [V]
    valid = point_to_voxel >= 0
    p2v = point_to_voxel.clamp(min=0)
    pq = best_q[p2v]
    valid &= best_w[p2v] > 0
    q_thing = thing.to(device)[q_class]
    # segment key: a thing query is its own segment, a stuff class one segment over all its queries
    c = class_logits.shape[1]
    key = torch.where(q_thing[pq], c + pq, q_class[pq])
    key = torch.where(valid, key, torch.full_like(key, -1))
    size = torch.bincount(key[valid], minlength=c + q_count)
    keep = valid & (size[key.clamp(min=0)] >= min_points)
    semantic[keep] = q_class[pq[keep]]
    score[keep] = q_score[pq[keep]].float()
    # instance ids 1..K for the kept thing segments, in query order (deterministic)
    kept_thing = torch.zeros(q_count, dtype=torch.bool, device=device)
    kept_thing[pq[keep & q_thing[pq]]] = True
    ids = torch.cumsum(kept_thing.long(), 0) * kept_thing
    instance[keep] = ids[pq[keep]]
    return PanopticPoints(semantic, instance, score)
