"""A rotating multi-beam LiDAR: real vertical beam tables, range noise, dropouts, intensity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip3d_core.data.synthetic.config import LidarConfig
from clip3d_core.data.synthetic.raycast import GROUND, cast_rays
from clip3d_core.data.synthetic.world import CLUTTER, Scene


class LidarConfigError(ValueError):
    """Unknown beam pattern or inconsistent LiDAR settings."""


def beam_elevations_deg(cfg: LidarConfig) -> np.ndarray:
    """Vertical angle per beam (degrees, top beam first).

    hdl32: Velodyne HDL-32E (nuScenes), +10.67 to -30.67 in 4/3 degree steps.
    hdl64: Velodyne HDL-64E S2 (KITTI), upper block +2 to -8.33 (1/3 degree), lower block
    -8.83 to -24.33 (1/2 degree). vlp16: VLP-16, +15 to -15 in 2 degree steps.
    uniform: `beams` beams evenly between fov_up_deg and fov_down_deg.
    """
    tables = {
        "hdl32": np.linspace(10.67, -30.67, 32),
        "hdl64": np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.33, 32)]),
        "vlp16": np.linspace(15.0, -15.0, 16),
    }
    if cfg.pattern == "uniform":
        if cfg.beams < 1 or cfg.fov_up_deg <= cfg.fov_down_deg:
            raise LidarConfigError(f"uniform pattern needs beams >= 1 and fov_up > fov_down, got {cfg}")
        return np.linspace(cfg.fov_up_deg, cfg.fov_down_deg, cfg.beams)
    if cfg.pattern not in tables:
        raise LidarConfigError(f"unknown LiDAR pattern {cfg.pattern!r}; known: {[*tables, 'uniform']}")
    table = tables[cfg.pattern]
    if cfg.beams != len(table):
        raise LidarConfigError(f"pattern {cfg.pattern!r} has {len(table)} beams, "
                               f"config says beams={cfg.beams}")
    return table


@dataclass(frozen=True)
class LidarScan:
    """Returned points in the LiDAR frame with exact labels of the surface each ray hit."""

    points: np.ndarray  # [N, 4] float32 x, y, z, intensity in [0, 1]
    semantic: np.ndarray  # [N] int64
    instance: np.ndarray  # [N] int64
    ring: np.ndarray  # [N] int64 beam index (0 = top)
    primitive: np.ndarray  # [N] int64 scene primitive (GROUND for the ground)


class Lidar:
    """Casts one full revolution (all beams x `azimuths` columns, instantaneous: no motion skew)."""

    def __init__(self, cfg: LidarConfig) -> None:
        if cfg.azimuths < 1 or not 0 < cfg.min_range < cfg.max_range:
            raise LidarConfigError(f"need azimuths >= 1 and 0 < min_range < max_range, got {cfg}")
        self.cfg = cfg
        self.elevation = np.radians(beam_elevations_deg(cfg))

    @property
    def num_rays(self) -> int:
        return len(self.elevation) * self.cfg.azimuths

    def directions(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Unit ray directions in the LiDAR frame [B*A, 3] (beam-major) and their ring index."""
        a = self.cfg.azimuths
        jitter = rng.uniform(-self.cfg.azimuth_jitter, self.cfg.azimuth_jitter, size=a)
        az = 2 * np.pi * (np.arange(a) + 0.5 + jitter) / a - np.pi
        el = self.elevation[:, None]
        dirs = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), -1)
        ring = np.repeat(np.arange(len(self.elevation)), a)
        return dirs.reshape(-1, 3), ring

    def scan(self, scene: Scene, T_world_lidar: np.ndarray, time: float,
             rng: np.random.Generator) -> LidarScan:
        cfg = self.cfg
        dirs, ring = self.directions(rng)
        R, origin = T_world_lidar[:3, :3], T_world_lidar[:3, 3]
        hits = cast_rays(scene, origin, dirs @ R.T, time, cfg.max_range)
        rng_noise = rng.normal(0.0, cfg.range_noise, size=len(dirs))
        u_drop = rng.random(len(dirs))
        i_noise = rng.normal(0.0, cfg.intensity_noise, size=len(dirs))

        ground = hits.primitive == GROUND
        prim = np.maximum(hits.primitive, 0)
        x, y = hits.point[:, 0], hits.point[:, 1]
        g_sem, _, g_refl = scene.layout.material(x, y)
        semantic = np.where(ground, g_sem, scene.semantic[prim])
        semantic = np.where(semantic == CLUTTER, -1, semantic)  # no class: ignore-labelled
        instance = np.where(ground, 0, scene.instance[prim])
        refl = np.where(ground, g_refl, scene.reflectivity[prim])

        r = hits.t
        cos_inc = np.abs((hits.normal * (dirs @ R.T)).sum(1))
        frac = np.where(hits.hit, r / cfg.max_range, 1.0)
        intensity = refl * (0.3 + 0.7 * cos_inc) * (1.0 - 0.25 * frac) + i_noise
        # dark surfaces far away fall below the detection threshold more often
        p_drop = cfg.dropout + 0.5 * np.clip(frac - 2.0 * refl, 0.0, 1.0)
        keep = hits.hit & (r >= cfg.min_range) & (u_drop >= p_drop)
        r_noisy = r[keep] + rng_noise[keep]
        xyz = dirs[keep] * r_noisy[:, None]
        points = np.concatenate([xyz, np.clip(intensity[keep], 0.0, 1.0)[:, None]], 1).astype(np.float32)
        return LidarScan(points=points, semantic=semantic[keep], instance=instance[keep], ring=ring[keep],
                         primitive=hits.primitive[keep])
