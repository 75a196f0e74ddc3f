"""Typed training configuration (`TrainConfig`), loaded from YAML with `--set a.b=value` overrides.

One file describes one run: data + zero-shot split, CLIP identity, teacher, 3D model, the method
(which losses/labels are used) and the engine (iterations, optimiser, checkpoints, AMP, logging).
Sub-configs owned by other modules (ClipConfig, SyntheticConfig, PseudoLabelConfig) are embedded
as their own dataclasses; the model is a preset plus overrides (its `embed_dim` comes from CLIP).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clip3d_core.clip import ClipConfig
from clip3d_core.clip.dense import LastBlock
from clip3d_core.config import ConfigError, check_choices, from_dict, load_yaml, to_dict
from clip3d_core.data.registry import dataset_options
from clip3d_core.losses.registry import LossTermConfig, build_loss_terms, default_loss_config
from clip3d_core.metrics import METRICS, MetricConfig, default_metrics_config
from clip3d_core.model.config import ModelPreset
from clip3d_core.pseudo_labels import PseudoLabelConfig

Setting = Literal["zero_shot", "annotation_free", "supervised", "panoptic"]

def is_device_name(name: str) -> bool:
    """auto | cpu | cuda | cuda:N"""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())

@dataclass
class DataConfig:
    """Which frames are trained on / evaluated on.

    `dataset` names a registered dataset (`clip3d_core.data.registry`: synthetic, semantickitti,
    nuscenes) and `options` holds its own typed options (e.g. synthetic: world, train_frames,
    val_frames, val_seed, cache_dir; semantickitti: train_sequences, val_sequences). Training and
    evaluation frames never overlap (each dataset checks its own way).
    """

    dataset: str = "synthetic"
    root: str | None = None
    # Zero-shot split: a name for `clip3d_core.data.load_split`, or explicit unseen class names.
    split: str | None = None
    unseen: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    max_val_frames: int | None = None

    def typed_options(self) -> Any:
        """The dataset's options as its `Options` dataclass (`ConfigError` for unknown keys)."""
        return dataset_options(self.dataset, self.options)


@dataclass
class TeacherConfig:
    """The 2D teacher that supplies dense CLIP features per camera image.

    kind: "clip" (frozen CLIP image encoder, dense features from its last block's value path,
    see `DenseClipEncoder`; `dense_last_block` picks "value" or "maskclip") or "simulated"
    (synthetic world only: features derived from the rendered pixel labels with configurable
    noise and confusion, standing in for a pretrained CLIP that is not available offline).
    `options` holds the teacher's own config keys.
    """

    kind: Literal["clip", "simulated"] = "clip"
    options: dict[str, Any] = field(default_factory=dict)
    # Dense path of CLIP's last block (kind "clip"): "value" (residual-free, the default) or
    # "maskclip" (value path plus residual and MLP, as in MaskCLIP). Fusion models reuse it at inference.
    dense_last_block: LastBlock = "value"
    # Short image side fed to the CLIP image encoder (None = the model's native size).
    short_side: int | None = None
    # Keep per-frame point-level teacher outputs in memory (the teacher is frozen, so features
    # for a frame never change). Only sensible for small datasets.
    cache: bool = False


@dataclass
class PseudoConfig:
    """Output-level teacher labels for the points without (seen) ground truth."""

    enabled: bool = True
    # Zero-shot: seen-class labels are complete, so a point without one can only be an unseen
    # class; a teacher label naming a seen class there is dropped as a teacher error.
    restrict_to_unseen: bool = True
    # How teacher features become labels (temperature, confidence kind and thresholds).
    labels: PseudoLabelConfig = field(default_factory=lambda: PseudoLabelConfig(min_confidence=0.0))


@dataclass
class FusionConfig:
    """Training of the 2D-3D fusion (models with ``model.fusion: true``): the model is fed the
    teacher's frozen CLIP features of the points a camera sees, as the segmenter feeds it at
    inference. With probability ``camera_dropout`` a frame loses all its camera features, so the
    model also works when cameras fail."""

    camera_dropout: float = 0.2


@dataclass
class EvaluationConfig:
    """Held-out evaluation: the metrics (by registered name, see `clip3d_core.metrics`), and the
    inference settings evaluated -- the same the segmenter ships with: ``score_threshold`` (points
    scoring below it are unlabelled) and ``cameras`` (fusion models are fed the frame's camera
    features; false scores the LiDAR-only path)."""

    metrics: dict[str, MetricConfig] = field(default_factory=default_metrics_config)
    score_threshold: float | None = None
    cameras: bool = True


@dataclass
class SelfTrainingConfig:
    """Stage 2: a frozen copy of the stage-1 model labels the points without ground truth.

    A point keeps the copy's prediction when its confidence reaches the threshold of the predicted
    class: the class's (1 - top_fraction) confidence quantile over `calibration_frames` training
    frames (per-class, so rare classes are not drowned by a global threshold), floored at
    `min_confidence`."""

    enabled: bool = False
    iterations: int = 0
    top_fraction: float = 0.5
    min_confidence: float = 0.0
    calibration_frames: int = 16
    lr_scale: float = 0.5
    # Where the stage-1 copy is not confident, fall back to the teacher's pseudo label.
    keep_teacher_labels: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iterations: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 10.0


@dataclass
class AugmentConfig:
    """Point-only augmentation, applied after the point <-> pixel correspondence is fixed."""

    enabled: bool = True
    rotate_z: float = 3.141592653589793
    flip: bool = True
    scale: tuple[float, float] = (0.95, 1.05)
    jitter: float = 0.01


