"""`PanopticTrainer`: `clip3d train` for ``setting: panoptic`` (open-vocabulary panoptic segmentation).

The semantic `Trainer` with the panoptic task plugged into its hooks: the split is a
`PanopticSplit`, the network a `PanopticNet`, one batch's losses `training_losses` (the configured
panoptic terms), evaluation `predict_panoptic` under the configured metrics (add
``panoptic: {options: {dataset: ...}}`` for PQ), and checkpoints carry `PanopticInfo`. Everything
else is the engine's, so the panoptic setting gets the same DDP (torchrun, gloo CPU processes),
resumable iteration sampler, point augmentation (one rigid rotation / mirror / scale per frame plus
a few cm of jitter: instance ids stay per point), LR warmup + schedule, periodic checkpoints +
``--resume``, precise BN, monitor and ``trainer.eval_every``. One stage, named "panoptic"::

    <out>/config.yaml                 resolved TrainConfig
    <out>/checkpoints/iter_*.pt       periodic checkpoints (+ .state.pt sidecars for resuming)
    <out>/final.pt, stage_panoptic.pt panoptic checkpoint (`PanopticInfo` inside)
    <out>/metrics.json                {"panoptic": evaluation, "panoptic@<iteration>": ...}
    <out>/tb/                         TensorBoard scalars

Text: one row per name of every class (`NameEmbeddings`); a class scores the maximum over its names
in training, evaluation and serving. fp32 only: ``trainer.amp`` is ignored (the decoder, the
Hungarian matching and the merge are not validated under autocast).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip3d_core.checkpoint import CheckpointError, load_checkpoint
from clip3d_core.config import ConfigError, from_dict
from clip3d_core.data import ZeroShotSplit
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.losses import LossParts
from clip3d_core.model import ModelConfig, sparse_backend
from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticInfo, PanopticModelConfig, PanopticNet
from clip3d_core.training.augment import augment_points
from clip3d_core.training.config import TrainConfig
from clip3d_core.training.data import build_model_config
from clip3d_core.training.engine import Trainer
from clip3d_core.training.panoptic import PanopticTask, training_losses
from clip3d_core.training.stages import Stage
from clip3d_core.training.validation import PanopticFramePredictor, summary

log = logging.getLogger(__name__)


class PanopticTrainer(Trainer):
    """`Trainer` for ``setting: panoptic``: overrides the task hooks only (module doc)."""

    def __init__(self, cfg: TrainConfig, *, out_dir: str | Path | None = None, resume: bool = False) -> None:
        if cfg.setting != "panoptic":
            raise ConfigError(f"PanopticTrainer runs setting 'panoptic', not {cfg.setting!r}")
        if cfg.panoptic.instance_gap < 0:
            raise ConfigError(f"panoptic.instance_gap must be >= 0 (0 = off): {cfg.panoptic.instance_gap}")
        super().__init__(cfg, out_dir=out_dir, resume=resume)
        self._set_names()

    def _set_names(self) -> None:
        """One text row per name (a class scores the maximum over its names) from the run's bank;
        `self.text` keeps one row per class for the teacher."""
        self.names = self.bank.lookup_names(self.vocab).to(self.device)
        self.task = PanopticTask(self.panoptic_split, self.names, self.cfg.loss)

    # ------------------------------------------------------------------ the engine's hooks
    def _build_split(self) -> ZeroShotSplit:
        self.panoptic_split = load_panoptic_split(self.cfg.panoptic.split)
        return self.panoptic_split.semantic

    def _model_config(self) -> PanopticModelConfig:
        # the split fixes the stuff queries and, for the PFC baseline's fixed classifier, its classes
        split, head_cfg = self.panoptic_split, self.cfg.panoptic.head
        fixed = {"base_classes": split.base_ids} if head_cfg.get("classifier") == "fixed" else {}
        head = from_dict(PanopticHeadConfig, {
            **head_cfg, "num_stuff_queries": len(split.base_stuff_ids),
            "camera_dropout": self.cfg.fusion.camera_dropout, **fixed}, where="panoptic.head")
        return PanopticModelConfig(build_model_config(self.cfg, self.identity.embed_dim), head)

    def _build_network(self) -> nn.Module:
        return PanopticNet(self.model_cfg, backend=sparse_backend.for_device(self.device))

    def _needs_teacher(self) -> bool:
        distill = any(t.reads_teacher for t in self.loss_terms)
        return self.model_cfg.head.reads_camera or distill

    def _amp_dtype(self) -> torch.dtype | None:
        if self.cfg.trainer.amp != "off" and self.device.type == "cuda":
            log.warning("trainer.amp %r ignored: panoptic training runs in fp32", self.cfg.trainer.amp)
        return None

    def _checkpoint_model(self) -> tuple[ModelConfig, PanopticInfo | None]:
        spec = self.panoptic_split.spec
        return self.model_cfg.model, PanopticInfo(self.model_cfg.head, spec.things, spec.min_points,
                                                  self.cfg.panoptic.instance_gap)

    def _meta(self, stage: str) -> dict[str, Any]:
        return {**super()._meta(stage), "split": self.panoptic_split.to_dict()}

    def _losses(self, stage: Stage, frames: list, batch: dict[str, Any], gen: torch.Generator
                ) -> tuple[LossParts, dict[str, float]]:
        points = batch["points"].to(self.device, non_blocking=True)
        batch_index = batch["batch_index"].to(self.device, non_blocking=True)
        pt = self._point_targets(frames)  # on the original points: the pixel correspondence is fixed
        aug = augment_points(points, batch_index, len(frames), self.cfg.augment, gen)
        self.model.train()
        # Camera drop-out happens inside the network (per sample, distillation targets kept), drawn
        # from this iteration's generator (the global RNG would make a resumed run differ).
        batch = {**batch, "points": aug, "batch_index": batch_index}
        parts = training_losses(self.bare, self.task, batch, pt, forward=self.model, generator=gen)
        return parts, {}

    def _model_scalars(self) -> dict[str, float]:
        scale = getattr(self.bare.classifier, "scale", None)  # the cosine head's (not the fixed one's)
        return {} if scale is None else {"logit_scale": float(scale.detach())}

    # ------------------------------------------------------------------ evaluation
    def predictor(self) -> PanopticFramePredictor:
        """The model on one frame as the segmenter runs it (camera features when
        ``evaluation.cameras`` and the head fuses them; the configured score threshold)."""
        e, split = self.cfg.evaluation, self.panoptic_split
        return PanopticFramePredictor(self.bare, self.names, torch.from_numpy(split.spec.thing_mask()),
                                      self._checkpoint_model()[1], self.device,
                                      teacher=self.teacher if e.cameras else None, text=self.text,
                                      score_threshold=e.score_threshold)

    def evaluate(self) -> dict[str, Any]:
        """The configured metrics' results (`Trainer._evaluate_metrics`: the split's classes, the
        novel ones unseen), without the semantic trainer's per-class report."""
        return summary(self._evaluate_metrics())

    def load_checkpoint(self, path: str | Path) -> None:
        """Evaluate a trained panoptic checkpoint instead of the fresh model: its weights, and the
        name vectors its stored text bank gives this config's vocabulary. The merge's
        ``instance_gap`` is the config's (an inference setting: one model scored at several gaps)."""
        ckpt = load_checkpoint(path, self.identity)
        if ckpt.panoptic is None:
            raise CheckpointError(f"{path} is not a panoptic checkpoint")
        ckpt_info = replace(ckpt.panoptic, instance_gap=self.cfg.panoptic.instance_gap)
        if (ckpt.model_config, ckpt_info) != self._checkpoint_model():
            raise CheckpointError(f"{path}: its model {ckpt.model_config} / {ckpt.panoptic} differs from the "
                                  f"config's {self._checkpoint_model()}")
        self.bare.load_state_dict(ckpt.state_dict)
        if ckpt.text_bank is not None:
            self.bank = ckpt.text_bank
            self.text = self.bank.lookup(self.vocab).to(self.device)
            self._set_names()
