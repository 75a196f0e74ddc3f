"""The core's open seams: loss terms, metrics, datasets and config choices are extended by one file
plus one config entry. The toy loss term, metric and dataset below live in this test file only:
registering them and naming them in the config is all it takes to use them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch

from clip3d_core.config import ConfigError, check_choices, from_dict
from clip3d_core.data import SyntheticWorldDataset
from clip3d_core.data.registry import register_dataset
from clip3d_core.losses import (
    LOSSES,
    LossInputs,
    LossTermConfig,
    build_loss_terms,
    class_frequency_weights,
    combine_losses,
    masked_cross_entropy,
    register_loss,
    semantic_alignment_loss,
    spatial_alignment_loss,
)
from clip3d_core.metrics import METRICS, GroundTruth, MetricContext, register_metric
from clip3d_core.predictor import Prediction
from clip3d_core.registry import Registry, RegistryError
from clip3d_core.teacher import PointTargets
from clip3d_core.training import TrainConfig, Trainer, load_train_config
from clip3d_core.training.data import build_datasets, build_split

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "synthetic_tiny.yaml"


# ------------------------------------------------------------------ the toy extensions (one "file")


@register_loss("toy_mean_feature")
class ToyMeanFeatureTerm:
    """Pulls the batch's mean point feature towards length `target` (a loss nobody needs)."""

    @dataclass
    class Options:
        target: float = 0.5

    needs_teacher: ClassVar[bool] = False

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        mean = inputs.features[inputs.valid].mean(0)
        return (mean.norm() - self.options.target).abs()


@register_metric("toy_coverage")
class ToyCoverageMetric:
    """Share of the labelled points that got any prediction."""

    @dataclass
    class Options:
        pass

    def __init__(self, context: MetricContext, options: Options) -> None:
        self.counts = torch.zeros(2, dtype=torch.int64)  # [labelled, labelled and predicted]

    def update(self, prediction: Prediction, truth: GroundTruth) -> None:
        labelled = truth.labels >= 0
        self.counts += torch.tensor([int(labelled.sum()), int((labelled & (prediction.labels >= 0)).sum())])

    def state(self) -> list[torch.Tensor]:
        return [self.counts]

    def compute(self) -> dict[str, Any]:
        return {"toy_coverage": float(self.counts[1]) / max(1, int(self.counts[0]))}


# ------------------------------------------------------------------ tests


def test_a_toy_term_and_a_toy_metric_are_one_config_entry_each(tmp_path: Path, frame_cache: Path) -> None:
    cfg = load_train_config(TINY, [
        "loss.toy_mean_feature.weight=0.1",  # the one config entry of the loss term
        "evaluation.metrics.toy_coverage={}",  # the one config entry of the metric
        "trainer.iterations=2", "self_training.enabled=false", "trainer.precise_bn_batches=1",
        "data.options.val_frames=1", "trainer.log_every=1", "trainer.checkpoint_every=0",
        f"data.options.cache_dir={frame_cache}",
    ])
    result = Trainer(cfg, out_dir=tmp_path / "run").fit()
    logged = result.history[-1]
    assert logged["loss/toy_mean_feature"] > 0.0
    parts = 1.0 * logged["loss/ce"] + 0.5 * logged["loss/semantic"] + 0.5 * logged["loss/spatial"]
    assert logged["loss"] == pytest.approx(parts + 0.1 * logged["loss/toy_mean_feature"], rel=1e-5)
    metrics = result.metrics["clip_guided"]
    assert 0.9 < metrics["toy_coverage"] <= 1.0 and metrics["miou"] is not None  # next to the default


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, PointTargets, torch.Tensor]


def _batch(gen: torch.Generator) -> Batch:
    n, d, c, p = 300, 16, 5, 40
    features = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_(True)
    labels = torch.randint(-1, c, (n,), generator=gen)
    valid = torch.rand(n, generator=gen) > 0.1
    visible = torch.rand(n, generator=gen) > 0.3
    pt = PointTargets(features=torch.randn(n, d, generator=gen), visible=visible,
                      patch_index=torch.where(visible, torch.randint(0, p, (n,), generator=gen), -1),
                      patch_features=torch.randn(p, d, generator=gen))
    return features, labels, valid, pt, torch.randn(c, d, generator=gen)


def test_default_loss_terms_equal_the_method_loss_bit_for_bit() -> None:
    """The registry's default terms compute exactly the former hard-wired loss:
    w_ce * CE (class balanced) + w_sem * semantic MCFA + w_spa * spatial MCFA."""
    features, labels, valid, pt, text = _batch(torch.Generator().manual_seed(0))
    labels = torch.where(valid, labels, -1)
    logits = features @ torch.nn.functional.normalize(text, dim=1).t() / 0.05
    cfg = load_train_config(REPO / "training" / "synthetic_bench.yaml")
    terms = build_loss_terms(cfg.loss)
    inputs = LossInputs(features=features, valid=valid, labels=labels, text=text, logits=logits,
                        point_targets=pt, generator=torch.Generator().manual_seed(7))
    new = combine_losses(terms, inputs).total
    (g_new,) = torch.autograd.grad(new, features, retain_graph=True)

    gen = torch.Generator().manual_seed(7)
    weight = class_frequency_weights(labels, 5, power=0.5)
    ce = masked_cross_entropy(logits, labels, class_weight=weight)
    sem = semantic_alignment_loss(features, labels, pt.features, torch.where(pt.visible, labels, -1),
                                  num_classes=5, temperature=0.07, balance=True)
    spa = spatial_alignment_loss(features, torch.where(valid, pt.patch_index, -1), pt.patch_features,
                                 temperature=0.07, max_pairs=2048, generator=gen)
    old = 1.0 * ce + 0.5 * sem + 0.5 * spa
    (g_old,) = torch.autograd.grad(old, features)
    assert torch.equal(new, old) and torch.equal(g_new, g_old)
    assert [(t.name, t.weight) for t in terms] == [("ce", 1.0), ("semantic", 0.5), ("spatial", 0.5)]


