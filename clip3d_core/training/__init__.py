"""Training: CLIP-guided stage, self-training stage, annotation-free setting, open-vocabulary
panoptic setting; DDP via torchrun.

Entry points: `clip3d train --config training/<name>.yaml` (`make_trainer`: `Trainer`, or
`PanopticTrainer` for ``setting: panoptic``), `clip3d evaluate`.
"""

from __future__ import annotations

from pathlib import Path

from clip3d_core.training.config import TrainConfig, apply_overrides, load_train_config
from clip3d_core.training.engine import Trainer, TrainResult


def make_trainer(cfg: TrainConfig, *, out_dir: str | Path | None = None, resume: bool = False) -> Trainer:
    """The trainer of ``cfg.setting``: the panoptic setting plugs its task into the same engine."""
    if cfg.setting == "panoptic":
        from clip3d_core.training.panoptic_trainer import PanopticTrainer

        return PanopticTrainer(cfg, out_dir=out_dir, resume=resume)
    return Trainer(cfg, out_dir=out_dir, resume=resume)


__all__ = ["TrainConfig", "TrainResult", "Trainer", "apply_overrides", "load_train_config", "make_trainer"]
