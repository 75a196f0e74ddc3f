"""Panoptic data: things/stuff specs, base/novel splits, training targets, instance labels per dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from clip3d_core.data import SemanticKittiDataset
from clip3d_core.data.panoptic import (
    PANOPTIC_SPLIT_NAMES,
    PanopticSplit,
    load_panoptic_split,
    panoptic_spec,
)
from clip3d_core.data.semantickitti import LEARNING_MAP, encode_labels, map_labels
from clip3d_core.data.splits import SplitError
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorld
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig


def test_specs_things_stuff_min_points() -> None:
    nus, kitti, syn = (panoptic_spec(d) for d in ("nuscenes", "semantickitti", "synthetic"))
    assert (len(nus.things), len(nus.stuff), nus.min_points) == (10, 6, 15)
    assert "vegetation" in nus.stuff and "pedestrian" in nus.things and "driveable_surface" in nus.stuff
    assert (len(kitti.things), len(kitti.stuff), kitti.min_points) == (8, 11, 50)
    assert set(kitti.things) == {"car", "bicycle", "motorcycle", "truck", "other-vehicle", "person",
                                 "bicyclist", "motorcyclist"}
    assert set(syn.things) == {"car", "truck", "bus", "pedestrian", "bicyclist", "motorcyclist",
                               "traffic cone", "barrier"}
    assert syn.thing_mask().sum() == 8 and not syn.thing_mask()[syn.classes.index("tree")]
    with pytest.raises(SplitError, match="unknown panoptic dataset"):
        panoptic_spec("waymo")


def test_builtin_splits() -> None:
    assert set(PANOPTIC_SPLIT_NAMES) == {"nuscenes_b12n4", "nuscenes_b11n5", "semantickitti_b15n4",
                                         "synthetic_b13n4"}
    b12 = load_panoptic_split("nuscenes_b12n4")
    assert set(b12.novel) == {"bus", "motorcycle", "pedestrian", "vegetation"}
    assert len(b12.base_ids) == 12 and len(b12.novel_ids) == 4
    novel_things = [b12.classes[i] for i in b12.novel_ids if i in b12.thing_ids]
    assert novel_things == ["bus", "motorcycle", "pedestrian"]
    assert len(load_panoptic_split("nuscenes_b11n5").base_ids) == 11
    for name in PANOPTIC_SPLIT_NAMES:
        s = load_panoptic_split(name)
        novel_things = set(s.novel_ids) & set(s.thing_ids)
        assert len(novel_things) >= 2 and len(set(s.novel_ids) - novel_things) >= 1, name
        assert set(s.base_thing_ids) | set(s.base_stuff_ids) == set(s.base_ids)
        assert s.semantic.unseen == s.novel and PanopticSplit.from_dict(s.to_dict()) == s


def test_split_validation(tmp_path: Path) -> None:
    spec = panoptic_spec("synthetic")
    with pytest.raises(SplitError, match="not among"):
        PanopticSplit(spec, ("spaceship",))
    with pytest.raises(SplitError, match="no base thing"):
        PanopticSplit(spec, spec.things)
    with pytest.raises(SplitError, match="unknown keys"):
        PanopticSplit.from_dict({"dataset": "synthetic", "novel": ["bus"], "unseen": []})
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: nuscenes\nnovel: [bus, terrain]\n")
    mine = load_panoptic_split(path)
    assert mine.name == "mine" and mine.novel == ("bus", "terrain")
    with pytest.raises(SplitError, match="unknown panoptic split"):
        load_panoptic_split("nope")


def test_training_targets_hand_case() -> None:
    split = load_panoptic_split("synthetic_b13n4")
    c = {n: i for i, n in enumerate(split.classes)}
    labels = np.array([c["road"], c["road"], c["car"], c["car"], c["car"], c["bus"], c["tree"], -1,
                       c["sidewalk"], c["pedestrian"]])
    # the road carries a junk instance id (stuff ignores it); car instances 4 and 9; novel bus/pedestrian 5/6
    instances = np.array([3, 0, 4, 4, 9, 5, 0, 0, 0, 6])
    t = split.training_targets(labels, instances)
    novel_or_ignored = [5, 6, 7, 9]
    np.testing.assert_array_equal(t.semantic[novel_or_ignored], -1)
    np.testing.assert_array_equal(t.segment[novel_or_ignored], -1)
    assert t.num_segments == 4  # road, car#4, car#9, sidewalk
    seg = t.segment
    assert seg[0] == seg[1] and seg[2] == seg[3] and len({seg[0], seg[2], seg[4], seg[8]}) == 4
    assert [split.classes[k] for k in t.segment_class[[seg[0], seg[2], seg[4], seg[8]]]] == [
        "road", "car", "car", "sidewalk"]


def test_training_targets_ignore_novel_ground_truth() -> None:
    """Permuting the novel classes' labels and instance ids changes nothing in the targets."""
    split = load_panoptic_split("synthetic_b13n4")
    frame = SyntheticWorld(SyntheticConfig(seed=1, lidar=LidarConfig(azimuths=256),
                                           cameras=(CameraConfig(width=64, height=48),))).frame(0)
    novel = np.array(split.novel_ids)
    is_novel = np.isin(frame.labels, novel)
    assert is_novel.sum() > 20, "the frame should show novel classes"
    labels, inst = frame.labels.copy(), frame.instances.copy()
    labels[is_novel] = np.roll(novel, 1)[np.searchsorted(novel, labels[is_novel])]
    inst[is_novel] = inst[is_novel] * 7 + 1
    a, b = split.training_targets(frame.labels, frame.instances), split.training_targets(labels, inst)
    for x, y in ((a.semantic, b.semantic), (a.segment, b.segment), (a.segment_class, b.segment_class)):
        np.testing.assert_array_equal(x, y)


