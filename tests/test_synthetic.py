"""Synthetic world: determinism, exact labels, ray-casting correctness, camera/LiDAR consistency."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

import clip3d_core  # noqa: F401  (applies _compat first)
from clip3d_core.config import from_dict, to_dict
from clip3d_core.data.frame import Frame
from clip3d_core.data.synthetic import (
    CLASS_NAMES,
    CameraConfig,
    LidarConfig,
    SyntheticConfig,
    SyntheticWorld,
    SyntheticWorldDataset,
)
from clip3d_core.data.synthetic.lidar import LidarConfigError, beam_elevations_deg
from clip3d_core.data.synthetic.raycast import GROUND, MISS, cast_rays
from clip3d_core.data.synthetic.world import BOX, CLASS_ID, ELLIPSOID, FRUSTUM, Scene, StreetLayout
from clip3d_core.geometry import PinholeCamera
from clip3d_core.geometry.projection import project_points


def small_cfg(seed: int = 0, **kw) -> SyntheticConfig:
    """A cheaper sensor setup for most tests (the default size is timed separately)."""
    return SyntheticConfig(seed=seed, lidar=LidarConfig(azimuths=512),
                           cameras=(CameraConfig(width=192, height=112),), drive_frames=40, **kw)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(small_cfg(seed=3))


@pytest.fixture(scope="module")
def frame(world: SyntheticWorld) -> Frame:
    return world.frame(5)


def to_world(frame: Frame) -> np.ndarray:
    xyz = frame.points[:, :3].astype(np.float64)
    return xyz @ frame.pose[:3, :3].T + frame.pose[:3, 3]


def test_frame_contract(frame: Frame) -> None:
    frame.validate()
    assert frame.class_names == CLASS_NAMES and 15 <= len(CLASS_NAMES) <= 19
    assert frame.points.dtype == np.float32 and frame.points.shape[1] == 4
    assert frame.points[:, 3].min() >= 0 and frame.points[:, 3].max() <= 1.0
    assert len(frame.images) == len(frame.cameras) == len(frame.pixel_labels) == 1
    cam = frame.cameras[0]
    assert isinstance(cam, PinholeCamera) and frame.images[0].shape == (cam.height, cam.width, 3)
    # a street scene: ground classes dominate, several object classes present
    counts = np.bincount(frame.labels, minlength=len(CLASS_NAMES))
    assert counts[CLASS_ID["road"]] > 0.2 * frame.num_points
    assert (counts > 0).sum() >= 8
    # the upper image rows show sky (-1), the lower rows ground
    assert (frame.pixel_labels[0][0] == -1).mean() > 0.3
    assert (frame.pixel_labels[0][-1] == CLASS_ID["road"]).mean() > 0.5


def test_determinism_by_seed() -> None:
    a, b = SyntheticWorld(small_cfg(seed=7)).frame(2), SyntheticWorld(small_cfg(seed=7)).frame(2)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.instances, b.instances)
    np.testing.assert_array_equal(a.images[0], b.images[0])
    np.testing.assert_array_equal(a.pixel_labels[0], b.pixel_labels[0])
    assert a.stamp_ns == b.stamp_ns and a.frame_id == b.frame_id
    c = SyntheticWorld(small_cfg(seed=8)).frame(2)
    assert a.points.shape != c.points.shape or not np.array_equal(a.points, c.points)
    assert not np.array_equal(a.images[0], c.images[0])


def test_ground_labels_are_exact(world: SyntheticWorld, frame: Frame) -> None:
    xyz = to_world(frame)
    sigma = world.cfg.lidar.range_noise
    road = frame.labels == CLASS_ID["road"]
    assert np.abs(xyz[road, 2]).max() < 5 * sigma  # the road plane is z = 0
    # road / grass points lie where the layout says (a 0.1 m margin for range noise near edges)
    layout: StreetLayout = world.scene.layout
    for cls in ("road", "grass"):
        pts = xyz[(frame.labels == CLASS_ID[cls]) & (np.abs(xyz[:, 2]) < 0.05)]
        shifted = [layout.semantic(pts[:, 0] + dx, pts[:, 1] + dy) for dx, dy in
                   ((0, 0), (0.1, 0), (-0.1, 0), (0, 0.1), (0, -0.1))]
        assert np.any(np.stack(shifted) == CLASS_ID[cls], axis=0).all()
    # sidewalk points lie on the kerb top or its side faces, never below the road
    side = xyz[frame.labels == CLASS_ID["sidewalk"]]
    assert side[:, 2].max() < world.cfg.scene.curb_height + 5 * sigma and side[:, 2].min() > -5 * sigma


def test_object_points_inside_their_primitives(world: SyntheticWorld, frame: Frame) -> None:
    """Every non-ground point lies on a primitive of its own class and instance (up to range noise)."""
    scene = world.scene
    t = world.time(5)
    xyz = to_world(frame)
    objects = np.flatnonzero(frame.labels != CLASS_ID["road"])
    objects = objects[np.abs(xyz[objects, 2]) > 0.05]  # ground plane hits have no primitive
    rng = np.random.default_rng(0)
    sample = rng.choice(objects, size=min(3000, len(objects)), replace=False)
    inside = scene.contains(xyz[sample], t, tol=0.1)
    same = inside & (scene.semantic[None, :] == frame.labels[sample, None]) \
        & (scene.instance[None, :] == frame.instances[sample, None])
    assert same.any(axis=1).mean() > 0.999
    cars = sample[frame.labels[sample] == CLASS_ID["car"]]
    assert len(cars) > 20, "seed 3 puts cars in view"
    in_car = scene.contains(xyz[cars], t, tol=0.1)[:, scene.semantic == CLASS_ID["car"]]
    assert in_car.any(axis=1).all()
    # thing classes carry instance ids, stuff does not
    things = np.isin(frame.labels, [CLASS_ID[c] for c in ("car", "truck", "bus", "pedestrian")])
    assert (frame.instances[things] > 0).all()
    assert (frame.instances[frame.labels == CLASS_ID["road"]] == 0).all()


def test_camera_labels_agree_with_lidar_labels(frame: Frame) -> None:
    proj = project_points(torch.from_numpy(frame.points[:, :3]), frame.cameras)
    vis = proj.visible[0].numpy()
    uv = proj.uv[0].numpy()[vis]
    col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
    pixel = frame.pixel_labels[0][row, col]
    assert vis.sum() > 1000
    agree = (pixel == frame.labels[vis]).mean()
    assert agree > 0.9, agree
    # instances agree as well for thing points
    inst = frame.instances[vis]
    assert (frame.pixel_instances[0][row, col][inst > 0] == inst[inst > 0]).mean() > 0.85


def test_tiled_culling_matches_brute_force(world: SyntheticWorld) -> None:
    """The tile/sphere culling must not lose hits: compare with testing every primitive per ray."""
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(1500, 3))
    dirs[:, 2] = -np.abs(dirs[:, 2]) * 0.3  # mostly near the horizon, where the objects are
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = world.ego_pose(0)[:3, 3]
    fast = cast_rays(world.scene, origin, dirs, 0.0, 80.0)
    # brute force: one "scene" per primitive, nearest over all
    best_t, best_p = np.full(len(dirs), np.inf), np.full(len(dirs), MISS)
    for p in range(len(world.scene)):
        sub = Scene(*(getattr(world.scene, f.name)[p : p + 1] for f in dataclasses.fields(Scene)[:-1]),
                    layout=world.scene.layout)
        hits = cast_rays(sub, origin + np.array([0, 0, 0.0]), dirs, 0.0, 80.0)
        better = (hits.primitive == 0) & (hits.t < best_t)
        best_t[better], best_p[better] = hits.t[better], p
    ground_t = np.where(dirs[:, 2] < 0, -origin[2] / np.minimum(dirs[:, 2], -1e-12), np.inf)
    ground = (ground_t < best_t) & (ground_t <= 80.0)
    best_p[ground], best_t[ground] = GROUND, ground_t[ground]
    np.testing.assert_array_equal(fast.primitive, best_p)
    finite = np.isfinite(best_t)
    np.testing.assert_allclose(fast.t[finite], best_t[finite], rtol=1e-9)
    assert (best_p >= 0).sum() > 100


@pytest.mark.parametrize("kind", [BOX, FRUSTUM, ELLIPSOID])
def test_primitive_intersections(kind: int) -> None:
    """Rays from (-10, 0, z) along +x hit each primitive at its analytic surface."""
    size = {BOX: (1.0, 2.0, 1.5), FRUSTUM: (1.0, 0.5, 1.5), ELLIPSOID: (1.0, 2.0, 1.5)}[kind]
    scene = Scene(kind=np.array([kind], np.int8), center=np.array([[0.0, 0.0, 5.0]]), size=np.array([size]),
                  yaw=np.array([0.0]), velocity=np.zeros((1, 3)), semantic=np.array([9]),
                  instance=np.array([1]), albedo=np.ones((1, 3)), reflectivity=np.ones(1),
                  layout=StreetLayout(7.0, np.zeros(0), 5.0))
    z = np.array([5.0, 5.75, 6.4, 7.0])  # local heights 0, 0.75, 1.4, 2.0 (the last misses)
    hits = [cast_rays(scene, np.array([-10.0, 0.0, zi]), np.array([[1.0, 0.0, 0.0]]), 0.0, 100.0) for zi in z]
    local = z - 5.0
    if kind == BOX:
        expect = np.where(np.abs(local) <= 1.5, -1.0, np.nan)
    elif kind == FRUSTUM:  # radius 1.0 at the bottom (-1.5) to 0.5 at the top (+1.5)
        expect = np.where(np.abs(local) <= 1.5, -(1.0 + (0.5 - 1.0) * (local + 1.5) / 3.0), np.nan)
    else:
        expect = np.where(np.abs(local) <= 1.5, -np.sqrt(np.clip(1 - (local / 1.5) ** 2, 0, 1)), np.nan)
    for h, e in zip(hits, expect):
        if np.isnan(e):
            assert h.primitive[0] == MISS
        else:
            assert h.primitive[0] == 0
            np.testing.assert_allclose(h.point[0, 0], e, atol=1e-9)
            assert h.normal[0, 0] < 0  # facing the ray


def test_drive_is_consistent(world: SyntheticWorld) -> None:
    f0, f1 = world.frame(0), world.frame(1)
    step = world.cfg.ego_speed / world.cfg.rate_hz
    np.testing.assert_allclose(f1.pose[:3, 3] - f0.pose[:3, 3], [step, 0, 0])
    assert f1.stamp_ns - f0.stamp_ns == round(1e9 / world.cfg.rate_hz)
    # static geometry is fixed in the world: buildings seen from both frames overlap in world space
    b0 = to_world(f0)[f0.labels == CLASS_ID["building"]]
    b1 = to_world(f1)[f1.labels == CLASS_ID["building"]]
    inside0 = world.scene.contains(b0[:500], world.time(0), tol=0.1).any(1)
    inside1 = world.scene.contains(b1[:500], world.time(1), tol=0.1).any(1)
    assert inside0.all() and inside1.all()
    with pytest.raises(IndexError):
        world.frame(len(world))


def test_dataset_modes() -> None:
    cfg = small_cfg(seed=11)
    ds = SyntheticWorldDataset(cfg, length=3)
    a, b = ds[0], ds[1]
    assert a.frame_id != b.frame_id and not np.array_equal(a.images[0], b.images[0])
    np.testing.assert_array_equal(ds[1].points, b.points)  # item i is reproducible
    drive = SyntheticWorldDataset(cfg, length=4, mode="drive")
    np.testing.assert_array_equal(drive[2].points, SyntheticWorld(cfg).frame(2).points)
    with pytest.raises(ValueError, match="drive_frames"):
        SyntheticWorldDataset(cfg, length=cfg.drive_frames + 1, mode="drive")
    with pytest.raises(IndexError):
        ds[3]


def test_config_round_trip_and_validation() -> None:
    cfg = SyntheticConfig.surround(seed=2)
    assert from_dict(SyntheticConfig, to_dict(cfg)) == cfg
    assert [c.name for c in cfg.cameras] == ["CAM_FRONT", "CAM_LEFT", "CAM_BACK", "CAM_RIGHT"]
    world = SyntheticWorld(dataclasses.replace(cfg, drive_frames=10))
    # a point 10 m ahead (LiDAR frame) is in front of CAM_FRONT only; 10 m left in CAM_LEFT only
    proj = project_points(torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]), world.cameras, occlusion=False)
    assert proj.in_image[:, 0].tolist() == [True, False, False, False]
    assert proj.in_image[:, 1].tolist() == [False, True, False, False]
    assert len(beam_elevations_deg(LidarConfig(pattern="hdl64", beams=64))) == 64
    with pytest.raises(LidarConfigError):
        beam_elevations_deg(LidarConfig(pattern="nope"))
    with pytest.raises(LidarConfigError):
        beam_elevations_deg(LidarConfig(pattern="hdl64", beams=32))
    with pytest.raises(ValueError, match="leaves the street"):
        SyntheticWorld(SyntheticConfig(ego_speed=30.0))


def test_intensity_follows_material(frame: Frame) -> None:
    inten = frame.points[:, 3]
    assert inten[frame.labels == CLASS_ID["road"]].mean() < inten[frame.labels == CLASS_ID["grass"]].mean()


def test_default_frame_timing() -> None:
    """Default size (32 x 1024 LiDAR, one 320x192 camera): printed, loosely bounded."""
    world = SyntheticWorld(SyntheticConfig(seed=0))
    wall, cpu, n = [], [], []
    for i in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        f = world.frame(i * 20)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        n.append(f.num_points)
    print(f"\nsynthetic frame (default): median wall {np.median(wall) * 1e3:.0f} ms, "
          f"cpu {np.median(cpu) * 1e3:.0f} ms, {int(np.median(n))} points")
    assert 20_000 < np.median(n) < 32 * 1024
    assert np.median(wall) < 10.0
