"""Load a frozen open_clip model from a pretrained tag, a local file or (explicitly) random weights.

Weights never fall back silently: a tag that cannot be obtained, a missing or unfitting file, or no
weight source at all raises `ClipLoadError`. Every load records a `ClipIdentity` so checkpoints and
embedding caches can tell which CLIP they were made with.

Without a network, a pretrained tag only loads from open_clip's/Hugging Face's local cache; set
HF_HUB_OFFLINE=1 there so a missing copy fails at once instead of after the hub client's retries.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_MODEL = "clip3d-tiny"  # 2-layer ViT/16 at 64 px, embed_dim 32: for tests and demos only
PRECISIONS = ("fp32", "fp16", "bf16")

open_clip.add_model_config(MODEL_CONFIG_DIR)


class ClipLoadError(ValueError):
    """The requested CLIP model or its weights cannot be loaded."""


@dataclass
class ClipConfig:
    """Which CLIP to load. Exactly one weight source: `pretrained` tag, `checkpoint` file, or
    `allow_random` (tests/demos; deterministic from `random_seed`)."""

    model_name: str = "ViT-B-16"
    pretrained: str | None = None
    checkpoint: str | None = None
    allow_random: bool = False
    random_seed: int = 0
    precision: str = "fp32"


def _canonical_name(model_name: str) -> str:
    """open_clip's spelling of a model name ("ViT-B/16" and "ViT-B-16" are one model)."""
    return model_name.replace("/", "-")


@dataclass(frozen=True)
class ClipIdentity:
    """What produced an embedding: model architecture, weight source and output dimension."""

    model_name: str
    source: str  # "pretrained:<tag>" | "file:<sha256[:16]>" | "random:<seed>"
    embed_dim: int

    def __post_init__(self) -> None:  # one spelling per model, however a config wrote it
        object.__setattr__(self, "model_name", _canonical_name(self.model_name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipIdentity:
        try:
            return cls(model_name=str(data["model_name"]), source=str(data["source"]),
                       embed_dim=int(data["embed_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ClipLoadError(f"malformed CLIP identity {data!r}: {exc}") from exc

    def __str__(self) -> str:
        return f"{self.model_name} ({self.source}, D={self.embed_dim})"


@dataclass
class LoadedClip:
    """A frozen open_clip model with what the dense and text encoders need to drive it."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    identity: ClipIdentity
    config: ClipConfig
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: tuple[int, int]  # native (h, w)
    patch_size: int | None  # None for non-ViT image towers (no dense features)
    embed_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def tiny_clip_config(seed: int = 0) -> ClipConfig:
    """A tiny randomly initialised CLIP that loads offline in well under a second (tests)."""
    return ClipConfig(model_name=TINY_MODEL, allow_random=True, random_seed=seed)


def file_fingerprint(path: str | Path) -> str:
    """First 16 hex digits of the file's SHA-256 (the `file:` identity of a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check_config(cfg: ClipConfig) -> dict[str, Any]:
    if ":" in cfg.model_name:
        raise ClipLoadError(
            f"model name {cfg.model_name!r}: hub/dir schemas are not supported; use a built-in open_clip "
            "name with a pretrained tag or a local checkpoint file"
        )
    model_cfg = open_clip.get_model_config(_canonical_name(cfg.model_name))
    if model_cfg is None:
        near = [m for m in open_clip.list_models() if cfg.model_name.split("-")[0].lower() in m.lower()]
        raise ClipLoadError(f"unknown open_clip model {cfg.model_name!r}; similar: {near[:12]}")
    if cfg.precision not in PRECISIONS:
        raise ClipLoadError(f"precision {cfg.precision!r} not one of {PRECISIONS}")
    if cfg.pretrained and cfg.checkpoint:
        raise ClipLoadError("both a pretrained tag and a checkpoint file given; choose one weight source")
    return model_cfg


def _create(cfg: ClipConfig, device: str | torch.device) -> tuple[nn.Module, str]:
    """The open_clip model and its identity source string."""
    name = _canonical_name(cfg.model_name)
    common = dict(precision=cfg.precision, device=device, pretrained_text=False)
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ClipLoadError(f"CLIP checkpoint file not found: {path}")
        source = f"file:{file_fingerprint(path)}"
        try:
            model = open_clip.create_model(name, pretrained=str(path), **common)
        except Exception as exc:  # open_clip raises RuntimeError/KeyError/pickle errors alike
            raise ClipLoadError(f"CLIP checkpoint {path} does not load into {name}: {exc}") from exc
        return model, source
    if cfg.pretrained:
        if not open_clip.get_pretrained_cfg(name, cfg.pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            hint = " (a file? use checkpoint=)" if Path(cfg.pretrained).exists() else ""
            raise ClipLoadError(f"unknown pretrained tag {cfg.pretrained!r} for {name}{hint}; known: {tags}")
        # OpenAI's weights were trained with QuickGELU, which plain configs such as ViT-B-16 lack:
        # open_clip would only warn and return a model whose features are quietly wrong.
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, cfg.pretrained).get("quick_gelu", False))
        try:
            model = open_clip.create_model(
                name, pretrained=cfg.pretrained, force_quick_gelu=quick_gelu, **common
            )
        except Exception as exc:
            raise ClipLoadError(
                f"weights for {name} tag {cfg.pretrained!r} are not available (no network and no cached "
                f"copy?): {exc}. Download them where a network is available and pass the file as "
                "checkpoint instead."
            ) from exc
        return model, f"pretrained:{cfg.pretrained}"
    if not cfg.allow_random:
        raise ClipLoadError(
            f"no weights for {name}: give a pretrained tag or a checkpoint file (random weights need "
            "allow_random=True)"
        )
    log.warning("CLIP %s uses RANDOM weights (seed %d): features carry no semantics", name, cfg.random_seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(cfg.random_seed)
        model = open_clip.create_model(name, **common)
    return model, f"random:{cfg.random_seed}"


def load_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> LoadedClip:
    """Load `cfg` frozen and in eval mode on `device`; raise `ClipLoadError` on any missing piece."""
    model_cfg = _check_config(cfg)
    model, source = _create(cfg, device)
    model.eval().requires_grad_(False)
    visual = model.visual
    pp = open_clip.get_model_preprocess_cfg(model)
    patch = getattr(visual, "patch_size", None)
    patch_size = None if patch is None else int(open_clip.utils.to_2tuple(patch)[0])
    identity = ClipIdentity(cfg.model_name, source, int(model_cfg["embed_dim"]))
    log.info("loaded CLIP %s on %s", identity, device)
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(identity.model_name),
        identity=identity,
        config=cfg,
        image_mean=tuple(float(v) for v in pp["mean"]),
        image_std=tuple(float(v) for v in pp["std"]),
        image_size=tuple(int(v) for v in open_clip.utils.to_2tuple(visual.image_size)),
        patch_size=patch_size,
        embed_dim=identity.embed_dim,
    )
