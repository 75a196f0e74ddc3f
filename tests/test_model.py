"""Clip3DNet: gradients, invalid points, order, batching, fusion masking, temperature, configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import clip3d_core  # noqa: F401  (applies the spconv CPU backward fix first)
from clip3d_core.config import ConfigError, from_dict, to_dict
from clip3d_core.model import BackboneConfig, Clip3DNet, CosineClassifier, ModelConfig

D = 32


def cloud(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """A ground plane plus random boxes of points: x, y, z, intensity inside the default range."""
    g = torch.Generator().manual_seed(seed)
    ground = torch.cat([torch.rand(n // 2, 2, generator=g) * 40 - 20, torch.full((n // 2, 1), -1.7)], 1)
    objects = torch.rand(n - n // 2, 3, generator=g) * torch.tensor([30.0, 30.0, 3.0]) - torch.tensor(
        [15, 15, 1.7]
    )
    xyz = torch.cat([ground, objects])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], 1)


@pytest.fixture(scope="module")
def model() -> Clip3DNet:
    torch.manual_seed(0)
    return Clip3DNet(ModelConfig.small(embed_dim=D)).eval()


def test_forward_backward_reaches_backbone_and_temperature() -> None:
    torch.manual_seed(0)
    net = Clip3DNet(ModelConfig.small(embed_dim=D)).train()
    pts = cloud()
    out = net(pts, torch.zeros(len(pts), dtype=torch.long))
    assert out.features.shape == (len(pts), D) and out.valid.all()
    assert torch.allclose(out.features.norm(dim=1), torch.ones(len(pts)), atol=1e-5)
    text = torch.nn.functional.normalize(torch.randn(5, D), dim=1)
    labels = torch.randint(0, 5, (len(pts),))
    nn.functional.cross_entropy(net.logits(out.features, text), labels).backward()
    for name in (
        "backbone.stem.0.weight",
        "backbone.down.3.0.weight",
        "backbone.encoder.0.0.conv1.weight",
        "backbone.up.0.0.weight",
        "backbone.decoder.3.0.conv2.weight",
        "point_mlp.0.weight",
        "head.net.3.weight",
        "classifier.log_temperature",
    ):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_invalid_points_get_zero_features_and_do_not_disturb_others(model: Clip3DNet) -> None:
    pts = cloud()
    bad = cloud(6, seed=1)
    bad[0, 0] = float("nan")
    bad[1, 3] = float("nan")  # NaN intensity only: xyz fine, still unusable
    bad[2, 1] = float("inf")
    bad[3, :3] = torch.tensor([200.0, 0.0, 0.0])  # outside the point range
    bad[4, 2] = -10.0
    bad[5, :3] = torch.tensor([51.2, 0.0, 0.0])  # range is half-open: x_max excluded
    mixed = torch.cat([pts[:1000], bad, pts[1000:]])
    bad_rows = torch.arange(1000, 1006)
    with torch.inference_mode():
        clean = model(pts)
        out = model(mixed)
    good = torch.ones(len(mixed), dtype=torch.bool)
    good[bad_rows] = False
    assert torch.equal(out.valid, good)
    assert (out.features[~out.valid] == 0).all()
    assert torch.isfinite(out.features).all()
    assert torch.equal(out.features[good], clean.features)  # bit-identical: invalid rows never enter


def test_output_follows_input_order(model: Clip3DNet) -> None:
    pts = cloud()
    perm = torch.randperm(len(pts), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a = model(pts).features
        b = model(pts[perm]).features
    assert torch.allclose(b, a[perm], atol=1e-5)
    assert not torch.allclose(b, a, atol=1e-3)  # the rows really differ point to point


def test_sparse_convs_are_exact_with_several_threads(model: Clip3DNet) -> None:
    """spconv's CPU scatter-add shares pointers across threads (replaced in clip3d_core._compat):
    repeated multi-threaded runs must agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            runs = [model(cloud(4000, seed=6)).features for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_batch_index_keeps_samples_apart(model: Clip3DNet) -> None:
    a, b = cloud(2000, seed=4), cloud(2500, seed=5)
    batch = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.ones(len(b), dtype=torch.long)])
    with torch.inference_mode():
        joint = model(torch.cat([a, b]), batch).features
        fa, fb = model(a).features, model(b).features
    assert torch.allclose(joint[: len(a)], fa, atol=1e-5)
    assert torch.allclose(joint[len(a) :], fb, atol=1e-5)


