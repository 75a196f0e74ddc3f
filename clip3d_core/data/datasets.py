"""The built-in datasets of the registry (`clip3d_core.data.registry`): synthetic, SemanticKITTI,
nuScenes-lidarseg, each with its own typed options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from clip3d_core.config import ConfigError
from clip3d_core.data.cache import FrameCache, synthetic_key
from clip3d_core.data.frame import Frame
from clip3d_core.data.nuscenes import NUSCENES_CAMERAS, NuScenesLidarSegDataset
from clip3d_core.data.registry import register_dataset
from clip3d_core.data.semantickitti import SEQUENCE_SPLITS, SemanticKittiDataset
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorldDataset

Frames = tuple[Dataset[Frame], Dataset[Frame]]


@register_dataset("synthetic")
class SyntheticSource:
    """The procedural world; training and evaluation frames come from different world seeds."""

    @dataclass
    class Options:
        world: SyntheticConfig = field(default_factory=SyntheticConfig)  # training frames' world
        train_frames: int = 64
        val_frames: int = 16
        val_seed: int = 100_000  # world seed of the evaluation frames (training: world.seed)
        cache_frames: bool = True  # keep generated frames in memory
        cache_dir: str | None = None  # also keep them on disk (reused across runs)

    @classmethod
    def build(cls, root: str | None, options: Options) -> Frames:
        if options.val_seed == options.world.seed:
            raise ConfigError("data.options.val_seed equals the world seed: evaluation = training frames")
        val_cfg = dataclasses.replace(options.world, seed=options.val_seed)
        train: Dataset[Frame] = SyntheticWorldDataset(options.world, options.train_frames)
        val: Dataset[Frame] = SyntheticWorldDataset(val_cfg, options.val_frames)
        if options.cache_frames:
            train = FrameCache(train, key=synthetic_key(options.world), directory=options.cache_dir)
            val = FrameCache(val, key=synthetic_key(val_cfg), directory=options.cache_dir)
        return train, val


def _sequences(value: str | list[str]) -> set[str]:
    names = SEQUENCE_SPLITS.get(value, [value]) if isinstance(value, str) else value
    return {f"{int(n):02d}" if str(n).isdigit() else str(n) for n in names}


def _root(root: str | None, name: str) -> str:
    if root is None:
        raise ConfigError(f"data.root is required for dataset {name!r}")
    return root


@register_dataset("semantickitti")
class SemanticKittiSource:
    """SemanticKITTI; training and evaluation sequences must not overlap."""

    @dataclass
    class Options:
        train_sequences: str | list[str] = "train"  # "train" / "val" or sequence numbers
        val_sequences: str | list[str] = "val"
        with_images: bool = True
        camera: str = "P2"

    @classmethod
    def build(cls, root: str | None, options: Options) -> Frames:
        root = _root(root, "semantickitti")
        overlap = sorted(_sequences(options.train_sequences) & _sequences(options.val_sequences))
        if overlap:
            raise ConfigError(f"sequences {overlap} are in both train_sequences and val_sequences")
        kw = {"with_images": options.with_images, "camera": options.camera}
        return (SemanticKittiDataset(root, options.train_sequences, **kw),
                SemanticKittiDataset(root, options.val_sequences, **kw))


@register_dataset("nuscenes")
class NuScenesSource:
    """nuScenes-lidarseg; training and evaluation splits must differ."""

    @dataclass
    class Options:
        version: str = "v1.0-trainval"
        train_split: str = "train"
        val_split: str = "val"
        with_images: bool = True
        cameras: tuple[str, ...] = tuple(NUSCENES_CAMERAS)
        intensity_scale: float = 1.0 / 255.0

    @classmethod
    def build(cls, root: str | None, options: Options) -> Frames:
        root = _root(root, "nuscenes")
        if options.train_split == options.val_split:
            raise ConfigError("data.options.train_split equals data.options.val_split")
        kw = {"with_images": options.with_images, "cameras": tuple(options.cameras),
              "intensity_scale": options.intensity_scale}
        return (NuScenesLidarSegDataset(root, options.version, options.train_split, **kw),
                NuScenesLidarSegDataset(root, options.version, options.val_split, **kw))
