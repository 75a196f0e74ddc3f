"""`PanopticTrainer`: `clip3d train` for ``setting: panoptic`` (open-vocabulary panoptic segmentation).

One process (no DDP, no resume yet). The data, CLIP, text and teacher come from the same builders as
the semantic `Trainer`; the model is a `PanopticNet`, the loss the configured list of terms (the
panoptic ones: `clip3d_core.losses.terms.panoptic`), evaluation the configured metrics (add
``panoptic: {options: {dataset: ...}}`` for PQ) on `predict_panoptic` outputs. Run directory::

    <out>/config.yaml     resolved TrainConfig
    <out>/final.pt        panoptic checkpoint (`PanopticInfo` inside)
    <out>/metrics.json    {"panoptic": evaluation results}
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from clip3d_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clip3d_core.clip import load_clip
from clip3d_core.config import ConfigError, from_dict, to_dict
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.metrics import GroundTruth, MetricContext, build_metrics, merged_results
from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticInfo, PanopticModelConfig, PanopticNet
from clip3d_core.predictor import CameraFeatures, predict_panoptic
from clip3d_core.teacher import PointTargets, frame_point_targets
from clip3d_core.training import state as st
from clip3d_core.training.config import TrainConfig
from clip3d_core.training.data import (
    build_datasets,
    build_model_config,
    build_teacher,
    build_text,
    build_vocabulary,
    collate,
)
from clip3d_core.training.engine import TrainResult
from clip3d_core.training.panoptic import PanopticTask, training_losses

log = logging.getLogger(__name__)


class PanopticTrainer:
    def __init__(self, cfg: TrainConfig, *, out_dir: str | Path | None = None) -> None:
        if cfg.setting != "panoptic":
            raise ConfigError(f"PanopticTrainer runs setting 'panoptic', not {cfg.setting!r}")
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else cfg.output_dir
        if cfg.trainer.cpu_threads > 0:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        st.seed_everything(cfg.trainer.seed)
        self.panoptic_split = load_panoptic_split(cfg.panoptic.split)
        split = self.panoptic_split.semantic
        self.loaded = load_clip(cfg.clip, "cpu")
        self.vocab = build_vocabulary(cfg, split)
        self.text, self.bank = build_text(cfg, self.loaded, self.vocab)
        self.train_set, self.val_set = build_datasets(cfg.data, split)
        self.teacher = build_teacher(cfg.teacher, self.loaded)
        # the split fixes the stuff queries and, for the PFC baseline's fixed classifier, its classes
        split_ids = self.panoptic_split.base_ids
        fixed = {"base_classes": split_ids} if cfg.panoptic.head.get("classifier") == "fixed" else {}
        head = from_dict(PanopticHeadConfig, {
            **cfg.panoptic.head, "num_stuff_queries": len(self.panoptic_split.base_stuff_ids),
            "camera_dropout": cfg.fusion.camera_dropout, **fixed}, where="panoptic.head")
        self.model_cfg = PanopticModelConfig(build_model_config(cfg, self.bank.identity.embed_dim), head)
        self.model = PanopticNet(self.model_cfg)
        self.task = PanopticTask(self.panoptic_split, self.text, cfg.loss)
        self._teacher_cache: dict[str, PointTargets] = {}

    def _point_targets(self, frame: Any) -> PointTargets:
        """The frozen teacher's features at the frame's points (cached with ``teacher.cache``)."""
        if frame.frame_id in self._teacher_cache:
            return self._teacher_cache[frame.frame_id]
        targets = frame_point_targets(self.teacher, frame, self.text)[1]
        if self.cfg.teacher.cache:
            self._teacher_cache[frame.frame_id] = targets
        return targets

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        o = cfg.optim
        opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        loader = DataLoader(self.train_set, batch_size=cfg.trainer.batch_size, shuffle=True,
                            num_workers=cfg.trainer.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.trainer.seed))
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        history: list[dict[str, float]] = []
        self.model.train()
        for iteration in range(cfg.trainer.iterations):
            frames, batch = next(batches)
            targets = PointTargets.cat([self._point_targets(f) for f in frames])
            parts = training_losses(self.model, self.task, batch, targets)
            opt.zero_grad()
            parts.total.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            opt.step()
            history.append(parts.scalars)
            if cfg.trainer.log_every and (iteration + 1) % cfg.trainer.log_every == 0:
                log.info("panoptic iteration %d: %s", iteration + 1,
                         {k: round(v, 4) for k, v in parts.scalars.items()})
        metrics = {"panoptic": self.evaluate()}
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        spec = self.panoptic_split.spec
        final = save_checkpoint(
            self.out_dir / "final.pt", self.model, self.model_cfg.model, cfg.clip, self.bank.identity,
            vocabulary=self.vocab, text_bank=self.bank,
            meta={"setting": "panoptic", "split": self.panoptic_split.to_dict(), "metrics": metrics,
                  "iterations": cfg.trainer.iterations},
            panoptic=PanopticInfo(self.model_cfg.head, spec.things, spec.min_points))
        return TrainResult(self.out_dir, final, cfg.trainer.iterations, metrics, history)

    def load_checkpoint(self, path: str | Path) -> None:
        """Evaluate a trained panoptic checkpoint instead of the fresh model: its weights, and the
        class vectors its stored text bank gives this config's vocabulary."""
        ckpt = load_checkpoint(path, self.bank.identity)
        if ckpt.panoptic is None:
            raise CheckpointError(f"{path} is not a panoptic checkpoint")
        model = ckpt.build_model()
        if model.cfg != self.model_cfg:
            raise CheckpointError(f"{path}: its model {model.cfg} differs from the config's {self.model_cfg}")
        self.model = model
        if ckpt.text_bank is not None:
            self.text = ckpt.text_bank.lookup(self.vocab)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """The configured metrics over the evaluation frames (camera features when
        ``evaluation.cameras`` and the model fuses them)."""
        split = self.panoptic_split
        metrics = build_metrics(self.cfg.evaluation.metrics, MetricContext(split.classes, split.novel_ids))
        thing = torch.from_numpy(split.spec.thing_mask())
        use_cameras = self.cfg.evaluation.cameras and self.model_cfg.head.fusion
        self.model.eval()
        for i in range(len(self.val_set)):  # type: ignore[arg-type]
            frame = self.val_set[i]
            camera = None
            if use_cameras:
                t = self._point_targets(frame)
                camera = CameraFeatures(t.features, t.visible)
            pred = predict_panoptic(self.model, torch.from_numpy(frame.points), self.text, thing,
                                    min_points=split.spec.min_points, camera=camera)[0]
            truth = GroundTruth.from_frame(frame)
            for m in metrics.values():
                m.update(pred, truth)
        self.model.train()
        return merged_results(metrics)
