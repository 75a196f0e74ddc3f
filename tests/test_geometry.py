"""Geometry: camera model, projection (+ occlusion, distortion), calibration parsers, voxelisation.

Projection is checked against the datasets' own projection formulas and annotations (KITTI
P2 @ R0_rect @ Tr_velo_to_cam and label_2 2D boxes; nuScenes boxes and mmdetection3d's 2D boxes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip3d_core.geometry import (
    INVALID_UV,
    NUSCENES_CAMERAS,
    CalibrationError,
    PinholeCamera,
    camera_from_camera_info,
    camera_from_kitti_info,
    cameras_from_nuscenes_info,
    grid_shape,
    image_paths_from_info,
    info_sample,
    load_info_pickle,
    load_kitti_calib,
    parse_kitti_calib,
    project_points,
    voxel_mean,
    voxelize,
)
from clip3d_core.io import read_cloud, read_image

K_SIMPLE = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])


def _lidar_to_optical() -> np.ndarray:
    """LiDAR (x fwd, y left, z up) -> camera optical (x right, y down, z fwd), camera at the origin."""
    T = np.eye(4)
    T[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]
    return T


def _front_camera(**kw) -> PinholeCamera:
    return PinholeCamera("front", K_SIMPLE, 640, 480, _lidar_to_optical(), **kw).validate()


# ---------------------------------------------------------------------- camera
def test_camera_validate_rejects_bad_calibration():
    T = _lidar_to_optical()
    bad = {
        "non-finite": dict(K=np.where(np.eye(3) > 0, np.nan, 0.0)),
        "focal": dict(K=np.diag([-500.0, 500.0, 1.0])),
        "non-rigid": dict(T_cam_lidar=np.diag([2.0, 1.0, 1.0, 1.0])),
        "reflection": dict(T_cam_lidar=np.diag([-1.0, 1.0, 1.0, 1.0])),
        "size": dict(width=0),
    }
    for what, change in bad.items():
        args = dict(name="c", K=K_SIMPLE, width=640, height=480, T_cam_lidar=T) | change
        with pytest.raises(CalibrationError):
            PinholeCamera(**args).validate()
        assert what  # each case raised
    with pytest.raises(CalibrationError, match="3x3"):
        PinholeCamera("c", np.eye(2), 640, 480, T)
    with pytest.raises(CalibrationError, match="plumb_bob"):
        PinholeCamera("c", K_SIMPLE, 640, 480, T, D=[0.1, 0, 0, 0, 0, 0.2, 0, 0])


def test_camera_dict_round_trip_is_frozen_and_scaled_matches_resize():
    cam = _front_camera(D=[0.01, -0.002, 0.0, 0.0])
    assert cam.D.shape == (5,)  # padded to plumb_bob length
    back = PinholeCamera.from_dict(json.loads(json.dumps(cam.to_dict())))
    assert back == cam
    with pytest.raises(ValueError):
        cam.K[0, 0] = 1.0  # arrays are read-only: frozen means frozen

    xyz = torch.tensor([[10.0, 1.5, -0.7], [20.0, -4.0, 2.0]], dtype=torch.float64)
    full = project_points(xyz, [cam], occlusion=False)
    half = project_points(xyz, [cam.scaled(0.5)], occlusion=False)
    assert cam.scaled(0.5).width == 320 and cam.scaled(0.5).height == 240
    torch.testing.assert_close(half.uv, full.uv * 0.5)
    torch.testing.assert_close(half.depth, full.depth)


# ---------------------------------------------------------------------- projection
def test_projection_matches_pinhole_formula_for_rotated_cameras():
    rng = np.random.default_rng(0)
    cams = []
    for i, yaw in enumerate((0.0, 0.7, -2.0)):
        Rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        T = _lidar_to_optical()
        T[:3, :3] = T[:3, :3] @ Rz
        T[:3, 3] = (0.1 * i, -0.3, 0.5)
        K = np.array([[700.0 + 10 * i, 0.5, 600], [0, 690.0, 180], [0, 0, 1]])
        cams.append(PinholeCamera(f"c{i}", K, 1200, 370, T).validate())
    xyz = rng.uniform(-30, 30, size=(2000, 3))
    proj = project_points(torch.from_numpy(xyz), cams, occlusion=False)
    assert proj.uv.shape == (3, 2000, 2) and proj.depth.shape == (3, 2000)
    for m, cam in enumerate(cams):
        pc = xyz @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3]
        q = pc @ cam.K.T
        front = pc[:, 2] > 0.1
        uv = q[:, :2] / q[:, 2:]
        inside = front & (uv[:, 0] >= 0) & (uv[:, 0] < 1200) & (uv[:, 1] >= 0) & (uv[:, 1] < 370)
        np.testing.assert_allclose(proj.uv[m].numpy()[front], uv[front], atol=1e-6)
        np.testing.assert_allclose(proj.depth[m].numpy(), pc[:, 2], atol=1e-9)
        assert np.array_equal(proj.in_image[m].numpy(), inside)
        assert inside.sum() > 20  # the check above is not vacuous


def test_points_behind_camera_or_non_finite_are_never_in_image():
    cam = _front_camera()
    # Mirror images of in-view points: naive division would land them inside the image.
    ahead = torch.tensor([[10.0, 1.0, 0.5], [5.0, -0.5, -0.2]])
    behind = -ahead
    weird = torch.tensor([[float("nan"), 0, 0], [float("inf"), 0, 0], [0.05, 0, 0]])
    proj = project_points(torch.cat([ahead, behind, weird]), [cam])
    assert proj.in_image[0].tolist() == [True, True, False, False, False, False, False]
    assert proj.visible[0, :2].all() and not proj.visible[0, 2:].any()
    assert (proj.uv[0, 2:] == INVALID_UV).all()
    cam_idx, uv = proj.first_visible()
    assert cam_idx.tolist() == [0, 0, -1, -1, -1, -1, -1]
    assert (uv[2:] == INVALID_UV).all() and torch.isfinite(uv).all()


def test_occlusion_hides_points_behind_a_nearer_surface():
    cam = _front_camera()
    ray = torch.tensor([1.0, 0.12, -0.05])  # a ray inside the image
    wall, behind, same_surface = 5.0 * ray, 6.0 * ray, 5.2 * ray  # 5.2: within 0.5 m surface tolerance
    # Sparse-LiDAR parallax case: background at 20 m, 20 px below a foreground return at 8 m (in the
    # gap between two rings of the foreground object) -> hidden by the neighbourhood ratio test.
    fg = torch.tensor([8.0, -1.0, 0.0])
    bg = torch.tensor([20.0, -2.5, -20 * 20 / 500])
    # Sloped ground: neighbouring rings at 10 m and 13 m must both stay visible.
    g1, g2 = torch.tensor([10.0, 2.0, -1.7]), torch.tensor([13.0, 2.6, -1.7])
    xyz = torch.stack([wall, behind, same_surface, fg, bg, g1, g2])
    proj = project_points(xyz, [cam])
    assert torch.equal(proj.in_image[0], torch.ones(7, dtype=torch.bool))
    uv = proj.uv[0]
    assert torch.equal(uv[0].floor(), uv[1].floor())  # same pixel
    torch.testing.assert_close(uv[4] - uv[3], torch.tensor([0.0, 20.0]))
    assert proj.visible[0].tolist() == [True, False, True, True, False, True, True]
    # Without the neighbourhood test only the same-pixel point is hidden; without occlusion none.
    assert project_points(xyz, [cam], occlusion_ratio=None).visible[0].tolist() == [True, False] + [True] * 5
    assert project_points(xyz, [cam], occlusion=False).visible.all()


def test_occlusion_is_per_camera():
    """A point hidden in one camera stays visible in another that sees it unobstructed."""
    cam_a = _front_camera()
    T_b = _lidar_to_optical()
    T_b[:3, 3] = (3.0, 0.0, 0.0)  # shifted 3 m sideways (optical x): different line of sight
    cam_b = PinholeCamera("side", K_SIMPLE, 640, 480, T_b).validate()
    xyz = torch.tensor([[5.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    proj = project_points(xyz, [cam_a, cam_b])
    assert proj.visible[0].tolist() == [True, False]
    assert proj.visible[1].tolist() == [True, True]
    cam_idx, uv = proj.first_visible()
    assert cam_idx.tolist() == [0, 1]
    torch.testing.assert_close(uv[1], proj.uv[1, 1])


def _undistort(uv: np.ndarray, K: np.ndarray, D: np.ndarray, iters: int = 50) -> np.ndarray:
    """OpenCV-style fixed-point undistortion, written independently of the library's forward model."""
    k1, k2, p1, p2, k3 = D
    xd = (uv[:, 0] - K[0, 2]) / K[0, 0]
    yd = (uv[:, 1] - K[1, 2]) / K[1, 1]
    x, y = xd.copy(), yd.copy()
    for _ in range(iters):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x, y = (xd - dx) / radial, (yd - dy) / radial
    return np.stack([x, y], axis=1)


