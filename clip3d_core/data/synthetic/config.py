"""Typed configuration of the synthetic world: scene layout, LiDAR, cameras, drive."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SceneConfig:
    """A straight street along world +x with cross streets; sizes in metres, densities per 100 m."""

    length: float = 320.0  # street along x in [0, length]
    drive_start_x: float = 80.0  # ego position at frame 0 (a LiDAR range of street behind it)
    road_half_width: float = 7.0  # four lanes of 3.5 m: two each way (x+ on the y < 0 side)
    sidewalk_width: float = 3.0
    curb_height: float = 0.15
    cross_street_spacing: float = 90.0  # mean distance between cross streets (0 = none)
    cross_street_half_width: float = 5.5
    building_gap: float = 0.25  # probability of an empty lot between buildings
    trees_per_100m: float = 7.0  # per side
    poles_per_100m: float = 3.0  # street lamps per side
    signs_per_100m: float = 2.0  # per side
    fences_per_100m: float = 1.5  # per side
    moving_vehicles_per_100m: float = 4.0  # per driving lane
    parked_vehicles_per_100m: float = 9.0
    pedestrians_per_100m: float = 5.0  # per side
    riders_per_100m: float = 3.0  # bicyclists + motorcyclists, right lane
    cones_per_100m: float = 4.0
    barriers_per_100m: float = 1.5
    # Objects and surfaces of no class (ignore-labelled points), per side; 0 in the easy world.
    clutter_per_100m: float = 0.0
    clutter_surfaces_per_100m: float = 0.0


@dataclass
class LidarConfig:
    """A rotating multi-beam LiDAR; `pattern` names a real vertical angle table (see lidar.py)."""

    pattern: str = "hdl32"  # hdl32 (nuScenes-like), hdl64 (KITTI-like), vlp16, uniform
    beams: int = 32  # only used by pattern "uniform" (and checked against the others)
    fov_up_deg: float = 10.0  # "uniform" only
    fov_down_deg: float = -30.0  # "uniform" only
    azimuths: int = 1024  # columns per revolution
    height: float = 1.8  # mount height above the road
    min_range: float = 1.0
    max_range: float = 80.0
    range_noise: float = 0.02  # gaussian sigma, metres
    dropout: float = 0.02  # random missing returns
    intensity_noise: float = 0.02
    azimuth_jitter: float = 0.1  # fraction of a column


@dataclass
class CameraConfig:
    """A pinhole camera rigidly mounted on the LiDAR (position in the LiDAR frame: x fwd, y left, z up)."""

    name: str = "CAM_FRONT"
    width: int = 320
    height: int = 192
    hfov_deg: float = 90.0
    yaw_deg: float = 0.0  # rotation about LiDAR z, positive = looking left
    pitch_deg: float = 0.0  # positive = looking down
    position: tuple[float, float, float] = (0.3, 0.0, -0.2)
    max_depth: float = 200.0


def _mount(yaw_deg: float) -> tuple[float, float, float]:
    """Camera 0.3 m out from the LiDAR axis in its viewing direction, 0.2 m below it."""
    a = math.radians(yaw_deg)
    return (0.3 * math.cos(a), 0.3 * math.sin(a), -0.2)


@dataclass
class SyntheticConfig:
    """The whole synthetic world. Same config and seed -> bit-identical frames."""

    seed: int = 0
    scene: SceneConfig = field(default_factory=SceneConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    cameras: tuple[CameraConfig, ...] = field(default_factory=lambda: (CameraConfig(),))
    ego_speed: float = 8.0  # m/s along +x in the drive
    rate_hz: float = 10.0
    drive_frames: int = 200  # frames in a drive (20 s at 10 Hz)
    start_stamp_ns: int = 1_700_000_000_000_000_000
    random_pose: bool = True  # dataset "random" mode: jitter lane offset, yaw, mount height

    @staticmethod
    def surround(seed: int = 0, width: int = 320, height: int = 192) -> SyntheticConfig:
        """Four cameras (front, left, back, right), 90 degrees each: a full ring around the car."""
        mounts = (("CAM_FRONT", 0.0), ("CAM_LEFT", 90.0), ("CAM_BACK", 180.0), ("CAM_RIGHT", -90.0))
        cams = tuple(CameraConfig(name=n, width=width, height=height, yaw_deg=yaw, position=_mount(yaw))
                     for n, yaw in mounts)
        return SyntheticConfig(seed=seed, cameras=cams)
