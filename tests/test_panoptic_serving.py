"""Panoptic checkpoints served by the one inference path: `Segmenter.segment` gives the instance ids of
`predict_panoptic` per point in input order, and `label_frame` (node, label-bag, demo) carries them
into the labelled cloud's `instance` field. An untrained tiny model: the ids mean nothing, the
contract is what is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip3d_core.clip import Vocabulary
from clip3d_core.clip.text import name_classes
from clip3d_core.labels import UNLABELLED
from clip3d_core.model.panoptic import PanopticNet
from clip3d_core.predictor import predict_panoptic
from clip3d_core.segmenter import Segmenter, thing_mask
from clip3d_core.testing import PANOPTIC_THINGS, PANOPTIC_VOCABULARY, tiny_panoptic_checkpoint
from clip3d_ros import conversions
from clip3d_ros.labelling import DecodedCloud, label_frame

VOCAB = list(PANOPTIC_VOCABULARY)
THINGS = PANOPTIC_THINGS
MIN_POINTS = 5


def cloud(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-15.0, -15.0, -1.7], [15.0, 15.0, 1.3], size=(n, 3))
    return np.concatenate([xyz, rng.uniform(size=(n, 1))], 1).astype(np.float32)


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return Segmenter.from_checkpoint(tiny_panoptic_checkpoint(tmp_path_factory.mktemp("pan") / "pan.pt"))


def test_thing_mask_matches_any_name_case_insensitively() -> None:
    vocab = Vocabulary.from_strings(VOCAB)
    assert thing_mask(vocab, THINGS).tolist() == [False, True, True, True, False]


def test_segment_returns_the_instances_of_predict_panoptic(seg: Segmenter) -> None:
    assert seg.panoptic is not None and isinstance(seg.model, PanopticNet)
    pts = cloud(3000, 0)
    pts[7] = np.nan  # a bad point: unlabelled, no instance, the others untouched
    pts[11, :3] = 500.0  # outside the grid
    result = seg.segment(pts)
    assert result.instances is not None and result.instances.dtype == np.uint32
    assert len(result.instances) == len(result.labels) == len(pts)

    thing = torch.from_numpy(thing_mask(seg.vocabulary, THINGS))
    with torch.inference_mode():
        (ref,) = predict_panoptic(seg.model, torch.from_numpy(pts), seg.text_embeddings, thing,
                                  min_points=MIN_POINTS, name_class=name_classes(seg.vocabulary.entries))
    np.testing.assert_array_equal(result.instances, ref.extras["instances"].numpy())
    ref_labels = ref.labels.numpy()
    np.testing.assert_array_equal(result.labels, np.where(ref_labels >= 0, ref_labels, UNLABELLED))
    np.testing.assert_allclose(result.scores, ref.scores.numpy())
    np.testing.assert_array_equal(result.valid, ref.valid.numpy())

    # the stages `clip3d bench` reports; point embeddings only when asked for (costly, unused here)
    stages = ("voxelise", "backbone", "decoder", "merge", "classify")
    assert set(result.timings_ms) == {*stages, "total"} and result.features is None
    assert 0 < sum(result.timings_ms[s] for s in stages) <= result.timings_ms["total"]
    assert not result.valid[[7, 11]].any() and (result.instances[[7, 11]] == 0).all()
    assert (result.labels[[7, 11]] == UNLABELLED).all()
    # ids only on thing classes, 1..K with each id one class; stuff and unlabelled points get 0
    labelled_thing = (result.labels != UNLABELLED) & np.isin(result.labels, np.flatnonzero(thing.numpy()))
    assert result.instances.max() > 0, "the test needs at least one instance"
    assert (result.instances[~labelled_thing] == 0).all() and (result.instances[labelled_thing] > 0).all()
    ids = np.unique(result.instances[result.instances > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1))
    for i in ids:
        assert len(np.unique(result.labels[result.instances == i])) == 1
        assert (result.instances == i).sum() >= MIN_POINTS


def test_score_threshold_drops_labels_and_instances(seg: Segmenter) -> None:
    pts = cloud(1500, 1)
    full = seg.segment(pts)
    cut = float(np.median(full.scores[full.instances > 0]))
    part = seg.segment(pts, score_threshold=cut)
    low = full.scores < cut
    assert low.any() and (~low & (full.instances > 0)).any()
    assert (part.labels[low] == UNLABELLED).all() and (part.instances[low] == 0).all()
    np.testing.assert_array_equal(part.instances[~low], full.instances[~low])


def test_a_new_vocabulary_rescores_the_same_queries(seg: Segmenter) -> None:
    """The vocabulary stays live: no thing class in it -> no instance; things only -> ids wherever
    a segment survives."""
    pts = cloud(1500, 6)
    stuff = seg.segment(pts, vocabulary=["road", "vegetation", "building"])
    assert (stuff.instances == 0).all() and (stuff.labels != UNLABELLED).any()
    things = seg.segment(pts, vocabulary=["car", "bus|coach"])
    kept = things.labels != UNLABELLED
    assert kept.any() and (things.instances[kept] > 0).all() and (things.instances[~kept] == 0).all()


def test_label_frame_carries_instances_into_the_cloud(seg: Segmenter) -> None:
    pts = cloud(2000, 2)
    frame = label_frame(seg.segment, DecodedCloud(pts, True, 1), [], [], vocabulary=seg.vocabulary,
                        panoptic=True)
    assert frame.records.dtype.names[-1] == "instance"
    back = conversions.cloud_to_array(conversions.array_to_cloud(frame.records))
    np.testing.assert_array_equal(back["instance"], frame.result.instances)
    np.testing.assert_array_equal(back["label"], frame.result.labels)
    # an empty cloud keeps the panoptic layout (one layout per topic); a semantic frame has none
    empty = label_frame(seg.segment, DecodedCloud(np.zeros((0, 4), np.float32), True, 1), [], [],
                        vocabulary=seg.vocabulary, panoptic=True)
    assert empty.records.dtype == frame.records.dtype and len(empty.records) == 0
    semantic = label_frame(seg.segment, DecodedCloud(pts, True, 1), [], [], vocabulary=seg.vocabulary)
    assert "instance" not in semantic.records.dtype.names


def test_fusion_head_reads_camera_features_through_the_camera_source(tmp_path: Path) -> None:
    """A fusion panoptic model fed an image: the image stage runs and the points a camera sees can
    change; without images the model runs LiDAR-only (its learned no-image vector)."""
    from clip3d_core.geometry import PinholeCamera

    seg = Segmenter.from_checkpoint(tiny_panoptic_checkpoint(tmp_path / "fused.pt", fusion=True))
    pts = cloud(2000, 3)
    K = np.array([[60.0, 0.0, 64.0], [0.0, 60.0, 48.0], [0.0, 0.0, 1.0]])
    T = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    cam = PinholeCamera("front", K, 128, 96, T)  # looking along +x
    yy, xx = np.mgrid[0:96, 0:128]
    image = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)
    plain = seg.segment(pts, return_features=True)
    voxelise = seg.model.voxelize
    calls = []
    seg.model.voxelize = lambda *a: calls.append(1) or voxelise(*a)  # type: ignore[method-assign]
    fused = seg.segment(pts, images=[image], cameras=[cam], return_features=True)
    del seg.model.voxelize
    assert len(calls) == 1, "the camera source's voxelisation is the network's"
    assert "image" in fused.timings_ms and "image" not in plain.timings_ms
    assert fused.instances is not None and np.array_equal(fused.valid, plain.valid)
    assert not np.allclose(fused.features, plain.features)


def test_segment_command_writes_instances(tmp_path: Path) -> None:
    import json

    from clip3d_core.cli import main
    from clip3d_core.io import read_labels

    ckpt = tiny_panoptic_checkpoint(tmp_path / "pan.pt")
    np.save(tmp_path / "cloud.npy", cloud(2000, 5))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "cloud.npy"), "--checkpoint", str(ckpt), "--out", str(out),
                 "--log-level", "ERROR"]) == 0
    instances = np.load(out / "instances.npy")
    assert instances.dtype == np.uint32 and instances.shape == (2000,) and instances.max() > 0
    labels, packed_instances = read_labels(out / "labels.label", expected=2000)
    np.testing.assert_array_equal(labels, np.load(out / "labels.npy"))
    np.testing.assert_array_equal(packed_instances, instances)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == len(np.unique(instances[instances > 0]))
    assert "instances.npy" in summary["files"]
