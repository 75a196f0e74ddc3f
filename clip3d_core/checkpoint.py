"""The clip3d checkpoint: one self-describing torch file (model config + weights + CLIP identity).

Layout (format_version 2)::

    {"format": "clip3d", "format_version": 2,
     "model_config": ModelConfig as a plain dict, "state_dict": {name: tensor},
     "clip": {"config": ClipConfig dict, "identity": ClipIdentity dict},
     "dense": DenseConfig dict (how the CLIP image features a fusion model reads are made),
     "vocabulary": ["car|automobile", ...] | None,
     "text_bank": EmbeddingBank.to_dict() (names, vectors, identity, ...) | None,
     "meta": {plain data: clip3d_version, created, epoch, metrics, ...},
     "panoptic": PanopticInfo dict (head sizes, thing names, min_points) | absent for semantic models}

Everything inference needs is a typed field; ``meta`` is a record for people (inference never
reads it). Format 1 (no "dense"; a fusion model's dense settings were only in
``meta["train_config"]["teacher"]``) still loads: `_dense_of_format_1` reads them there, once.

Only plain containers and tensors are stored, so it loads with ``torch.load(weights_only=True)``
(no pickled code runs on load). Every way a file can be unusable raises `CheckpointError` naming
the problem.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clip3d_core.clip import ClipConfig, ClipIdentity, EmbeddingBank, Vocabulary
from clip3d_core.clip.dense import DenseConfig
from clip3d_core.config import ConfigError, from_dict, to_dict
from clip3d_core.model import Clip3DNet, ModelConfig
from clip3d_core.model.panoptic import PanopticInfo, PanopticModelConfig, PanopticNet

log = logging.getLogger(__name__)

FORMAT = "clip3d"
FORMAT_VERSION = 2
_REQUIRED = ("model_config", "state_dict", "clip")
_MAX_LISTED = 8  # keys listed per kind in a state-dict mismatch message


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, foreign, too new or does not fit the model/CLIP."""


@dataclass
class Checkpoint:
    """A loaded and validated checkpoint (weights on CPU)."""

    path: Path
    model_config: ModelConfig
    state_dict: dict[str, Tensor]
    clip_config: ClipConfig
    identity: ClipIdentity
    vocabulary: list[str] | None = None
    text_bank: EmbeddingBank | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    dense: DenseConfig = field(default_factory=DenseConfig)
    panoptic: PanopticInfo | None = None

    def build_model(self, device: str | torch.device = "cpu") -> Clip3DNet | PanopticNet:
        """The network (`Clip3DNet`, or `PanopticNet` for a panoptic checkpoint) with these weights,
        in eval mode on `device`."""
        model = _network(self.model_config, self.panoptic)
        model.load_state_dict(self.state_dict, strict=True)  # compatibility checked at load time
        return model.to(device).eval()

    def check_identity(self, identity: ClipIdentity, what: str = "the CLIP model supplied") -> None:
        """Raise `CheckpointError` unless `identity` is the CLIP this checkpoint was trained with."""
        if identity != self.identity:
            raise CheckpointError(
                f"CLIP identity mismatch for {self.path}: the checkpoint was made with {self.identity}, "
                f"{what} is {identity}; its features live in a different embedding space"
            )


def _plain_vocabulary(vocabulary: Vocabulary | Sequence[str] | None) -> list[str] | None:
    if vocabulary is None:
        return None
    if isinstance(vocabulary, Vocabulary):
        return vocabulary.to_strings()
    return Vocabulary.from_strings(vocabulary).to_strings()  # validates


