"""SemanticKITTI in its official layout.

    <root>/sequences/<XX>/velodyne/<NNNNNN>.bin   float32 [N, 4] x, y, z, remission
    <root>/sequences/<XX>/labels/<NNNNNN>.label   uint32 [N]: lower 16 bits raw semantic id, upper 16 instance
    <root>/sequences/<XX>/image_2/<NNNNNN>.png    left colour camera (optional)
    <root>/sequences/<XX>/calib.txt               P0..P3, Tr (velodyne -> cam0)
    <root>/sequences/<XX>/times.txt               seconds per scan (optional)

Raw ids map to the 19 benchmark classes with the official `learning_map` of semantic-kitti.yaml
(semantic-kitti-api); 0 ("unlabeled") and everything mapped to it become -1 (ignore).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from clip3d_core.data.errors import DatasetError
from clip3d_core.data.frame import Frame
from clip3d_core.geometry.calibration import load_kitti_calib
from clip3d_core.geometry.camera import PinholeCamera

log = logging.getLogger(__name__)

SEMANTICKITTI_CLASSES: tuple[str, ...] = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist",
    "road", "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain",
    "pole", "traffic-sign",
)
# CLIP-friendly vocabulary entries, aligned with SEMANTICKITTI_CLASSES ("name|synonym|...").
SEMANTICKITTI_PROMPTS: tuple[str, ...] = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle|bus|trailer|tram", "person|pedestrian",
    "bicyclist|cyclist", "motorcyclist", "road", "parking|parking lot", "sidewalk",
    "other-ground|traffic island", "building", "fence|wall", "vegetation|bush|tree", "trunk|tree trunk",
    "terrain|grass", "pole", "traffic-sign|traffic sign",
)

# semantic-kitti.yaml `learning_map`: raw id -> train id (0 = ignore, 1..19 = SEMANTICKITTI_CLASSES).
LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11,
    49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7,
    254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}

# Official sequence split (semantic-kitti.yaml `split`).
SEQUENCE_SPLITS: dict[str, tuple[int, ...]] = {
    "train": (0, 1, 2, 3, 4, 5, 6, 7, 9, 10),
    "val": (8,),
    "test": tuple(range(11, 22)),
}


def _lookup_table() -> np.ndarray:
    """Raw 16-bit id -> class index (-1 ignore, also for ids the map does not know)."""
    lut = np.full(1 << 16, -1, dtype=np.int64)
    for raw, train in LEARNING_MAP.items():
        lut[raw] = train - 1
    return lut


_LUT = _lookup_table()


def map_labels(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint32 .label words -> (class index int64 [N], -1 ignore; instance id int64 [N])."""
    raw = np.asarray(raw, dtype=np.uint32)
    semantic = raw & 0xFFFF
    unknown = ~np.isin(semantic, np.fromiter(LEARNING_MAP, dtype=np.uint32))
    if unknown.any():
        log.warning("%d points carry raw ids outside the learning map (%s): ignored",
                    int(unknown.sum()), np.unique(semantic[unknown])[:8].tolist())
    return _LUT[semantic], (raw >> 16).astype(np.int64)


