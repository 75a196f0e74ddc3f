"""Pinhole camera model (optical frame: x right, y down, z forward) with optional plumb_bob distortion."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


class CalibrationError(ValueError):
    """Camera calibration is missing, malformed or physically impossible."""


def _as_matrix(value: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{what}: not numeric ({exc})") from exc
    if arr.size != shape[0] * shape[1]:
        raise CalibrationError(f"{what}: expected {shape[0]}x{shape[1]} values, got shape {arr.shape}")
    return arr.reshape(shape)


def _as_distortion(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    try:
        d = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"D: not numeric ({exc})") from exc
    if d.size == 0:
        return None
    if d.size > 5:
        # Rational/fisheye models are not supported; silently truncating would mis-project.
        if np.any(d[5:] != 0):
            raise CalibrationError(
                f"D: only plumb_bob (k1,k2,p1,p2,k3) is supported, got {d.size} non-zero terms"
            )
        d = d[:5]
    return np.pad(d, (0, 5 - d.size))


@dataclasses.dataclass(frozen=True, eq=False)
class PinholeCamera:
    """Intrinsics `K`, image size, extrinsics `T_cam_lidar` (LiDAR -> camera optical frame) and
    optional plumb_bob distortion `D = (k1, k2, p1, p2, k3)` (shorter vectors are zero padded)."""

    name: str
    K: np.ndarray
    width: int
    height: int
    T_cam_lidar: np.ndarray
    D: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Normalise to float64 arrays (frozen: go through object.__setattr__); read-only so the
        # "frozen" promise also covers the array contents.
        K = _as_matrix(self.K, (3, 3), f"{self.name}.K").copy()
        T = _as_matrix(self.T_cam_lidar, (4, 4), f"{self.name}.T_cam_lidar").copy()
        D = _as_distortion(self.D)
        for arr in (K, T, D):
            if arr is not None:
                arr.setflags(write=False)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "T_cam_lidar", T)
        object.__setattr__(self, "D", D)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    # ------------------------------------------------------------------ properties
    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    @property
    def has_distortion(self) -> bool:
        return self.D is not None and bool(np.any(self.D != 0))

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def T_lidar_cam(self) -> np.ndarray:
        """Inverse extrinsics (camera -> LiDAR), computed as a rigid inverse."""
        R, t = self.T_cam_lidar[:3, :3], self.T_cam_lidar[:3, 3]
        out = np.eye(4)
        out[:3, :3] = R.T
        out[:3, 3] = -R.T @ t
        return out

    # ------------------------------------------------------------------ checks / transforms
    def validate(self, rigid_tol: float = 1e-4) -> PinholeCamera:
        """Raise `CalibrationError` naming the first problem; returns self for chaining."""
        where = f"camera {self.name!r}"
        if not self.name:
            raise CalibrationError("camera name is empty")
        if self.width <= 0 or self.height <= 0:
            raise CalibrationError(f"{where}: bad image size {self.width}x{self.height}")
        for what, arr in (("K", self.K), ("T_cam_lidar", self.T_cam_lidar), ("D", self.D)):
            if arr is not None and not np.all(np.isfinite(arr)):
                raise CalibrationError(f"{where}: {what} contains non-finite values")
        if self.fx <= 0 or self.fy <= 0:
            raise CalibrationError(f"{where}: focal lengths must be positive (fx={self.fx}, fy={self.fy})")
        if abs(self.K[1, 0]) > 0 or abs(self.K[2, 0]) > 0 or abs(self.K[2, 1]) > 0 or self.K[2, 2] != 1:
            raise CalibrationError(
                f"{where}: K must be upper triangular with K[2,2] == 1, got {self.K.tolist()}"
            )
        R = self.T_cam_lidar[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=rigid_tol) or abs(np.linalg.det(R) - 1) > rigid_tol:
            raise CalibrationError(f"{where}: T_cam_lidar rotation is not orthonormal with det +1")
        if not np.allclose(self.T_cam_lidar[3], (0, 0, 0, 1), atol=1e-9):
            raise CalibrationError(f"{where}: T_cam_lidar last row must be (0, 0, 0, 1)")
        return self

    def scaled(self, sx: float, sy: float | None = None) -> PinholeCamera:
        """The same camera for an image resized by (sx, sy). Pixel coordinates are treated as
        continuous with pixel i covering [i, i+1) (the convention `in_image` and floor-indexing use),
        so K scales directly. Distortion lives in normalised coordinates and is unchanged."""
        sy = sx if sy is None else sy
        if not (sx > 0 and sy > 0):
            raise CalibrationError(f"camera {self.name!r}: scale factors must be positive, got ({sx}, {sy})")
        return dataclasses.replace(
            self,
            K=np.diag([sx, sy, 1.0]) @ self.K,
            width=round(self.width * sx),
            height=round(self.height * sy),
        )

    def with_extrinsics(self, T_cam_lidar: np.ndarray) -> PinholeCamera:
        return dataclasses.replace(self, T_cam_lidar=T_cam_lidar)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain lists only (YAML / checkpoint safe)."""
        return {
            "name": self.name,
            "K": self.K.tolist(),
            "width": self.width,
            "height": self.height,
            "T_cam_lidar": self.T_cam_lidar.tolist(),
            "D": None if self.D is None else self.D.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PinholeCamera:
        required = {"name", "K", "width", "height", "T_cam_lidar"}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - required - {"D"})
        if missing or unknown:
            raise CalibrationError(f"camera dict: missing keys {missing}, unknown keys {unknown}")
        return cls(
            name=str(data["name"]),
            K=data["K"],
            width=data["width"],
            height=data["height"],
            T_cam_lidar=data["T_cam_lidar"],
            D=data.get("D"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PinholeCamera):
            return NotImplemented
        same_d = (self.D is None and other.D is None) or (
            self.D is not None and other.D is not None and np.array_equal(self.D, other.D)
        )
        return (
            self.name == other.name
            and self.width == other.width
            and self.height == other.height
            and np.array_equal(self.K, other.K)
            and np.array_equal(self.T_cam_lidar, other.T_cam_lidar)
            and same_d
        )

    __hash__ = None  # type: ignore[assignment]
