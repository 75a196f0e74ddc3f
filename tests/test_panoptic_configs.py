"""The shipped real-data panoptic configs (training/semantickitti_panoptic.yaml, nuscenes_panoptic.yaml):
they load, refuse to run without CLIP weights, and -- with a random tiny CLIP -- train and evaluate
through `clip3d train` on the real samples in ../shared/data (SemanticKITTI scan with its instance
labels; the nuScenes keyframe with its six cameras and panoptic labels made from its 69 annotated
boxes, since the sample ships none)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data import CATEGORY_NAMES, NuScenesWriter, write_real_keyframe

import clip3d_core  # noqa: F401  (compat shims first)
from clip3d_core.cli import main as cli_main
from clip3d_core.training import load_train_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"semantickitti_panoptic.yaml": "semantickitti_b15n4", "nuscenes_panoptic.yaml": "nuscenes_b12n4"}
# a random tiny CLIP, small network and head, two iterations: the machinery on real frames
TINY = ["clip.model_name=clip3d-tiny", "clip.allow_random=true", "clip.pretrained=null", "model_preset=small",
        "model.voxel_size=0.4", "panoptic.head={hidden: 32, num_thing_queries: 8, num_layers: 1, ffn: 64}",
        "trainer.iterations=2", "trainer.batch_size=1", "trainer.num_workers=0", "trainer.cpu_threads=1",
        "trainer.precise_bn_batches=0", "trainer.tensorboard=false", "trainer.progress=false",
        "trainer.log_every=1", "teacher.short_side=64"]
# mmdetection3d's box label names -> nuScenes general categories
BOX_CATEGORY = {"car": "vehicle.car", "truck": "vehicle.truck", "trailer": "vehicle.trailer",
                "bus": "vehicle.bus.rigid", "construction_vehicle": "vehicle.construction",
                "bicycle": "vehicle.bicycle", "motorcycle": "vehicle.motorcycle",
                "pedestrian": "human.pedestrian.adult", "traffic_cone": "movable_object.trafficcone",
                "barrier": "movable_object.barrier"}


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_loads_and_needs_real_clip_weights(name: str, tmp_path: Path, monkeypatch, caplog) -> None:
    cfg = load_train_config(REPO / "training" / name)
    assert cfg.setting == "panoptic" and cfg.panoptic.split == CONFIGS[name]
    assert cfg.teacher.kind == "clip" and not cfg.clip.allow_random and cfg.clip.pretrained == "openai"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once, not after retries
    args = ["train", "--config", str(REPO / "training" / name), "--out", str(tmp_path), "--set",
            f"data.root={tmp_path / 'none'}"]
    assert cli_main(args) == 2
    assert "weights" in caplog.text  # a ClipLoadError naming the missing weights, never random ones


def kitti_root(tmp_path: Path, shared_data: Path) -> Path:
    """The real scan as sequence 00 (training) and 08 (evaluation): no image, no calibration."""
    src = shared_data / "semantickitti_scan"
    for seq in ("00", "08"):
        d = tmp_path / "kitti" / "sequences" / seq
        (d / "velodyne").mkdir(parents=True)
        (d / "labels").mkdir()
        os.symlink(src / "000000.bin", d / "velodyne" / "000000.bin")
        shutil.copy(src / "000000.label", d / "labels" / "000000.label")
    return tmp_path / "kitti"


def box_panoptic(points: np.ndarray, info: dict) -> np.ndarray:
    """category * 1000 + instance per point from the keyframe's 3D boxes (LiDAR frame; inside the
    footprint, from half a height below the box origin to a height above it, so the box origin's
    convention does not matter); other points driveable surface (a stuff class)."""
    names = {v: k for k, v in info["metainfo"]["categories"].items()}
    out = np.full(len(points), CATEGORY_NAMES.index("flat.driveable_surface") * 1000, np.uint16)
    for k, box in enumerate(info["data_list"][0]["instances"], start=1):
        if box["bbox_label_3d"] < 0:  # a category outside the ten detection classes
            continue
        x, y, z, dx, dy, dz, yaw = box["bbox_3d"]
        c, s = np.cos(yaw), np.sin(yaw)
        px, py = points[:, 0] - x, points[:, 1] - y
        lx, ly = c * px + s * py, -s * px + c * py
        inside = (np.abs(lx) <= dx / 2) & (np.abs(ly) <= dy / 2) & (points[:, 2] >= z - dz / 2) & \
            (points[:, 2] <= z + dz)
        out[inside] = CATEGORY_NAMES.index(BOX_CATEGORY[names[box["bbox_label_3d"]]]) * 1000 + k
    return out


def nuscenes_root(tmp_path: Path, shared_data: Path) -> Path:
    """The real keyframe twice (scenes of mini_train and mini_val) with box-made panoptic labels."""
    src = shared_data / "nuscenes_keyframe"
    info = pickle.loads(next(src.glob("*.pkl")).read_bytes())
    root = tmp_path / "nuscenes"
    w = NuScenesWriter(root)
    rows = []
    for scene in ("scene-0061", "scene-0103"):
        lidar_sd, n = write_real_keyframe(w, src, scene)
        sweep = src / info["data_list"][0]["lidar_points"]["lidar_path"]
        points = np.fromfile(sweep, np.float32).reshape(n, 5)
        rel = f"panoptic/v1.0-mini/{lidar_sd}_panoptic.npz"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        panoptic = box_panoptic(points, info)
        assert len(np.unique(panoptic[panoptic % 1000 > 0])) > 10  # many box instances hold points
        np.savez_compressed(root / rel, data=panoptic)
        rows.append({"token": f"pan_{lidar_sd}", "sample_data_token": lidar_sd, "filename": rel})
    w.write()
    (root / "v1.0-mini" / "panoptic.json").write_text(json.dumps(rows))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_trains_on_the_real_sample(name: str, tmp_path: Path, shared_data: Path) -> None:
    if name.startswith("semantickitti"):
        data = [f"data.root={kitti_root(tmp_path, shared_data)}", "data.options.train_sequences=[0]",
                "data.options.val_sequences=[8]"]
    else:
        data = [f"data.root={nuscenes_root(tmp_path, shared_data)}", "data.options.version=v1.0-mini",
                "data.options.train_split=mini_train", "data.options.val_split=mini_val"]
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "training" / name), "--out", str(out), *sets(TINY + data)]
    assert cli_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["panoptic"]
    assert {"pq", "pq_novel_things", "pq_novel_stuff", "miou"} <= set(metrics)
    from clip3d_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt.panoptic is not None and ckpt.meta["split"]["name"] == CONFIGS[name]
    assert ckpt.panoptic.min_points == (50 if name.startswith("semantickitti") else 15)
