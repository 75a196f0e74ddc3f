"""Segmenter on a real SemanticKITTI scan with a tiny random CLIP and an untrained small model.

The labels of an untrained model mean nothing; what is checked is the contract: one output per
point in input order, invalid points flagged without disturbing the others, vocabulary changes that
touch only the text side, bit-identical reloads, bank == text tower, and the image fusion path.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import clip3d_core  # noqa: F401
from clip3d_core import SegmentationResult, Segmenter
from clip3d_core import segmenter as segmenter_module
from clip3d_core.checkpoint import (
    CheckpointError,
    build_untrained_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from clip3d_core.clip import (
    ClipIdentity,
    EmbeddingBank,
    TextEncoder,
    VocabularyError,
    load_clip,
    tiny_clip_config,
)
from clip3d_core.geometry import PinholeCamera, project_points
from clip3d_core.io import read_cloud
from clip3d_core.labels import UNLABELLED
from clip3d_core.model import ModelConfig
from clip3d_core.segmenter import SegmenterInputError

D = 32
VOCAB = ["car|automobile", "road", "building", "vegetation", "person|pedestrian", "pole"]
# A coarser grid than the preset keeps the 123k-point runs quick on a shared CPU.
MODEL_CFG = ModelConfig.small(embed_dim=D, voxel_size=0.2)


@pytest.fixture(scope="module")
def scan(shared_data: Path) -> np.ndarray:
    return read_cloud(shared_data / "semantickitti_scan" / "000000.bin")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seg") / "model.pt"
    return build_untrained_checkpoint(path, MODEL_CFG, tiny_clip_config(), vocabulary=VOCAB, seed=0)


@pytest.fixture(scope="module")
def seg(ckpt: Path) -> Segmenter:
    return Segmenter.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def clean(seg: Segmenter, scan: np.ndarray) -> SegmentationResult:
    return seg.segment(scan, return_features=True)


def in_range(points: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    lo, hi = np.array(cfg.point_range[:3]), np.array(cfg.point_range[3:])
    with np.errstate(invalid="ignore"):
        xyz = points[:, :3]
        return np.isfinite(points[:, :4]).all(1) & (xyz >= lo).all(1) & (xyz < hi).all(1)


def test_one_output_per_point_with_the_promised_types(clean: SegmentationResult, scan: np.ndarray) -> None:
    n = len(scan)
    assert n > 120_000
    assert clean.labels.shape == (n,) and clean.labels.dtype == np.uint16
    assert clean.scores.shape == (n,) and clean.scores.dtype == np.float32
    assert clean.valid.shape == (n,) and clean.valid.dtype == np.bool_
    assert np.array_equal(clean.valid, in_range(scan, MODEL_CFG))
    v = clean.valid
    assert (clean.labels[v] < len(VOCAB)).all() and (clean.labels[~v] == UNLABELLED).all()
    assert (clean.scores[v] > 1.0 / len(VOCAB) - 1e-6).all() and (clean.scores[v] <= 1.0).all()
    assert (clean.scores[~v] == 0).all()
    assert len(np.unique(clean.labels[v])) >= 2  # else the order checks below prove nothing
    assert clean.vocabulary.names == ["car", "road", "building", "vegetation", "person", "pole"]
    assert {"voxelise", "backbone", "classify", "total"} <= set(clean.timings_ms)
    assert clean.timings_ms["total"] >= clean.timings_ms["backbone"] > 0
    assert clean.features.shape == (n, D) and (clean.features[~v] == 0).all()
    assert sum(clean.class_counts().values()) == n


def test_output_follows_input_order(seg: Segmenter, scan: np.ndarray, clean: SegmentationResult) -> None:
    perm = np.random.default_rng(1).permutation(len(scan))
    shuffled = seg.segment(scan[perm])
    # Voxel means are summed in another order, so allow last-bit differences (near-ties may flip).
    assert np.array_equal(shuffled.valid, clean.valid[perm])
    assert np.mean(shuffled.labels == clean.labels[perm]) > 0.999
    assert np.allclose(shuffled.scores, clean.scores[perm], atol=1e-4)


def test_bad_points_are_unlabelled_in_place(
    seg: Segmenter, scan: np.ndarray, clean: SegmentationResult
) -> None:
    rng = np.random.default_rng(0)
    bad_rows = np.tile(scan[:1], (60, 1))
    bad_rows[0:10, 0] = np.nan
    bad_rows[10:20, 1] = np.inf
    bad_rows[20:30, 2] = -np.inf
    bad_rows[30:40, 3] = np.nan  # finite xyz, NaN intensity
    bad_rows[40:50, :3] = [500.0, 0.0, 0.0]  # far outside the range
    bad_rows[50:60, 2] = -30.0
    at = np.sort(rng.choice(len(scan), size=len(bad_rows), replace=False))
    pts = np.insert(scan, at, bad_rows, axis=0)  # scattered through the cloud
    bad = np.zeros(len(pts), dtype=bool)
    bad[at + np.arange(len(at))] = True
    res = seg.segment(pts)
    assert len(res.labels) == len(pts)
    assert (res.labels[bad] == UNLABELLED).all() and (res.scores[bad] == 0).all() and not res.valid[bad].any()
    # Every other point keeps exactly its clean output: bad rows never reach the network.
    assert np.array_equal(res.labels[~bad], clean.labels)
    assert np.array_equal(res.scores[~bad], clean.scores)


def test_vocabulary_change_touches_only_the_text_side(
    ckpt: Path, scan: np.ndarray, clean: SegmentationResult
) -> None:
    seg = Segmenter.from_checkpoint(ckpt)
    calls = []
    handle = seg.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    old = seg.vocabulary
    new = seg.set_vocabulary(["truck", "sidewalk", "traffic sign"])
    assert calls == []  # re-encoding text never runs the 3D network
    assert new.version > old.version and seg.vocabulary is new
    res = seg.segment(scan, return_features=True)
    handle.remove()
    assert np.array_equal(res.features, clean.features)
    assert (res.labels[res.valid] < 3).all() and res.vocabulary.names == ["truck", "sidewalk", "traffic sign"]
    cos = res.features[res.valid] @ seg.text_embeddings.numpy().T
    assert np.mean(cos.argmax(1) == res.labels[res.valid]) > 0.999
    # A per-call vocabulary labels that call only.
    once = seg.segment(scan[:5000], vocabulary=["car", "road"])
    assert (once.labels[once.valid] < 2).all() and seg.vocabulary is new


def test_reloaded_checkpoint_is_bit_identical(
    ckpt: Path, scan: np.ndarray, clean: SegmentationResult, tmp_path: Path
) -> None:
    loaded = load_checkpoint(ckpt)
    resaved = save_checkpoint(
        tmp_path / "again.pt",
        loaded.build_model(),
        loaded.model_config,
        loaded.clip_config,
        loaded.identity,
        vocabulary=loaded.vocabulary,
    )
    res = Segmenter.from_checkpoint(resaved).segment(scan)
    assert np.array_equal(res.labels, clean.labels)
    assert np.array_equal(res.scores, clean.scores)


def test_embedding_bank_matches_text_tower(
    ckpt: Path, scan: np.ndarray, clean: SegmentationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = EmbeddingBank.from_text_encoder(TextEncoder(load_clip(tiny_clip_config())), [*VOCAB, "truck"])
    bank_path = bank.save(tmp_path / "bank.pt")
    seg = Segmenter.from_checkpoint(ckpt, embedding_bank=bank_path)
    assert isinstance(seg.text_source, EmbeddingBank) and seg.dense is None  # no CLIP needed
    res = seg.segment(scan)
    assert np.array_equal(res.labels, clean.labels)
    assert np.allclose(res.scores, clean.scores, atol=1e-6)
    with pytest.raises(VocabularyError, match="giraffe"):
        seg.set_vocabulary(["car", "giraffe"])
    before = seg.vocabulary
    with pytest.raises(VocabularyError, match="giraffe"):  # up front, nothing encoded or installed
        seg.check_vocabulary(["car", "giraffe"])
    seg.check_vocabulary(["truck", "car"])
    assert seg.vocabulary is before

    # The bank a (training) checkpoint stores: a vehicle needs no CLIP weights at all.
    c = load_checkpoint(ckpt)
    stored = save_checkpoint(tmp_path / "with_bank.pt", c.build_model(), c.model_config, c.clip_config,
                             c.identity, vocabulary=VOCAB, text_bank=bank)
    monkeypatch.setattr(segmenter_module, "load_clip", lambda *a, **k: pytest.fail("CLIP was loaded"))
    offline = Segmenter.from_checkpoint(stored, embedding_bank="checkpoint")
    assert np.array_equal(offline.segment(scan).labels, clean.labels)
    with pytest.raises(CheckpointError, match="no text embedding bank"):
        Segmenter.from_checkpoint(ckpt, embedding_bank="checkpoint")
    monkeypatch.undo()

    foreign = EmbeddingBank(bank.names, bank.vectors, ClipIdentity("clip3d-tiny", "random:9", D))
    with pytest.raises(CheckpointError, match="identity mismatch"):
        Segmenter.from_checkpoint(ckpt, embedding_bank=foreign)
    with pytest.raises(CheckpointError, match="identity mismatch"):
        Segmenter.from_checkpoint(ckpt, clip=tiny_clip_config(seed=9))


def forward_camera(width: int = 128, height: int = 96) -> PinholeCamera:
    """Looking along +x of the LiDAR (x forward, y left, z up -> optical x right, y down, z forward)."""
    T = np.eye(4)
    T[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]
    T[:3, 3] = [0.0, -0.1, 0.0]
    K = np.array([[70.0, 0, width / 2], [0, 70.0, height / 2], [0, 0, 1]])
    return PinholeCamera("front", K, width, height, T)


def test_images_and_cameras_feed_the_fusion_model(scan: np.ndarray, tmp_path: Path) -> None:
    cfg = ModelConfig.small(embed_dim=D, voxel_size=0.2, fusion=True)
    path = build_untrained_checkpoint(tmp_path / "fusion.pt", cfg, tiny_clip_config(), vocabulary=VOCAB)
    seg = Segmenter.from_checkpoint(path)
    cam = forward_camera()
    yy, xx = np.mgrid[0:96, 0:128]
    image = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)
    scan = scan[::3]  # a third of the scan is plenty here
    plain = seg.segment(scan, return_features=True)
    fused = seg.segment(scan, images=[image], cameras=[cam], return_features=True)
    assert "image" in fused.timings_ms and "image" not in plain.timings_ms
    assert np.array_equal(fused.valid, plain.valid)

    xyz = torch.from_numpy(scan[plain.valid, :3])
    cam_idx, _ = project_points(xyz, [cam]).first_visible()
    seen = np.zeros(len(scan), dtype=bool)
    seen[np.flatnonzero(plain.valid)[cam_idx.numpy() >= 0]] = True
    changed = np.abs(fused.features - plain.features).sum(1) > 0
    assert seen.sum() > 500
    assert np.array_equal(changed, seen)  # exactly the points the camera sees took CLIP features
    assert np.array_equal(fused.labels[~seen], plain.labels[~seen])


def test_bad_inputs_raise_named_errors(seg: Segmenter, scan: np.ndarray, ckpt: Path) -> None:
    with pytest.raises(SegmenterInputError, match=r"\[N, >=3\]"):
        seg.segment(scan[:, :2])
    with pytest.raises(SegmenterInputError, match="numeric"):
        seg.segment(np.array([["a", "b", "c"]]))
    with pytest.raises(SegmenterInputError, match="together"):
        seg.segment(scan, images=[np.zeros((96, 128, 3), np.uint8)])
    with pytest.raises(SegmenterInputError, match="camera 'front'"):
        seg.segment(scan, images=[np.zeros((90, 128, 3), np.uint8)], cameras=[forward_camera()])
    with pytest.raises(SegmenterInputError, match="uint8"):
        seg.segment(scan, images=[np.zeros((96, 128, 3), np.float32)], cameras=[forward_camera()])
    for call in (lambda: seg.set_vocabulary("car"), lambda: seg.segment(scan[:10], vocabulary="car")):
        with pytest.raises(VocabularyError, match="one string"):  # not the classes c, a, r
            call()
    stacked = seg.segment(scan[:10], images=np.zeros((1, 96, 128, 3), np.uint8), cameras=[forward_camera()])
    assert stacked.labels.shape == (10,)  # images as one [M, H, W, 3] array are fine too
    empty = seg.segment(np.zeros((0, 4), np.float32))
    assert empty.labels.shape == (0,) and empty.labels.dtype == np.uint16 and empty.scores.dtype == np.float32
    no_vocab = Segmenter(load_checkpoint(ckpt).build_model(), ClipIdentity("clip3d-tiny", "random:0", D))
    with pytest.raises(VocabularyError, match="no vocabulary"):
        no_vocab.segment(scan[:10])
    with pytest.raises(VocabularyError, match="no text encoder"):
        no_vocab.set_vocabulary(["car"])
    with pytest.raises(VocabularyError, match=r"\[2, 32\]"):
        no_vocab.swap_vocabulary(seg.vocabulary.__class__.from_strings(["a", "b"]), torch.ones(3, D))


def test_score_threshold_and_xyz_only_input(seg: Segmenter, scan: np.ndarray) -> None:
    part = scan[:5000]
    base = seg.segment(part)
    cut = float(np.median(base.scores[base.valid]))
    res = seg.segment(part, score_threshold=cut)
    low = base.valid & (base.scores < cut)
    assert low.sum() > 0 and (res.labels[low] == UNLABELLED).all()
    assert np.array_equal(res.labels[~low], base.labels[~low]) and np.array_equal(res.scores, base.scores)
    xyz_only = seg.segment(part[:, :3])  # intensity missing: padded with zeros
    zero_i = part.copy()
    zero_i[:, 3] = 0
    assert np.array_equal(xyz_only.labels, seg.segment(zero_i).labels)


def test_swaps_during_segmentation_stay_consistent(ckpt: Path, scan: np.ndarray) -> None:
    seg = Segmenter.from_checkpoint(ckpt)
    a = seg.encode_vocabulary(["car", "road"])
    b = seg.encode_vocabulary(["car", "road", "building", "pole", "person"])
    assert b[0].version > a[0].version
    assert seg.swap_vocabulary(*b) and not seg.swap_vocabulary(*a)  # stale encoding dropped
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            vocab, text = seg.encode_vocabulary(["car", "road"] if i % 2 else VOCAB)
            seg.swap_vocabulary(vocab, text)
            i += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(4):
            res = seg.segment(scan[:4000])
            assert (res.labels[res.valid] < len(res.vocabulary)).all()
    finally:
        stop.set()
        thread.join()


def test_segment_command_writes_labels_png_and_summary(scan: np.ndarray, tmp_path: Path, ckpt: Path) -> None:
    import json

    from clip3d_core.cli import main
    from clip3d_core.io import read_labels

    cloud = tmp_path / "part.npy"
    np.save(cloud, scan[:3000])
    out = tmp_path / "out"
    assert (
        main(["segment", str(cloud), "--checkpoint", str(ckpt), "--out", str(out), "--log-level", "ERROR"])
        == 0
    )
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.uint16 and labels.shape == (3000,)
    assert np.array_equal(read_labels(out / "labels.label", expected=3000)[0], labels)
    assert np.load(out / "scores.npy").dtype == np.float32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"] == 3000 and summary["untrained"] is False
    assert sum(summary["class_counts"].values()) == 3000
    assert [e["name"] for e in summary["vocabulary"]["entries"]][:2] == ["car", "road"]  # the checkpoint's
    assert (out / "bev.png").stat().st_size > 1000
    # No checkpoint needs an explicit opt-in to random weights.
    assert main(["segment", str(cloud), "--out", str(tmp_path / "x"), "--log-level", "CRITICAL"]) == 2
    assert not (tmp_path / "x").exists()
