"""Write a synthetic drive (clip3d_core's SyntheticWorld) as a rosbag2.

Topics (camera `CAM_FRONT` -> `front`; one set per configured camera):
  /lidar/points                    sensor_msgs/PointCloud2  x, y, z, intensity (float32), frame `lidar`
  /camera/front/image_raw          sensor_msgs/Image rgb8   (`--compressed`: .../image_raw/compressed, JPEG)
  /camera/front/camera_info        sensor_msgs/CameraInfo   K, D (plumb_bob), R = I, P = [K | 0]
  /tf_static                       tf2_msgs/TFMessage       lidar -> camera_front_optical_frame (latched)
  with `--labels`:
  /lidar/labels                    sensor_msgs/PointCloud2  x, y, z, label (uint16, 65535 = none), same order
  /lidar/label_classes             std_msgs/String          {"version", "entries": [...]} (latched)
Header stamps are the simulation time of each frame; bag timestamps equal header stamps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clip3d_core.clip.vocabulary import Vocabulary
from clip3d_core.data.frame import Frame
from clip3d_core.data.synthetic.config import SyntheticConfig
from clip3d_core.data.synthetic.dataset import SyntheticWorld
from clip3d_core.geometry.camera import PinholeCamera
from clip3d_core.labels import UNLABELLED
from clip3d_ros import bag

log = logging.getLogger(__name__)

LIDAR_FRAME = "lidar"
CLOUD_TOPIC = "/lidar/points"
LABELS_TOPIC = "/lidar/labels"
CLASSES_TOPIC = "/lidar/label_classes"
TF_STATIC_TOPIC = "/tf_static"

XYZI = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4})
XYZL = np.dtype(
    {
        "names": ["x", "y", "z", "label"],
        "formats": ["<f4", "<f4", "<f4", "<u2"],
        "offsets": [0, 4, 8, 12],
        "itemsize": 16,
    }
)


@dataclasses.dataclass(frozen=True)
class CameraTopics:
    """Topic and frame names of one camera, derived from its name (`CAM_FRONT` -> `front`)."""

    short: str
    compressed: bool = False

    @classmethod
    def for_camera(cls, name: str, compressed: bool = False) -> CameraTopics:
        short = name.lower()
        short = short[4:] if short.startswith("cam_") else short
        return cls(short=short, compressed=compressed)

    @property
    def image(self) -> str:
        base = f"/camera/{self.short}/image_raw"
        return base + "/compressed" if self.compressed else base

    @property
    def info(self) -> str:
        return f"/camera/{self.short}/camera_info"

    @property
    def frame_id(self) -> str:
        return f"camera_{self.short}_optical_frame"


def drive_config(
    seconds: float, rate: float, seed: int, base: SyntheticConfig | None = None
) -> SyntheticConfig:
    """`base` (default SyntheticConfig) with the drive length and rate set; the street is
    lengthened when the drive would run off its end."""
    base = base or SyntheticConfig()
    frames = max(1, round(seconds * rate))
    end = base.scene.drive_start_x + base.ego_speed * (frames - 1) / rate
    scene = base.scene
    if end + 40.0 > scene.length:  # keep a LiDAR range of street ahead of the last frame
        scene = dataclasses.replace(scene, length=end + 40.0)
    return dataclasses.replace(base, seed=seed, rate_hz=rate, drive_frames=frames, scene=scene)


def static_transforms(cameras: list[PinholeCamera]) -> list[tuple[str, str, np.ndarray]]:
    """(parent, child, T_parent_child) of every camera's optical frame on the LiDAR."""
    return [(LIDAR_FRAME, CameraTopics.for_camera(c.name).frame_id, c.T_lidar_cam) for c in cameras]


def xyzi_points(points: np.ndarray) -> np.ndarray:
    out = np.empty(len(points), XYZI)
    for i, name in enumerate(XYZI.names):
        out[name] = points[:, i]
    return out


def label_points(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.zeros(len(points), XYZL)
    for i, name in enumerate(("x", "y", "z")):
        out[name] = points[:, i]
    out["label"] = np.where(labels < 0, UNLABELLED, labels).astype(np.uint16)
    return out


# ------------------------------------------------------------------------------------ rendering
_WORLD: SyntheticWorld | None = None


def _init_worker(cfg: SyntheticConfig) -> None:
    global _WORLD
    _WORLD = SyntheticWorld(cfg)


def _render(index: int) -> Frame:
    assert _WORLD is not None
    return _WORLD.frame(index)


def render_drive(cfg: SyntheticConfig, workers: int = 1) -> Iterator[Frame]:
    """The drive's frames in order; with `workers` > 1 rendered in a process pool (the camera
    ray caster is single-threaded numpy, so frames parallelise almost perfectly)."""
    if workers <= 1:
        _init_worker(cfg)
        yield from (_render(i) for i in range(cfg.drive_frames))
        return
    # fork: workers run numpy only (never torch, whose thread pools fork does not copy safely), and
    # spawn would re-import torch in every worker (seconds each).
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_render, range(cfg.drive_frames), chunksize=1)