def test_distortion_zero_equals_none_and_round_trips():
    rng = np.random.default_rng(1)
    xyz = torch.from_numpy(np.c_[rng.uniform(4, 30, 500), rng.uniform(-8, 8, 500), rng.uniform(-3, 3, 500)])
    plain = project_points(xyz, [_front_camera()], occlusion=False)
    zero = project_points(xyz, [_front_camera(D=np.zeros(5))], occlusion=False)
    assert torch.equal(plain.uv, zero.uv) and torch.equal(plain.in_image, zero.in_image)

    D = np.array([-0.28, 0.07, 0.0008, -0.0005, 0.0])
    dist = project_points(xyz, [_front_camera(D=D)], occlusion=False)
    ok = dist.in_image[0].numpy()
    assert ok.sum() > 100
    assert (dist.uv - plain.uv)[0][torch.from_numpy(ok)].abs().max() > 5  # distortion really applied
    pc = xyz.numpy() @ _lidar_to_optical()[:3, :3].T
    normalised = pc[:, :2] / pc[:, 2:]
    recovered = _undistort(dist.uv[0].numpy()[ok], K_SIMPLE, D)
    np.testing.assert_allclose(recovered, normalised[ok], atol=1e-6)


def test_distortion_fold_over_never_brings_far_off_axis_points_into_the_image():
    # Strong barrel distortion: r_d = r (1 - 0.4 r²) peaks at r² = 0.83 and folds back, so a point at
    # 80° off axis would land near the image centre if the polynomial were applied blindly.
    cam = _front_camera(D=[-0.4, 0.0, 0.0, 0.0, 0.0])
    off_axis = torch.tensor([[1.0, -math.tan(math.radians(80)), 0.0]])
    proj = project_points(off_axis, [cam], occlusion=False)
    assert not proj.in_image.any()


