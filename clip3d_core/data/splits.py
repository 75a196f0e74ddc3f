"""Zero-shot splits: which classes of a dataset are seen (labelled) in training and which are unseen.

Built-in splits (`load_split(name)`):
- "semantickitti": unseen motorcycle, truck, bicyclist, traffic-sign — the SemanticKITTI protocol of
  3DGenZ (Michele et al., "Generative Zero-Shot Learning for Semantic Segmentation of 3D Point
  Clouds", 3DV 2021), reused by later zero-shot LiDAR segmentation papers.
- "nuscenes": unseen motorcycle, truck, construction_vehicle, traffic_cone — OUR choice: the two
  vehicle classes of the 3DGenZ SemanticKITTI protocol plus the two rare nuScenes-only object classes.
  Zero-shot nuScenes results exist (e.g. Chen et al. arXiv:2210.09923, Lu et al. ICCV 2023
  arXiv:2307.10782) but their exact unseen lists were not verified here; compare with care.
- "synthetic": unseen truck, motorcyclist, traffic sign, traffic cone — OUR choice for the synthetic
  world, mirroring the KITTI protocol (a large vehicle, a rider class, a thin static object) plus a
  small object class.
Custom splits: `load_split("path/to/split.yaml")` with keys name, classes, unseen, prompts (optional).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml


class SplitError(ValueError):
    """A zero-shot split is inconsistent (unknown / duplicate class, nothing seen)."""


@dataclass(frozen=True)
class ZeroShotSplit:
    """Dataset classes (label index = position) and the subset held out as unseen.

    prompts: one vocabulary entry per class ("name|synonym|..." as `Vocabulary.from_strings` takes),
    phrasing dataset jargon ("other-vehicle", "manmade") as CLIP-friendly text; defaults to the names.
    """

    classes: tuple[str, ...]
    unseen: tuple[str, ...]
    name: str = ""
    prompts: tuple[str, ...] | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "unseen", tuple(self.unseen))
        where = f"split {self.name!r}" if self.name else "split"
        if not self.classes:
            raise SplitError(f"{where}: no classes")
        if any(not isinstance(c, str) or not c.strip() for c in self.classes):
            raise SplitError(f"{where}: empty or non-string class name in {self.classes}")
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dup:
            raise SplitError(f"{where}: duplicate classes {dup}")
        unknown = [u for u in self.unseen if u not in self.classes]
        if unknown:
            raise SplitError(f"{where}: unseen classes {unknown} are not among the classes "
                             f"{list(self.classes)}")
        if len(set(self.unseen)) != len(self.unseen):
            raise SplitError(f"{where}: duplicate unseen classes {list(self.unseen)}")
        if len(self.unseen) == len(self.classes):
            raise SplitError(f"{where}: every class is unseen; nothing to train on")
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
            if len(self.prompts) != len(self.classes):
                raise SplitError(f"{where}: {len(self.prompts)} prompts for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def unseen_ids(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c in self.unseen)

    @property
    def seen_ids(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c not in self.unseen)

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(self.classes[i] for i in self.seen_ids)

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Vocabulary entries for all classes, in label order."""
        return self.prompts if self.prompts is not None else self.classes

    def unseen_mask(self) -> np.ndarray:
        """[C] bool, True for unseen classes."""
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[list(self.unseen_ids)] = True
        return mask

    def seen_labels(self, labels: np.ndarray) -> np.ndarray:
        """Training labels: unseen classes become -1 (ignore); indices are unchanged."""
        out = np.array(labels, dtype=np.int64, copy=True)
        valid = out >= 0
        out[valid & self.unseen_mask()[np.where(valid, out, 0)]] = -1
        return out

    def with_unseen(self, unseen: Sequence[str]) -> ZeroShotSplit:
        return ZeroShotSplit(self.classes, tuple(unseen), self.name, self.prompts, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "classes": list(self.classes), "unseen": list(self.unseen),
                "prompts": None if self.prompts is None else list(self.prompts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotSplit:
        unknown = sorted(set(data) - {"name", "classes", "unseen", "prompts", "source"})
        if unknown:
            raise SplitError(f"split dict: unknown keys {unknown}")
        if "classes" not in data or "unseen" not in data:
            raise SplitError("split dict: needs 'classes' and 'unseen'")
        return cls(tuple(data["classes"]), tuple(data["unseen"] or ()), str(data.get("name", "")),
                   data.get("prompts"), str(data.get("source", "")))


def _builtin() -> dict[str, ZeroShotSplit]:
    from clip3d_core.data.nuscenes import NUSCENES_CLASSES, NUSCENES_PROMPTS
    from clip3d_core.data.semantickitti import SEMANTICKITTI_CLASSES, SEMANTICKITTI_PROMPTS
    from clip3d_core.data.synthetic.world import CLASS_NAMES

    return {
        "semantickitti": ZeroShotSplit(
            SEMANTICKITTI_CLASSES, ("motorcycle", "truck", "bicyclist", "traffic-sign"), "semantickitti",
            SEMANTICKITTI_PROMPTS, "3DGenZ (Michele et al., 3DV 2021) SemanticKITTI protocol"),
        "nuscenes": ZeroShotSplit(
            NUSCENES_CLASSES, ("motorcycle", "truck", "construction_vehicle", "traffic_cone"), "nuscenes",
            NUSCENES_PROMPTS, "clip3d choice: 3DGenZ's vehicle classes + the rare nuScenes object classes"),
        "synthetic": ZeroShotSplit(
            CLASS_NAMES, ("truck", "motorcyclist", "traffic sign", "traffic cone"), "synthetic", None,
            "clip3d choice for the synthetic world, mirroring the 3DGenZ KITTI protocol"),
    }


SPLIT_NAMES: tuple[str, ...] = ("semantickitti", "nuscenes", "synthetic")


def load_split(name: str | Path) -> ZeroShotSplit:
    """A built-in split by name (see module doc) or a YAML file path."""
    key = str(name)
    if key in SPLIT_NAMES:
        return _builtin()[key]
    path = Path(key)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SplitError(f"{path}: expected a mapping")
        return ZeroShotSplit.from_dict({"name": path.stem, **data})
    raise SplitError(f"unknown split {key!r}: use one of {list(SPLIT_NAMES)} or a .yaml file")
