"""Losses on hand-built tensors with values computed by hand, invariances and gradient checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (applies the compat fixes first)
from clip3d_core.losses import (
    class_frequency_weights,
    class_prototypes,
    cosine_cross_entropy,
    masked_cross_entropy,
    pool_by_index,
    semantic_alignment_loss,
    spatial_alignment_loss,
)
from clip3d_core.similarity import cosine_logits

E = torch.eye(4, dtype=torch.float64)


# ---------------------------------------------------------------- output level


def test_cosine_logits_hand_values():
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / 0.5
    torch.testing.assert_close(cosine_logits(feats, text, 0.5), expected)
    with pytest.raises(ValueError):
        cosine_logits(feats, torch.ones(3, 3), 0.5)


def test_masked_cross_entropy_hand_value_and_ignore():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]])
    labels = torch.tensor([1, -1])
    # softmax([0, ln 3]) = [1/4, 3/4]; the ignored row must not count.
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(math.log(4 / 3))
    smoothed = masked_cross_entropy(logits, labels, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-(0.1 * math.log(1 / 4) + 0.9 * math.log(3 / 4)))
    weighted = masked_cross_entropy(
        torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), torch.tensor([1, 0]),
        class_weight=torch.tensor([1.0, 3.0]),
    )
    assert weighted.item() == pytest.approx((3 * math.log(4 / 3) + 1 * math.log(2)) / 4)


def test_masked_cross_entropy_all_ignored_is_zero_with_gradient():
    logits = torch.randn(5, 3, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((5,), -1))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(5, 3))


def test_masked_cross_entropy_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        masked_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="outside"):
        masked_cross_entropy(torch.zeros(2, 3), torch.tensor([0, -2]))


def test_cosine_cross_entropy_orthogonal_and_learnable_temperature():
    text = E[:3, :3].float()
    feats = 2.0 * text  # scale must not matter: cosine
    tau = torch.tensor(0.5, requires_grad=True)
    loss = cosine_cross_entropy(feats, text, torch.tensor([0, 1, 2]), temperature=tau)
    # Each row: logits [2, 0, 0] -> -2 + log(e^2 + 2).
    assert loss.item() == pytest.approx(math.log(math.e**2 + 2) - 2, rel=1e-6)
    loss.backward()
    assert tau.grad is not None and tau.grad.item() > 0  # a larger tau would sharpen less -> worse


def test_class_frequency_weights():
    w = class_frequency_weights(torch.tensor([0, 1, 1, 1, 1, -1]), 3, power=0.5)
    raw = torch.tensor([math.sqrt(5), math.sqrt(5 / 4)])
    torch.testing.assert_close(w[:2], (raw / raw.mean()).float())
    assert w[2] == 0.0


# ---------------------------------------------------------------- semantic (global) alignment


def test_class_prototypes_are_normalised_means():
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]])
    protos, present = class_prototypes(feats, torch.tensor([0, 0, 2, -1]), 4)
    torch.testing.assert_close(protos[0], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    torch.testing.assert_close(protos[2], torch.tensor([0.0, 0.0, 1.0]))
    assert present.tolist() == [True, False, True, False]
    assert torch.equal(protos[1], torch.zeros(3))


def test_semantic_loss_orthogonal_one_hot_exact():
    labels = torch.tensor([0, 0, 1, 2])
    feat2d = E[labels][:, :3]
    feat3d = feat2d.clone()
    for tau in (1.0, 0.1):
        loss = semantic_alignment_loss(feat3d, labels, feat2d, temperature=tau)
        # logits [1/tau, 0, 0] for every point
        assert loss.item() == pytest.approx(math.log(math.exp(1 / tau) + 2) - 1 / tau, rel=1e-9)


def test_semantic_loss_balanced_vs_point_mean():
    labels = torch.tensor([0, 0, 0, 1])
    feat2d = E[labels][:, :2]
    feat3d = torch.stack([E[0, :2], E[0, :2], E[0, :2], E[0, :2]])  # the class-1 point is wrong
    a = math.log(math.e + 1) - 1  # aligned point: logits [1, 0]
    b = math.log(math.e + 1)  # misaligned point: logits [1, 0], target the 0
    assert semantic_alignment_loss(feat3d, labels, feat2d, temperature=1.0).item() == pytest.approx(
        (3 * a + b) / 4)
    assert semantic_alignment_loss(feat3d, labels, feat2d, temperature=1.0, balance=True).item() == (
        pytest.approx((a + b) / 2))


def test_semantic_loss_prototypes_from_separate_pixels_and_missing_classes():
    # Pixels define prototypes of classes 0 and 1 only; points of class 2 have no prototype and
    # are skipped, ignored points too.
    pix = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]], dtype=torch.float64)
    pix_labels = torch.tensor([0, 0, 1])
    feat3d = torch.tensor([[1.0, 0.1], [0.3, 1.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -1])
    loss = semantic_alignment_loss(feat3d, labels, pix, pix_labels, temperature=0.5, num_classes=3)
    protos = F.normalize(torch.stack([pix[0] + pix[1], pix[2]]), dim=1)
    logits = F.normalize(feat3d[:2], dim=1) @ protos.t() / 0.5
    expected = F.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="labels2d"):
        semantic_alignment_loss(feat3d, labels, pix)


def test_semantic_loss_permutation_invariant_and_aligned_is_best():
    g = torch.Generator().manual_seed(0)
    n, d, c = 200, 16, 5
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::7] = -1
    centres = F.normalize(torch.randn(c, d, generator=g), dim=1)
    feat2d = centres[labels.clamp(min=0)] + 0.3 * torch.randn(n, d, generator=g)
    feat3d = torch.randn(n, d, generator=g)
    loss = semantic_alignment_loss(feat3d, labels, feat2d, temperature=0.1)
    perm = torch.randperm(n, generator=g)
    permuted = semantic_alignment_loss(feat3d[perm], labels[perm], feat2d[perm], temperature=0.1)
    torch.testing.assert_close(permuted, loss)
    protos, _ = class_prototypes(feat2d, labels, c)
    aligned = semantic_alignment_loss(protos[labels.clamp(min=0)], labels, feat2d, temperature=0.1)
    assert aligned < loss
    for _ in range(20):
        rand = semantic_alignment_loss(torch.randn(n, d, generator=g), labels, feat2d, temperature=0.1)
        assert aligned < rand


def test_semantic_loss_degenerate_cases_keep_the_graph():
    feat3d = torch.randn(4, 3, requires_grad=True)
    zero = semantic_alignment_loss(feat3d, torch.full((4,), -1), torch.randn(4, 3))
    single = semantic_alignment_loss(feat3d, torch.zeros(4, dtype=torch.long), torch.randn(4, 3))
    assert zero.item() == 0.0 and single.item() == pytest.approx(0.0, abs=1e-7)
    (zero + single).backward()
    assert feat3d.grad is not None
    with pytest.raises(ValueError, match="outside"):
        semantic_alignment_loss(feat3d, torch.tensor([0, 1, 5, -1]), torch.randn(4, 3), num_classes=3)


def test_semantic_loss_gradcheck_and_detached_target():
    g = torch.Generator().manual_seed(1)
    feat3d = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    feat2d = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, -1, 2])
    assert torch.autograd.gradcheck(
        lambda f: semantic_alignment_loss(f, labels, feat2d, temperature=0.3, balance=True), (feat3d,))
    semantic_alignment_loss(feat3d, labels, feat2d).backward()
    assert feat2d.grad is None


# ---------------------------------------------------------------- spatial (local) alignment


def test_pool_by_index_means():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [7.0, 7.0]])
    pooled, keys, counts = pool_by_index(feats, torch.tensor([4, 4, 1, -1]))
    assert keys.tolist() == [1, 4] and counts.tolist() == [1, 2]
    torch.testing.assert_close(pooled, torch.tensor([[3.0, 3.0], [0.5, 0.5]]))


def test_spatial_loss_orthogonal_patches_exact():
    patches = E[:, :4].clone()  # patch 3 is hit by no point: not a pair
    index = torch.tensor([0, 0, 1, 2, -1])
    feat3d = torch.stack([E[0], E[0], E[1], E[2], E[3]])
    for symmetric in (False, True):
        loss = spatial_alignment_loss(feat3d, index, patches, temperature=0.5, symmetric=symmetric)
        assert loss.item() == pytest.approx(math.log(math.exp(2) + 2) - 2, rel=1e-9)


def test_spatial_loss_asymmetric_hand_value():
    s = 1 / math.sqrt(2)
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Patch 1 pools (1,0) and (0,1) -> direction (1,1)/sqrt2.
    feat3d = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    index = torch.tensor([0, 1, 1])
    one_way = 0.5 * ((math.log(math.e + 1) - 1) + (math.log(2 * math.exp(s)) - s))
    other_way = 0.5 * ((math.log(math.e + math.exp(s)) - 1) + (math.log(1 + math.exp(s)) - s))
    assert spatial_alignment_loss(feat3d, index, patches, temperature=1.0, symmetric=False).item() == (
        pytest.approx(one_way, rel=1e-12))
    assert spatial_alignment_loss(feat3d, index, patches, temperature=1.0).item() == pytest.approx(
        0.5 * (one_way + other_way), rel=1e-12)


def test_spatial_loss_permutation_invariant_aligned_best_and_min_points():
    g = torch.Generator().manual_seed(2)
    n, d, p = 300, 8, 40
    patches = torch.randn(p, d, generator=g)
    index = torch.randint(-1, p, (n,), generator=g)
    feat3d = torch.randn(n, d, generator=g)
    loss = spatial_alignment_loss(feat3d, index, patches, temperature=0.1)
    perm = torch.randperm(n, generator=g)
    permuted = spatial_alignment_loss(feat3d[perm], index[perm], patches, temperature=0.1)
    torch.testing.assert_close(permuted, loss)
    aligned_feats = patches[index.clamp(min=0)]
    aligned = spatial_alignment_loss(aligned_feats, index, patches, temperature=0.1)
    shuffled = spatial_alignment_loss(aligned_feats, index, patches[torch.randperm(p, generator=g)],
                                      temperature=0.1)
    assert aligned < loss and aligned < shuffled
    # min_points drops patches hit by a single point: same as removing those points.
    counts = torch.bincount(index[index >= 0], minlength=p)
    crowded = (index >= 0) & (counts[index.clamp(min=0)] >= 2)
    torch.testing.assert_close(
        spatial_alignment_loss(feat3d, index, patches, temperature=0.1, min_points=2),
        spatial_alignment_loss(feat3d, torch.where(crowded, index, -1), patches, temperature=0.1))


def test_spatial_loss_subsampling_cap():
    g = torch.Generator().manual_seed(3)
    patches = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    index = torch.arange(50)
    feat3d = patches + 0.1 * torch.randn(50, 8, generator=g)
    capped = spatial_alignment_loss(feat3d, index, patches, max_pairs=10,
                                    generator=torch.Generator().manual_seed(7))
    again = spatial_alignment_loss(feat3d, index, patches, max_pairs=10,
                                   generator=torch.Generator().manual_seed(7))
    assert capped.item() == again.item()
    # Computed on exactly the 10 drawn patches.
    pick = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:10]
    keep = torch.full((50,), -1)
    keep[pick] = pick
    torch.testing.assert_close(capped, spatial_alignment_loss(feat3d, keep, patches, max_pairs=None))
    # With 10 candidates the softmax is over far fewer negatives than with 50.
    assert capped < spatial_alignment_loss(feat3d, index, patches, max_pairs=None)


def test_spatial_loss_degenerate_and_gradcheck():
    feat3d = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    patches = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    lone = spatial_alignment_loss(feat3d, torch.tensor([2, 2, -1]), patches)
    assert lone.item() == 0.0
    lone.backward()
    assert feat3d.grad is not None and patches.grad is None
    with pytest.raises(ValueError, match="beyond"):
        spatial_alignment_loss(feat3d, torch.tensor([0, 5, 1]), patches)
    index = torch.tensor([0, 3, 3])
    assert torch.autograd.gradcheck(
        lambda f: spatial_alignment_loss(f, index, patches, temperature=0.2), (feat3d,))