def encode_labels(raw_semantic: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """(raw 16-bit semantic id, instance id) -> uint32 .label words, the inverse of the file's packing."""
    raw_semantic, instances = np.asarray(raw_semantic, np.int64), np.asarray(instances, np.int64)
    for name, a in (("semantic", raw_semantic), ("instance", instances)):
        if a.size and (a.min() < 0 or a.max() > 0xFFFF):
            raise DatasetError(f"{name} ids must fit in 16 bits, got [{a.min()}, {a.max()}]")
    return ((instances << 16) | raw_semantic).astype(np.uint32)


def read_scan(bin_path: str | Path, label_path: str | Path | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One velodyne .bin (+ .label) -> (points float32 [N, 4], labels, instances)."""
    bin_path = Path(bin_path)
    try:
        data = np.fromfile(bin_path, dtype=np.float32)
    except OSError as exc:
        raise DatasetError(f"{bin_path}: cannot read ({exc})") from exc
    if data.size % 4:
        raise DatasetError(f"{bin_path}: {data.size} floats is not a multiple of 4 (x, y, z, remission)")
    points = data.reshape(-1, 4)
    if label_path is None:
        return points, None, None
    label_path = Path(label_path)
    try:
        raw = np.fromfile(label_path, dtype=np.uint32)
    except OSError as exc:
        raise DatasetError(f"{label_path}: cannot read ({exc})") from exc
    if raw.size != len(points):
        raise DatasetError(f"{label_path}: {raw.size} labels for {len(points)} points in {bin_path.name}")
    labels, instances = map_labels(raw)
    return points, labels, instances


def _sequence_names(sequences: str | int | Sequence[str | int]) -> list[str]:
    if isinstance(sequences, str) and sequences in SEQUENCE_SPLITS:
        sequences = SEQUENCE_SPLITS[sequences]
    if isinstance(sequences, str | int):
        sequences = [sequences]
    names = []
    for s in sequences:
        try:
            names.append(f"{int(s):02d}")
        except ValueError as exc:
            raise DatasetError(f"bad sequence {s!r}: use numbers or one of {list(SEQUENCE_SPLITS)}") from exc
    return names


class SemanticKittiDataset(Dataset[Frame]):
    """Scans of the given sequences (numbers, or "train" / "val" / "test"), in sequence / scan order.

    with_images: load image_2 and its calibrated camera (`camera` = "P2", the left colour camera)
    when the sequence has them; frames of sequences without images get no cameras. Sequences with
    no labels folder (the test split) yield labels None.
    """

    def __init__(self, root: str | Path, sequences: str | int | Sequence[str | int] = "train", *,
                 with_images: bool = True, camera: str = "P2") -> None:
        self.root = Path(root)
        seq_root = self.root / "sequences"
        if not seq_root.is_dir():
            raise DatasetError(f"{self.root}: no 'sequences' folder (expected <root>/sequences/XX/velodyne)")
        self.camera, self.with_images = camera, with_images
        self.class_names = SEMANTICKITTI_CLASSES
        self._scans: list[tuple[str, str]] = []
        self._times: dict[str, np.ndarray] = {}
        self._cameras: dict[tuple[str, tuple[int, int]], PinholeCamera] = {}
        for seq in _sequence_names(sequences):
            velo = seq_root / seq / "velodyne"
            if not velo.is_dir():
                raise DatasetError(f"sequence {seq}: missing {velo}")
            scans = sorted(p.stem for p in velo.glob("*.bin"))
            if not scans:
                raise DatasetError(f"sequence {seq}: no .bin scans in {velo}")
            self._scans += [(seq, s) for s in scans]
            times = seq_root / seq / "times.txt"
            if times.is_file():
                self._times[seq] = np.loadtxt(times, dtype=np.float64, ndmin=1)
        log.info("SemanticKITTI %s: %d scans from %d sequences", self.root, len(self._scans),
                 len({s for s, _ in self._scans}))

    def __len__(self) -> int:
        return len(self._scans)

    def _seq(self, seq: str) -> Path:
        return self.root / "sequences" / seq

    def _camera(self, seq: str, image_hw: tuple[int, int]) -> PinholeCamera:
        key = (seq, image_hw)
        if key not in self._cameras:
            calib = self._seq(seq) / "calib.txt"
            if not calib.is_file():
                raise DatasetError(f"sequence {seq}: images present but {calib} missing")
            self._cameras[key] = load_kitti_calib(calib, image_hw, camera=self.camera, name="image_2")
        return self._cameras[key]

    def __getitem__(self, index: int) -> Frame:
        seq, scan = self._scans[index]
        d = self._seq(seq)
        label = d / "labels" / f"{scan}.label"
        points, labels, instances = read_scan(d / "velodyne" / f"{scan}.bin",
                                              label if label.is_file() else None)
        images, cameras = [], []
        png = d / "image_2" / f"{scan}.png"
        if self.with_images and png.is_file():
            with Image.open(png) as im:
                image = np.asarray(im.convert("RGB"))
            images.append(image)
            cameras.append(self._camera(seq, image.shape[:2]))
        stamp = 0
        times = self._times.get(seq)
        if times is not None and int(scan) < len(times):
            stamp = round(float(times[int(scan)]) * 1e9)
        return Frame(points=points, labels=labels, instances=instances, images=images, cameras=cameras,
                     class_names=self.class_names, frame_id=f"{seq}/{scan}", stamp_ns=stamp)
