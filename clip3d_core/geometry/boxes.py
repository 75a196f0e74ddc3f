"""Oriented boxes around predicted instances (markers on the node's objects topic, boxes in pictures).

A box is upright: its yaw is the principal axis of the instance's points in the x-y plane (PCA),
its length / width the extent of the points along / across that axis, its height their z extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InstanceBox:
    """One thing instance. center (x, y, z) and size (length, width, height) in metres, yaw in
    radians in (-pi/2, pi/2] (a box is symmetric under a half turn), score = mean point score."""

    instance: int
    label: int
    score: float
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    num_points: int

    def corners_xy(self) -> np.ndarray:
        """[4, 2] footprint corners, counter-clockwise."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * np.array(self.size[:2]) / 2
        return half @ np.array([[c, s], [-s, c]]) + np.array(self.center[:2])


def instance_boxes(xyz: np.ndarray, semantic: np.ndarray, instance: np.ndarray,
                   score: np.ndarray | None = None, *, min_points: int = 1) -> list[InstanceBox]:
    """Boxes of every instance id > 0 with >= ``min_points`` points, in instance-id order; the label is
    the instance's most frequent semantic label."""
    xyz = np.asarray(xyz, dtype=np.float64)[:, :3]
    instance = np.asarray(instance, dtype=np.int64)
    semantic = np.asarray(semantic, dtype=np.int64)
    score = np.ones(len(xyz)) if score is None else np.asarray(score, dtype=np.float64)
    # group the points by instance with one stable sort (each group keeps input order), instead of
    # a full-cloud mask per instance: this runs on every frame of the node's objects topic
    rows = np.flatnonzero(instance > 0)
    rows = rows[np.argsort(instance[rows], kind="stable")]
    ids, starts = np.unique(instance[rows], return_index=True)
    boxes = []
    for inst, sel in zip(ids, np.split(rows, starts[1:])):
        p = xyz[sel]
        if len(p) < min_points or not np.isfinite(p).all():
            continue
        xy = p[:, :2] - p[:, :2].mean(axis=0)
        if len(p) > 1:
            _, vecs = np.linalg.eigh(xy.T @ xy)
            axis = vecs[:, -1]  # largest spread
        else:
            axis = np.array([1.0, 0.0])
        yaw = float(np.arctan2(axis[1], axis[0]))
        if yaw <= -np.pi / 2:
            yaw += np.pi
        elif yaw > np.pi / 2:
            yaw -= np.pi
        c, s = np.cos(yaw), np.sin(yaw)
        local = p[:, :2] @ np.array([[c, -s], [s, c]])  # rows: (along, across)
        lo, hi = local.min(axis=0), local.max(axis=0)
        mid = (lo + hi) / 2
        center_xy = np.array([[c, -s], [s, c]]) @ mid
        z0, z1 = p[:, 2].min(), p[:, 2].max()
        labels, counts = np.unique(semantic[sel], return_counts=True)
        boxes.append(InstanceBox(
            instance=int(inst), label=int(labels[np.argmax(counts)]), score=float(score[sel].mean()),
            center=(float(center_xy[0]), float(center_xy[1]), float((z0 + z1) / 2)),
            size=(float(hi[0] - lo[0]), float(hi[1] - lo[1]), float(z1 - z0)), yaw=yaw,
            num_points=len(sel)))
    return boxes
