"""Panoptic merge: query masks + class scores -> per-point semantic label, instance id and score.

Each voxel goes to the query maximising ``sigmoid(mask logit) x class score`` (class score = the
query's best class probability); every point inherits its voxel's query. A query predicting a thing
class is one instance; all points of queries predicting the same stuff class merge into one segment
(instance 0). Segments with fewer than ``min_points`` points are dropped (label -1, instance 0, score
0): the evaluators do not count such segments either, so they could only cost a false positive.

Optionally (``instance_gap`` > 0, needs the points' coordinates) a thing query's points are split into
spatially connected components first, each its own instance: a query trained on few iterations often
collects several separate objects of its class (cars 10-20 m apart), which would otherwise be one
instance and one box. Points are binned into cubic cells of ``instance_gap`` metres; a query's occupied
cells connect to their 26 neighbours. So two points closer than ``instance_gap`` are always connected,
two farther apart than 2 x ``instance_gap`` (in x, y or z) never are. Components under ``min_points``
are dropped like small segments. ``instance_gap`` 0 is the paper's merge (one instance per query).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor


@dataclass
class PanopticPoints:
    """One row per input point, input order. semantic -1 = no label; instance 0 = none / stuff."""

    semantic: Tensor  # [N] long
    instance: Tensor  # [N] long
    score: Tensor  # [N] float: class probability of the point's segment


def query_components(query: Tensor, xyz: Tensor, gap: float) -> tuple[Tensor, int]:
    """Connected components of each query's points: [M] query ids and [M, 3] coordinates -> [M] long
    component ids 0..K-1 (never shared between queries; numbered in order of (query, lowest cell),
    deterministic) and K. Cells of ``gap`` metres, 26-neighbourhood (module doc)."""
    if query.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=query.device), 0
    cell = torch.floor(xyz.double() / gap).long()
    cell = cell - cell.min(dim=0).values + 1  # >= 1: a neighbour offset of -1 stays >= 0
    ext = cell.max(dim=0).values + 2  # room for +1: neighbour keys never wrap into another row
    if (int(query.max()) + 1) * float(ext.double().prod()) >= 2.0**62:
        raise ValueError(f"instance_gap {gap} m is too small for the cloud's extent (cell keys overflow)")
    key = ((query.long() * ext[0] + cell[:, 0]) * ext[1] + cell[:, 1]) * ext[2] + cell[:, 2]
    # the cell graph in numpy (scipy labels it; numpy's searchsorted of sorted rows is several times
    # torch's on CPU)
    cells, point_cell = np.unique(key.cpu().numpy(), return_inverse=True)  # sorted: query-major
    e = ext.cpu().numpy()
    # half of the 26 neighbours (the lexicographically positive offsets): the graph is undirected
    offsets = np.array([(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
                        if (dx, dy, dz) > (0, 0, 0)], dtype=np.int64)
    step = (offsets[:, 0] * e[1] + offsets[:, 1]) * e[2] + offsets[:, 2]
    neighbour = cells[None, :] + step[:, None]  # [13, M'] same query (the key's query part is unchanged)
    at = np.minimum(np.searchsorted(cells, neighbour), len(cells) - 1)
    hit = cells[at] == neighbour
    src = np.broadcast_to(np.arange(len(cells)), at.shape)[hit]
    graph = coo_matrix((np.ones(len(src)), (src, at[hit])), shape=(len(cells), len(cells)))
    k, cell_comp = connected_components(graph, directed=False)  # labels in order of the lowest cell
    return torch.from_numpy(cell_comp[point_cell].astype(np.int64)).to(query.device), int(k)


def panoptic_merge(mask_logits: Tensor, class_logits: Tensor, thing: Tensor, point_to_voxel: Tensor, *,
                   min_points: int, min_score: float = 0.0, points: Tensor | None = None,
                   instance_gap: float | None = None) -> PanopticPoints:
    """One sample. mask_logits [Q, V]; class_logits [Q, C] (sigmoid scores); thing [C] bool;
    point_to_voxel [N] long row into the sample's V voxels, -1 for points outside the grid.
    Queries whose best class probability is <= ``min_score`` take part in nothing. ``instance_gap``
    (metres; 0 / None = off) splits thing segments into connected components of ``points`` [N, >=3]."""
    q_count, v = mask_logits.shape
    if class_logits.shape[0] != q_count or thing.shape != class_logits.shape[1:]:
        raise ValueError(f"mask logits {tuple(mask_logits.shape)}, class logits {tuple(class_logits.shape)} "
                         f"and thing {tuple(thing.shape)} disagree")
    n = point_to_voxel.shape[0]
    device = mask_logits.device
    if q_count == 0 or v == 0 or n == 0:
        return PanopticPoints(torch.full((n,), -1, dtype=torch.long, device=device),
                              torch.zeros(n, dtype=torch.long, device=device),
                              torch.zeros(n, dtype=torch.float32, device=device))
    q_score, q_class = class_logits.sigmoid().max(dim=1)
    q_weight = torch.where(q_score > min_score, q_score, torch.zeros_like(q_score))
    weight = mask_logits.sigmoid() * q_weight[:, None]
    best_w, best_q = weight.max(dim=0)  # [V]
    valid = point_to_voxel >= 0
    p2v = point_to_voxel.clamp(min=0)
    pq = best_q[p2v]
    valid &= best_w[p2v] > 0
    q_thing = thing.to(device)[q_class]
    # thing segment: a query (or, split, each connected component of its points); stuff: one per class
    is_thing = valid & q_thing[pq]
    segment, n_segments = pq, q_count
    if instance_gap:
        if instance_gap < 0:
            raise ValueError(f"instance_gap must be >= 0 (0 / None = off), got {instance_gap}")
        if points is None or points.shape[0] != n:
            raise ValueError("instance_gap needs the sample's points [N, >=3]")
        comp, n_segments = query_components(pq[is_thing], points[is_thing, :3], float(instance_gap))
        segment = torch.zeros_like(pq)
        segment[is_thing] = comp
    c = class_logits.shape[1]
    key = torch.where(is_thing, c + segment, q_class[pq])
    key = torch.where(valid, key, torch.full_like(key, -1))
    # Per-point selections below are torch.where / gathers, not boolean indexing: a boolean index is
    # a nonzero (a host sync on GPU, most of this function's CPU time on a 100k-point cloud) and this
    # runs on every frame. Invalid points (key -1) count in bin 0, which is dropped.
    size = torch.bincount(key + 1, minlength=c + n_segments + 1)[1:]
    keep = valid & (size[key.clamp(min=0)] >= min_points)
    semantic = torch.where(keep, q_class[pq], -1)
    score = torch.where(keep, q_score[pq].float(), 0.0)
    # instance ids 1..K for the kept thing segments, in segment order (query order: deterministic)
    slot = torch.where(keep & is_thing, segment + 1, 0)  # 0: in no kept thing segment
    kept_thing = torch.bincount(slot, minlength=n_segments + 1)[1:] > 0
    ids = torch.cumsum(kept_thing.long(), 0) * kept_thing
    instance = torch.cat((ids.new_zeros(1), ids))[slot]
    return PanopticPoints(semantic, instance, score)
