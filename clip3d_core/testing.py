"""Helpers shared by tests, benchmarks and demos (no pytest import here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clip3d_core.training import Trainer, TrainResult

_REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real-sample folder: $CLIP3D_SHARED_DATA, else `<repo>/../shared/data`; None if absent."""
    env = os.environ.get("CLIP3D_SHARED_DATA")
    candidates = [Path(env)] if env else [_REPO.parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


PANOPTIC_VOCABULARY = ("road", "car|automobile", "bus", "person|Pedestrian", "vegetation")
PANOPTIC_THINGS = ("car", "bus", "pedestrian", "bicycle")


def tiny_panoptic_checkpoint(path: str | Path, *, fusion: bool = False, min_points: int = 5,
                             instance_gap: float = 0.0) -> Path:
    """An UNTRAINED tiny panoptic checkpoint (random tiny CLIP, `PANOPTIC_VOCABULARY`, things
    `PANOPTIC_THINGS`) for serving tests: its instances mean nothing, the contract does."""
    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import load_clip, tiny_clip_config
    from clip3d_core.model import ModelConfig
    from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticInfo

    clip = tiny_clip_config()
    head = PanopticHeadConfig(hidden=32, num_thing_queries=8, num_stuff_queries=2, num_layers=1, ffn=64,
                              fusion=fusion)
    # voxel 0.4: at 0.5 the default z range leaves the U-Net's deepest level no z cell
    model = ModelConfig.small(embed_dim=load_clip(clip).identity.embed_dim, voxel_size=0.4)
    return build_untrained_checkpoint(path, model, clip, vocabulary=list(PANOPTIC_VOCABULARY),
                                      panoptic=PanopticInfo(head, PANOPTIC_THINGS, min_points, instance_gap))


def assert_resumed_like_uninterrupted(straight: Trainer, resumed: Trainer, done: TrainResult,
                                      again: TrainResult) -> None:
    """A resumed run ends exactly as the uninterrupted one: bit-identical weights and optimizer
    moments, the same logged losses and the same evaluations."""
    import torch

    a, b = straight.bare.state_dict(), resumed.bare.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in done.history]
    assert again.metrics == done.metrics
