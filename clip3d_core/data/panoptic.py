"""Panoptic data: things / stuff per dataset (one place), base / novel splits, training targets.

A panoptic *segment* is one (class, instance) pair: every point of a stuff class in a frame forms one
segment (instance 0), every instance of a thing class its own. The standard minimum segment sizes
(smaller ground-truth / predicted segments are neither false negatives nor false positives) are the
nuScenes-panoptic 15 points and the SemanticKITTI 50 points; the synthetic world uses nuScenes' 15
(its VLP-16-like scans are as sparse).

Open-vocabulary protocol (arXiv 2401.02402): novel classes never contribute a label to training.
`PanopticSplit.training_targets` turns their points into unlabelled points (semantic -1, no segment),
exactly like ignored points, so permuting the novel ground truth cannot change training.

Built-in splits (`load_panoptic_split(name)`, YAML files in `panoptic_splits/`):
- nuscenes_b12n4: novel bus, motorcycle, pedestrian (things) + vegetation (stuff) — the paper's B12/N4.
- nuscenes_b11n5: novel bus, motorcycle, pedestrian, trailer (things) + vegetation (stuff) — B11/N5
  (the fifth novel class, trailer, is OUR reading of the paper's alternative split; verify before
  comparing numbers).
- semantickitti_b15n4: OUR split (the paper's SemanticKITTI split is random and unpublished): novel
  motorcycle, truck, bicyclist (things) + vegetation (stuff).
- synthetic_b13n4: OUR split for the synthetic world: novel bus, pedestrian, traffic cone (things) +
  tree (stuff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clip3d_core.data.splits import SplitError, ZeroShotSplit

SPLIT_DIR = Path(__file__).with_name("panoptic_splits")


@dataclass(frozen=True)
class PanopticSpec:
    """A dataset's classes (label index = position), which of them are things, the minimum segment size."""

    name: str
    classes: tuple[str, ...]
    things: tuple[str, ...]
    min_points: int
    prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.things if t not in self.classes]
        if unknown:
            raise SplitError(f"{self.name}: thing classes {unknown} are not among {list(self.classes)}")
        if self.min_points < 1:
            raise SplitError(f"{self.name}: min_points must be >= 1, got {self.min_points}")

    def thing_mask(self) -> np.ndarray:
        """[C] bool, True for thing classes."""
        return np.array([c in self.things for c in self.classes], dtype=bool)

    @property
    def stuff(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.things)


def _builtin_specs() -> dict[str, PanopticSpec]:
    from clip3d_core.data.nuscenes import NUSCENES_CLASSES, NUSCENES_PROMPTS
    from clip3d_core.data.semantickitti import SEMANTICKITTI_CLASSES, SEMANTICKITTI_PROMPTS
    from clip3d_core.data.synthetic.world import CLASS_NAMES, THING_CLASSES

    return {
        # nuScenes-panoptic: the 10 detection classes are things, the 6 surfaces stuff.
        "nuscenes": PanopticSpec("nuscenes", NUSCENES_CLASSES, NUSCENES_CLASSES[:10], 15, NUSCENES_PROMPTS),
        # SemanticKITTI panoptic: the 8 vehicle / human classes are things (semantic-kitti.yaml).
        "semantickitti": PanopticSpec("semantickitti", SEMANTICKITTI_CLASSES, SEMANTICKITTI_CLASSES[:8], 50,
                                      SEMANTICKITTI_PROMPTS),
        "synthetic": PanopticSpec("synthetic", CLASS_NAMES,
                                  tuple(c for c in CLASS_NAMES if c in THING_CLASSES), 15),
    }


DATASET_NAMES: tuple[str, ...] = ("nuscenes", "semantickitti", "synthetic")


def panoptic_spec(dataset: str) -> PanopticSpec:
    specs = _builtin_specs()
    if dataset not in specs:
        raise SplitError(f"unknown panoptic dataset {dataset!r}: use one of {list(specs)}")
    return specs[dataset]


@dataclass(frozen=True)
class PanopticTargets:
    """Training targets of one frame, base classes only.

    semantic: int64 [N] class index, -1 for ignored and novel points.
    segment: int64 [N] row into `segment_class`, -1 for points of no segment (ignored, novel).
    segment_class: int64 [S] class index of each segment (things first in order of appearance in
    `np.unique`, then stuff; every class present once for stuff).
    """

    semantic: np.ndarray
    segment: np.ndarray
    segment_class: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(self.segment_class.shape[0])