# ---------------------------------------------------------------------- calibration parsers
def test_camera_from_camera_info_raw_and_rectified():
    T = _lidar_to_optical()
    raw = camera_from_camera_info(K_SIMPLE.ravel(), [0.1, -0.05, 0, 0, 0], None, 640, 480, T, "cam")
    assert raw.has_distortion and raw.D.tolist() == [0.1, -0.05, 0, 0, 0]
    # Right camera of a rectified stereo pair: P = [K' | -fx' * B]; rectification rotation r.
    P = np.array([[480.0, 0, 330, -480.0 * 0.12], [0, 480.0, 235, 0], [0, 0, 1, 0]])
    a = 0.02
    r = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rect = camera_from_camera_info(
        K_SIMPLE, [0.1, 0, 0, 0, 0], P.ravel(), 640, 480, T, "cam", r=r, rectified=True
    )
    assert rect.D is None
    xyz = np.array([[10.0, 1.0, 0.3], [6.0, -1.2, -0.4]])
    Rf = np.eye(4)
    Rf[:3, :3] = r
    q = (P @ Rf @ T @ np.c_[xyz, np.ones(2)].T).T
    proj = project_points(torch.from_numpy(xyz), [rect], occlusion=False)
    np.testing.assert_allclose(proj.uv[0].numpy(), q[:, :2] / q[:, 2:], atol=1e-9)
    with pytest.raises(CalibrationError):
        camera_from_camera_info([1, 2, 3], None, None, 640, 480, T, "bad")