def test_synthetic_instances_exact() -> None:
    frame = SyntheticWorld(SyntheticConfig(seed=2, lidar=LidarConfig(azimuths=256),
                                           cameras=(CameraConfig(width=64, height=48),))).frame(0)
    things = panoptic_spec("synthetic").thing_mask()
    labelled = frame.labels >= 0
    is_thing = labelled & things[np.where(labelled, frame.labels, 0)]
    assert (frame.instances[is_thing] > 0).all() and (frame.instances[~is_thing] == 0).all()
    ids = np.unique(frame.instances[is_thing])
    assert len(ids) >= 3
    for i in ids:  # one class per instance id
        assert len(np.unique(frame.labels[frame.instances == i])) == 1


def write_scan(seq: Path, points: np.ndarray, words: np.ndarray) -> None:
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    points.astype(np.float32).tofile(seq / "velodyne" / "000000.bin")
    words.astype(np.uint32).tofile(seq / "labels" / "000000.label")


def test_semantickitti_instance_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw_sem = rng.choice([10, 30, 40, 70, 252], 200)
    inst = np.where(np.isin(raw_sem, [10, 30, 252]), rng.integers(1, 65536, 200), 0)
    words = encode_labels(raw_sem, inst)
    assert np.array_equal(words & 0xFFFF, raw_sem) and np.array_equal(words >> 16, inst)
    write_scan(tmp_path / "sequences" / "00", rng.normal(size=(200, 4)), words)
    f = SemanticKittiDataset(tmp_path, [0])[0].validate()
    np.testing.assert_array_equal(f.instances, inst)
    np.testing.assert_array_equal(f.labels, [LEARNING_MAP[s] - 1 for s in raw_sem])
    with pytest.raises(ValueError, match="16 bits"):
        encode_labels(np.array([1]), np.array([1 << 16]))


def test_semantickitti_real_scan_instances(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "semantickitti_scan"
    raw = np.fromfile(src / "000000.label", np.uint32)
    seq = tmp_path / "sequences" / "00"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    shutil.copy(src / "000000.bin", seq / "velodyne" / "000000.bin")
    encode_labels(raw & 0xFFFF, raw >> 16).tofile(seq / "labels" / "000000.label")  # re-packed by us
    assert (seq / "labels" / "000000.label").read_bytes() == (src / "000000.label").read_bytes()
    f = SemanticKittiDataset(tmp_path, [0])[0]
    np.testing.assert_array_equal(f.instances, (raw >> 16).astype(np.int64))
    np.testing.assert_array_equal(f.labels, map_labels(raw)[0])
    t = load_panoptic_split("semantickitti_b15n4").training_targets(f.labels, f.instances)
    spec = panoptic_spec("semantickitti")
    cars = t.segment_class == spec.classes.index("car")
    car_ids = np.unique(f.instances[f.labels == spec.classes.index("car")])
    assert cars.sum() == len(car_ids) >= 2  # one segment per car instance of the real scan