def _network(model_cfg: ModelConfig, panoptic: PanopticInfo | None) -> Clip3DNet | PanopticNet:
    if panoptic is None:
        return Clip3DNet(model_cfg)
    return PanopticNet(PanopticModelConfig(model_cfg, panoptic.head))


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    clip_cfg: ClipConfig,
    identity: ClipIdentity,
    vocabulary: Vocabulary | Sequence[str] | None = None,
    text_bank: EmbeddingBank | None = None,
    meta: Mapping[str, Any] | None = None,
    dense: DenseConfig | None = None,
    panoptic: PanopticInfo | None = None,
) -> Path:
    """Write `model`'s weights with everything needed to rebuild and use it (``dense``: how the CLIP
    image features it was trained on were made; default `DenseConfig()`). Atomic (temp file +
    rename), so a crash mid-save never leaves a truncated checkpoint under `path`.

    `meta` must hold plain data only (numbers, strings, lists, dicts, tensors). A `PanopticNet` needs
    ``panoptic`` (its head config, thing classes and minimum segment size)."""
    path = Path(path)
    net = _unwrap(model)
    net_cfg = getattr(net, "cfg", model_cfg)
    if isinstance(net_cfg, PanopticModelConfig):
        if panoptic is None or panoptic.head != net_cfg.head:
            raise CheckpointError("a panoptic model is saved with its PanopticInfo (same head config)")
        net_cfg = net_cfg.model
    elif panoptic is not None:
        raise CheckpointError("panoptic info given for a model without a panoptic head")
    if net_cfg != model_cfg:
        raise CheckpointError(f"model_cfg does not describe the model being saved: {model_cfg} vs {net_cfg}")
    if identity.embed_dim != model_cfg.embed_dim:
        raise CheckpointError(
            f"model embed_dim {model_cfg.embed_dim} != CLIP {identity} embed_dim {identity.embed_dim}"
        )
    bank = None
    if text_bank is not None:
        if text_bank.identity != identity:
            raise CheckpointError(
                f"text bank made with CLIP {text_bank.identity}, checkpoint uses {identity}"
            )
        bank = text_bank.to_dict()  # names, vectors (+ identity, aliases)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": to_dict(model_cfg),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "clip": {"config": to_dict(clip_cfg), "identity": identity.as_dict()},
        "dense": to_dict(dense or DenseConfig()),
        "vocabulary": _plain_vocabulary(vocabulary),
        "text_bank": bank,
        "meta": {
            "clip3d_version": _version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **dict(meta or {}),
        },
    }
    if panoptic is not None:
        payload["panoptic"] = to_dict(panoptic)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved checkpoint %s (%s, CLIP %s)", path, type(net).__name__, identity)
    return path


def _version() -> str:
    from clip3d_core import __version__

    return __version__


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].split(". ")[0][:300]


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    # torch.save writes a zip archive; files from torch < 1.6 start with a pickle protocol byte.
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a torch file (starts with {head!r}): corrupt or another format")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers; explain what it met.
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln]
        reason = lines[0].split(". ")[0] if lines else _first_sentence(exc)
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain data, so it is not a clip3d "
            f"checkpoint (refusing to unpickle it): {reason}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt (cannot read it as a torch file): {_first_sentence(exc)}"
        ) from exc


def _check_state_dict(model_cfg: ModelConfig, panoptic: PanopticInfo | None, state_dict: Mapping[str, Any],
                      path: Path) -> None:
    """Compare names and shapes with the network the configs build (on the meta device: no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _network(model_cfg, panoptic).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    not_tensor = sorted(k for k in set(expected) & set(state_dict) if not isinstance(state_dict[k], Tensor))
    shapes = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if k not in not_tensor and tuple(state_dict[k].shape) != expected[k]
    )

    def listed(kind: str, items: list[str]) -> str:
        more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        return f"{len(items)} {kind}: {', '.join(items[:_MAX_LISTED])}{more}"

    problems = [
        listed(kind, items)
        for kind, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-tensor entries", not_tensor),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"state dict in {path} does not fit its model config: " + "; ".join(problems))


def _dense_of_format_1(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Format 1 kept a fusion model's dense settings only in the training config it recorded."""
    teacher = (meta.get("train_config") or {}).get("teacher") or {}
    return {"last_block": teacher.get("dense_last_block", "value"), "short_side": teacher.get("short_side")}