def test_fusion_reads_clip_features_only_where_masked() -> None:
    torch.manual_seed(0)
    net = Clip3DNet(ModelConfig.small(embed_dim=D, fusion=True)).eval()
    pts = cloud(2000)
    mask = torch.zeros(len(pts), dtype=torch.bool)
    mask[::3] = True
    clip = torch.nn.functional.normalize(torch.randn(len(pts), D), dim=1)
    poisoned = clip.clone()
    poisoned[~mask] = float("nan")  # rows outside the mask must never be read
    with torch.no_grad():
        base = net(pts).features
        fused = net(pts, clip_features=clip, clip_mask=mask).features
        fused_p = net(pts, clip_features=poisoned, clip_mask=mask).features
    assert torch.equal(fused[~mask], base[~mask])
    assert torch.equal(fused_p, fused)
    assert (fused[mask] - base[mask]).abs().sum(dim=1).min() > 0  # every masked point changed
    assert torch.allclose(fused.norm(dim=1), torch.ones(len(pts)), atol=1e-5)

    net.train()
    out = net(pts, clip_features=clip, clip_mask=mask)
    out.features.sum().backward()
    assert net.fusion.gate[0].weight.grad.abs().sum() > 0


def test_fusion_disabled_model_rejects_clip_features(model: Clip3DNet) -> None:
    pts = cloud(100)
    with pytest.raises(ValueError, match="fusion=False"):
        model(pts, clip_features=torch.zeros(len(pts), D))


def test_cosine_classifier_is_cosine_over_clamped_temperature() -> None:
    clf = CosineClassifier(init_temperature=0.05)
    f, t = torch.randn(7, D), torch.randn(3, D)
    expected = torch.nn.functional.cosine_similarity(f[:, None], t[None], dim=2) / 0.05
    assert torch.allclose(clf(f, t), expected, atol=1e-4)
    assert torch.equal(clf(torch.zeros(2, D), t), torch.zeros(2, 3))  # invalid points: zero logits
    fn, tn = torch.nn.functional.normalize(f, dim=1), torch.nn.functional.normalize(t, dim=1)
    assert torch.allclose(clf(fn, tn, normalized=True), expected, atol=1e-4)  # the inference fast path
    with torch.no_grad():
        clf.log_temperature.fill_(-50.0)
    assert math.isclose(float(clf.temperature.detach()), 0.01, rel_tol=1e-5)
    with torch.no_grad():
        clf.log_temperature.fill_(5.0)
    assert math.isclose(float(clf.temperature.detach()), 1.0, rel_tol=1e-5)
    assert not CosineClassifier(learn=False).log_temperature.requires_grad


def test_config_presets_round_trip_and_validation() -> None:
    for cfg in (ModelConfig.small(embed_dim=D), ModelConfig.default(), ModelConfig.small(fusion=True)):
        assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    assert ModelConfig.default().embed_dim == 512 and ModelConfig.default().backbone.channels == (
        32,
        64,
        128,
        256,
    )
    with pytest.raises(ValueError, match="same"):
        BackboneConfig(channels=(16, 32), blocks=(1,))
    with pytest.raises(ValueError, match="decoder_blocks"):
        BackboneConfig(decoder_blocks=(1, 1, 1, 0))
    with pytest.raises(ValueError, match="temperature"):
        ModelConfig(init_temperature=0.0)
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(ModelConfig, {"embed_dims": 3})


def test_sync_batchnorm_conversion_covers_every_norm(model: Clip3DNet) -> None:
    n_bn = sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(Clip3DNet(ModelConfig.small(embed_dim=D)))
    assert n_bn > 10
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
