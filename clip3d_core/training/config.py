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
from typing import Any

import yaml

from clip3d_core.clip import ClipConfig
from clip3d_core.clip.dense import LAST_BLOCK_MODES
from clip3d_core.config import ConfigError, from_dict, load_yaml, to_dict
from clip3d_core.data.synthetic.config import SyntheticConfig
from clip3d_core.pseudo_labels import PseudoLabelConfig

SETTINGS = ("zero_shot", "annotation_free", "supervised")
DATASETS = ("synthetic", "semantickitti", "nuscenes")



def is_device_name(name: str) -> bool:
    """auto | cpu | cuda | cuda:N"""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())

@dataclass
class DataConfig:
    """Which frames are trained on / evaluated on.

    `dataset` picks the reader. Training and evaluation frames never overlap: synthetic frames
    come from different world seeds (`synthetic.seed`, `val_seed`), real ones from disjoint
    sequences / splits.
    """

    dataset: str = "synthetic"
    root: str | None = None
    # Zero-shot split: a name for `clip3d_core.data.load_split`, or explicit unseen class names.
    split: str | None = None
    unseen: list[str] = field(default_factory=list)
    # synthetic
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_frames: int = 64
    val_frames: int = 16
    val_seed: int = 100_000  # synthetic world seed of the evaluation frames (training: synthetic.seed)
    cache_frames: bool = True  # synthetic: keep generated frames in memory
    cache_dir: str | None = None  # synthetic: also keep them on disk (reused across runs)
    # SemanticKITTI
    train_sequences: str | list[str] = "train"  # "train" / "val" or sequence numbers
    val_sequences: str | list[str] = "val"
    # nuScenes
    version: str = "v1.0-trainval"
    train_split: str = "train"
    val_split: str = "val"
    # Extra keyword arguments for the real-dataset readers (e.g. camera list, image size).
    reader: dict[str, Any] = field(default_factory=dict)
    max_val_frames: int | None = None


@dataclass
class TeacherConfig:
    """The 2D teacher that supplies dense CLIP features per camera image.

    kind: "clip" (frozen CLIP image encoder, dense features from its last block's value path,
    see `DenseClipEncoder`; `dense_last_block` picks "value" or "maskclip") or "simulated"
    (synthetic world only: features derived from the rendered pixel labels with configurable
    noise and confusion, standing in for a pretrained CLIP that is not available offline).
    `options` holds the teacher's own config keys.
    """

    kind: str = "clip"
    options: dict[str, Any] = field(default_factory=dict)
    # Dense path of CLIP's last block (kind "clip"): "value" (residual-free, the default) or
    # "maskclip" (value path plus residual and MLP, as in MaskCLIP). Fusion models reuse it at inference.
    dense_last_block: str = "value"
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
class LossConfig:
    """loss = w_ce * CE(cos(F3d, text) / tau) + w_sem * semantic MCFA + w_spa * spatial MCFA (0 disables)."""

    w_ce: float = 1.0
    w_sem: float = 1.0
    w_spa: float = 1.0
    mcfa_temperature: float = 0.07  # temperature of both MCFA InfoNCE terms
    semantic_balance: bool = True  # semantic term: every class weighs the same
    spatial_pairs: int = 2048  # cap on point-group <-> patch pairs per batch (spatial term)
    class_balance: float = 0.0  # CE class weights (n_c / n) ** -power per batch; 0 = unweighted
    label_smoothing: float = 0.0


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
    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iterations: int = 0
    schedule: str = "cosine"  # cosine | constant
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
    amp: str = "bf16"  # bf16 | fp16 | off — autocast only on CUDA
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
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/${name}"
    setting: str = "zero_shot"
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
    model_preset: str = "small"  # small | default
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides of the preset
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting: {self.setting!r} not in {SETTINGS}")
        if self.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset: {self.data.dataset!r} not in {DATASETS}")
        if self.teacher.kind not in ("clip", "simulated"):
            raise ConfigError(f"teacher.kind: {self.teacher.kind!r} not in ('clip', 'simulated')")
        if self.teacher.dense_last_block not in LAST_BLOCK_MODES:
            raise ConfigError(f"teacher.dense_last_block: {self.teacher.dense_last_block!r} not in "
                              f"{LAST_BLOCK_MODES}")
        if self.text_bank == "synthetic" and self.data.dataset != "synthetic":
            raise ConfigError("text_bank 'synthetic' is the synthetic world's class geometry: synthetic only")
        if self.teacher.kind == "simulated" and self.data.dataset != "synthetic":
            raise ConfigError("teacher.kind 'simulated' needs rendered pixel labels: synthetic data only")
        if self.model_preset not in ("small", "default"):
            raise ConfigError(f"model_preset: {self.model_preset!r} not in ('small', 'default')")
        if self.trainer.amp not in ("bf16", "fp16", "off"):
            raise ConfigError(f"trainer.amp: {self.trainer.amp!r} not in ('bf16', 'fp16', 'off')")
        if not is_device_name(self.trainer.device):
            raise ConfigError(f"trainer.device: {self.trainer.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule: {self.optim.schedule!r} not in ('cosine', 'constant')")
        if self.optim.name not in ("adamw", "sgd"):
            raise ConfigError(f"optim.name: {self.optim.name!r} not in ('adamw', 'sgd')")
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
        if self.pseudo.labels.restrict_to is not None:
            raise ConfigError("pseudo.labels.restrict_to comes from the split: use pseudo.restrict_to_unseen")
        if self.setting == "supervised" and (self.pseudo.enabled or self.self_training.enabled):
            raise ConfigError("setting 'supervised' uses ground truth only: disable pseudo and self_training")
        if self.setting == "annotation_free" and not self.pseudo.enabled:
            raise ConfigError("setting 'annotation_free' has no ground truth: pseudo.enabled must be true")
        lo, hi = self.augment.scale
        if not 0 < lo <= hi or self.augment.jitter < 0:
            raise ConfigError(f"augment: need 0 < scale[0] <= scale[1] and jitter >= 0, got {self.augment}")
        for key in ("w_ce", "w_sem", "w_spa"):
            if getattr(self.loss, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0")
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


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return to_dict(cfg)
