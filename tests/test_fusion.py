"""2D-3D fusion trained end to end, and one prediction path: evaluation scores exactly what the
segmenter ships (fusion and score threshold included). Checkpoints carry what inference needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clip3d_core.checkpoint import build_untrained_checkpoint, load_checkpoint
from clip3d_core.clip import load_clip, tiny_clip_config
from clip3d_core.clip.dense import DenseClipEncoder
from clip3d_core.data import SyntheticWorldDataset
from clip3d_core.labels import IGNORE_INDEX, UNLABELLED
from clip3d_core.model import ModelConfig
from clip3d_core.segmenter import Segmenter
from clip3d_core.teacher import ClipTeacher, PointTargets
from clip3d_core.training import Trainer, load_train_config
from clip3d_core.training.validation import FramePredictor

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "synthetic_tiny.yaml"
D = 32


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path):
    tmp = tmp_path_factory.mktemp("fusion")
    cfg = load_train_config(TINY, ["model.fusion=true", "fusion.camera_dropout=0.2", "trainer.iterations=4",
                                   "self_training.enabled=false", "trainer.precise_bn_batches=1",
                                   "data.options.val_frames=1", "trainer.checkpoint_every=0",
                                   f"data.options.cache_dir={frame_cache}"])
    trainer = Trainer(cfg, out_dir=tmp / "run")
    before = {k: v.clone() for k, v in trainer.bare.fusion.state_dict().items()}
    return trainer, before, trainer.fit()


def test_training_feeds_the_fusion_gate(fusion_run) -> None:
    trainer, before, result = fusion_run
    gate = trainer.bare.fusion
    after = gate.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "fusion gate not trained"
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in gate.parameters())
    # Fused and LiDAR-only predictions differ exactly where the camera sees the point.
    frame = trainer.val_set[0]
    model = trainer.bare.eval()
    fused = FramePredictor(model, trainer.text, trainer.device, teacher=trainer.teacher)(frame)
    lidar = FramePredictor(model, trainer.text, trainer.device)(frame)
    changed = (fused.features - lidar.features).abs().sum(1) > 0
    assert changed.sum() > 100 and not changed[~fused.valid].any()
    assert (fused.labels != lidar.labels).any()
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt.model_config.fusion and ckpt.dense.last_block == trainer.cfg.teacher.dense_last_block


def test_camera_dropout_drops_whole_frames(fusion_run) -> None:
    trainer, _, _ = fusion_run
    n = 10
    visible = torch.tensor([True, False] * 5)
    pt = PointTargets(torch.randn(n, D), visible, torch.full((n,), -1), torch.zeros(0, D))
    batch_index = torch.tensor([0] * 5 + [1] * 5)
    gen = torch.Generator().manual_seed(0)
    dropout = trainer.cfg.fusion.camera_dropout
    try:
        trainer.cfg.fusion.camera_dropout = 0.0
        assert torch.equal(trainer._camera_input(pt, batch_index, 2, gen).mask, visible)
        trainer.cfg.fusion.camera_dropout = 1.0
        assert not trainer._camera_input(pt, batch_index, 2, gen).mask.any()
        trainer.cfg.fusion.camera_dropout = 0.5
        masks = [trainer._camera_input(pt, batch_index, 2, gen).mask for _ in range(40)]
        per_frame = {(bool(m[:5].any()), bool(m[5:].any())) for m in masks}
        assert per_frame == {(True, True), (True, False), (False, True), (False, False)}
    finally:
        trainer.cfg.fusion.camera_dropout = dropout


def test_evaluation_labels_equal_the_segmenter_with_fusion_and_threshold(tmp_path: Path) -> None:
    cfg = ModelConfig.small(embed_dim=D, voxel_size=0.2, fusion=True,
                            point_range=(-51.2, -51.2, -4.0, 51.2, 51.2, 8.8))
    vocab = ["car", "road", "building", "vegetation", "person", "pole"]
    path = build_untrained_checkpoint(tmp_path / "fusion.pt", cfg, tiny_clip_config(), vocabulary=vocab)
    frame = SyntheticWorldDataset(load_train_config(TINY).data.typed_options().world, 1)[0]
    seg = Segmenter.from_checkpoint(path)
    full = seg.segment(frame.points, images=frame.images, cameras=frame.cameras)
    cut = float(np.median(full.scores[full.valid]))  # a threshold that removes half the labels
    shipped = seg.segment(frame.points, images=frame.images, cameras=frame.cameras, score_threshold=cut)

    loaded = load_clip(tiny_clip_config())
    teacher = ClipTeacher(DenseClipEncoder(loaded, load_checkpoint(path).dense.last_block))
    model = load_checkpoint(path).build_model()
    evaluated = FramePredictor(model, seg.text_embeddings, torch.device("cpu"), teacher=teacher,
                               score_threshold=cut)(frame)
    labels = evaluated.labels.numpy()
    expected = np.where(labels == IGNORE_INDEX, UNLABELLED, labels).astype(np.uint16)
    np.testing.assert_array_equal(shipped.labels, expected)
    assert (shipped.labels == UNLABELLED).sum() > (~shipped.valid).sum()  # the threshold did cut
    plain = seg.segment(frame.points, score_threshold=cut)
    assert (plain.labels != shipped.labels).any()  # and the cameras did change labels


def test_format_1_checkpoints_still_load(tmp_path: Path) -> None:
    cfg = ModelConfig.small(embed_dim=D, fusion=True)
    path = build_untrained_checkpoint(tmp_path / "new.pt", cfg, tiny_clip_config())
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 2 and raw["dense"] == {"last_block": "value", "short_side": None}
    del raw["dense"]
    raw["format_version"] = 1
    raw["meta"]["train_config"] = {"teacher": {"dense_last_block": "maskclip", "short_side": 448}}
    torch.save(raw, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.format_version == 1 and old.dense.last_block == "maskclip" and old.dense.short_side == 448
    raw["meta"] = {}
    torch.save(raw, tmp_path / "older.pt")
    assert load_checkpoint(tmp_path / "older.pt").dense.last_block == "value"
    seg = Segmenter.from_checkpoint(tmp_path / "old.pt", vocabulary=["car", "road"])
    assert seg.teacher is not None and seg.teacher.short_side == 448


def test_evaluate_command_scores_the_shipped_path(fusion_run, tmp_path: Path) -> None:
    from clip3d_core.cli import main as cli_main

    trainer, _, result = fusion_run
    cache = trainer.cfg.data.typed_options().cache_dir
    base = ["evaluate", "--checkpoint", str(result.final_checkpoint), "--config", str(TINY),
            "--device", "cpu", "--set", "model.fusion=true", "--set", "data.options.val_frames=1",
            "--set", f"data.options.cache_dir={cache}"]
    records = {}
    for name, extra in (("fused", []), ("lidar", ["--no-cameras"]), ("cut", ["--score-threshold", "0.99"])):
        assert cli_main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        records[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert records["fused"]["cameras"] and not records["lidar"]["cameras"]
    assert records["fused"]["miou"] == pytest.approx(result.metrics["clip_guided"]["miou"])
    assert records["cut"]["score_threshold"] == 0.99
    assert records["cut"]["accuracy"] < records["fused"]["accuracy"]  # unlabelled points count as wrong