@dataclass(frozen=True)
class PanopticSplit:
    """A dataset's panoptic classes and the novel ones (never labelled in training)."""

    spec: PanopticSpec
    novel: tuple[str, ...]
    name: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "novel", tuple(self.novel))
        self.semantic  # validates the class lists (unknown / duplicate / all novel)  # noqa: B018
        if not any(c not in self.novel for c in self.spec.things):
            raise SplitError(f"split {self.name!r}: no base thing class left")

    @property
    def semantic(self) -> ZeroShotSplit:
        """The same split as a semantic zero-shot split (seen = base, unseen = novel)."""
        return ZeroShotSplit(self.spec.classes, self.novel, self.name, self.spec.prompts, self.source)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)

    def _ids(self, *, novel: bool | None = None, thing: bool | None = None) -> tuple[int, ...]:
        things = self.spec.thing_mask()
        return tuple(i for i, c in enumerate(self.classes)
                     if (novel is None or (c in self.novel) == novel)
                     and (thing is None or things[i] == thing))

    @property
    def base_ids(self) -> tuple[int, ...]:
        return self._ids(novel=False)

    @property
    def novel_ids(self) -> tuple[int, ...]:
        return self._ids(novel=True)

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return self._ids(thing=True)

    @property
    def base_thing_ids(self) -> tuple[int, ...]:
        return self._ids(novel=False, thing=True)

    @property
    def base_stuff_ids(self) -> tuple[int, ...]:
        return self._ids(novel=False, thing=False)

    def novel_mask(self) -> np.ndarray:
        return self.semantic.unseen_mask()

    def training_targets(self, labels: np.ndarray, instances: np.ndarray | None) -> PanopticTargets:
        """Base-class segments of one frame. Novel points become unlabelled (semantic -1, segment -1),
        so nothing about them (class, instance id, extent) reaches a loss. Thing points without an
        instance id (0) are one segment per class, as the panoptic evaluators count them."""
        semantic = self.semantic.seen_labels(labels)
        n = semantic.shape[0]
        inst = np.zeros(n, dtype=np.int64) if instances is None else np.asarray(instances, dtype=np.int64)
        if inst.shape != (n,):
            raise SplitError(f"instances {inst.shape} do not match labels {semantic.shape}")
        labelled = semantic >= 0
        # stuff: one segment per class whatever instance id the dataset stored
        inst = np.where(labelled & self.spec.thing_mask()[np.where(labelled, semantic, 0)], inst, 0)
        key = semantic * (int(inst.max(initial=0)) + 1) + inst
        segment = np.full(n, -1, dtype=np.int64)
        uniq, first, inverse = np.unique(key[labelled], return_index=True, return_inverse=True)
        segment[labelled] = inverse
        segment_class = semantic[labelled][first] if uniq.size else np.zeros(0, dtype=np.int64)
        return PanopticTargets(semantic, segment, segment_class.astype(np.int64))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dataset": self.spec.name, "novel": list(self.novel),
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanopticSplit:
        unknown = sorted(set(data) - {"name", "dataset", "novel", "source"})
        if unknown:
            raise SplitError(f"panoptic split: unknown keys {unknown}")
        if "dataset" not in data or "novel" not in data:
            raise SplitError("panoptic split: needs 'dataset' and 'novel'")
        return cls(panoptic_spec(str(data["dataset"])), tuple(data["novel"] or ()), str(data.get("name", "")),
                   str(data.get("source", "")))


PANOPTIC_SPLIT_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in SPLIT_DIR.glob("*.yaml")))


def load_panoptic_split(name: str | Path) -> PanopticSplit:
    """A built-in split by name (module doc) or a YAML file with keys dataset, novel, name, source."""
    key = str(name)
    path = SPLIT_DIR / f"{key}.yaml" if key in PANOPTIC_SPLIT_NAMES else Path(key)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise SplitError(f"unknown panoptic split {key!r}: use one of {list(PANOPTIC_SPLIT_NAMES)} "
                         "or a .yaml file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected a mapping")
    return PanopticSplit.from_dict({"name": path.stem, **data})

