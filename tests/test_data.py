"""Data layer: Frame contract, SemanticKITTI / nuScenes-lidarseg loaders on official-layout fixtures,
zero-shot splits, collate."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip3d_core  # noqa: F401  (applies _compat first)
from clip3d_core.data import (
    NUSCENES_CLASSES,
    SEMANTICKITTI_CLASSES,
    DatasetError,
    Frame,
    FrameError,
    NuScenesLidarSegDataset,
    SemanticKittiDataset,
    SplitError,
    ZeroShotSplit,
    collate_frames,
    load_split,
)
from clip3d_core.data.nuscenes import GENERAL_TO_LIDARSEG, quaternion_to_matrix
from clip3d_core.data.semantickitti import LEARNING_MAP, map_labels
from clip3d_core.geometry.projection import project_points

# --------------------------------------------------------------------------------------- helpers
# KITTI odometry sequence-00-like calibration (P0..P3 rectified projections, Tr velodyne -> cam0).
_F, _CX, _CY = 718.856, 607.1928, 185.2157
KITTI_MATRICES = {
    "P0": [_F, 0, _CX, 0, 0, _F, _CY, 0, 0, 0, 1, 0],
    "P1": [_F, 0, _CX, -386.1448, 0, _F, _CY, 0, 0, 0, 1, 0],
    "P2": [_F, 0, _CX, 45.38225, 0, _F, _CY, -0.1130887, 0, 0, 1, 0.003779761],
    "P3": [_F, 0, _CX, -337.2877, 0, _F, _CY, 2.369057, 0, 0, 1, 0.004915215],
    "Tr": [4.276802e-04, -9.999672e-01, -8.084492e-03, -1.198460e-02, -7.210626e-03, 8.081198e-03,
           -9.999413e-01, -5.403985e-02, 9.999738e-01, 4.859486e-04, -7.206934e-03, -2.921969e-01],
}
KITTI_CALIB = "".join(f"{k}: {' '.join(f'{v:.6e}' for v in m)}\n" for k, m in KITTI_MATRICES.items())


def kitti_projection(points: np.ndarray) -> np.ndarray:
    """Reference pixels P2 @ Tr @ p straight from the calibration values."""
    Tr = np.vstack([np.reshape(KITTI_MATRICES["Tr"], (3, 4)), [0, 0, 0, 1]])
    uvw = (np.reshape(KITTI_MATRICES["P2"], (3, 4)) @ Tr @ np.c_[points, np.ones(len(points))].T).T
    return uvw[:, :2] / uvw[:, 2:3]


def write_kitti_scan(seq_dir: Path, scan: str, points: np.ndarray, raw: np.ndarray | None,
                     image_hw: tuple[int, int] | None = (376, 1241)) -> None:
    (seq_dir / "velodyne").mkdir(parents=True, exist_ok=True)
    points.astype(np.float32).tofile(seq_dir / "velodyne" / f"{scan}.bin")
    if raw is not None:
        (seq_dir / "labels").mkdir(exist_ok=True)
        raw.astype(np.uint32).tofile(seq_dir / "labels" / f"{scan}.label")
    if image_hw is not None:
        (seq_dir / "image_2").mkdir(exist_ok=True)
        img = np.zeros((*image_hw, 3), np.uint8)
        img[:, :, 0] = int(scan) % 256
        Image.fromarray(img).save(seq_dir / "image_2" / f"{scan}.png")
    (seq_dir / "calib.txt").write_text(KITTI_CALIB)


def matrix_to_quaternion(R: np.ndarray) -> list[float]:
    """3x3 rotation -> (w, x, y, z), the nuScenes convention (Shepperd's method)."""
    m = R
    tr = np.trace(m)
    if tr > 0:
        s = 2 * np.sqrt(1 + tr)
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(1 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0] * 4
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    return [float(v) for v in q]


def pose_record(T: np.ndarray, token: str, **extra) -> dict:
    return {"token": token, "rotation": matrix_to_quaternion(T[:3, :3]), "translation": T[:3, 3].tolist(),
            **extra}


def yaw_pose(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = (x, y, z)
    return T


CATEGORY_NAMES = list(GENERAL_TO_LIDARSEG)  # the 32 general categories in their lidarseg index order


class NuScenesWriter:
    """Writes the official nuScenes(-lidarseg) table layout for hand-made samples."""

    def __init__(self, root: Path, version: str = "v1.0-mini") -> None:
        self.root, self.version = root, version
        names = ("sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor", "scene", "lidarseg")
        self.tables: dict[str, list[dict]] = {k: [] for k in names}
        self.tables["category"] = [{"token": f"cat{i}", "name": n, "description": "", "index": i}
                                   for i, n in enumerate(CATEGORY_NAMES)]
        self._n = 0

    def token(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}"

    def sensor(self, channel: str, T_ego_sensor: np.ndarray, K: np.ndarray | None = None) -> str:
        st = self.token("sensor")
        self.tables["sensor"].append({"token": st, "channel": channel,
                                      "modality": "camera" if K is not None else "lidar"})
        ct = self.token("cs")
        self.tables["calibrated_sensor"].append(pose_record(
            T_ego_sensor, ct, sensor_token=st, camera_intrinsic=[] if K is None else K.tolist()))
        return ct

    def scene(self, name: str) -> str:
        t = self.token("scene")
        self.tables["scene"].append({"token": t, "name": name, "description": "", "log_token": "log"})
        return t

    def sample(self, scene: str, timestamp: int) -> str:
        t = self.token("sample")
        self.tables["sample"].append({"token": t, "timestamp": timestamp, "scene_token": scene, "prev": "",
                                      "next": ""})
        return t

    def sample_data(self, sample: str, cs: str, channel: str, T_global_ego: np.ndarray, timestamp: int,
                    src: Path | None = None, data: bytes | None = None, ext: str = "jpg", hw=(0, 0)) -> str:
        t = self.token("sd")
        ep = self.token("ego")
        self.tables["ego_pose"].append(pose_record(T_global_ego, ep, timestamp=timestamp))
        rel = f"samples/{channel}/{t}__{channel}__{timestamp}.{ext}"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        if src is not None:
            shutil.copy(src, self.root / rel)
        else:
            (self.root / rel).write_bytes(data)
        self.tables["sample_data"].append({
            "token": t, "sample_token": sample, "ego_pose_token": ep, "calibrated_sensor_token": cs,
            "timestamp": timestamp, "fileformat": ext, "is_key_frame": True, "height": hw[0], "width": hw[1],
            "filename": rel, "prev": "", "next": ""})
        return t

    def lidarseg(self, sd: str, labels: np.ndarray) -> None:
        t = self.token("ls")
        rel = f"lidarseg/{self.version}/{t}_lidarseg.bin"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        labels.astype(np.uint8).tofile(self.root / rel)
        self.tables["lidarseg"].append({"token": t, "sample_data_token": sd, "filename": rel})

    def write(self) -> None:
        d = self.root / self.version
        d.mkdir(parents=True, exist_ok=True)
        for name, rows in self.tables.items():
            (d / f"{name}.json").write_text(json.dumps(rows))


def write_real_keyframe(w: NuScenesWriter, src: Path, scene_name: str) -> tuple[str, int]:
    """The real mini keyframe in ``src`` (mmdetection3d info .pkl) as one sample of a new scene: the
    LiDAR sweep and the six cameras, per-camera ego poses recovered from its lidar2cam. Returns the
    LiDAR sample_data token and the point count (labels are the caller's)."""
    s = pickle.loads(next(src.glob("*.pkl")).read_bytes())["data_list"][0]
    lidar2ego, ego2global = np.array(s["lidar_points"]["lidar2ego"]), np.array(s["ego2global"])
    ts = round(s["timestamp"] * 1e6)
    sample = w.sample(w.scene(scene_name), ts)
    lidar_sd = w.sample_data(sample, w.sensor("LIDAR_TOP", lidar2ego), "LIDAR_TOP", ego2global, ts,
                             src=src / s["lidar_points"]["lidar_path"], ext="pcd.bin")
    n = (src / s["lidar_points"]["lidar_path"]).stat().st_size // 20
    for name, cam in s["images"].items():
        cam2ego, lidar2cam = np.array(cam["cam2ego"]), np.array(cam["lidar2cam"])
        ego2global_cam = ego2global @ lidar2ego @ np.linalg.inv(lidar2cam) @ np.linalg.inv(cam2ego)
        w.sample_data(sample, w.sensor(name, cam2ego, np.array(cam["cam2img"])), name, ego2global_cam,
                      round(cam["timestamp"] * 1e6), src=src / cam["img_path"], hw=(900, 1600))
    return lidar_sd, n


def jpeg_bytes(hw: tuple[int, int], value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_frame(n: int, labels: bool = True, names=("a", "b", "c"), fid="f") -> Frame:
    rng = np.random.default_rng(n)
    return Frame(points=rng.normal(size=(n, 4)).astype(np.float32),
                 labels=rng.integers(-1, len(names), n) if labels else None,
                 instances=np.zeros(n, np.int64) if labels else None, images=[], cameras=[],
                 class_names=tuple(names), frame_id=fid, stamp_ns=n)


# --------------------------------------------------------------------------------------- Frame / collate
def test_frame_validate_catches_inconsistencies() -> None:
    f = make_frame(10).validate()
    with pytest.raises(FrameError, match="points"):
        Frame(**{**f.__dict__, "points": f.points.astype(np.float64)}).validate()
    with pytest.raises(FrameError, match="labels"):
        Frame(**{**f.__dict__, "labels": f.labels[:5]}).validate()
    with pytest.raises(FrameError, match="outside"):
        Frame(**{**f.__dict__, "labels": np.full(10, 3, np.int64)}).validate()
    with pytest.raises(FrameError, match="images"):
        Frame(**{**f.__dict__, "images": [np.zeros((2, 2, 3), np.uint8)]}).validate()


def test_collate_frames() -> None:
    a, b, c = make_frame(5, fid="a"), make_frame(7, labels=False, fid="b"), make_frame(3, fid="c")
    batch = collate_frames([a, b, c])
    assert batch["points"].shape == (15, 4) and batch["points"].dtype == torch.float32
    assert batch["batch_index"].tolist() == [0] * 5 + [1] * 7 + [2] * 3
    assert batch["offsets"].tolist() == [0, 5, 12, 15]
    np.testing.assert_array_equal(batch["points"][5:12].numpy(), b.points)
    assert batch["labels"][5:12].tolist() == [-1] * 7  # unlabelled frame -> ignore
    np.testing.assert_array_equal(batch["labels"][12:].numpy(), c.labels)
    assert batch["frame_ids"] == ["a", "b", "c"] and batch["stamps_ns"].tolist() == [5, 7, 3]
    assert batch["batch_size"] == 3 and batch["pixel_labels"] is None
    assert collate_frames([b])["labels"] is None
    with pytest.raises(FrameError, match="class lists"):
        collate_frames([a, make_frame(4, names=("x", "y"))])
    with pytest.raises(FrameError, match="empty"):
        collate_frames([])


def test_collate_synthetic_batch_feeds_dataloader() -> None:
    from clip3d_core.data.synthetic import CameraConfig, LidarConfig, SyntheticConfig, SyntheticWorldDataset

    cfg = SyntheticConfig(lidar=LidarConfig(azimuths=256), cameras=(CameraConfig(width=96, height=64),))
    loader = torch.utils.data.DataLoader(SyntheticWorldDataset(cfg, 2), batch_size=2,
                                         collate_fn=collate_frames)
    batch = next(iter(loader))
    assert batch["batch_index"].max() == 1 and len(batch["cameras"]) == 2
    assert batch["pixel_labels"][0][0].shape == (64, 96) and batch["images"][1][0].shape == (64, 96, 3)
    assert batch["labels"].shape[0] == batch["points"].shape[0]


# --------------------------------------------------------------------------------------- splits
def test_builtin_splits() -> None:
    kitti = load_split("semantickitti")
    assert kitti.classes == SEMANTICKITTI_CLASSES and len(kitti.classes) == 19
    assert set(kitti.unseen) == {"motorcycle", "truck", "bicyclist", "traffic-sign"}
    assert kitti.unseen_ids == (2, 3, 6, 18)
    assert set(kitti.seen_ids) | set(kitti.unseen_ids) == set(range(19))
    nus = load_split("nuscenes")
    assert nus.classes == NUSCENES_CLASSES and len(nus.classes) == 16 and len(nus.unseen) == 4
    syn = load_split("synthetic")
    assert "traffic cone" in syn.unseen and len(syn.vocabulary) == len(syn.classes)
    for split in (kitti, nus):  # prompts: first synonym is the class name, so names stay aligned
        assert [p.split("|")[0] for p in split.vocabulary] == list(split.classes)


def test_split_validation_and_masking(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="not among"):
        ZeroShotSplit(("car", "road"), ("truck",))
    with pytest.raises(SplitError, match="duplicate"):
        ZeroShotSplit(("car", "car"), ())
    with pytest.raises(SplitError, match="nothing to train"):
        ZeroShotSplit(("car",), ("car",))
    with pytest.raises(SplitError, match="prompts"):
        ZeroShotSplit(("car", "road"), (), prompts=("car",))
    s = ZeroShotSplit(("car", "truck", "road"), ("truck",))
    assert s.seen_ids == (0, 2) and s.unseen_ids == (1,) and s.seen == ("car", "road")
    np.testing.assert_array_equal(s.seen_labels(np.array([0, 1, 2, -1, 1])), [0, -1, 2, -1, -1])
    path = tmp_path / "mine.yaml"
    path.write_text("classes: [car, truck, road]\nunseen: [road]\n")
    custom = load_split(path)
    assert custom.name == "mine" and custom.unseen_ids == (2,)
    assert ZeroShotSplit.from_dict(custom.to_dict()) == custom
    with pytest.raises(SplitError, match="unknown split"):
        load_split("kitti-360")


# --------------------------------------------------------------------------------------- SemanticKITTI
def test_learning_map() -> None:
    assert len(LEARNING_MAP) == 34 and set(LEARNING_MAP.values()) == set(range(20))
    raw_ids = np.array([10, 252, 40, 60, 44, 0, 1, 52, 99, 13, 257, 81, 123, 30, 254], np.uint32)
    instance = np.arange(len(raw_ids), dtype=np.uint32) + 100
    labels, inst = map_labels(raw_ids | (instance << 16))
    names = [SEMANTICKITTI_CLASSES[i] if i >= 0 else None for i in labels]
    assert names == ["car", "car", "road", "road", "parking", None, None, None, None, "other-vehicle",
                     "other-vehicle", "traffic-sign", None, "person", "person"]
    np.testing.assert_array_equal(inst, instance)


def test_semantickitti_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "dataset"
    raw_pool = np.array(list(LEARNING_MAP), np.uint32)
    scans = {}
    for scan in ("000000", "000001"):
        pts = np.c_[rng.uniform(5, 40, 300), rng.uniform(-5, 5, 300), rng.uniform(-1.5, 1, 300),
                    rng.random(300)]
        raw = rng.choice(raw_pool, 300) | (rng.integers(0, 5, 300).astype(np.uint32) << 16)
        write_kitti_scan(root / "sequences" / "00", scan, pts, raw)
        scans[scan] = (pts, raw)
    (root / "sequences" / "00" / "times.txt").write_text("0.0\n0.103\n")
    write_kitti_scan(root / "sequences" / "08", "000000", scans["000000"][0], None, image_hw=None)

    ds = SemanticKittiDataset(root, [0])
    assert len(ds) == 2
    f = ds[1].validate()
    pts, raw = scans["000001"]
    np.testing.assert_allclose(f.points, pts.astype(np.float32))
    expected = np.array([LEARNING_MAP[int(r) & 0xFFFF] - 1 for r in raw])
    np.testing.assert_array_equal(f.labels, expected)
    np.testing.assert_array_equal(f.instances, raw >> 16)
    assert f.frame_id == "00/000001" and f.stamp_ns == 103_000_000
    assert f.images[0].shape == (376, 1241, 3) and f.images[0][0, 0, 0] == 1
    cam = f.cameras[0]
    proj = project_points(torch.from_numpy(f.points[:, :3]), [cam], occlusion=False)
    np.testing.assert_allclose(proj.uv[0].numpy(), kitti_projection(f.points[:, :3]), atol=1e-2)
    assert proj.in_image[0].float().mean() > 0.5

    val = SemanticKittiDataset(root, "val")  # sequence 08: no labels, no images
    assert len(val) == 1 and val[0].labels is None and val[0].cameras == []
    assert SemanticKittiDataset(root, [0], with_images=False)[0].images == []

    (root / "sequences" / "00" / "labels" / "000000.label").write_bytes(b"\0" * 8)
    with pytest.raises(DatasetError, match="labels for"):
        ds[0]
    with pytest.raises(DatasetError, match="sequences"):
        SemanticKittiDataset(tmp_path / "nowhere", [0])
    with pytest.raises(DatasetError, match="missing"):
        SemanticKittiDataset(root, [5])


def test_semantickitti_real_scan(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "semantickitti_scan"
    seq = tmp_path / "sequences" / "00"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    shutil.copy(src / "000000.bin", seq / "velodyne" / "000000.bin")
    shutil.copy(src / "000000.label", seq / "labels" / "000000.label")
    f = SemanticKittiDataset(tmp_path, [0])[0].validate()
    assert f.num_points == 123_389 and f.cameras == []
    raw = np.fromfile(src / "000000.label", np.uint32)
    expected = np.array([LEARNING_MAP.get(int(r) & 0xFFFF, 0) - 1 for r in raw])
    np.testing.assert_array_equal(f.labels, expected)
    counts = np.bincount(f.labels[f.labels >= 0], minlength=19)
    for cls in ("road", "sidewalk", "building", "vegetation", "car"):
        assert counts[SEMANTICKITTI_CLASSES.index(cls)] > 100, cls
    # instance ids only on thing classes (or points mapped to ignore)
    things = [SEMANTICKITTI_CLASSES.index(c) for c in SEMANTICKITTI_CLASSES[:8]]
    with_instance = f.instances > 0
    assert with_instance.any() and np.isin(f.labels[with_instance], [*things, -1]).all()


# --------------------------------------------------------------------------------------- nuScenes
def test_quaternion_to_matrix() -> None:
    # nuScenes CAM_FRONT-like mounting: optical z = ego x, optical x = -ego y, optical y = -ego z
    R = quaternion_to_matrix([0.5, -0.5, 0.5, -0.5])
    np.testing.assert_allclose(R, [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], atol=1e-12)
    for yaw in (0.3, -2.0):
        np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(yaw_pose(0, 0, 0, yaw)[:3, :3])),
                                   yaw_pose(0, 0, 0, yaw)[:3, :3], atol=1e-12)


def build_tiny_nuscenes(root: Path) -> dict:
    w = NuScenesWriter(root)
    T_ego_lidar = yaw_pose(0.94, 0.0, 1.84, -np.pi / 2)
    K = np.array([[100.0, 0, 80], [0, 100.0, 45], [0, 0, 1]])
    R_ego_cam = quaternion_to_matrix([0.5, -0.5, 0.5, -0.5])
    T_ego_front = np.eye(4)
    T_ego_front[:3, :3], T_ego_front[:3, 3] = R_ego_cam, (1.7, 0.0, 1.5)
    T_ego_back = yaw_pose(-1.0, 0.0, 1.5, np.pi)  # looking backwards
    T_ego_back[:3, :3] = T_ego_back[:3, :3] @ R_ego_cam
    cs = {"LIDAR_TOP": w.sensor("LIDAR_TOP", T_ego_lidar), "CAM_FRONT": w.sensor("CAM_FRONT", T_ego_front, K),
          "CAM_BACK": w.sensor("CAM_BACK", T_ego_back, K)}
    out = {"T_ego_lidar": T_ego_lidar, "T_ego_front": T_ego_front, "K": K, "samples": []}
    rng = np.random.default_rng(0)
    for scene_name, t0 in (("scene-0103", 2_000_000), ("scene-0061", 1_000_000)):
        scene = w.scene(scene_name)
        for k in (1, 0):  # written out of time order on purpose
            ts = t0 + k * 500_000
            sample = w.sample(scene, ts)
            ego_lidar = yaw_pose(100.0 + k * 5, 200.0, 0.0, 0.5)
            # the camera exposes 20 ms earlier, the car has moved 0.2 m less along its heading
            ego_cam = yaw_pose(100.0 + k * 5 - 0.2 * np.cos(0.5), 200.0 - 0.2 * np.sin(0.5), 0.0, 0.5)
            pts = np.c_[rng.uniform(-20, 20, (50, 3)), rng.uniform(0, 255, 50), rng.integers(0, 32, 50)]
            lidar_sd = w.sample_data(sample, cs["LIDAR_TOP"], "LIDAR_TOP", ego_lidar, ts,
                                     data=pts.astype(np.float32).tobytes(), ext="pcd.bin")
            raw = np.arange(50) % 32
            w.lidarseg(lidar_sd, raw)
            w.sample_data(sample, cs["CAM_FRONT"], "CAM_FRONT", ego_cam, ts - 20_000,
                          data=jpeg_bytes((90, 160), 10 * k + 50), hw=(90, 160))
            if scene_name == "scene-0061":  # scene-0103 lacks the back camera
                w.sample_data(sample, cs["CAM_BACK"], "CAM_BACK", ego_cam, ts - 20_000,
                              data=jpeg_bytes((90, 160), 200), hw=(90, 160))
            out["samples"].append((scene_name, ts, pts, raw, ego_lidar, ego_cam))
    w.write()
    return out


def test_nuscenes_layout(tmp_path: Path) -> None:
    truth = build_tiny_nuscenes(tmp_path)
    ds = NuScenesLidarSegDataset(tmp_path, "v1.0-mini", "all", cameras=("CAM_FRONT", "CAM_BACK"))
    assert len(ds) == 4
    frames = [ds[i].validate() for i in range(4)]
    # ordered by scene name, then time
    order = sorted(truth["samples"], key=lambda s: (s[0], s[1]))
    assert [f.stamp_ns for f in frames] == [s[1] * 1000 for s in order]
    f, (_, _, pts, raw, ego_lidar, ego_cam) = frames[0], order[0]
    np.testing.assert_allclose(f.points[:, :3], pts[:, :3].astype(np.float32))
    np.testing.assert_allclose(f.points[:, 3], pts[:, 3].astype(np.float32) / 255, rtol=1e-6)
    names = [None if lab < 0 else NUSCENES_CLASSES[lab] for lab in f.labels]
    assert names == [GENERAL_TO_LIDARSEG[CATEGORY_NAMES[r]] for r in raw]
    assert f.labels[17] == NUSCENES_CLASSES.index("car") and f.labels[31] == -1 and f.labels[0] == -1
    assert [c.name for c in f.cameras] == ["CAM_FRONT", "CAM_BACK"] and f.images[1][0, 0, 0] > 150
    # extrinsics chain lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera
    T_global_lidar = ego_lidar @ truth["T_ego_lidar"]
    np.testing.assert_allclose(f.pose, T_global_lidar, atol=1e-9)
    P_global = T_global_lidar @ np.c_[pts[:, :3], np.ones(50)].T
    P_cam = np.linalg.inv(ego_cam @ truth["T_ego_front"]) @ P_global
    np.testing.assert_allclose(f.cameras[0].T_cam_lidar @ np.c_[pts[:, :3], np.ones(50)].T, P_cam, atol=1e-6)
    ahead = P_cam[2] > 1
    uv = (truth["K"] @ P_cam[:3, ahead]).T
    proj = project_points(torch.from_numpy(pts[ahead, :3]).double(), f.cameras[:1], occlusion=False)
    np.testing.assert_allclose(proj.uv[0].numpy(), uv[:, :2] / uv[:, 2:3], atol=1e-6)

    later = ds[2]  # scene-0103 has no CAM_BACK keyframe: skipped, not fatal
    assert [c.name for c in later.cameras] == ["CAM_FRONT"]
    mini_val = NuScenesLidarSegDataset(tmp_path, "v1.0-mini", "mini_val", with_images=False)
    assert len(mini_val) == 2 and mini_val[0].images == []
    assert len(NuScenesLidarSegDataset(tmp_path, "v1.0-mini", ["scene-0061"])) == 2
    with pytest.raises(DatasetError, match=r"not in scene\.json"):
        NuScenesLidarSegDataset(tmp_path, "v1.0-mini", ["scene-9999"])
    with pytest.raises(DatasetError, match="no table folder"):
        NuScenesLidarSegDataset(tmp_path, "v1.0-trainval")
    try:
        import nuscenes  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="nuscenes-devkit"):
            NuScenesLidarSegDataset(tmp_path, "v1.0-mini", "train")


def test_nuscenes_panoptic_labels(tmp_path: Path) -> None:
    """panoptic/*.npz (category * 1000 + instance) gives labels and instance ids, replacing lidarseg."""
    build_tiny_nuscenes(tmp_path)
    table = tmp_path / "v1.0-mini"
    rows, truth = [], {}
    for k, rec in enumerate(json.loads((table / "lidarseg.json").read_text())):
        category = (np.arange(50) + k) % 32
        instance = np.where(np.isin(category, [17, 18]), np.arange(50) % 3 + 1, 0)
        rel = f"panoptic/v1.0-mini/pan{k}_panoptic.npz"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(tmp_path / rel, data=(category * 1000 + instance).astype(np.uint16))
        rows.append({"token": f"pan{k}", "sample_data_token": rec["sample_data_token"], "filename": rel})
        truth[rec["sample_data_token"]] = (category, instance)
    (table / "panoptic.json").write_text(json.dumps(rows))
    ds = NuScenesLidarSegDataset(tmp_path, with_images=False)
    seen = 0
    for i in range(len(ds)):
        f = ds[i].validate()
        sd = next(t for t, (c, _) in truth.items() if np.array_equal(
            f.labels, [NUSCENES_CLASSES.index(n) if (n := GENERAL_TO_LIDARSEG[CATEGORY_NAMES[x]]) else -1
                       for x in c]))
        np.testing.assert_array_equal(f.instances, truth[sd][1])
        seen += 1
    assert seen == 4
    bad = tmp_path / rows[0]["filename"]
    np.savez_compressed(bad, data=np.zeros(3, np.uint16))
    with pytest.raises(DatasetError, match="3 labels for 50 points"):
        [ds[i] for i in range(len(ds))]


def test_nuscenes_real_keyframe(tmp_path: Path, shared_data: Path) -> None:
    """The real mini keyframe re-packed into the official layout; per-camera ego poses are recovered
    from mmdetection3d's lidar2cam so our chain must reproduce its extrinsics exactly."""
    from clip3d_core.geometry.calibration import cameras_from_nuscenes_info

    src = shared_data / "nuscenes_keyframe"
    info = pickle.loads(next(src.glob("*.pkl")).read_bytes())
    w = NuScenesWriter(tmp_path)
    lidar_sd, n = write_real_keyframe(w, src, "scene-0061")
    w.lidarseg(lidar_sd, np.full(n, CATEGORY_NAMES.index("flat.driveable_surface")))
    w.write()
    f = NuScenesLidarSegDataset(tmp_path, "v1.0-mini", "mini_train")[0].validate()
    assert f.num_points == 34_688 and len(f.cameras) == 6 and f.images[0].shape == (900, 1600, 3)
    assert f.points[:, 3].min() >= 0 and f.points[:, 3].max() <= 1.0
    assert (f.labels == NUSCENES_CLASSES.index("driveable_surface")).all()
    reference = cameras_from_nuscenes_info(info)
    for ours, ref in zip(f.cameras, reference):
        assert ours.name == ref.name
        np.testing.assert_allclose(ours.K, ref.K, atol=1e-9)
        np.testing.assert_allclose(ours.T_cam_lidar, ref.T_cam_lidar, atol=1e-5)
    proj = project_points(torch.from_numpy(f.points[:, :3]), f.cameras)
    assert proj.visible.any(0).float().mean() > 0.3  # six cameras see most of the sweep
