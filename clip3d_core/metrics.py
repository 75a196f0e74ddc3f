"""Evaluation metrics as objects behind one protocol, built by name from the config::

    evaluation:
      metrics:
        semantic: {}                          # mIoU / seen / unseen / hIoU (the default)
        my_metric: {metric: registered_name, options: {...}}

A metric is updated with one frame's `Prediction` and `GroundTruth`, exposes the tensors whose sum
over DDP ranks is its merged state (`state`), and computes a flat dict of scalars (`compute`).
Adding a metric is one file (a class decorated with `register_metric`, with an ``Options``
dataclass) plus one config entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from clip3d_core.config import ConfigError
from clip3d_core.evaluation import ConfusionMatrix, EvaluationReport
from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.predictor import Prediction
from clip3d_core.registry import Registry


@dataclass
class GroundTruth:
    """One frame's reference: labels [N] long (`IGNORE_INDEX` = not scored), instance ids [N]
    (0 = stuff / none) when known, and anything else a metric needs in ``extras``."""

    labels: Tensor
    instances: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, frame: Any, score_mask: Tensor | None = None) -> GroundTruth:
        """From a `Frame` with labels; points outside ``score_mask`` are not scored."""
        if frame.labels is None:
            raise ValueError(f"evaluation frame {frame.frame_id} has no labels")
        labels = torch.from_numpy(np.asarray(frame.labels, dtype=np.int64))
        if score_mask is not None:
            labels = torch.where(score_mask, labels, IGNORE_INDEX)
        instances = None if frame.instances is None else torch.from_numpy(np.asarray(frame.instances))
        return cls(labels=labels, instances=instances)


@dataclass(frozen=True)
class MetricContext:
    """What every metric may know about the label space."""

    class_names: tuple[str, ...]
    unseen: tuple[int, ...]


class Metric(Protocol):
    def update(self, prediction: Prediction, truth: GroundTruth) -> None: ...

    def state(self) -> list[Tensor]:
        """The accumulators; summing each over DDP ranks (in place) merges the ranks' metrics."""
        ...

    def compute(self) -> dict[str, Any]:
        """Flat results (scalars, None where undefined), keys unique across the configured metrics."""
        ...


@dataclass
class MetricConfig:
    """One entry of `evaluation.metrics`: registered metric name (default: the key) and options."""

    metric: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


METRICS: Registry[Callable[..., Metric]] = Registry("metric")


def register_metric(name: str) -> Callable[[type], type]:
    """Class decorator: ``cls(context: MetricContext, options: cls.Options)`` is a `Metric`."""
    return METRICS.register(name)


def build_metrics(entries: Mapping[str, MetricConfig], context: MetricContext) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for key, entry in entries.items():
        cls, options = METRICS.with_options(entry.metric or key, entry.options, f"evaluation.metrics.{key}")
        out[key] = cls(context, options)
    return out


def default_metrics_config() -> dict[str, MetricConfig]:
    return {"semantic": MetricConfig()}


@register_metric("semantic")
class SemanticMetric:
    """Confusion matrix over the classes -> IoU per class, mIoU (all / seen / unseen), hIoU, accuracy."""

    @dataclass
    class Options:
        pass

    def __init__(self, context: MetricContext, options: Options | None = None) -> None:
        self.context = context
        self.confusion = ConfusionMatrix(len(context.class_names))

    def update(self, prediction: Prediction, truth: GroundTruth) -> None:
        self.confusion.update(prediction.labels, truth.labels)

    def state(self) -> list[Tensor]:
        return [self.confusion.counts]

    def report(self) -> EvaluationReport:
        return self.confusion.report(list(self.context.class_names), unseen=list(self.context.unseen))

    def compute(self) -> dict[str, Any]:
        r = self.report()
        return {"miou": r.miou, "miou_seen": r.miou_seen, "miou_unseen": r.miou_unseen, "hiou": r.hiou,
                "accuracy": r.accuracy}


def merged_results(metrics: Mapping[str, Metric]) -> dict[str, Any]:
    """The configured metrics' `compute` dicts in one (a key computed twice is a config error)."""
    out: dict[str, Any] = {}
    for name, metric in metrics.items():
        values = metric.compute()
        clash = sorted(set(values) & set(out))
        if clash:
            raise ConfigError(f"metric {name!r} reports {clash}, already reported by another metric")
        out.update(values)
    return out


from clip3d_core import panoptic_quality as _panoptic_quality  # noqa: E402, F401  (registers "panoptic")
