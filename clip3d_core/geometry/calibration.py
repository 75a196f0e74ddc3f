"""Calibration parsers: KITTI calib .txt, mmdetection3d-style info pickles (nuScenes, KITTI) and ROS
CameraInfo K/D/P. Each returns validated `PinholeCamera`s whose T_cam_lidar maps LiDAR points into
the camera optical frame such that K @ (T_cam_lidar @ p) reproduces the dataset's projection."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clip3d_core.geometry.camera import CalibrationError, PinholeCamera

logger = logging.getLogger(__name__)

NUSCENES_CAMERAS = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)


def _homogeneous(m: np.ndarray) -> np.ndarray:
    """3x3 or 3x4 -> 4x4 with identity padding."""
    out = np.eye(4)
    out[: m.shape[0], : m.shape[1]] = m
    return out


def _split_projection(P: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """P = K [I | b] (rectified stereo P with baseline) -> (K, T_b) with T_b a pure translation, so
    that K @ (T_b @ x)[:3] == P @ x exactly."""
    K = P[:, :3].copy()
    if abs(K[2, 2]) < 1e-12 or np.linalg.matrix_rank(K) < 3:
        raise CalibrationError(f"{where}: projection matrix has a singular left 3x3 block")
    K = K / K[2, 2]
    P = P / P[2, 2]
    T_b = np.eye(4)
    T_b[:3, 3] = np.linalg.solve(K, P[:, 3])
    return K, T_b


def parse_kitti_calib(path: str | Path) -> dict[str, np.ndarray]:
    """`KEY: v v v ...` lines -> {KEY: flat float64 array}. Blank lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration ({exc})") from exc
    out: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, values = line.partition(":")
        if not sep:
            raise CalibrationError(f"{path}:{lineno}: expected 'KEY: values', got {line[:60]!r}")
        try:
            out[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as exc:
            raise CalibrationError(f"{path}:{lineno}: non-numeric value in {key.strip()} ({exc})") from exc
    return out


def load_kitti_calib(
    path: str | Path, image_hw: tuple[int, int], camera: str = "P2", name: str | None = None
) -> PinholeCamera:
    """KITTI object/odometry calib file -> camera `camera` (P0..P3).

    Projection in KITTI is P @ R0_rect @ Tr_velo_to_cam; here K = P[:, :3] and the stereo baseline
    in P[:, 3] becomes a translation folded into T_cam_lidar = T_b @ R0_rect @ Tr_velo_to_cam, so the
    result is exact and T stays rigid. Odometry files (no R0_rect, `Tr` instead of Tr_velo_to_cam)
    are accepted."""
    calib = parse_kitti_calib(path)
    where = f"{path}"
    if camera not in calib:
        raise CalibrationError(f"{where}: no {camera!r} entry (have {sorted(calib)})")
    tr_key = "Tr_velo_to_cam" if "Tr_velo_to_cam" in calib else "Tr"
    if tr_key not in calib:
        raise CalibrationError(f"{where}: no Tr_velo_to_cam / Tr entry")
    if calib[camera].size != 12 or calib[tr_key].size != 12:
        raise CalibrationError(f"{where}: {camera} and {tr_key} need 12 values each")
    P = calib[camera].reshape(3, 4)
    K, T_b = _split_projection(P, f"{where}:{camera}")
    R0 = np.eye(4)
    if "R0_rect" in calib:
        if calib["R0_rect"].size != 9:
            raise CalibrationError(f"{where}: R0_rect needs 9 values")
        R0[:3, :3] = calib["R0_rect"].reshape(3, 3)
    Tr = _homogeneous(calib[tr_key].reshape(3, 4))
    h, w = image_hw
    return PinholeCamera(name or camera, K, int(w), int(h), T_b @ R0 @ Tr).validate()


def info_sample(info: Mapping[str, Any], index: int = 0) -> Mapping[str, Any]:
    """Accept a whole mmdetection3d info file ({metainfo, data_list}) or one of its samples."""
    sample = info
    if "data_list" in info:
        samples = info["data_list"]
        if not isinstance(samples, Sequence) or not 0 <= index < len(samples):
            size = len(samples) if isinstance(samples, Sequence) else type(samples).__name__
            raise CalibrationError(f"info: sample index {index} outside data_list of {size}")
        sample = samples[index]
    if not isinstance(sample, Mapping):
        raise CalibrationError(f"info: sample {index} is a {type(sample).__name__}, not a dict")
    return sample


def _mat(value: Any, shapes: Sequence[tuple[int, int]], where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{where}: not numeric ({exc})") from exc
    if arr.shape not in shapes:
        raise CalibrationError(f"{where}: expected shape one of {list(shapes)}, got {arr.shape}")
    return arr


def _camera_from_info_entry(name: str, entry: Mapping[str, Any], image_hw: tuple[int, int]) -> PinholeCamera:
    where = f"info camera {name}"
    for key in ("cam2img", "lidar2cam"):
        if key not in entry:
            raise CalibrationError(f"{where}: missing {key!r}")
    # cam2img: 3x3 K (nuScenes) or a 3x4 / 4x4-padded P with stereo baseline (KITTI).
    cam2img = _mat(entry["cam2img"], [(3, 3), (3, 4), (4, 4)], f"{where}.cam2img")
    lidar2cam = _mat(entry["lidar2cam"], [(4, 4)], f"{where}.lidar2cam")
    if cam2img.shape == (3, 3):
        K, T_b = cam2img, np.eye(4)
    else:
        K, T_b = _split_projection(cam2img[:3, :4], f"{where}.cam2img")
    h = int(entry.get("height", image_hw[0]))
    w = int(entry.get("width", image_hw[1]))
    return PinholeCamera(name, K, w, h, T_b @ lidar2cam).validate()


def cameras_from_nuscenes_info(
    info: Mapping[str, Any],
    image_hw: tuple[int, int] = (900, 1600),
    names: Sequence[str] = NUSCENES_CAMERAS,
    index: int = 0,
) -> list[PinholeCamera]:
    """mmdetection3d nuScenes info (whole file dict or one `data_list` sample) -> six cameras in
    `names` order, from per-camera `cam2img` (3x3) and `lidar2cam` (4x4)."""
    images = info_sample(info, index).get("images")
    if not isinstance(images, Mapping):
        raise CalibrationError("nuScenes info: no 'images' mapping in sample")
    missing = [n for n in names if n not in images]
    if missing:
        raise CalibrationError(f"nuScenes info: cameras {missing} missing (have {sorted(images)})")
    return [_camera_from_info_entry(n, images[n], image_hw) for n in names]


def image_paths_from_info(
    info: Mapping[str, Any], root: str | Path, names: Sequence[str] = NUSCENES_CAMERAS, index: int = 0
) -> list[Path]:
    """Image file per camera: `img_path` from the info, resolved against `root` (basename fallback)."""
    images = info_sample(info, index).get("images", {})
    root = Path(root)
    out = []
    for n in names:
        rel = images.get(n, {}).get("img_path")
        if not rel:
            raise CalibrationError(f"info: no img_path for camera {n}")
        path = root / rel
        out.append(path if path.exists() else root / Path(rel).name)
    return out


def load_info_pickle(path: str | Path) -> dict[str, Any]:
    """Read an mmdetection3d info pickle (plain dicts/lists/numpy). Only load trusted files."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as exc:  # also a pickle naming classes of a package not installed here
        raise CalibrationError(f"{path}: cannot read info pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def camera_from_kitti_info(
    info: Mapping[str, Any], camera: str = "CAM2", image_hw: tuple[int, int] = (375, 1242), index: int = 0
) -> PinholeCamera:
    """mmdetection3d KITTI info (e.g. kitti_demo/000008.pkl): `cam2img` (4x4 P with baseline) and
    `lidar2cam` (R0_rect @ Tr_velo_to_cam) of `camera`."""
    images = info_sample(info, index).get("images")
    if not isinstance(images, Mapping) or camera not in images:
        raise CalibrationError(f"KITTI info: camera {camera!r} missing")
    return _camera_from_info_entry(camera, images[camera], image_hw)


def camera_from_camera_info(
    k: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray | None,
    p: Sequence[float] | np.ndarray | None,
    width: int,
    height: int,
    T_cam_lidar: np.ndarray,
    name: str,
    *,
    r: Sequence[float] | np.ndarray | None = None,
    rectified: bool = False,
) -> PinholeCamera:
    """ROS sensor_msgs/CameraInfo fields -> camera for the raw (distorted) image: K and plumb_bob D.
    With `rectified=True` (images from image_proc's *_rect topics) P[:, :3] is the intrinsic matrix,
    the rectification rotation `r` and P's Tx/Ty baseline are folded into the extrinsics, D is dropped."""
    K = np.asarray(k, dtype=np.float64).reshape(-1)
    if K.size != 9:
        raise CalibrationError(f"camera {name!r}: CameraInfo k needs 9 values, got {K.size}")
    if not rectified:
        D = None if d is None or len(d) == 0 else np.asarray(d, dtype=np.float64)
        return PinholeCamera(name, K.reshape(3, 3), width, height, T_cam_lidar, D).validate()
    P = np.asarray(p if p is not None else [], dtype=np.float64).reshape(-1)
    if P.size != 12 or not np.any(P):
        raise CalibrationError(f"camera {name!r}: rectified=True needs a 12-value non-zero P")
    K_rect, T_b = _split_projection(P.reshape(3, 4), f"camera {name!r}.P")
    R = np.eye(4)
    if r is not None and np.any(r):
        r_arr = np.asarray(r, dtype=np.float64).reshape(-1)
        if r_arr.size != 9:
            raise CalibrationError(f"camera {name!r}: CameraInfo r needs 9 values, got {r_arr.size}")
        R[:3, :3] = r_arr.reshape(3, 3)
    T = T_b @ R @ np.asarray(T_cam_lidar, dtype=np.float64)
    return PinholeCamera(name, K_rect, width, height, T).validate()
