"""Tiny end-to-end panoptic training on the synthetic world (SIMULATED CLIP teacher, random text):
the loss falls, novel ground truth never reaches training (bit-identical runs), inference yields
per-point labels / instance ids that the PQ metric accepts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (applies the spconv CPU backward fix first)
from clip3d_core.data import collate_frames
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorld
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig
from clip3d_core.data.synthetic.teacher import SimulatedTeacher, SimulatedTeacherConfig
from clip3d_core.model import ModelConfig
from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticModelConfig, PanopticNet
from clip3d_core.panoptic_quality import PanopticQuality
from clip3d_core.predictor import CameraFeatures, predict_panoptic
from clip3d_core.teacher import PointTargets, frame_point_targets
from clip3d_core.training.panoptic import PanopticTask, training_losses

D = 16
SPLIT = load_panoptic_split("synthetic_b13n4")


@pytest.fixture(scope="module")
def data():
    world = SyntheticWorld(SyntheticConfig(seed=0, lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=360,
                                                                     max_range=30.0),
                                           cameras=(CameraConfig(width=128, height=72),)))
    frames = [world.frame(0), world.frame(6)]
    text = F.normalize(torch.randn(SPLIT.num_classes, D, generator=torch.Generator().manual_seed(0)), dim=1)
    teacher = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, noise=0.1, confusion_prob=0.0))
    targets = PointTargets.cat([frame_point_targets(teacher, f, text)[1] for f in frames])
    return frames, text, targets


def make_model() -> PanopticNet:
    torch.manual_seed(0)
    cfg = PanopticModelConfig(
        ModelConfig.small(embed_dim=D, voxel_size=0.5, point_range=(-32.0, -32.0, -4.0, 32.0, 32.0, 8.0)),
        PanopticHeadConfig(hidden=32, num_thing_queries=10, num_stuff_queries=len(SPLIT.base_stuff_ids),
                           num_layers=2, ffn=64, camera_dropout=0.2))
    return PanopticNet(cfg)


def train(frames, text, targets, iterations: int) -> tuple[PanopticNet, list[dict[str, float]]]:
    model = make_model().train()
    task = PanopticTask(SPLIT, text)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate_frames(frames)
    history = []
    for _ in range(iterations):
        parts = training_losses(model, task, batch, targets)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        history.append(parts.scalars)
    return model, history


def test_tiny_run_loss_falls_and_predicts(data) -> None:
    frames, text, targets = data
    model, history = train(frames, text, targets, 30)
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.7 * first, (first, last)
    for term in ("panoptic_mask", "panoptic_dice", "voxel_distill", "object_distill"):
        key = f"loss/{term}"
        assert np.mean([h[key] for h in history[-5:]]) < np.mean([h[key] for h in history[:5]]), term
    model.eval()
    thing = torch.from_numpy(SPLIT.spec.thing_mask())
    batch = collate_frames(frames)
    with torch.no_grad():
        preds = predict_panoptic(model, batch["points"], text, thing, min_points=SPLIT.spec.min_points,
                                 batch_index=batch["batch_index"],
                                 camera=CameraFeatures(targets.features, targets.visible))
    metric = PanopticQuality(SPLIT.classes, SPLIT.spec.thing_mask(), min_points=SPLIT.spec.min_points,
                             novel=SPLIT.novel_mask())
    for f, p in zip(frames, preds):
        instances = p.extras["instances"]
        assert p.labels.shape == (f.num_points,) and (instances[p.labels < 0] == 0).all()
        is_stuff = p.labels >= 0
        is_stuff[is_stuff.clone()] = ~thing[p.labels[is_stuff]]
        assert (instances[is_stuff] == 0).all() and (instances[~is_stuff & (p.labels >= 0)] > 0).all()
        assert torch.allclose(p.features[p.valid].norm(dim=1), torch.ones(int(p.valid.sum())), atol=1e-5)
        metric.update(p.labels, instances, f.labels, f.instances)
    report = metric.report()
    assert report.summary["pq"] > 0  # 30 iterations on 2 frames: some segment is recognised


def permute_novel(frame, seed: int):
    """The frame with the novel classes' point labels permuted and their instance ids renumbered
    (images and pixel labels, i.e. what the camera sees, unchanged)."""
    novel = np.array(SPLIT.novel_ids)
    labels, inst = frame.labels.copy(), frame.instances.copy()
    hit = np.isin(labels, novel)
    perm = np.random.default_rng(seed).permutation(len(novel))
    labels[hit] = novel[perm][np.searchsorted(novel, labels[hit])]
    inst[hit] = np.where(inst[hit] > 0, inst[hit] + 1000, 0)
    return dataclasses.replace(frame, labels=labels, instances=inst)


def test_novel_ground_truth_never_reaches_training(data) -> None:
    frames, text, targets = data
    assert all(np.isin(f.labels, SPLIT.novel_ids).sum() > 10 for f in frames)
    a, _ = train(frames, text, targets, 3)
    b, _ = train([permute_novel(f, 1) for f in frames], text, targets, 3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # the check has teeth: relabelling base classes the same way does change training
    base_things = np.array(SPLIT.base_thing_ids)
    swapped = []
    for f in frames:
        labels = f.labels.copy()
        hit = np.isin(labels, base_things)
        labels[hit] = np.roll(base_things, 1)[np.searchsorted(base_things, labels[hit])]
        swapped.append(dataclasses.replace(f, labels=labels))
    c, _ = train(swapped, text, targets, 3)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_clip3d_train_panoptic_setting(tmp_path) -> None:
    """`clip3d train` with training/synthetic_panoptic_tiny.yaml: a panoptic checkpoint (carrying the
    config's merge settings) and PQ metrics; `clip3d evaluate` reproduces them and scores the same
    checkpoint at another ``panoptic.instance_gap``."""
    from pathlib import Path

    from clip3d_core.checkpoint import load_checkpoint
    from clip3d_core.cli import main
    from clip3d_core.config import ConfigError
    from clip3d_core.training import load_train_config, make_trainer

    config = Path(__file__).resolve().parents[1] / "training" / "synthetic_panoptic_tiny.yaml"
    gap = ["--set", "panoptic.instance_gap=1.5"]
    args = ["train", "--config", str(config), "--out", str(tmp_path), "--set", "trainer.iterations=3", *gap]
    assert main(args) == 0
    ckpt = load_checkpoint(tmp_path / "final.pt")
    assert ckpt.panoptic is not None and ckpt.panoptic.min_points == 15 and "bus" in ckpt.panoptic.things
    assert ckpt.panoptic.instance_gap == 1.5
    assert ckpt.panoptic.head.num_stuff_queries == len(SPLIT.base_stuff_ids)
    assert isinstance(ckpt.build_model(), PanopticNet)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["panoptic"]
    assert {"pq", "pq_novel_things", "pq_novel_stuff", "miou", "hiou"} <= set(metrics)
    # clip3d evaluate on the checkpoint reproduces the run's own evaluation
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "final.pt"), "--config", str(config)]
    assert main([*evaluate, "--out", str(tmp_path / "eval"), *gap]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"] == metrics
    assert main([*evaluate, "--out", str(tmp_path / "eval_off")]) == 0  # the config's gap (0): accepted
    assert set(json.loads((tmp_path / "eval_off" / "eval.json").read_text())["metrics"]) == set(metrics)
    with pytest.raises(ConfigError, match="disable pseudo"):
        load_train_config(config, ["pseudo.enabled=true"])
    with pytest.raises(ConfigError, match="instance_gap"):
        make_trainer(load_train_config(config, ["panoptic.instance_gap=-1"]), out_dir=tmp_path / "x")


def test_pfc_baseline_from_config(tmp_path, data) -> None:
    """``panoptic.head.classifier: fixed`` (the PFC baseline) trains through `clip3d train`: its classes
    are the split's base classes, and a split that disagrees is refused by the training step."""
    from pathlib import Path

    from clip3d_core.checkpoint import load_checkpoint
    from clip3d_core.cli import main

    config = Path(__file__).resolve().parents[1] / "training" / "synthetic_panoptic_tiny.yaml"
    args = ["train", "--config", str(config), "--out", str(tmp_path), "--set", "trainer.iterations=2",
            "--set", "panoptic.head.classifier=fixed", "--set", "panoptic.head.fusion=false",
            "--set", "loss.object_distill.weight=0", "--set", "loss.voxel_distill.weight=0"]
    assert main(args) == 0
    head = load_checkpoint(tmp_path / "final.pt").panoptic.head
    assert head.classifier == "fixed" and head.base_classes == SPLIT.base_ids and not head.fusion
    frames, text, targets = data
    torch.manual_seed(0)
    model = PanopticNet(dataclasses.replace(make_model().cfg, head=head))
    with pytest.raises(ValueError, match="not the split's base classes"):
        task = PanopticTask(load_panoptic_split("nuscenes_b12n4"), text)
        training_losses(model, task, collate_frames(frames), targets)