# ------------------------------------------------------------------------------------ writing
def write_drive_bag(
    out: str | Path,
    cfg: SyntheticConfig,
    *,
    storage: str = "sqlite3",
    compressed: bool = False,
    labels: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Counter[str]:
    """Render `cfg`'s drive into a new bag at `out`; returns messages written per topic."""
    out = Path(out)
    counts: Counter[str] = Counter()
    world = SyntheticWorld(cfg)
    cams = [CameraTopics.for_camera(c.name, compressed) for c in world.cameras]
    with bag.BagWriter(out, storage) as writer:
        writer.add_topic(CLOUD_TOPIC, bag.T_CLOUD)
        writer.add_topic(TF_STATIC_TOPIC, bag.T_TF, bag.QOS_LATCHED)
        for topics in cams:
            writer.add_topic(topics.image, bag.T_COMPRESSED if compressed else bag.T_IMAGE)
            writer.add_topic(topics.info, bag.T_CAMERA_INFO)
        if labels:
            writer.add_topic(LABELS_TOPIC, bag.T_CLOUD)
            writer.add_topic(CLASSES_TOPIC, bag.T_STRING, bag.QOS_LATCHED)

        def put(topic: str, ns: int, msg: object) -> None:
            writer.write(topic, ns, msg)
            counts[topic] += 1

        frames = tqdm(
            render_drive(cfg, workers),
            total=cfg.drive_frames,
            desc=f"make-bag {out.name}",
            unit="frame",
            disable=not progress,
        )
        for index, frame in enumerate(frames):
            ns = frame.stamp_ns
            if index == 0:
                put(TF_STATIC_TOPIC, ns, bag.tf_message(static_transforms(frame.cameras), ns))
                if labels:
                    classes = Vocabulary.from_strings(frame.class_names).as_dict()
                    put(CLASSES_TOPIC, ns, bag.msg_class(bag.T_STRING)(data=json.dumps(classes)))
            put(CLOUD_TOPIC, ns, bag.cloud_msg(xyzi_points(frame.points), bag.header(ns, LIDAR_FRAME)))
            if labels:
                assert frame.labels is not None
                put(
                    LABELS_TOPIC,
                    ns,
                    bag.cloud_msg(label_points(frame.points, frame.labels), bag.header(ns, LIDAR_FRAME)),
                )
            for topics, cam, image in zip(cams, frame.cameras, frame.images):
                hdr = bag.header(ns, topics.frame_id)
                put(
                    topics.image,
                    ns,
                    bag.compressed_image_msg(image, hdr) if compressed else bag.image_msg(image, hdr),
                )
                put(topics.info, ns, bag.camera_info_msg(cam.K, cam.D, cam.width, cam.height, hdr))
    log.info("wrote %s (%s): %s", out, storage, dict(counts))
    return counts


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="new rosbag2 folder (must not exist)")
    parser.add_argument("--seconds", type=float, default=20.0, help="drive length in seconds of sim time")
    parser.add_argument("--rate", type=float, default=10.0, help="LiDAR / camera rate in Hz")
    parser.add_argument("--seed", type=int, default=0, help="street seed (same seed -> same bag contents)")
    parser.add_argument("--storage", choices=sorted(bag.STORAGES), default="sqlite3")
    parser.add_argument(
        "--compressed", action="store_true", help="JPEG CompressedImage instead of rgb8 Image"
    )
    parser.add_argument(
        "--labels", action="store_true", help="also write ground-truth labels on /lidar/labels"
    )
    parser.add_argument("--workers", type=int, default=1, help="render frames in this many processes")


def run(args: argparse.Namespace) -> int:
    if not (args.seconds > 0 and args.rate > 0 and args.workers >= 1):
        log.error("--seconds and --rate must be > 0 and --workers >= 1")
        return 2
    try:
        write_drive_bag(
            args.out,
            drive_config(args.seconds, args.rate, args.seed),
            storage=args.storage,
            compressed=args.compressed,
            labels=args.labels,
            workers=args.workers,
        )
    except bag.BagError as exc:
        log.error("%s", exc)
        return 2
    return 0
