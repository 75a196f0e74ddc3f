"""`PanopticTrainer` on the shared engine (training/synthetic_panoptic_tiny.yaml, SIMULATED teacher):
resume is bit-identical to an uninterrupted run, the LR warmup + cosine schedule is applied, and the
point augmentation is one similarity transform per frame (instances stay per point)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clip3d_core  # noqa: F401  (compat shims first)
from clip3d_core.cli import main as cli_main
from clip3d_core.testing import assert_resumed_like_uninterrupted
from clip3d_core.training import load_train_config, make_trainer
from clip3d_core.training import panoptic_trainer as pt_module
from clip3d_core.training.panoptic_trainer import PanopticTrainer

CONFIG = Path(__file__).resolve().parents[1] / "training" / "synthetic_panoptic_tiny.yaml"
LR = 0.003  # the config's optim.lr


def test_resume_is_bit_identical_and_the_schedule_is_applied(tmp_path: Path) -> None:
    overrides = ["trainer.iterations=5", "trainer.checkpoint_every=2", "trainer.log_every=1",
                 "trainer.precise_bn_batches=1", "data.options.val_frames=1", "optim.warmup_iterations=2",
                 "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]
    cfg = load_train_config(CONFIG, overrides)
    straight = make_trainer(cfg, out_dir=tmp_path / "a")
    assert isinstance(straight, PanopticTrainer)
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)  # warmup: iteration 0 at 1/2
    done = straight.fit()
    # logged after each step: the LR of the next iteration (warmup ends, then cosine to 0.1 x over 3)
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2, 3)]
    assert [h["lr"] for h in done.history] == pytest.approx([LR, LR] + [LR * c for c in cosine])
    # Paused after iteration 3: the newest checkpoint is iteration 2, so iteration 3 is redone.
    make_trainer(cfg, out_dir=tmp_path / "b").fit(stop_at=3)
    resumed = make_trainer(cfg, out_dir=tmp_path / "b", resume=True)
    assert resumed.iteration == 2
    again = resumed.fit()
    assert again.iterations == done.iterations == 5 and "panoptic" in done.metrics
    assert_resumed_like_uninterrupted(straight, resumed, done, again)
    # `clip3d train --resume` takes the panoptic setting too (nothing left to do: the run is complete)
    args = ["train", "--config", str(CONFIG), "--out", str(tmp_path / "b"), "--resume",
            *[a for o in overrides for a in ("--set", o)]]
    assert cli_main(args) == 0


def test_augmentation_is_one_similarity_per_frame(tmp_path: Path, monkeypatch) -> None:
    seen = []
    real = pt_module.training_losses

    def spy(model, task, batch, point_targets, **kwargs):
        seen.append(batch)
        return real(model, task, batch, point_targets, **kwargs)

    monkeypatch.setattr(pt_module, "training_losses", spy)
    cfg = load_train_config(CONFIG, ["trainer.iterations=1", "trainer.precise_bn_batches=0",
                                     "data.options.val_frames=1", "augment.jitter=0.0"])
    trainer = PanopticTrainer(cfg, out_dir=tmp_path)
    frames, batch = next(trainer._loader(0))
    trainer._step(trainer.stages[0], frames, batch)
    aug = seen[0]
    assert aug["labels"] is batch["labels"] and aug["instances"] is batch["instances"]
    lo, hi = cfg.augment.scale
    for b in range(batch["batch_size"]):
        sel = batch["batch_index"] == b
        x, y = batch["points"][sel].double(), aug["points"][sel].double()
        assert not torch.equal(x[:, :3], y[:, :3]) and torch.equal(x[:, 3:], y[:, 3:])
        # y = s R x with R a rotation about z (maybe mirrored): z scales, xy distances scale alike
        s = y[:, 2].abs().sum() / x[:, 2].abs().sum()
        assert lo - 1e-6 <= s <= hi + 1e-6
        np.testing.assert_allclose(y[:, 2].numpy(), (s * x[:, 2]).numpy(), atol=1e-4)
        radius = x[:, :2].norm(dim=1)
        np.testing.assert_allclose(y[:, :2].norm(dim=1).numpy(), (s * radius).numpy(), atol=1e-3)
