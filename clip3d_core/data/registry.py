"""Datasets by name, each with its own typed options: the training config's ``data`` section names
one and passes its options through::

    data:
      dataset: semantickitti        # a registered name
      root: /data/semantickitti
      options: {train_sequences: train, val_sequences: val, camera: P2}

A dataset is a class registered with `register_dataset`, holding an ``Options`` dataclass and a
``build(root, options) -> (training frames, evaluation frames)`` classmethod that guarantees the two
never overlap. Adding one is one file plus one config entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch.utils.data import Dataset

from clip3d_core.data.frame import Frame
from clip3d_core.registry import Registry


class DatasetSource(Protocol):
    """A registered dataset: ``Options`` (a dataclass) and ``build``."""

    Options: type

    @classmethod
    def build(cls, root: str | None, options: Any) -> tuple[Dataset[Frame], Dataset[Frame]]: ...


DATASETS: Registry[type[DatasetSource]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[type], type]:
    return DATASETS.register(name)


def dataset_source(name: str) -> type[DatasetSource]:
    import clip3d_core.data.datasets  # noqa: F401  (registers the built-in datasets)

    return DATASETS.get(name)


def dataset_options(name: str, options: dict[str, Any]) -> Any:
    """The typed options of dataset `name` (unknown keys raise `ConfigError`)."""
    dataset_source(name)  # registers the built-in datasets
    return DATASETS.with_options(name, options, f"data.options ({name})")[1]
