"""Pinhole cameras rendered by ray casting the same primitives the LiDAR sees.

Per pixel: class id (-1 = sky, -2 = clutter of no class), instance id and a simply shaded RGB
(per-object albedo, Lambert sun + ambient, world-anchored value noise as texture, windows on
buildings, distance haze).
Pixel (col j, row i) is sampled at its centre (j + 0.5, i + 0.5): pixel i spans [i, i + 1), the
convention of `clip3d_core.geometry.project_points`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clip3d_core.data.synthetic.config import CameraConfig
from clip3d_core.data.synthetic.raycast import GROUND, cast_rays
from clip3d_core.data.synthetic.world import BOX, CLASS_ID, Scene
from clip3d_core.geometry.camera import PinholeCamera

_SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])
_SKY_HORIZON = np.array([0.78, 0.85, 0.93])
_SKY_ZENITH = np.array([0.35, 0.55, 0.85])
_WINDOW_RGB = np.array([0.16, 0.2, 0.28])


def camera_from_config(cfg: CameraConfig) -> PinholeCamera:
    """Intrinsics from the horizontal field of view (square pixels, centred principal point) and
    extrinsics from yaw/pitch/position on the LiDAR (LiDAR frame: x forward, y left, z up)."""
    fx = (cfg.width / 2) / math.tan(math.radians(cfg.hfov_deg) / 2)
    K = np.array([[fx, 0.0, cfg.width / 2], [0.0, fx, cfg.height / 2], [0.0, 0.0, 1.0]])
    yaw, pitch = math.radians(cfg.yaw_deg), math.radians(cfg.pitch_deg)
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.cross(forward, right)
    T_lidar_cam = np.eye(4)
    T_lidar_cam[:3, :3] = np.stack([right, down, forward], 1)
    T_lidar_cam[:3, 3] = cfg.position
    T_cam_lidar = np.eye(4)
    T_cam_lidar[:3, :3] = T_lidar_cam[:3, :3].T
    T_cam_lidar[:3, 3] = -T_lidar_cam[:3, :3].T @ T_lidar_cam[:3, 3]
    return PinholeCamera(cfg.name, K, cfg.width, cfg.height, T_cam_lidar).validate()


def _value_noise(p: np.ndarray, scale: float) -> np.ndarray:
    """Deterministic per-cell noise in [0, 1) anchored to world coordinates (stable across frames)."""
    cell = np.floor(p * scale).astype(np.int64)
    h = (cell[:, 0] * 73856093) ^ (cell[:, 1] * 19349663) ^ (cell[:, 2] * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


@dataclass(frozen=True)
class Rendering:
    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray  # [H, W] int64, -1 = sky, -2 = clutter (world.CLUTTER)
    instances: np.ndarray  # [H, W] int64
    depth: np.ndarray  # [H, W] float32 along the optical axis, inf = sky


def render(scene: Scene, camera: PinholeCamera, T_world_lidar: np.ndarray, time: float,
           rng: np.random.Generator, max_depth: float = 200.0) -> Rendering:
    h, w = camera.height, camera.width
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_cam = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], -1)
    rays_cam = rays_cam.reshape(-1, 3)
    z_per_t = 1.0 / np.linalg.norm(rays_cam, axis=1)  # optical-axis depth per unit ray length
    T_world_cam = T_world_lidar @ camera.T_lidar_cam
    dirs = (rays_cam * z_per_t[:, None]) @ T_world_cam[:3, :3].T
    hits = cast_rays(scene, T_world_cam[:3, 3], dirs, time, max_depth)

    ground = hits.primitive == GROUND
    prim = np.maximum(hits.primitive, 0)
    g_sem, g_albedo, _ = scene.layout.material(hits.point[:, 0], hits.point[:, 1])
    labels = np.where(ground, g_sem, scene.semantic[prim])
    instances = np.where(ground, 0, scene.instance[prim])
    albedo = np.where(ground[:, None], g_albedo, scene.albedo[prim])

    # building windows: a grid on vertical walls above the ground floor
    n = hits.normal
    building = (scene.kind[prim] == BOX) & (scene.semantic[prim] == CLASS_ID["building"])
    wall = ~ground & building & (np.abs(n[:, 2]) < 0.5)
    along = hits.point[:, 0] * -n[:, 1] + hits.point[:, 1] * n[:, 0]
    z = hits.point[:, 2]
    window = wall & (np.mod(along / 3.2, 1.0) > 0.25) & (np.mod(along / 3.2, 1.0) < 0.75) \
        & (np.mod(z / 3.0, 1.0) > 0.35) & (np.mod(z / 3.0, 1.0) < 0.8) & (z > 2.5)
    albedo = np.where(window[:, None], _WINDOW_RGB, albedo)

    texture = 0.85 + 0.2 * _value_noise(hits.point, 4.0) + 0.1 * _value_noise(hits.point, 0.7)
    shade = 0.45 + 0.55 * np.clip(n @ _SUN, 0.0, 1.0)
    colour = albedo * (shade * texture)[:, None]
    sky = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * np.clip(dirs[:, 2:3] * 3.0, 0.0, 1.0)
    haze = np.where(hits.hit, 1.0 - np.exp(-np.where(hits.hit, hits.t, 0.0) / 350.0), 1.0)[:, None]
    colour = colour * (1 - haze) + sky * haze
    colour = colour + rng.normal(0.0, 0.01, size=colour.shape)
    image = np.clip(colour * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(h, w, 3)

    labels = np.where(hits.hit, labels, -1).astype(np.int64).reshape(h, w)
    instances = np.where(hits.hit, instances, 0).astype(np.int64).reshape(h, w)
    depth = np.where(hits.hit, hits.t * z_per_t, np.inf).astype(np.float32).reshape(h, w)
    return Rendering(image=image, labels=labels, instances=instances, depth=depth)