def test_terms_without_weight_or_teacher_output_are_skipped() -> None:
    features, labels, valid, pt, text = _batch(torch.Generator().manual_seed(1))
    logits = features @ text.t()
    terms = build_loss_terms({"ce": LossTermConfig(1.0), "semantic": LossTermConfig(0.0),
                              "spatial": LossTermConfig(1.0)})
    no_teacher = combine_losses(terms, LossInputs(features, valid, labels, text, logits, point_targets=None))
    assert set(no_teacher.scalars) == {"loss/ce", "loss"}
    with_teacher = combine_losses(terms, LossInputs(features, valid, labels, text, logits, point_targets=pt))
    assert set(with_teacher.scalars) == {"loss/ce", "loss/spatial", "loss"}


def test_unknown_names_and_bad_options_fail_at_config_time() -> None:
    with pytest.raises(RegistryError, match=r"unknown loss term 'focal'.*registered: .*'ce'"):
        load_train_config(TINY, ["loss.focal.weight=1.0"])
    with pytest.raises(ConfigError, match=r"loss\.ce\.options: unknown key"):
        load_train_config(TINY, ["loss.ce.options.gamma=2"])
    with pytest.raises(ConfigError, match="weight must be >= 0"):
        load_train_config(TINY, ["loss.ce.weight=-1"])
    with pytest.raises(RegistryError, match="unknown metric 'pq'"):
        load_train_config(TINY, ["evaluation.metrics.pq={}"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_train_config(TINY, ["loss.ce=1.0"])  # the former `loss: {w_ce: 1.0}` style
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(2)
    assert "toy_mean_feature" in LOSSES and "semantic" in METRICS and "toy_coverage" in METRICS


def test_literal_choices_are_checked_from_yaml_and_in_code() -> None:
    @dataclass
    class Small:
        mode: Literal["a", "b"] = "a"

    assert from_dict(Small, {"mode": "b"}).mode == "b"
    with pytest.raises(ConfigError, match=r"Small\.mode: 'c' not in \('a', 'b'\)"):
        from_dict(Small, {"mode": "c"})
    with pytest.raises(ConfigError, match=r"Small\.mode: 'c' not in"):
        check_choices(Small(mode="c"))  # type: ignore[arg-type]
    for key, bad in (("setting", "fully_supervised"), ("model_preset", "huge"), ("trainer.amp", "fp8"),
                     ("optim.name", "lamb"), ("optim.schedule", "step"), ("teacher.kind", "dino")):
        with pytest.raises(ConfigError, match=f"{key.split('.')[-1]}: '{bad}' not in"):
            load_train_config(TINY, [f"{key}={bad}"])
    with pytest.raises(ConfigError, match="setting: 'x' not in"):
        TrainConfig(setting="x")  # type: ignore[arg-type]


@register_dataset("toy_frames")
class ToyFramesSource:
    """A few synthetic frames of two world seeds (a dataset nobody needs)."""

    @dataclass
    class Options:
        frames: int = 2

    @classmethod
    def build(cls, root: str | None, options: Options):
        world = load_train_config(TINY).data.typed_options().world
        held_out = dataclasses.replace(world, seed=world.seed + 1)
        return SyntheticWorldDataset(world, options.frames), SyntheticWorldDataset(held_out, options.frames)


def test_a_toy_dataset_is_one_config_entry() -> None:
    cfg = load_train_config(TINY, ["data.dataset=toy_frames", "data.options={frames: 1}", "teacher.kind=clip",
                                   "teacher.options={}"])
    assert cfg.data.typed_options() == ToyFramesSource.Options(frames=1)
    train, val = build_datasets(cfg.data, build_split(cfg.data))
    assert len(train) == len(val) == 1 and train[0].frame_id != val[0].frame_id
    with pytest.raises(RegistryError, match="unknown dataset 'waymo'"):
        load_train_config(TINY, ["data.dataset=waymo"])
    with pytest.raises(ConfigError, match=r"data\.options \(toy_frames\): unknown key"):
        load_train_config(TINY, ["data.dataset=toy_frames", "teacher.kind=clip"])  # the synthetic options
    kitti = load_train_config(REPO / "training" / "semantickitti_zeroshot.yaml",
                              ["data.options.val_sequences=[0]", "data.root=/nonexistent"])
    with pytest.raises(ConfigError, match=r"sequences \['00'\] are in both"):
        build_datasets(kitti.data, build_split(kitti.data))
