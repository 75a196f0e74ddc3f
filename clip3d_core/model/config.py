"""Typed model configuration: the sparse U-Net's sizes, the CLIP-space head and the voxel grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# SemanticKITTI / nuScenes driving range: +-51.2 m around the sensor, -4..2.4 m height. A multiple
# of 2**4 voxels per axis at 0.1/0.2 m, so every encoder stage halves the grid exactly.
DEFAULT_POINT_RANGE: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -4.0, 51.2, 51.2, 2.4)


@dataclass(frozen=True)
class BackboneConfig:
    """Sparse U-Net sizes (Pointcept SpUNet layout).

    ``channels[i]``/``blocks[i]``: encoder stage i (a stride-2 SparseConv3d, then residual blocks).
    ``decoder_channels[j]``/``decoder_blocks[j]``: decoder stage j, deepest first (inverse conv,
    skip concat, residual blocks); the last one is the per-voxel output width.
    """

    in_channels: int = 4
    stem_channels: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    decoder_channels: tuple[int, ...] = (128, 96, 96, 96)
    decoder_blocks: tuple[int, ...] = (2, 2, 2, 2)
    point_channels: int = 32  # width of the per-point MLP on the raw point
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3

    def __post_init__(self) -> None:
        stages = len(self.channels)
        if stages == 0 or any(
            len(t) != stages for t in (self.blocks, self.decoder_channels, self.decoder_blocks)
        ):
            raise ValueError(
                "channels, blocks, decoder_channels and decoder_blocks need the same (non-zero) length, got "
                f"{self.channels}, {self.blocks}, {self.decoder_channels}, {self.decoder_blocks}"
            )
        sizes = (
            self.in_channels,
            self.stem_channels,
            self.point_channels,
            *self.channels,
            *self.decoder_channels,
        )
        # Decoder stages need >= 1 block: it is what narrows the skip concat back to the stage width.
        if min(sizes) < 1 or min(self.blocks, default=0) < 0 or min(self.decoder_blocks, default=0) < 1:
            raise ValueError(f"channels must be >= 1, blocks >= 0 and decoder_blocks >= 1: {self}")

    @property
    def out_channels(self) -> int:
        return self.decoder_channels[-1]


@dataclass(frozen=True)
class ModelConfig:
    """The whole 3D network: backbone, voxel grid, CLIP-space head and optional 2D-3D fusion.

    ``embed_dim`` must equal the CLIP model's joint embedding width (512 for ViT-B-16).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed_dim: int = 512
    voxel_size: float = 0.1
    point_range: tuple[float, float, float, float, float, float] = DEFAULT_POINT_RANGE
    head_hidden: int = 256
    fusion: bool = False
    fusion_hidden: int = 128
    init_temperature: float = 0.07
    learn_temperature: bool = True
    min_temperature: float = 0.01  # CLIP's logit-scale cap (100) as a temperature floor
    max_temperature: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.point_range[:3], self.point_range[3:]
        if self.voxel_size <= 0 or any(h <= l for l, h in zip(lo, hi)):
            raise ValueError(f"voxel_size must be > 0 and point_range (x0,y0,z0,x1,y1,z1) non-empty: {self}")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{self.min_temperature}, {self.init_temperature}, {self.max_temperature}"
            )
        if min(self.embed_dim, self.head_hidden, self.fusion_hidden) < 1:
            raise ValueError(f"embed_dim, head_hidden and fusion_hidden must be >= 1: {self}")

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """~2M parameters (default: ~16M): tests and CPU demos. Override e.g. ``embed_dim``."""
        backbone = BackboneConfig(
            stem_channels=16,
            channels=(16, 32, 64, 128),
            blocks=(1, 1, 1, 1),
            decoder_channels=(64, 48, 48, 48),
            decoder_blocks=(1, 1, 1, 1),
            point_channels=16,
        )
        return dataclasses.replace(cls(backbone=backbone, head_hidden=128, fusion_hidden=64), **overrides)

    @classmethod
    def default(cls, **overrides: Any) -> ModelConfig:
        """The training configuration: Pointcept-sized encoder, 512-d ViT-B-16 joint space."""
        return dataclasses.replace(cls(), **overrides)


ModelPreset = Literal["small", "default"]
# Named model sizes: the one table every "--config small" / `model_preset:` goes through.
MODEL_PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "small": ModelConfig.small,
    "default": ModelConfig.default,
}
