"""`Frame`: one LiDAR sweep with optional labels and calibrated camera images (the data contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clip3d_core.geometry.camera import PinholeCamera


class FrameError(ValueError):
    """A frame's arrays are inconsistent (shapes, dtypes, label range)."""


@dataclass
class Frame:
    """One sample as every dataset yields it.

    points: float32 [N, 4] (x, y, z, intensity) in the LiDAR frame.
    labels: int64 [N] index into `class_names`, -1 = ignore; None when unlabelled.
    instances: int64 [N] instance id (0 = stuff / none); None when unknown.
    images / cameras: parallel lists; `cameras[i].T_cam_lidar` maps LiDAR points into image i.
    pixel_labels: int64 [H, W] per image (synthetic only; -1 = sky / nothing, -2 = clutter: an
        object or surface of no class, whose points are labelled -1).
    pixel_instances: int64 [H, W] per image (synthetic only; 0 = stuff / nothing).
    pose: float64 [4, 4] T_world_lidar when known (drives, for TF / accumulation).
    """

    points: np.ndarray
    labels: np.ndarray | None
    instances: np.ndarray | None
    images: list[np.ndarray]
    cameras: list[PinholeCamera]
    class_names: tuple[str, ...]
    frame_id: str
    stamp_ns: int = 0
    pixel_labels: list[np.ndarray] | None = None
    pixel_instances: list[np.ndarray] | None = None
    pose: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def validate(self) -> Frame:
        """Raise `FrameError` naming the first inconsistency; returns self for chaining."""
        p = self.points
        if p.ndim != 2 or p.shape[1] != 4 or p.dtype != np.float32:
            raise FrameError(f"{self.frame_id}: points must be float32 [N,4], got {p.dtype} {p.shape}")
        n = p.shape[0]
        for name in ("labels", "instances"):
            a = getattr(self, name)
            if a is not None and (a.shape != (n,) or a.dtype != np.int64):
                raise FrameError(f"{self.frame_id}: {name} must be int64 [{n}], got {a.dtype} {a.shape}")
        c = len(self.class_names)
        if self.labels is not None and n and (self.labels.min() < -1 or self.labels.max() >= c):
            raise FrameError(f"{self.frame_id}: labels outside [-1, {len(self.class_names)})")
        if len(self.images) != len(self.cameras):
            raise FrameError(f"{self.frame_id}: {len(self.images)} images but {len(self.cameras)} cameras")
        for img, cam in zip(self.images, self.cameras):
            if img.dtype != np.uint8 or img.shape != (cam.height, cam.width, 3):
                raise FrameError(
                    f"{self.frame_id}: image {cam.name} is {img.dtype} {img.shape}, "
                    f"camera says {(cam.height, cam.width, 3)} uint8"
                )
        for name in ("pixel_labels", "pixel_instances"):
            maps = getattr(self, name)
            if maps is None:
                continue
            if len(maps) != len(self.images):
                raise FrameError(f"{self.frame_id}: {len(maps)} {name} for {len(self.images)} images")
            for m, img in zip(maps, self.images):
                if m.shape != img.shape[:2] or m.dtype != np.int64:
                    raise FrameError(f"{self.frame_id}: {name} {m.dtype} {m.shape} vs image {img.shape[:2]}")
        if self.pose is not None and self.pose.shape != (4, 4):
            raise FrameError(f"{self.frame_id}: pose must be [4,4], got {self.pose.shape}")
        return self