def load_checkpoint(path: str | Path, identity: ClipIdentity | None = None) -> Checkpoint:
    """Read and validate a checkpoint. With `identity`, also require that CLIP (see
    `Checkpoint.check_identity`)."""
    path = Path(path)
    raw = _read(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        what = (
            f"format={raw.get('format')!r}"
            if isinstance(raw, dict) and "format" in raw
            else (
                "a dict without a 'format' key (a bare state dict?)"
                if isinstance(raw, dict)
                else type(raw).__name__
            )
        )
        raise CheckpointError(f"{path} is not a clip3d checkpoint: {what}")
    version = raw.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this clip3d reads ({FORMAT_VERSION}); "
            "upgrade clip3d"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks required field(s) {missing}")
    try:
        model_cfg = from_dict(ModelConfig, raw["model_config"])
        clip_cfg = from_dict(ClipConfig, raw["clip"]["config"])
        clip_id = ClipIdentity.from_dict(raw["clip"]["identity"])
        dense_data = raw.get("dense") if version >= 2 else _dense_of_format_1(raw.get("meta") or {})
        dense = from_dict(DenseConfig, dense_data or {}, where="dense")
        panoptic = None if raw.get("panoptic") is None else from_dict(PanopticInfo, raw["panoptic"],
                                                                      where="panoptic")
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} (format version {version}): invalid model/CLIP/dense configuration: {exc}"
        ) from exc
    state_dict = raw["state_dict"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state_dict).__name__}, not a dict")
    _check_state_dict(model_cfg, panoptic, state_dict, path)
    if clip_id.embed_dim != model_cfg.embed_dim:
        raise CheckpointError(f"{path}: model embed_dim {model_cfg.embed_dim} != CLIP {clip_id} embed_dim")

    bank = None
    if raw.get("text_bank") is not None:
        data = raw["text_bank"]
        try:
            bank = (
                EmbeddingBank.from_dict(data)
                if "format" in data
                else EmbeddingBank(list(data["names"]), data["vectors"], clip_id)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid text_bank: {exc}") from exc
        if bank.identity != clip_id:
            raise CheckpointError(
                f"{path}: text bank made with CLIP {bank.identity}, checkpoint with {clip_id}"
            )
    vocabulary = raw.get("vocabulary")
    if vocabulary is not None:
        try:
            vocabulary = Vocabulary.from_strings(vocabulary).to_strings()
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: invalid vocabulary: {exc}") from exc
    ckpt = Checkpoint(
        path=path,
        model_config=model_cfg,
        state_dict=state_dict,
        clip_config=clip_cfg,
        identity=clip_id,
        vocabulary=vocabulary,
        text_bank=bank,
        meta=dict(raw.get("meta") or {}),
        format_version=version,
        dense=dense,
        panoptic=panoptic,
    )
    if identity is not None:
        ckpt.check_identity(identity)
    return ckpt


def build_untrained_checkpoint(
    path: str | Path,
    model_cfg: ModelConfig,
    clip_cfg: ClipConfig,
    vocabulary: Vocabulary | Sequence[str] | None = None,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    panoptic: PanopticInfo | None = None,
) -> Path:
    """Save a randomly initialised model (deterministic from `seed`) paired with `clip_cfg`'s CLIP;
    a `PanopticNet` with ``panoptic``'s head when given.

    For tests, demos and benchmarks: its labels mean nothing. The CLIP is loaded once to record its
    identity (so `clip_cfg` must be loadable, e.g. ``tiny_clip_config()``)."""
    from clip3d_core.clip import load_clip

    identity = load_clip(clip_cfg).identity
    if identity.embed_dim != model_cfg.embed_dim:
        raise CheckpointError(
            f"model embed_dim {model_cfg.embed_dim} != CLIP {identity} embed_dim {identity.embed_dim}; "
            f"build the model config with embed_dim={identity.embed_dim}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _network(model_cfg, panoptic)
    log.warning("writing an UNTRAINED checkpoint %s (random weights, seed %d)", path, seed)
    return save_checkpoint(
        path,
        model,
        model_cfg,
        clip_cfg,
        identity,
        vocabulary=vocabulary,
        meta={"untrained": True, "seed": seed, **dict(meta or {})},
        panoptic=panoptic,
    )
