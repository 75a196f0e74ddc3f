"""`Trainer`: iteration-based training of the 3D student through the method's stages.

One process or many (torchrun: one per GPU, or several CPU processes with gloo). Rank 0 does all
file I/O. Layout of a run directory::

    <out>/config.yaml                 resolved TrainConfig
    <out>/checkpoints/iter_*.pt       periodic checkpoints (+ .state.pt sidecars for resuming)
    <out>/stage_clip_guided.pt        model at the end of each stage (Segmenter-loadable)
    <out>/final.pt                    the trained model (Segmenter-loadable)
    <out>/metrics.json                evaluation after each stage ("<stage>") and, with
                                      trainer.eval_every, during it ("<stage>@<iteration>")
    <out>/eval_<stage>.json           the full report (IoU per class, confusion) at each stage end
    <out>/tb/                         TensorBoard scalars
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

from clip3d_core.checkpoint import load_checkpoint, save_checkpoint
from clip3d_core.clip import load_clip
from clip3d_core.clip.dense import DenseConfig
from clip3d_core.config import ConfigError, to_dict
from clip3d_core.data import ZeroShotSplit, collate_frames
from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.losses import LossInputs, LossParts, build_loss_terms, combine_losses
from clip3d_core.metrics import Metric, SemanticMetric
from clip3d_core.model import Clip3DNet, ModelConfig, sparse_backend
from clip3d_core.model.panoptic import PanopticInfo
from clip3d_core.predictor import CameraFeatures, predict
from clip3d_core.pseudo_labels import label_quality
from clip3d_core.teacher import PointTargets, frame_point_targets
from clip3d_core.training import state as st
from clip3d_core.training.augment import augment_points
from clip3d_core.training.config import TrainConfig
from clip3d_core.training.data import (
    build_datasets,
    build_model_config,
    build_split,
    build_teacher,
    build_text,
    build_vocabulary,
    collate,
)
from clip3d_core.training.distributed import (
    DistInfo,
    IterationBatchSampler,
    all_reduce_mean,
    barrier,
    init_distributed,
    local_rank_from_env,
    resolve_device,
    unwrap,
    wrap_model,
)
from clip3d_core.training.monitor import Monitor
from clip3d_core.training.precise_bn import recompute_bn_stats
from clip3d_core.training.stages import (
    CLIP_GUIDED,
    SELF_TRAINING,
    LabelSpace,
    Stage,
    Targets,
    calibrate_thresholds,
    clip_guided_targets,
    plan_stages,
    self_training_targets,
    stage_at,
    teacher_labels,
)
from clip3d_core.training.validation import FramePredictor, camera_features, evaluate, summary

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    final_checkpoint: Path
    iterations: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: evaluation summary
    history: list[dict[str, float]] = field(default_factory=list)  # logged means (rank 0)


def _lr_factor(stage: Stage, iteration: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Warmup then cosine (or constant) within the stage, times the stage's lr_scale."""
    k = iteration - stage.start
    factor = 1.0
    if warmup > 0 and k < warmup:
        factor = (k + 1) / warmup
    elif schedule == "cosine" and stage.iterations > warmup:
        progress = (k - warmup) / max(1, stage.iterations - warmup)
        factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return stage.lr_scale * factor