@dataclass
class TrainerConfig:
    iterations: int = 1000  # stage-1 (CLIP-guided) iterations
    batch_size: int = 2  # frames per process per iteration
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch intra-op threads per process (0 = torch's default). On a shared CPU, 1 thread avoids
    # OpenMP oversubscription, which can slow sparse convolutions down ten-fold.
    cpu_threads: int = 0
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # autocast only on CUDA
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 20
    eval_every: int = 0  # 0 = only after each stage
    # Batches of training frames over which BatchNorm statistics are recomputed at the end of each
    # stage (precise BN; 0 = keep the running averages).
    precise_bn_batches: int = 8
    tensorboard: bool = True
    progress: bool = True
    find_unused_parameters: bool = False
    sync_batchnorm: bool = True


@dataclass
class PanopticConfig:
    """Setting "panoptic" (`clip3d_core.training.panoptic_trainer`, the engine's `Trainer` with the
    panoptic task plugged in: DDP, resume, augmentation, LR schedule as for the semantic setting;
    fp32, `trainer.amp` ignored): the base / novel split (a name of
    `clip3d_core.data.panoptic` or a YAML file; its dataset fixes things and min segment size, and it
    replaces data.split / data.unseen) and `PanopticHeadConfig` overrides (the base-stuff query count
    follows the split, the camera drop-out is fusion.camera_dropout; ``classifier: fixed``, the PFC
    baseline, takes the split's base classes). ``instance_gap`` (metres, 0 = off): the merge splits
    each thing query's points into spatially connected components, one instance each
    (`panoptic_merge`); stored in the checkpoint's `PanopticInfo`, so serving merges as evaluated."""

    split: str = "synthetic_b13n4"
    head: dict[str, Any] = field(default_factory=dict)
    instance_gap: float = 0.0


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/${name}"
    setting: Setting = "zero_shot"
    clip: ClipConfig = field(default_factory=ClipConfig)
    vocabulary: list[str] | None = None  # text entries per class ("car|automobile"); None = class names
    templates: list[str] | None = None
    # Class vectors from an embedding bank instead of the CLIP text tower: a bank file
    # (`EmbeddingBank.save`), or "synthetic" for the synthetic world's real-CLIP text geometry
    # (`clip3d_core.data.synthetic.text_geometry`; the text tower, with a logged reason, where the
    # shared CLIP embeddings are absent). The model's embedding space is then the bank's.
    text_bank: str | None = None
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model_preset: ModelPreset = "small"  # a name of `MODEL_PRESETS`
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides of the preset
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    # Loss terms by name (see `clip3d_core.losses.registry`); a YAML `loss` section lists them all.
    loss: dict[str, LossTermConfig] = field(default_factory=default_loss_config)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        check_choices(self)  # every Literal[...] field, also for configs built in code
        self.data.typed_options()  # unknown dataset or options fail here
        if self.text_bank == "synthetic" and self.data.dataset != "synthetic":
            raise ConfigError("text_bank 'synthetic' is the synthetic world's class geometry: synthetic only")
        if self.teacher.kind == "simulated" and self.data.dataset != "synthetic":
            raise ConfigError("teacher.kind 'simulated' needs rendered pixel labels: synthetic data only")
        if not is_device_name(self.trainer.device):
            raise ConfigError(f"trainer.device: {self.trainer.device!r}: expected auto, cpu, cuda or cuda:N")
        for key in ("iterations", "batch_size"):
            if getattr(self.trainer, key) < (0 if key == "iterations" else 1):
                raise ConfigError(f"trainer.{key}: {getattr(self.trainer, key)} is out of range")
        if self.self_training.enabled and self.self_training.iterations <= 0:
            raise ConfigError("self_training.enabled needs self_training.iterations > 0")
        if not 0.0 < self.self_training.top_fraction <= 1.0:
            raise ConfigError(f"self_training.top_fraction: {self.self_training.top_fraction} not in (0, 1]")
        try:
            self.pseudo.labels.validate()
        except ValueError as exc:
            raise ConfigError(f"pseudo.labels: {exc}") from exc
        if self.setting == "supervised" and (self.pseudo.enabled or self.self_training.enabled):
            raise ConfigError("setting 'supervised' uses ground truth only: disable pseudo and self_training")
        if self.setting == "panoptic" and (self.pseudo.enabled or self.self_training.enabled):
            raise ConfigError("setting 'panoptic' learns from base labels + distillation: disable pseudo and "
                              "self_training")
        if self.setting == "annotation_free" and not self.pseudo.enabled:
            raise ConfigError("setting 'annotation_free' has no ground truth: pseudo.enabled must be true")
        lo, hi = self.augment.scale
        if not 0 < lo <= hi or self.augment.jitter < 0:
            raise ConfigError(f"augment: need 0 < scale[0] <= scale[1] and jitter >= 0, got {self.augment}")
        if not 0.0 <= self.fusion.camera_dropout <= 1.0:
            raise ConfigError(f"fusion.camera_dropout: {self.fusion.camera_dropout} not in [0, 1]")
        build_loss_terms(self.loss)  # unknown terms or options fail here, not mid-training
        for key, entry in self.evaluation.metrics.items():
            METRICS.get(entry.metric or key)
        return self

    @property
    def total_iterations(self) -> int:
        return self.trainer.iterations + (self.self_training.iterations if self.self_training.enabled else 0)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir.replace("${name}", self.name))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so numbers/bools/lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with every `key.path=value` applied (missing sections created;
    unknown keys are caught later by the typed `from_dict`)."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + `key.path=value` overrides -> validated `TrainConfig`."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = load_yaml(TrainConfig, path) if path is not None else TrainConfig()
    if overrides:
        where = str(path or "TrainConfig")
        cfg = from_dict(TrainConfig, apply_overrides(to_dict(cfg), overrides), where=where)
    return cfg
