"""`SyntheticWorld` (one fixed scene, a drive through it) and `SyntheticWorldDataset` (torch Dataset)."""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from clip3d_core.data.frame import Frame
from clip3d_core.data.synthetic.camera import camera_from_config, render
from clip3d_core.data.synthetic.config import SyntheticConfig
from clip3d_core.data.synthetic.lidar import Lidar
from clip3d_core.data.synthetic.world import CLASS_NAMES, Scene, generate_scene

log = logging.getLogger(__name__)

# Independent random streams per purpose, so e.g. the LiDAR noise of frame 3 never depends on
# how many random numbers the scene generator drew.
_SCENE, _FRAME, _POSE = 0, 1, 2


def _pose(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    c, s = math.cos(yaw), math.sin(yaw)
    T[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    T[:3, 3] = (x, y, z)
    return T


class SyntheticWorld:
    """One procedurally generated street (fixed by `seed`) and an ego car driving along it.

    `frame(i)` is the sensor data at time i / rate_hz with the ego at drive_start_x + speed * t in
    the ego lane; traffic and pedestrians move with their own constant velocities.
    """

    def __init__(self, cfg: SyntheticConfig, seed: int | None = None) -> None:
        self.cfg = cfg
        self.seed = cfg.seed if seed is None else int(seed)
        if cfg.rate_hz <= 0 or cfg.drive_frames < 1:
            raise ValueError(f"rate_hz must be > 0 and drive_frames >= 1, got {cfg.rate_hz}, "
                             f"{cfg.drive_frames}")
        end = cfg.scene.drive_start_x + cfg.ego_speed * (cfg.drive_frames - 1) / cfg.rate_hz
        if cfg.scene.drive_start_x < 0.0 or end > cfg.scene.length:
            raise ValueError(f"the drive [{cfg.scene.drive_start_x}, {end:.1f}] m leaves the street [0, "
                             f"{cfg.scene.length}] m: lower ego_speed/drive_frames or lengthen the street")
        self.scene: Scene = generate_scene(
            cfg.scene, np.random.default_rng([self.seed, _SCENE]), ego_start_x=cfg.scene.drive_start_x,
            ego_speed=cfg.ego_speed, duration=cfg.drive_frames / cfg.rate_hz)
        self.lidar = Lidar(cfg.lidar)
        self.cameras = [camera_from_config(c) for c in cfg.cameras]
        self.class_names = CLASS_NAMES

    def __len__(self) -> int:
        return self.cfg.drive_frames

    def time(self, index: int) -> float:
        return index / self.cfg.rate_hz

    def ego_pose(self, index: int) -> np.ndarray:
        """T_world_lidar of drive frame `index`."""
        x = self.cfg.scene.drive_start_x + self.cfg.ego_speed * self.time(index)
        return _pose(x, -self.cfg.scene.road_half_width / 4, self.cfg.lidar.height, 0.0)

    def frame(self, index: int) -> Frame:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} outside the drive of {len(self)} frames")
        rng = np.random.default_rng([self.seed, _FRAME, index])
        return self.render(self.ego_pose(index), self.time(index), rng,
                           frame_id=f"synthetic-{self.seed}-{index:06d}",
                           stamp_ns=self.cfg.start_stamp_ns + round(self.time(index) * 1e9))

    def random_pose(self, rng: np.random.Generator) -> np.ndarray:
        """The drive's first pose with lane offset, heading and mount-height jitter (training variety)."""
        x = self.cfg.scene.drive_start_x
        y = -self.cfg.scene.road_half_width / 4 + rng.uniform(-0.5, 0.5)
        return _pose(x, y, self.cfg.lidar.height + rng.uniform(-0.1, 0.1), rng.uniform(-0.08, 0.08))

    def render(self, T_world_lidar: np.ndarray, time: float, rng: np.random.Generator, *, frame_id: str,
               stamp_ns: int = 0) -> Frame:
        """All sensors at one pose and time; the frame's labels are exact."""
        scan = self.lidar.scan(self.scene, T_world_lidar, time, rng)
        images, pixel_labels, pixel_instances = [], [], []
        for cam, cam_cfg in zip(self.cameras, self.cfg.cameras):
            r = render(self.scene, cam, T_world_lidar, time, rng, max_depth=cam_cfg.max_depth)
            images.append(r.image)
            pixel_labels.append(r.labels)
            pixel_instances.append(r.instances)
        return Frame(points=scan.points, labels=scan.semantic, instances=scan.instance, images=images,
                     cameras=list(self.cameras), class_names=self.class_names, frame_id=frame_id,
                     stamp_ns=stamp_ns, pixel_labels=pixel_labels, pixel_instances=pixel_instances,
                     pose=T_world_lidar.copy())


class SyntheticWorldDataset(Dataset[Frame]):
    """`length` synthetic frames.

    mode "random" (training): item i is a fresh street from seed (cfg.seed, i), seen from a jittered
    ego pose (cfg.random_pose) at t = 0. mode "drive": the consecutive frames of one `SyntheticWorld`.
    """

    def __init__(self, cfg: SyntheticConfig, length: int,
                 mode: Literal["random", "drive"] = "random") -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if mode not in ("random", "drive"):
            raise ValueError(f"mode must be 'random' or 'drive', got {mode!r}")
        if mode == "drive" and length > cfg.drive_frames:
            raise ValueError(f"drive mode: length {length} > cfg.drive_frames {cfg.drive_frames}")
        self.cfg, self.length, self.mode = cfg, length, mode
        self.class_names = CLASS_NAMES
        self._world = SyntheticWorld(cfg) if mode == "drive" else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Frame:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside [0, {self.length})")
        if self._world is not None:
            return self._world.frame(index)
        seed = int(np.random.SeedSequence([self.cfg.seed, index]).generate_state(1)[0])
        world = SyntheticWorld(self.cfg, seed=seed)
        rng = np.random.default_rng([seed, _POSE])
        pose = world.random_pose(rng) if self.cfg.random_pose else world.ego_pose(0)
        return world.render(pose, 0.0, rng, frame_id=f"synthetic-{self.cfg.seed}-r{index:06d}",
                            stamp_ns=self.cfg.start_stamp_ns + index * round(1e9 / self.cfg.rate_hz))
