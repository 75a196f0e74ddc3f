"""nuScenes-lidarseg in its official layout (no devkit needed).

    <root>/<version>/{sample,sample_data,calibrated_sensor,ego_pose,sensor,scene,category,lidarseg}.json
    <root>/samples/LIDAR_TOP/*.pcd.bin          float32 [N, 5] x, y, z, intensity (0..255), ring
    <root>/samples/CAM_*/*.jpg
    <root>/lidarseg/<version>/<token>_lidarseg.bin   uint8 [N] general category index (category.json)
    <root>/panoptic/<version>/<token>_panoptic.npz   nuScenes-panoptic: "data" uint16 [N] =
                                                     category index * 1000 + instance (0 = stuff / none)

Labels: the 32 general categories map to the 16 lidarseg benchmark classes (the official
lidarseg challenge mapping; noise, animal, static.other, vehicle.ego, ... -> -1 ignore).
Cameras: T_cam_lidar chains lidar -> ego (at the LiDAR time) -> global -> ego (at the camera
time) -> camera, so ego motion between the two exposures is compensated.
Intensity is divided by 255 (`intensity_scale`) to share the [0, 1] range of KITTI remission.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from clip3d_core.data.errors import DatasetError
from clip3d_core.data.frame import Frame
from clip3d_core.geometry.calibration import NUSCENES_CAMERAS
from clip3d_core.geometry.camera import CalibrationError, PinholeCamera

log = logging.getLogger(__name__)

NUSCENES_CLASSES: tuple[str, ...] = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian", "traffic_cone",
    "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation",
)
# CLIP-friendly vocabulary entries aligned with NUSCENES_CLASSES (first synonym = the class name).
NUSCENES_PROMPTS: tuple[str, ...] = (
    "barrier|traffic barrier|concrete barrier", "bicycle", "bus", "car",
    "construction_vehicle|construction vehicle|excavator|crane", "motorcycle", "pedestrian|person",
    "traffic_cone|traffic cone", "trailer", "truck", "driveable_surface|road|driveable surface",
    "other_flat|traffic island|curb|rail track", "sidewalk", "terrain|grass|ground",
    "manmade|building|wall|man-made structure", "vegetation|tree|bush",
)
# general category name -> lidarseg class (None = ignore)
GENERAL_TO_LIDARSEG: dict[str, str | None] = {
    "noise": None,
    "animal": None,
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.personal_mobility": None,
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.stroller": None,
    "human.pedestrian.wheelchair": None,
    "movable_object.barrier": "barrier",
    "movable_object.debris": None,
    "movable_object.pushable_pullable": None,
    "movable_object.trafficcone": "traffic_cone",
    "static_object.bicycle_rack": None,
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.emergency.ambulance": None,
    "vehicle.emergency.police": None,
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable_surface",
    "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "static.manmade": "manmade",
    "static.other": None,
    "static.vegetation": "vegetation",
    "vehicle.ego": None,
}
# nuScenes devkit `splits.py`: the v1.0-mini scene split.
MINI_SPLITS: dict[str, tuple[str, ...]] = {
    "mini_train": ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077",
                   "scene-1094", "scene-1100"),
    "mini_val": ("scene-0103", "scene-0916"),
}


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """nuScenes quaternion (w, x, y, z) -> 3x3 rotation (normalised first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def pose_matrix(record: dict[str, Any]) -> np.ndarray:
    """calibrated_sensor / ego_pose record -> 4x4 (child -> parent)."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(record["rotation"])
    T[:3, 3] = record["translation"]
    return T


def _rigid_inverse(T: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


def label_lookup(categories: list[dict[str, Any]]) -> np.ndarray:
    """category.json -> [256] lut from the lidarseg uint8 index to class index (-1 ignore)."""
    lut = np.full(256, -1, dtype=np.int64)
    for pos, cat in enumerate(categories):
        index = int(cat.get("index", pos))
        target = GENERAL_TO_LIDARSEG.get(cat["name"])
        if cat["name"] not in GENERAL_TO_LIDARSEG:
            log.warning("nuScenes category %r is not in the lidarseg mapping: ignored", cat["name"])
        if not 0 <= index < 256:
            raise DatasetError(f"category {cat['name']!r}: index {index} outside uint8")
        lut[index] = -1 if target is None else NUSCENES_CLASSES.index(target)
    return lut


def read_panoptic(path: Path, lut: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """A nuScenes-panoptic .npz -> (class index int64 [N] via ``lut``, -1 ignore; instance id int64 [N])."""
    try:
        with np.load(path) as npz:
            raw = np.asarray(npz["data"]).astype(np.int64).reshape(-1)
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read a panoptic 'data' array ({exc})") from exc
    if raw.size != num_points:
        raise DatasetError(f"{path}: {raw.size} labels for {num_points} points")
    if raw.size and (raw.min() < 0 or raw.max() // 1000 >= lut.size):
        raise DatasetError(f"{path}: category index outside [0, {lut.size})")
    return lut[raw // 1000], raw % 1000


def _scene_names(split: str | Sequence[str]) -> tuple[str, ...] | None:
    """None = every scene of the version."""
    if isinstance(split, str):
        if split == "all":
            return None
        if split in MINI_SPLITS:
            return MINI_SPLITS[split]
        if split in ("train", "val", "test"):
            try:
                from nuscenes.utils.splits import create_splits_scenes
            except ImportError as exc:
                raise DatasetError(
                    f"split {split!r} needs the official scene lists of nuscenes-devkit "
                    "(pip install nuscenes-devkit) or pass the scene names / a text file of them") from exc
            return tuple(create_splits_scenes()[split])
        path = Path(split)
        if path.is_file():
            return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        raise DatasetError(f"unknown nuScenes split {split!r}: all, mini_train, mini_val, train, val, "
                           "a scene-name list or a text file")
    return tuple(split)


class NuScenesLidarSegDataset(Dataset[Frame]):
    """Keyframes (samples) of the selected scenes, ordered by scene name then time."""

    def __init__(self, root: str | Path, version: str = "v1.0-mini", split: str | Sequence[str] = "all", *,
                 with_images: bool = True, cameras: Sequence[str] = NUSCENES_CAMERAS,
                 intensity_scale: float = 1.0 / 255.0) -> None:
        self.root = Path(root)
        self.version = version
        self.camera_names = tuple(cameras)
        self.with_images = with_images
        self.intensity_scale = float(intensity_scale)
        self.class_names = NUSCENES_CLASSES
        table_dir = self.root / version
        if not table_dir.is_dir():
            raise DatasetError(f"{self.root}: no table folder {version!r}")

        def table(name: str, required: bool = True) -> list[dict[str, Any]]:
            path = table_dir / f"{name}.json"
            if not path.is_file():
                if required:
                    raise DatasetError(f"{path} missing")
                return []
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise DatasetError(f"{path}: cannot parse ({exc})") from exc

        self._calib = {r["token"]: r for r in table("calibrated_sensor")}
        self._ego = {r["token"]: r for r in table("ego_pose")}
        channel_of_sensor = {r["token"]: r["channel"] for r in table("sensor", required=False)}
        self._keyframes: dict[str, dict[str, dict[str, Any]]] = {}
        for sd in table("sample_data"):
            if not sd.get("is_key_frame", False):
                continue
            sensor = self._calib[sd["calibrated_sensor_token"]].get("sensor_token")
            # samples/<CHANNEL>/<file>: the channel is in the path when sensor.json is absent
            channel = channel_of_sensor.get(sensor) or Path(sd["filename"]).parts[1]
            self._keyframes.setdefault(sd["sample_token"], {})[channel] = sd

        lidarseg = table("lidarseg", required=False)
        self._lidarseg = {r["sample_data_token"]: r["filename"] for r in lidarseg}
        # nuScenes-panoptic: its labels are the lidarseg ones plus instance ids, so it replaces lidarseg
        self._panoptic = {r["sample_data_token"]: r["filename"] for r in table("panoptic", required=False)}
        self._lut = label_lookup(table("category")) if lidarseg or self._panoptic else None
        if not lidarseg and not self._panoptic:
            log.warning("%s: no lidarseg.json or panoptic.json, frames will be unlabelled", table_dir)

        scene_name = {r["token"]: r["name"] for r in table("scene")}
        wanted = _scene_names(split)
        unknown = sorted(set(wanted or ()) - set(scene_name.values()))
        if unknown and not isinstance(split, str):
            raise DatasetError(f"{version}: scenes {unknown[:5]} not in scene.json")
        if unknown:  # a named split over a partial copy of the version
            log.warning("%s split %r: %d of its scenes absent (%s ...)", version, split, len(unknown),
                        unknown[0])
        samples = [s for s in table("sample") if wanted is None or scene_name.get(s["scene_token"]) in wanted]
        samples.sort(key=lambda s: (scene_name.get(s["scene_token"], ""), s["timestamp"]))
        self._samples = [s for s in samples if "LIDAR_TOP" in self._keyframes.get(s["token"], {})]
        if len(self._samples) < len(samples):
            log.warning("%d samples without a LIDAR_TOP keyframe skipped", len(samples) - len(self._samples))
        if not self._samples:
            raise DatasetError(f"{version}: no samples for split {split!r}")
        log.info("nuScenes %s %s: %d samples", version, split if isinstance(split, str) else "custom",
                 len(self._samples))

    def __len__(self) -> int:
        return len(self._samples)

    def _camera(self, name: str, sd: dict[str, Any], T_global_lidar: np.ndarray, image_hw: tuple[int, int]
                ) -> PinholeCamera:
        cs = self._calib[sd["calibrated_sensor_token"]]
        T_global_cam = pose_matrix(self._ego[sd["ego_pose_token"]]) @ pose_matrix(cs)
        K = np.asarray(cs.get("camera_intrinsic") or [], dtype=np.float64)
        if K.shape != (3, 3):
            raise CalibrationError(f"{name}: camera_intrinsic must be 3x3, got shape {K.shape}")
        return PinholeCamera(name, K, image_hw[1], image_hw[0], _rigid_inverse(T_global_cam) @ T_global_lidar
                             ).validate()

    def __getitem__(self, index: int) -> Frame:
        sample = self._samples[index]
        frames = self._keyframes[sample["token"]]
        lidar = frames["LIDAR_TOP"]
        path = self.root / lidar["filename"]
        try:
            raw = np.fromfile(path, dtype=np.float32)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc})") from exc
        if raw.size % 5:
            raise DatasetError(f"{path}: {raw.size} floats is not a multiple of 5 (x, y, z, intensity, ring)")
        points = raw.reshape(-1, 5)[:, :4].copy()
        points[:, 3] *= self.intensity_scale

        labels = instances = None
        if self._lut is not None and lidar["token"] in self._panoptic:
            path = self.root / self._panoptic[lidar["token"]]
            labels, instances = read_panoptic(path, self._lut, len(points))
        elif self._lut is not None and lidar["token"] in self._lidarseg:
            lpath = self.root / self._lidarseg[lidar["token"]]
            try:
                raw_labels = np.fromfile(lpath, dtype=np.uint8)
            except OSError as exc:
                raise DatasetError(f"{lpath}: cannot read ({exc})") from exc
            if raw_labels.size != len(points):
                raise DatasetError(f"{lpath}: {raw_labels.size} labels for {len(points)} points")
            labels = self._lut[raw_labels]

        T_global_lidar = pose_matrix(self._ego[lidar["ego_pose_token"]]) @ pose_matrix(
            self._calib[lidar["calibrated_sensor_token"]])
        images, cameras = [], []
        if self.with_images:
            for name in self.camera_names:
                sd = frames.get(name)
                if sd is None:
                    log.warning("sample %s has no %s keyframe", sample["token"], name)
                    continue
                with Image.open(self.root / sd["filename"]) as im:
                    image = np.asarray(im.convert("RGB"))
                images.append(image)
                cameras.append(self._camera(name, sd, T_global_lidar, image.shape[:2]))
        return Frame(points=points, labels=labels, instances=instances, images=images, cameras=cameras,
                     class_names=self.class_names, frame_id=sample["token"],
                     stamp_ns=int(lidar["timestamp"]) * 1000, pose=T_global_lidar)
