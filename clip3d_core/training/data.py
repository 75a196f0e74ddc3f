"""Datasets, split, vocabulary, teacher and model config built from a `TrainConfig`, plus batch
collation (shared by `clip3d train`, `clip3d evaluate` and the benchmark)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from clip3d_core.clip import DEFAULT_TEMPLATES, EmbeddingBank, LoadedClip, TextEncoder, Vocabulary
from clip3d_core.config import ConfigError, from_dict, to_dict
from clip3d_core.data import Frame, ZeroShotSplit, collate_frames, load_split
from clip3d_core.data.registry import dataset_source
from clip3d_core.data.synthetic.teacher import SimulatedTeacher, SimulatedTeacherConfig
from clip3d_core.data.synthetic.text_geometry import load_text_geometry
from clip3d_core.model import MODEL_PRESETS, ModelConfig
from clip3d_core.teacher import ClipTeacher, Teacher
from clip3d_core.testing import shared_data_dir
from clip3d_core.training.config import DataConfig, TeacherConfig, TrainConfig

log = logging.getLogger(__name__)


def build_split(data: DataConfig) -> ZeroShotSplit:
    """The named zero-shot split (default: the dataset's own), with `data.unseen` overriding its
    unseen classes when given."""
    split = load_split(data.split or data.dataset)
    return split.with_unseen(data.unseen) if data.unseen else split


def _subset(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def build_datasets(data: DataConfig, split: ZeroShotSplit) -> tuple[Dataset[Frame], Dataset[Frame]]:
    """(training frames, evaluation frames) of the registered dataset `data.dataset`."""
    train, val = dataset_source(data.dataset).build(data.root, data.typed_options())
    class_names = train.class_names  # type: ignore[attr-defined]
    if tuple(class_names) != tuple(split.classes):
        raise ConfigError(
            f"split {split.name!r} classes {list(split.classes)} != dataset classes {list(class_names)}"
        )
    return train, _subset(val, data.max_val_frames)


def build_vocabulary(cfg: TrainConfig, split: ZeroShotSplit) -> Vocabulary:
    vocab = Vocabulary.from_strings(list(cfg.vocabulary or split.vocabulary))
    if len(vocab) != split.num_classes:
        raise ConfigError(f"vocabulary has {len(vocab)} entries for {split.num_classes} classes")
    return vocab


def build_text(cfg: TrainConfig, loaded: LoadedClip, vocab: Vocabulary) -> tuple[torch.Tensor, EmbeddingBank]:
    """Class text embeddings [C, D] and the phrase bank that reproduces them (stored in
    checkpoints, so evaluation uses exactly these vectors): from `cfg.text_bank` when set, else
    the text tower's prompt ensemble over `cfg.templates`. The bank's identity is the embedding
    space the model is trained in."""
    bank = None
    if cfg.text_bank == "synthetic":
        try:
            geometry = load_text_geometry(shared_data_dir(), vocab.names)
        except KeyError as exc:
            raise ConfigError(f"text_bank 'synthetic': {exc}") from exc
        bank = None if geometry is None else geometry.bank()
        if geometry is not None:
            log.info("text bank: synthetic world's real-CLIP geometry %s (mean pairwise cosine %.3f)",
                     geometry.identity, geometry.stats()["mean_pairwise_cosine"])
    elif cfg.text_bank is not None:
        bank = EmbeddingBank.load(cfg.text_bank)
    if bank is None:
        encoder = TextEncoder(loaded, cfg.templates or DEFAULT_TEMPLATES)
        bank = EmbeddingBank.from_text_encoder(encoder, vocab.to_strings())
    return bank.lookup(vocab), bank


def build_teacher(cfg: TeacherConfig, loaded: LoadedClip) -> Teacher:
    if cfg.kind == "simulated":
        log.warning("SIMULATED teacher: pseudo labels come from rendered ground truth with synthetic noise "
                    "and confusions, not from CLIP")
        return SimulatedTeacher(from_dict(SimulatedTeacherConfig, dict(cfg.options)))
    if cfg.options:
        raise ConfigError(f"teacher.options {sorted(cfg.options)} are for the simulated teacher only")
    from clip3d_core.clip.dense import DenseClipEncoder

    return ClipTeacher(DenseClipEncoder(loaded, cfg.dense_last_block), short_side=cfg.short_side)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def build_model_config(cfg: TrainConfig, embed_dim: int) -> ModelConfig:
    """Preset + overrides; `embed_dim` always follows the CLIP model."""
    preset = MODEL_PRESETS[cfg.model_preset]()
    given = cfg.model.get("embed_dim")
    if given is not None and given != embed_dim:
        raise ConfigError(f"model.embed_dim {given} differs from the CLIP embedding width {embed_dim}")
    data = _merge(to_dict(preset), {**cfg.model, "embed_dim": embed_dim})
    try:
        return from_dict(ModelConfig, data, where="model")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc


def collate(frames: Sequence[Frame]) -> tuple[list[Frame], dict[str, Any]]:
    """DataLoader collate: the frames themselves (the teacher reads images per frame) and the
    concatenated point batch."""
    return list(frames), collate_frames(frames)