def test_kitti_calib_parser_rejects_malformed(tmp_path: Path):
    p = tmp_path / "calib.txt"
    p.write_text("P2: 1 2 3\nTr_velo_to_cam: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(CalibrationError, match="12 values"):
        load_kitti_calib(p, (375, 1242))
    p.write_text("P2 1 2 3\n")
    with pytest.raises(CalibrationError, match="KEY: values"):
        parse_kitti_calib(p)
    with pytest.raises(CalibrationError, match="cannot read"):
        load_kitti_calib(tmp_path / "missing.txt", (375, 1242))


# ---------------------------------------------------------------------- real data: nuScenes
def _nuscenes(shared_data: Path):
    root = shared_data / "nuscenes_keyframe"
    pkl = next(root.glob("*.pkl"), None)
    if pkl is None:
        pytest.skip("nuscenes_keyframe sample absent")
    info = load_info_pickle(pkl)
    cams = cameras_from_nuscenes_info(info)
    points = read_cloud(next(root.glob("*LIDAR_TOP*.pcd.bin")))
    return root, info, cams, points


def _nus_box_corners(box) -> np.ndarray:
    x, y, z, dx, dy, dz, yaw = box
    local = np.array(
        [[sx * dx / 2, sy * dy / 2, sz * dz / 2] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    )
    c, s = math.cos(yaw), math.sin(yaw)
    return local @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + (x, y, z)


def _nus_in_box(xyz: np.ndarray, box) -> np.ndarray:
    """bbox_3d z is the box's gravity centre in this info version (checked by the test below)."""
    x, y, z, dx, dy, dz, yaw = box
    d = xyz - (x, y, z)
    c, s = math.cos(yaw), math.sin(yaw)
    lx, ly = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
    return (np.abs(lx) <= dx / 2) & (np.abs(ly) <= dy / 2) & (np.abs(d[:, 2]) <= dz / 2)


def test_nuscenes_cameras_images_and_visibility(shared_data: Path):
    root, info, cams, points = _nuscenes(shared_data)
    assert [c.name for c in cams] == list(NUSCENES_CAMERAS)
    paths = image_paths_from_info(info, root)
    for cam, path in zip(cams, paths):
        assert cam.name in path.name and path.exists()
        assert read_image(path).shape == (cam.height, cam.width, 3) == (900, 1600, 3)
    proj = project_points(torch.from_numpy(points[:, :3].copy()), cams)
    visible = proj.visible.sum(dim=1)
    assert (visible > 1000).all(), visible  # every camera receives points
    in_image = proj.in_image.sum(dim=1)
    # Occlusion removes leaks, not the scene: a few percent per camera at most.
    assert (visible.double() / in_image.double() > 0.9).all()
    cam_idx, _ = proj.first_visible()
    covered = (cam_idx >= 0).double().mean().item()
    assert 0.4 < covered < 0.9  # six cameras cover most but not all of a 360° sweep (no sky/roof)


def test_nuscenes_box_points_project_inside_box_images(shared_data: Path):
    _, info, cams, points = _nuscenes(shared_data)
    sample = info["data_list"][0]
    xyz = points[:, :3].astype(np.float64)
    proj = project_points(torch.from_numpy(xyz), cams, occlusion=False)
    inside_total = sum(int(_nus_in_box(xyz, inst["bbox_3d"]).sum()) for inst in sample["instances"])
    annotated = sum(int(inst["num_lidar_pts"]) for inst in sample["instances"])
    assert inside_total > 0.9 * annotated  # box convention (gravity-centre z) is the right one

    checked_points = checked_boxes = 0
    for inst in sample["instances"]:
        inside = _nus_in_box(xyz, inst["bbox_3d"])
        corners = project_points(torch.from_numpy(_nus_box_corners(inst["bbox_3d"])), cams, occlusion=False)
        for m, cam in enumerate(cams):
            if not (corners.depth[m] > 0.1).all():
                continue
            sel = proj.in_image[m].numpy() & inside
            if not sel.any():
                continue
            uv = proj.uv[m].numpy()[sel]
            c_uv = corners.uv[m].numpy()
            lo, hi = c_uv.min(axis=0) - 2.0, c_uv.max(axis=0) + 2.0
            assert ((uv >= lo) & (uv <= hi)).all(), (cam.name, inst["bbox_3d"])
            checked_points += len(uv)
            # Independent reference: mmdetection3d's 2D boxes (nuScenes devkit projection), for boxes
            # wholly inside the image where no clipping is involved.
            if (c_uv.min() >= 0) and (c_uv[:, 0].max() < cam.width) and (c_uv[:, 1].max() < cam.height):
                centre = cam.T_cam_lidar[:3, :3] @ inst["bbox_3d"][:3] + cam.T_cam_lidar[:3, 3]
                ref = [
                    c["bbox"]
                    for c in sample["cam_instances"][cam.name]
                    if np.linalg.norm(np.asarray(c["bbox_3d"][:3]) - centre) < 0.01
                ]
                if ref:  # mmdetection3d left a few boxes out of cam_instances
                    err = np.abs(np.r_[c_uv.min(0), c_uv.max(0)] - np.asarray(ref[0])).max()
                    # The devkit's 2D boxes keep the annotation's pitch/roll, bbox_3d only yaw: long
                    # boxes on a slope differ at the ends (a 10 m truck by ~5 %).
                    assert err < 4.0 + 0.06 * np.ptp(c_uv, axis=0).max(), (cam.name, err)
                    checked_boxes += 1
    assert checked_points > 500 and checked_boxes > 30


# ---------------------------------------------------------------------- real data: KITTI
def _kitti_label_boxes(path: Path):
    for line in path.read_text().splitlines():
        f = line.split()
        if f and f[0] != "DontCare":
            yield f[0], np.array(f[4:8], float), [float(v) for v in f[8:15]]


def test_kitti_projection_matches_calib_and_label_boxes(shared_data: Path):
    root = shared_data / "kitti_object" / "training"
    frames = sorted(p.stem for p in (root / "calib").glob("*.txt")) if root.is_dir() else []
    if not frames:
        pytest.skip("kitti_object sample absent")
    boxes_checked = 0
    for fid in frames:
        image = read_image(root / "image_2" / f"{fid}.png")
        cam = load_kitti_calib(root / "calib" / f"{fid}.txt", image.shape[:2])
        assert (cam.height, cam.width) == image.shape[:2]
        calib = parse_kitti_calib(root / "calib" / f"{fid}.txt")
        P2 = calib["P2"].reshape(3, 4)
        R0 = np.eye(4)
        R0[:3, :3] = calib["R0_rect"].reshape(3, 3)
        Tr = np.eye(4)
        Tr[:3] = calib["Tr_velo_to_cam"].reshape(3, 4)
        xyz = read_cloud(root / "velodyne" / f"{fid}.bin")[:, :3].astype(np.float64)
        hom = np.c_[xyz, np.ones(len(xyz))]
        q = hom @ (P2 @ R0 @ Tr).T
        proj = project_points(torch.from_numpy(xyz), [cam])
        front = q[:, 2] > 0.5
        np.testing.assert_allclose(proj.uv[0].numpy()[front], q[front, :2] / q[front, 2:], atol=1e-6)
        assert proj.visible.sum() > 0.9 * proj.in_image.sum() > 10000

        rect = (hom @ (R0 @ Tr).T)[:, :3]  # rectified camera-0 frame of label_2
        for _, bbox, (h, w, l, x, y, z, ry) in _kitti_label_boxes(root / "label_2" / f"{fid}.txt"):
            R = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
            local = (rect - (x, y, z)) @ R  # label location is the bottom centre, y points down
            inside = (np.abs(local[:, 0]) <= l / 2) & (np.abs(local[:, 2]) <= w / 2)
            inside &= (local[:, 1] <= 0) & (local[:, 1] >= -h)
            sel = inside & proj.in_image[0].numpy()
            if sel.sum() < 5:
                continue
            uv = proj.uv[0].numpy()[sel]
            assert ((uv >= bbox[:2] - 3) & (uv <= bbox[2:] + 3)).all(), (fid, bbox)
            corners_rect = np.array(
                [[sx * l / 2, sy, sz * w / 2] for sx in (-1, 1) for sy in (0, -h) for sz in (-1, 1)]
            ) @ R.T + (x, y, z)
            corners_lidar = (np.c_[corners_rect, np.ones(8)] @ np.linalg.inv(R0 @ Tr).T)[:, :3]
            c_uv = project_points(torch.from_numpy(corners_lidar), [cam], occlusion=False).uv[0].numpy()
            assert ((uv >= c_uv.min(0) - 1) & (uv <= c_uv.max(0) + 1)).all()
            boxes_checked += 1
    assert boxes_checked >= 4


def test_kitti_demo_info_pickle_matches_its_lidar2img(shared_data: Path):
    root = shared_data / "kitti_demo"
    if not (root / "000008.pkl").exists():
        pytest.skip("kitti_demo sample absent")
    info = load_info_pickle(root / "000008.pkl")
    cam = camera_from_kitti_info(info, "CAM2")
    assert (cam.height, cam.width) == read_image(root / "000008.png").shape[:2]
    lidar2img = np.asarray(info["data_list"][0]["images"]["CAM2"]["lidar2img"])
    xyz = read_cloud(root / "000008.bin")[:, :3].astype(np.float64)
    q = np.c_[xyz, np.ones(len(xyz))] @ lidar2img.T
    proj = project_points(torch.from_numpy(xyz), [cam])
    np.testing.assert_allclose(proj.uv[0].numpy(), q[:, :2] / q[:, 2:3], atol=1e-3)
    # The demo cloud is cropped to the camera frustum: nearly every point lands in the image.
    assert proj.in_image.double().mean() > 0.95


# ---------------------------------------------------------------------- voxelisation
def test_unreadable_info_pickles_are_calibration_errors(tmp_path: Path):
    foreign = tmp_path / "mmdet.pkl"
    foreign.write_bytes(b"cnot_installed_here\nThing\n)\x81.")  # a class from a package we lack
    with pytest.raises(CalibrationError, match="ModuleNotFoundError"):
        load_info_pickle(foreign)
    for info, match in [({"data_list": []}, "outside data_list of 0"), ({"data_list": [3]}, "not a dict")]:
        with pytest.raises(CalibrationError, match=match):
            info_sample(info)


def test_voxelize_hand_cases():
    pts = torch.tensor(
        [
            [0.05, 0.05, 0.05],  # voxel (x0, y0, z0)
            [0.09, 0.01, 0.099],  # same voxel
            [0.15, 0.05, 0.05],  # x1
            [0.05, 0.05, 0.35],  # z3
            [1.0, 0.0, 0.0],  # x == x_max: half-open range -> out
            [-0.01, 0.0, 0.0],  # below min -> out
            [float("nan"), 0.0, 0.0],
            [0.0, float("inf"), 0.0],
            [0.999, 0.399, 0.399],  # last voxel
        ]
    )
    rng = (0.0, 0.0, 0.0, 1.0, 0.4, 0.4)
    vox = voxelize(pts, 0.1, rng)
    assert vox.spatial_shape == (4, 4, 10) and vox.batch_size == 1
    p2v = vox.point_to_voxel
    assert p2v[0] == p2v[1] and p2v[0] != p2v[2] and p2v[0] != p2v[3]
    assert p2v[4:8].tolist() == [-1, -1, -1, -1] and vox.valid.sum() == 5
    assert vox.coords.dtype == torch.int32 and vox.num_voxels == 4
    assert vox.coords[p2v[3]].tolist() == [0, 3, 0, 0]  # (batch, z, y, x)
    assert vox.coords[p2v[8]].tolist() == [0, 3, 3, 9]
    assert vox.points_per_voxel().tolist() == [2, 1, 1, 1]
    # Anisotropic voxels and whole-number ranges with float error (51.2 / 0.1 = 511.99...).
    assert grid_shape((0.1, 0.2, 0.25), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)) == (32, 512, 1024)
    # A range that is not a whole number of voxels: the last cell sticks out, the crop stays exact.
    edge = voxelize(torch.tensor([[0.99, 0.1, 0.1], [1.02, 0.1, 0.1]]), 0.15, (0.0, 0.0, 0.0, 1.0, 0.3, 0.3))
    assert edge.spatial_shape == (2, 2, 7) and edge.valid.tolist() == [True, False]
    with pytest.raises(ValueError):
        voxelize(pts, 0.0, rng)
    with pytest.raises(ValueError):
        voxelize(pts, 0.1, (0, 0, 0, 1, 1, 1, 1))


def test_voxelize_batches_stay_apart_and_empty_input():
    pts = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    batch = torch.tensor([0, 2, 2])
    vox = voxelize(pts, 1.0, (0, 0, 0, 2, 2, 2), batch)
    assert vox.batch_size == 3 and vox.num_voxels == 2
    assert vox.coords.tolist() == [[0, 0, 0, 0], [2, 0, 0, 0]]
    assert vox.point_to_voxel.tolist() == [0, 1, 1]
    empty = voxelize(torch.zeros((0, 3)), 0.1, (0, 0, 0, 1, 1, 1))
    assert empty.num_voxels == 0 and empty.point_to_voxel.shape == (0,) and empty.coords.shape == (0, 4)
    with pytest.raises(ValueError):
        voxelize(pts, 1.0, (0, 0, 0, 2, 2, 2), batch, batch_size=2)


def test_voxel_mean_matches_loop_and_is_differentiable():
    torch.manual_seed(0)
    pts = torch.rand(300, 3) * 2 - 0.2  # some points outside the range
    vox = voxelize(pts, 0.5, (0, 0, 0, 1.5, 1.5, 1.5))
    feats = torch.randn(300, 5, requires_grad=True)
    mean = voxel_mean(feats, vox.point_to_voxel, vox.num_voxels)
    assert mean.shape == (vox.num_voxels, 5)
    for v in range(vox.num_voxels):
        members = vox.point_to_voxel == v
        torch.testing.assert_close(mean[v], feats[members].mean(0))
    mean.sum().backward()
    assert torch.all(feats.grad[~vox.valid] == 0) and torch.all(feats.grad[vox.valid] > 0)


def test_voxelize_semantickitti_scan_sparse_and_invertible(shared_data: Path):
    scan = shared_data / "semantickitti_scan" / "000000.bin"
    if not scan.exists():
        pytest.skip("semantickitti_scan sample absent")
    # Fresh interpreter so peak RSS reflects only this work. A dense 0.05 m table over this range
    # would be 2000 x 2000 x 160 = 6.4e8 cells (2.5 GB as int32).
    code = f"""
import json, resource, torch, numpy as np
import clip3d_core
from clip3d_core.geometry import voxelize
from clip3d_core.io import read_cloud
xyz = torch.from_numpy(read_cloud({str(scan)!r})[:, :3].copy())
voxelize(xyz[:100], 0.05, (-50, -50, -4, 50, 50, 4))  # warm up allocator / kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vox = voxelize(xyz, 0.05, (-50, -50, -4, 50, 50, 4))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
valid = vox.valid
cell = torch.floor((xyz.double() - torch.tensor([-50.0, -50.0, -4.0], dtype=torch.float64)) / 0.05).long()
rebuilt = vox.coords[vox.point_to_voxel[valid]].long()
ok = bool(torch.equal(rebuilt[:, 1:], cell[valid].flip(1))) and bool((rebuilt[:, 0] == 0).all())
c = vox.coords.long()
key = ((c[:, 1] * 2000) + c[:, 2]) * 2000 + c[:, 3]
print(json.dumps(dict(growth_kb=after - before, n=len(xyz), valid=int(valid.sum()), voxels=vox.num_voxels,
                      shape=list(vox.spatial_shape), ok=ok, unique_sorted=bool((key[1:] > key[:-1]).all()))))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 123389 and res["shape"] == [160, 2000, 2000]
    assert res["ok"], "coords[point_to_voxel] must equal floor((p - min) / size) in (z, y, x)"
    assert res["unique_sorted"]
    assert 0.9 * res["n"] < res["valid"] <= res["n"] and 50000 < res["voxels"] < res["valid"]
    assert res["growth_kb"] < 200 * 1024, f"peak RSS grew {res['growth_kb'] / 1024:.0f} MB"
