"""Loss terms as a configured list: each term is one small module registered by name, with its own
typed options; the training config lists the terms with their weights::

    loss:
      ce:       {weight: 1.0, options: {class_balance: 0.5}}
      semantic: {weight: 0.5, options: {temperature: 0.07}}
      spatial:  {weight: 0.5}
      my_term:  {weight: 0.1, term: my_registered_name, options: {...}}   # `term` defaults to the key

Adding a term is one file (a class decorated with `register_loss`, holding an ``Options`` dataclass;
`BaseTerm` stores the options)
plus one config entry. Every term reads one `LossInputs` bundle; ``extras`` carries what a later
term needs beyond it (e.g. instance targets) without changing this signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from clip3d_core.config import ConfigError
from clip3d_core.registry import Registry

if TYPE_CHECKING:
    from clip3d_core.teacher import PointTargets


@dataclass
class LossInputs:
    """What the loss terms of one batch may read.

    features: [N, D] point features (float32, after fusion where the model has it).
    valid: [N] bool, points the model produced a feature for.
    labels: [N] long training labels, `IGNORE_INDEX` where none (or not valid).
    text: [C, D] text embeddings of the training vocabulary.
    logits: [N, C] cosine logits at the model's (learnable) temperature.
    point_targets: the teacher's features at the points (None when no teacher runs).
    generator: for terms that subsample (reproducible runs).
    extras: anything else a term needs (filled by whoever adds such a term).
    """

    features: Tensor
    valid: Tensor
    labels: Tensor
    text: Tensor
    logits: Tensor
    point_targets: PointTargets | None = None
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])


class LossTerm(Protocol):
    """A loss term: ``term(inputs) -> scalar``. ``needs_teacher``: it reads ``point_targets`` (the
    trainer runs the teacher for it, and skips the term on batches without teacher output)."""

    needs_teacher: ClassVar[bool]

    def __call__(self, inputs: LossInputs) -> Tensor: ...


class BaseTerm:
    """What every term class repeats: stores its ``Options`` (built by `build_loss_terms` from the
    config entry's ``options``) and reads no teacher output unless it sets ``needs_teacher``.
    Subclassing it is optional: any class meeting `LossTerm` and holding an ``Options`` registers."""

    @dataclass
    class Options:
        pass

    needs_teacher: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options


@dataclass
class LossTermConfig:
    """One entry of the `loss` section: weight (0 disables), registered term name (default: the
    entry's key) and the term's own options."""

    weight: float = 1.0
    term: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"loss weight must be >= 0, got {self.weight}")


LOSSES: Registry[Callable[..., LossTerm]] = Registry("loss term")


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: register a loss term under `name`. The class takes one argument, an instance
    of its nested ``Options`` dataclass (built from the config entry's ``options``)."""
    return LOSSES.register(name)


@dataclass
class WeightedTerm:
    name: str  # the config key: scalars are logged as loss/<name>
    weight: float
    term: LossTerm

    @property
    def reads_teacher(self) -> bool:
        """Enabled and reading the teacher's point targets: a trainer must run the teacher for it."""
        return self.weight > 0 and self.term.needs_teacher


def build_loss_terms(entries: Mapping[str, LossTermConfig]) -> list[WeightedTerm]:
    """The configured terms, in config order (unknown names or options raise `ConfigError`)."""
    import clip3d_core.losses.terms  # noqa: F401  (registers the built-in terms)

    out = []
    for key, entry in entries.items():
        cls, options = LOSSES.with_options(entry.term or key, entry.options, f"loss.{key}.options")
        out.append(WeightedTerm(key, entry.weight, cls(options)))
    return out


@dataclass
class LossParts:
    total: Tensor
    scalars: dict[str, float]


def combine_losses(terms: Sequence[WeightedTerm], inputs: LossInputs) -> LossParts:
    """``total = sum_k w_k * term_k(inputs)`` over the terms with w_k > 0 (teacher terms only where
    the batch has teacher output); each term's value is logged as ``loss/<name>``."""
    total: Tensor | None = None
    scalars: dict[str, float] = {}
    for t in terms:
        if t.weight <= 0 or (t.term.needs_teacher and inputs.point_targets is None):
            continue
        value = t.term(inputs)
        total = t.weight * value if total is None else total + t.weight * value
        scalars[f"loss/{t.name}"] = float(value.detach())
    if total is None:
        total = inputs.features.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
    scalars["loss"] = float(total.detach())
    return LossParts(total, scalars)


def default_loss_config() -> dict[str, LossTermConfig]:
    """The method's loss: CE on cos(F3d, text) / tau + semantic MCFA + spatial MCFA."""
    return {"ce": LossTermConfig(), "semantic": LossTermConfig(), "spatial": LossTermConfig()}
