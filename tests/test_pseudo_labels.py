"""Pseudo labels, confidence filters, GT merging and self-training labels on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from clip3d_core.config import ConfigError, from_dict, to_dict
from clip3d_core.pseudo_labels import (
    PseudoLabelConfig,
    PseudoLabelError,
    classify,
    dense_pseudo_labels,
    filter_by_confidence,
    label_quality,
    mask_classes,
    merge_labels,
    per_class_thresholds,
    point_pseudo_labels,
    restrict_labels,
    self_training_labels,
)

TEXT = torch.eye(3, 4)  # three orthogonal class embeddings in D = 4


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_classify_prob_and_margin_by_hand():
    feats = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    labels, conf = classify(feats, TEXT, temperature=1.0)
    p = _softmax([1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25), 0.0])
    assert labels.tolist() == [0, 2]
    assert conf[0].item() == pytest.approx(p[0])
    assert conf[1].item() == pytest.approx(_softmax([0.0, 0.0, 1.0])[2])
    _, margin = classify(feats, TEXT, temperature=1.0, confidence="margin")
    assert margin[0].item() == pytest.approx(p[0] - p[1])
    with pytest.raises(PseudoLabelError):
        classify(feats, torch.eye(3), temperature=1.0)
    with pytest.raises(PseudoLabelError):
        classify(feats, TEXT, confidence="entropy")


def test_dense_pseudo_labels_per_patch_and_upsampled():
    dense = torch.zeros(4, 2, 2)
    dense[0, 0, 0] = dense[1, 0, 1] = dense[2, 1, 0] = dense[2, 1, 1] = 1.0
    labels, conf = dense_pseudo_labels(dense, TEXT)
    assert labels.tolist() == [[0, 1], [2, 2]] and conf.shape == (2, 2)
    assert bool((conf > 0.99).all())  # temperature 0.01: cos 1 vs 0 is a certain call
    up, _ = dense_pseudo_labels(dense, TEXT, out_hw=(8, 8))
    assert up.shape == (8, 8)
    assert up[0, 0] == 0 and up[0, 7] == 1 and up[7, 0] == 2 and up[7, 7] == 2
    with pytest.raises(PseudoLabelError):
        dense_pseudo_labels(dense[0], TEXT)


def test_per_class_thresholds_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, -1])
    conf = torch.tensor([0.3, 0.1, 0.4, 0.2, 0.5, 0.9, 1.0])
    thr = per_class_thresholds(labels, conf, 3, 0.5)
    torch.testing.assert_close(thr, torch.tensor([0.3, 0.9, 0.0]))
    # At least one point per present class survives even for a tiny fraction.
    torch.testing.assert_close(per_class_thresholds(labels, conf, 3, 0.01), torch.tensor([0.4, 0.9, 0.0]))
    with pytest.raises(PseudoLabelError):
        per_class_thresholds(labels, conf, 3, 0.0)
    with pytest.raises(PseudoLabelError, match="outside"):
        per_class_thresholds(labels, conf, 1, 0.5)


def test_config_from_dict():
    cfg = from_dict(PseudoLabelConfig, {"temperature": 0.02, "top_fraction": 0.5})
    assert cfg.temperature == 0.02 and cfg.validate().top_fraction == 0.5
    # The class restriction comes from the split (an argument), never from the user's config.
    with pytest.raises(ConfigError, match="restrict_to"):
        from_dict(PseudoLabelConfig, {"restrict_to": [3, 4]})
    assert from_dict(PseudoLabelConfig, to_dict(cfg)) == cfg


def test_filter_by_confidence_modes_and_permutation():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 4, (400,), generator=g)
    conf = torch.rand(400, generator=g)
    glob = filter_by_confidence(labels, conf, min_confidence=0.5)
    assert torch.equal(glob >= 0, (labels >= 0) & (conf >= 0.5))
    assert torch.equal(glob[glob >= 0], labels[glob >= 0])  # never relabels, only drops
    top = filter_by_confidence(labels, conf, top_fraction=0.25, num_classes=4)
    for c in range(4):
        n = int((labels == c).sum())
        kept = top == c
        assert int(kept.sum()) == round(0.25 * n)
        assert conf[kept].min() >= conf[(labels == c) & ~kept].max()
    perm = torch.randperm(400, generator=g)
    assert torch.equal(filter_by_confidence(labels[perm], conf[perm], top_fraction=0.25, num_classes=4),
                       top[perm])
    per_class = filter_by_confidence(labels, conf, class_thresholds=torch.tensor([0.0, 0.9, 0.0, 1.1]))
    assert not bool((per_class == 3).any())
    assert torch.equal(per_class == 1, (labels == 1) & (conf >= 0.9))
    assert bool((per_class == 0).sum() == (labels == 0).sum())


def test_restrict_and_mask_classes():
    labels = torch.tensor([0, 1, 2, -1, 1])
    assert restrict_labels(labels, [1, 2], 3).tolist() == [-1, 1, 2, -1, 1]
    assert restrict_labels(labels, torch.tensor([0]), 3).tolist() == [0, -1, -1, -1, -1]
    assert mask_classes(labels, [1]).tolist() == [0, -1, 2, -1, -1]


def test_point_pseudo_labels_visibility_restriction_and_confidence():
    feats = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0.2, 1.0, 0]])
    visible = torch.tensor([True, True, True, False])
    out = point_pseudo_labels(feats, visible, TEXT)
    assert out.labels.tolist() == [0, 1, 2, -1] and out.confidence[3] == 0.0
    assert bool((out.confidence[:3] > 0.99).all())
    unseen_only = point_pseudo_labels(feats, visible, TEXT, restrict_to=(1, 2))
    assert unseen_only.labels.tolist() == [-1, 1, 2, -1] and unseen_only.confidence[0] == 0.0
    strict = point_pseudo_labels(feats, torch.ones(4, dtype=torch.bool), TEXT,
                                 PseudoLabelConfig(temperature=1.0, min_confidence=0.56))
    # At tau = 1: cosines (1, 0, 0) give p = e / (e + 2) = 0.576; the last point only 0.546.
    assert strict.labels.tolist() == [0, 1, 2, -1]
    with pytest.raises(PseudoLabelError):
        PseudoLabelConfig(top_fraction=1.5).validate()
    with pytest.raises(PseudoLabelError):
        PseudoLabelConfig(temperature=0.0).validate()


def test_merge_zero_shot_and_annotation_free():
    full_gt = torch.tensor([0, 1, 1, 2, -1, 0])
    pseudo = torch.tensor([2, 1, -1, 1, 1, 1])
    gt = mask_classes(full_gt, [1])  # class 1 is unseen: its GT is hidden
    merged = merge_labels(gt, pseudo)
    # seen GT kept (points 0, 3, 5, even where the pseudo label disagrees), pseudo fills the rest
    assert merged.tolist() == [0, 1, -1, 2, 1, 0]
    assert merge_labels(None, pseudo).tolist() == pseudo.tolist()
    with pytest.raises(PseudoLabelError):
        merge_labels(gt[:3], pseudo)


def test_self_training_keeps_top_fraction_per_class_including_rare_ones():
    # 8 confident points of class 0, 2 hesitant points of class 1: a global threshold would drop
    # every class-1 point, the per-class quantile keeps the better half of each class.
    logits = torch.zeros(10, 2)
    logits[:8, 0] = torch.linspace(3.0, 6.0, 8)
    logits[8, 1], logits[9, 1] = 0.2, 0.4
    out = self_training_labels(logits, top_fraction=0.5)
    assert out.labels.tolist() == [-1, -1, -1, -1, 0, 0, 0, 0, -1, 1]
    assert out.confidence[9].item() == pytest.approx(_softmax([0.0, 0.4])[1])
    glob = self_training_labels(logits, top_fraction=None, min_confidence=0.7)
    assert not bool((glob.labels == 1).any())
    invalid = self_training_labels(logits, valid=torch.arange(10) != 9, top_fraction=None)
    assert invalid.labels[9] == -1 and invalid.labels[8] == 1
    # Dataset-level thresholds computed once, applied to a batch.
    labels, conf = classify(torch.randn(50, 4), TEXT)
    thr = per_class_thresholds(labels, conf, 3, 0.3)
    st = self_training_labels(torch.randn(20, 3), class_thresholds=thr, top_fraction=None)
    assert st.labels.shape == (20,)
    with pytest.raises(PseudoLabelError):
        self_training_labels(torch.zeros(4))


def test_label_quality():
    q = label_quality(torch.tensor([0, 1, -1, 2, 5]), torch.tensor([0, 2, 1, 2, -1]))
    assert q["coverage"] == pytest.approx(3 / 4) and q["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(label_quality(torch.tensor([1]), torch.tensor([-1]))["accuracy"])