class Trainer:
    """Builds everything from a `TrainConfig` and trains; `fit()` returns a `TrainResult`."""

    def __init__(self, cfg: TrainConfig, *, out_dir: str | Path | None = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else cfg.output_dir
        self.resume = resume
        self.device = resolve_device(cfg.trainer.device, local_rank_from_env())
        if cfg.trainer.cpu_threads > 0:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        self.info: DistInfo = init_distributed(self.device)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        st.seed_everything(cfg.trainer.seed)  # same model init on every rank (DDP also broadcasts it)

        self.loaded = load_clip(cfg.clip, self.device)
        self.split = self._build_split()
        self.vocab = build_vocabulary(cfg, self.split)
        text, self.bank = build_text(cfg, self.loaded, self.vocab)
        self.text = text.to(self.device)
        self.identity = self.bank.identity  # the embedding space trained in (CLIP's, or a bank's)
        self.space = LabelSpace(self.split.num_classes, self.split.unseen_ids, cfg.setting)
        self.train_set, self.val_set = build_datasets(cfg.data, self.split)
        self.stages = plan_stages(cfg)
        self.loss_terms = build_loss_terms(cfg.loss)
        self.model_cfg = self._model_config()
        self.teacher = build_teacher(cfg.teacher, self.loaded) if self._needs_teacher() else None
        if cfg.teacher.kind == "clip" and self.teacher is not None and self.identity != self.loaded.identity:
            raise ConfigError(f"text bank {self.identity} != CLIP teacher {self.loaded.identity}")
        self._teacher_cache: dict[str, PointTargets] = {}

        model = self._build_network().to(self.device)
        self.model = wrap_model(model, self.info, self.device, sync_batchnorm=cfg.trainer.sync_batchnorm,
                                find_unused_parameters=cfg.trainer.find_unused_parameters)
        self.optimizer = self._optimizer(model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.amp_dtype = self._amp_dtype()
        self.use_amp = self.device.type == "cuda" and self.amp_dtype is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.iteration = 0
        self.frozen: Clip3DNet | None = None  # stage-1 copy that labels points in self-training
        self.thresholds: Tensor | None = None
        self.metrics: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, float]] = []
        if resume:
            self._resume()

    # ------------------------------------------------------------------ what a task supplies
    # The semantic method's; `PanopticTrainer` overrides these (split, network, checkpoint content,
    # losses of one batch, evaluation) and shares everything else: DDP, sampler, augmentation,
    # schedule, AMP, checkpoints + resume, monitor, periodic evaluation.
    def _build_split(self) -> ZeroShotSplit:
        return build_split(self.cfg.data)

    def _model_config(self) -> Any:
        return build_model_config(self.cfg, self.identity.embed_dim)

    def _build_network(self) -> nn.Module:
        return Clip3DNet(self.model_cfg, backend=sparse_backend.for_device(self.device))

    def _amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.trainer.amp)

    def _checkpoint_model(self) -> tuple[ModelConfig, PanopticInfo | None]:
        """What `save_checkpoint` records of the network: its `ModelConfig` and, for panoptic
        models, their `PanopticInfo`."""
        return self.model_cfg, None

    # ------------------------------------------------------------------ setup helpers
    @property
    def bare(self) -> Clip3DNet:
        return unwrap(self.model)  # type: ignore[return-value]

    def _needs_teacher(self) -> bool:
        cfg = self.cfg
        return (cfg.pseudo.enabled or self.model_cfg.fusion
                or any(t.reads_teacher for t in self.loss_terms)
                or (cfg.self_training.enabled and cfg.self_training.keep_teacher_labels))

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            # Norms, biases and the temperature are not weights to shrink.
            (no_decay if p.ndim <= 1 or "temperature" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.betas[0], nesterov=True)
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)

    def _lr_lambda(self, iteration: int) -> float:
        stage = stage_at(self.stages, iteration) or self.stages[-1]
        o = self.cfg.optim
        return _lr_factor(stage, iteration, o.warmup_iterations, o.schedule, o.min_lr_ratio)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, stage: str) -> dict[str, Any]:
        return {
            "run": self.cfg.name,
            "setting": self.cfg.setting,
            "stage": stage,
            "iteration": self.iteration,
            "total_iterations": self.cfg.total_iterations,
            "split": self.split.to_dict(),
            "metrics": copy.deepcopy(self.metrics),
            "train_config": to_dict(self.cfg),  # a record of the run; inference never reads it
            "world_size": self.info.world_size,
        }

    def _save_model(self, path: Path, stage: str) -> Path:
        dense = DenseConfig(self.cfg.teacher.dense_last_block, self.cfg.teacher.short_side)
        model_cfg, panoptic = self._checkpoint_model()
        return save_checkpoint(path, self.bare, model_cfg, self.cfg.clip, self.identity,
                               vocabulary=self.vocab, text_bank=self.bank, meta=self._meta(stage),
                               dense=dense, panoptic=panoptic)

    def _save_training_checkpoint(self, stage: str) -> None:
        """Periodic checkpoint: model file + resume sidecar (rank 0; every rank's RNG gathered)."""
        rngs = [st.rng_state()]
        if self.info.distributed:
            rngs = [None] * self.info.world_size
            torch.distributed.all_gather_object(rngs, st.rng_state())
        if not self.info.is_main:
            return
        path = st.checkpoint_path(self.ckpt_dir, self.iteration)
        self._save_model(path, stage)
        st.save_state(path, {
            "iteration": self.iteration,
            "stage": stage,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "thresholds": self.thresholds,
            "metrics": self.metrics,
            "history": self.history,
            "world_size": self.info.world_size,
        })
        st.prune_checkpoints(self.ckpt_dir, self.cfg.trainer.keep_checkpoints)

    def _resume(self) -> None:
        path = st.latest_checkpoint(self.ckpt_dir)
        if path is None:
            log.info("resume requested but %s holds no checkpoint: starting from scratch", self.ckpt_dir)
            return
        ckpt = load_checkpoint(path, identity=self.identity)
        if (ckpt.model_config, ckpt.panoptic) != self._checkpoint_model():
            raise st.ResumeError(f"{path} was trained with another model config than this run's")
        self.bare.load_state_dict(ckpt.state_dict)
        state = st.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.thresholds = state.get("thresholds")
        self.metrics = state.get("metrics", {})
        self.history = state.get("history", [])
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            st.set_rng_state(rngs[self.info.rank])
        else:
            log.warning("checkpoint made by %d processes, resuming with %d: RNG streams restart",
                        len(rngs), self.info.world_size)
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------ data
    def _loader(self, start_iteration: int) -> Iterator[tuple[list, dict[str, Any]]]:
        t = self.cfg.trainer
        sampler = IterationBatchSampler(self.train_set, t.batch_size, self.info, seed=t.seed,
                                        start_iteration=start_iteration)
        loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate,
                            num_workers=t.num_workers, persistent_workers=t.num_workers > 0,
                            pin_memory=self.device.type == "cuda")
        return iter(loader)

    def _point_targets(self, frames: list) -> PointTargets | None:
        """The teacher's features for the batch's points (frames in batch order)."""
        if self.teacher is None:
            return None
        parts = []
        for frame in frames:
            cached = self._teacher_cache.get(frame.frame_id)
            if cached is None:
                with torch.no_grad():
                    _, cached = frame_point_targets(self.teacher, frame, self.text)
                if self.cfg.teacher.cache:
                    self._teacher_cache[frame.frame_id] = cached
            parts.append(cached)
        pt = PointTargets.cat(parts)
        return PointTargets(*(t.to(self.device) for t in (pt.features, pt.visible, pt.patch_index,
                                                            pt.patch_features)))

    # ------------------------------------------------------------------ self-training
    def _calibration_batches(self) -> Iterator[tuple[Tensor, Tensor | None, CameraFeatures | None]]:
        n = min(self.cfg.self_training.calibration_frames, len(self.train_set))  # type: ignore[arg-type]
        for i in range(n):
            frame = self.train_set[i]
            points = torch.as_tensor(frame.points, dtype=torch.float32, device=self.device)
            labels = None if frame.labels is None else torch.from_numpy(frame.labels)
            camera = None
            if self.model_cfg.fusion and self.teacher is not None and frame.cameras:
                with torch.no_grad():
                    camera = camera_features(self.teacher, frame, self.text)
            yield points, labels, camera

    def _enter_self_training(self) -> None:
        """Freeze the stage-1 model (current weights, or the saved stage-1 model after a resume) and
        calibrate its per-class thresholds (identical on every rank: same frames)."""
        if self.iteration == self.stages[0].end:
            frozen = copy.deepcopy(self.bare)
        else:
            frozen = load_checkpoint(self.out_dir / f"stage_{CLIP_GUIDED}.pt").build_model(self.device)
        self.frozen = frozen.eval().requires_grad_(False)
        if self.thresholds is None:
            st_cfg = self.cfg.self_training
            self.thresholds = calibrate_thresholds(
                self.frozen, self._calibration_batches(), self.text, st_cfg, self.space,
                self.cfg.pseudo.restrict_to_unseen,
            ).cpu()
            log.info("self-training thresholds per class: %s",
                     {n: round(float(t), 3) for n, t in zip(self.split.classes, self.thresholds)})

    # ------------------------------------------------------------------ one iteration
    def _targets(self, stage: Stage, points: Tensor, batch_index: Tensor, gt: Tensor | None,
                 pt: PointTargets | None) -> Targets:
        if stage.name == CLIP_GUIDED:
            return clip_guided_targets(gt, pt, self.text, self.cfg.pseudo, self.space, points.shape[0])
        assert self.frozen is not None
        camera = None if pt is None else CameraFeatures(pt.features, pt.visible)
        allowed = self.space.unlabelled_candidates(self.cfg.pseudo.restrict_to_unseen)
        with torch.no_grad(), self._autocast():
            prediction = predict(self.frozen, points, self.text, batch_index=batch_index, camera=camera,
                                 allowed=allowed)
        fallback = None
        if self.cfg.self_training.keep_teacher_labels and pt is not None and self.cfg.pseudo.enabled:
            fallback = teacher_labels(pt, self.text, self.cfg.pseudo, self.space)
        return self_training_targets(gt, prediction, self.thresholds, self.cfg.self_training, self.space,
                                     fallback)

    def _camera_input(self, pt: PointTargets | None, batch_index: Tensor, frames: int,
                      gen: torch.Generator) -> CameraFeatures | None:
        """Fusion input of a training batch: the teacher's frozen features where a camera sees the
        point (what the segmenter feeds at inference), each frame losing all of them with
        probability `fusion.camera_dropout` (so a camera failure is something the model has seen)."""
        if not self.model_cfg.fusion or pt is None:
            return None
        mask = pt.visible.to(self.device)
        p = self.cfg.fusion.camera_dropout
        if p > 0:
            dropped = (torch.rand(frames, generator=gen) < p).to(self.device)
            mask = mask & ~dropped[batch_index]
        return CameraFeatures(pt.features.to(self.device), mask)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _losses(self, stage: Stage, frames: list, batch: dict[str, Any], gen: torch.Generator
                ) -> tuple[LossParts, dict[str, float]]:
        """One batch's forward pass and configured loss terms, and what to log besides the losses.
        ``gen`` is this iteration's generator (augmentation, camera drop-out, sampled pairs)."""
        points = batch["points"].to(self.device, non_blocking=True)
        batch_index = batch["batch_index"].to(self.device, non_blocking=True)
        gt_full: Tensor | None = batch["labels"]
        pt = self._point_targets(frames)
        targets = self._targets(stage, points, batch_index, gt_full, pt)

        aug = augment_points(points, batch_index, len(frames), self.cfg.augment, gen)
        camera = self._camera_input(pt, batch_index, len(frames), gen)
        self.model.train()
        with self._autocast():
            if camera is None:
                out = self.model(aug, batch_index)
            else:
                out = self.model(aug, batch_index, camera.features, camera.mask)
        features = out.features.float()
        labels = torch.where(out.valid, targets.labels.to(features.device), IGNORE_INDEX)
        inputs = LossInputs(features=features, valid=out.valid, labels=labels, text=self.text,
                            logits=self.bare.logits(features, self.text), point_targets=pt, generator=gen)
        parts = combine_losses(self.loss_terms, inputs)
        scalars = targets.fractions()
        if gt_full is not None:
            # Diagnostics only (never used for training): how right the labels of points without
            # allowed GT are.
            allowed = self.space.training_gt(gt_full)
            hidden = gt_full >= 0 if allowed is None else (gt_full >= 0) & (allowed < 0)
            q = label_quality(targets.labels.cpu()[hidden], gt_full[hidden])
            scalars["labels/hidden_coverage"] = q["coverage"]
            scalars["labels/hidden_accuracy"] = q["accuracy"]
        return parts, scalars

    def _model_scalars(self) -> dict[str, float]:
        """Learned scalars worth logging, read after the optimizer step."""
        return {"temperature": float(self.bare.temperature.detach())}

    def _step(self, stage: Stage, frames: list, batch: dict[str, Any]) -> dict[str, float]:
        gen = torch.Generator().manual_seed(
            (self.cfg.trainer.seed * 1_000_003 + self.iteration * 7919 + self.info.rank) % 2**63)
        parts, extra = self._losses(stage, frames, batch, gen)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.total).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {**parts.scalars, **extra, **self._model_scalars(), "lr": lr}
        if self.info.distributed:
            keys = sorted(scalars)
            vec = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=self.device)
            scalars = dict(zip(keys, all_reduce_mean(vec, self.info).tolist()))
        if not math.isfinite(scalars["loss"]):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {parts.scalars}")
        return scalars

    # ------------------------------------------------------------------ evaluation
    def predictor(self) -> FramePredictor:
        """The model on one frame as the segmenter runs it (camera features when
        ``evaluation.cameras`` and the model fuses them; the configured score threshold)."""
        e = self.cfg.evaluation
        return FramePredictor(self.bare, self.text, self.device, score_threshold=e.score_threshold,
                              teacher=self.teacher if e.cameras else None)

    def _evaluate_metrics(self) -> dict[str, Metric]:
        """The configured metrics of `predictor` over the evaluation frames (sharded over DDP
        processes, merged); unseen classes are the split's."""
        self.model.eval()
        metrics = evaluate({"model": self.predictor()}, self.val_set, self.split.classes,
                           self.split.unseen_ids, metrics=self.cfg.evaluation.metrics, info=self.info,
                           progress=self.cfg.trainer.progress)["model"]
        self.model.train()
        return metrics

    def evaluate(self) -> dict[str, Any]:
        metrics = self._evaluate_metrics()
        semantic = metrics.get("semantic")
        report = semantic.report().to_dict() if isinstance(semantic, SemanticMetric) else None
        return {**summary(metrics), "report": report}

    # ------------------------------------------------------------------ main loop
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to the end (or, with `stop_at`, pause after that iteration's checkpoint logic, as if
        interrupted: `--resume` continues from the newest checkpoint)."""
        cfg, t = self.cfg, self.cfg.trainer
        total = cfg.total_iterations if stop_at is None else min(stop_at, cfg.total_iterations)
        monitor = Monitor(self.out_dir / "tb", enabled=self.info.is_main, total=total, initial=self.iteration,
                          tensorboard=t.tensorboard, progress=t.progress)
        batches = self._loader(self.iteration) if self.iteration < total else None
        t0 = time.perf_counter()
        try:
            while self.iteration < total:
                stage = stage_at(self.stages, self.iteration)
                assert stage is not None and batches is not None
                if stage.name == SELF_TRAINING and self.frozen is None:
                    self._enter_self_training()
                frames, batch = next(batches)
                scalars = self._step(stage, frames, batch)
                self.iteration += 1
                monitor.update(scalars)
                if self.iteration % max(1, t.log_every) == 0 or self.iteration == stage.end:
                    means = monitor.flush(self.iteration)
                    if means:
                        self.history.append({"iteration": self.iteration, **means})
                if t.eval_every and self.iteration % t.eval_every == 0 and self.iteration != stage.end:
                    self._log_eval(monitor, f"{stage.name}@{self.iteration}")
                if self.iteration == stage.end:
                    self._finish_stage(stage, monitor)
                periodic = t.checkpoint_every > 0 and self.iteration % t.checkpoint_every == 0
                if periodic or self.iteration == stage.end:
                    self._save_training_checkpoint(stage.name)
        finally:
            monitor.close()
        final = self.out_dir / "final.pt"
        if self.iteration < cfg.total_iterations:  # paused (stop_at)
            return TrainResult(self.out_dir, final, self.iteration, self.metrics, self.history)
        if self.info.is_main:
            self._save_model(final, self.stages[-1].name)
            (self.out_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        barrier(self.info)
        log.info("training done: %d iterations in %.1f s", self.iteration, time.perf_counter() - t0)
        return TrainResult(self.out_dir, final, self.iteration, self.metrics, self.history)

    def _log_eval(self, monitor: Monitor, key: str) -> dict[str, Any]:
        result = self.evaluate()
        self.metrics[key] = {k: v for k, v in result.items() if k != "report"}
        monitor.scalars(self.iteration, {k: v for k, v in self.metrics[key].items() if v is not None}, "val")
        if self.info.is_main:
            log.info("eval %s: %s", key, {k: None if v is None else round(v, 4)
                                           for k, v in self.metrics[key].items()})
        return result

    def _bn_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's share of the first training frames, in batches (precise BN)."""
        t = self.cfg.trainer
        n = len(self.train_set)  # type: ignore[arg-type]
        mine = list(range(self.info.rank, n, self.info.world_size))
        for b in range(min(t.precise_bn_batches, len(mine) // t.batch_size)):
            chunk = mine[b * t.batch_size : (b + 1) * t.batch_size]
            batch = collate_frames([self.train_set[i] for i in chunk])
            yield batch["points"].to(self.device), batch["batch_index"].to(self.device)

    def _finish_stage(self, stage: Stage, monitor: Monitor) -> None:
        if self.cfg.trainer.precise_bn_batches > 0:
            with self._autocast():
                # The bare network: DDP would re-broadcast rank 0's buffers before every forward.
                used = recompute_bn_stats(self.bare, self._bn_batches(), self.info)
            log.debug("precise BN over %d batches", used)
        result = self._log_eval(monitor, stage.name)
        if self.info.is_main:
            self._save_model(self.out_dir / f"stage_{stage.name}.pt", stage.name)
            if result.get("report") is not None:
                (self.out_dir / f"eval_{stage.name}.json").write_text(json.dumps(result["report"], indent=2))
