"""Panoptic network: one cosine head (max over names), concat fusion with a "no image" embedding,
camera drop-out, query decoder shapes and gradients, and the panoptic merge on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (applies the spconv CPU backward fix first)
from clip3d_core.geometry import voxelize
from clip3d_core.model import ModelConfig
from clip3d_core.model.panoptic import (
    ConcatFusion,
    OpenVocabClassifier,
    PanopticHeadConfig,
    PanopticModelConfig,
    PanopticNet,
    voxel_clip_features,
)
from clip3d_core.model.panoptic_merge import panoptic_merge

D = 16


def tiny_config(**head) -> PanopticModelConfig:
    return PanopticModelConfig(ModelConfig.small(embed_dim=D, voxel_size=0.4),
                               PanopticHeadConfig(hidden=32, num_thing_queries=6, num_stuff_queries=2,
                                                  num_layers=2, ffn=64, **head))


def cloud(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([30.0, 30.0, 3.0]) - torch.tensor([15.0, 15.0, 1.7])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], 1)


def test_classifier_is_scaled_cosine_max_over_names() -> None:
    head = OpenVocabClassifier(init_scale=10.0, init_bias=-4.0)
    embed = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=1)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # names of classes 0, 1, 1
    logits = head(embed, text, torch.tensor([0, 1, 1]), 2)
    expected = torch.tensor([[1.0, 0.0], [0.0, math.sqrt(0.5)]]) * 10.0 - 4.0
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(head(embed, text[:2]), embed @ text[:2].t() * 10.0 - 4.0)  # one name per class
    logits.sum().backward()
    assert head.log_scale.grad is not None and head.bias.grad is not None
    with torch.no_grad():
        head.log_scale.fill_(10.0)
    assert float(head.scale.detach()) == pytest.approx(100.0)  # CLIP's cap


def test_voxel_clip_features_mean_of_seen_points() -> None:
    xyz = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [5.1, 0.1, 0.1], [9.0, 0.1, 0.1]])
    vox = voxelize(xyz, 1.0, (0, 0, 0, 10, 10, 10))
    clip = torch.tensor([[3.0, 0.0], [float("nan"), 1.0], [0.0, 1.0], [1.0, 1.0]])
    feats, has = voxel_clip_features(clip, torch.tensor([True, False, True, False]), vox)
    torch.testing.assert_close(feats, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert has.tolist() == [True, True, False]


def test_concat_fusion_uses_no_image_embedding_for_unseen_voxels() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(4, 3, 8, fusion=True)
    lidar, clip = torch.randn(3, 4), F.normalize(torch.randn(3, 3), dim=1)
    seen = torch.tensor([True, False, True])
    out = fusion(lidar, clip, seen)
    no_image = fusion.proj(torch.cat((lidar, fusion.no_image.expand(3, -1)), 1))
    torch.testing.assert_close(out[1], no_image[1])
    assert not torch.allclose(out[0], no_image[0])
    torch.testing.assert_close(fusion(lidar, None, None), no_image)  # LiDAR only
    lidar_only = ConcatFusion(4, 3, 8, fusion=False)
    torch.testing.assert_close(lidar_only(lidar, clip, seen), lidar_only(lidar, None, None))


def test_forward_shapes_gradients_and_camera_dropout() -> None:
    torch.manual_seed(0)
    net = PanopticNet(tiny_config(camera_dropout=0.0)).train()
    pts = torch.cat([cloud(800, 0), cloud(600, 1)])
    batch = torch.cat([torch.zeros(800), torch.ones(600)]).long()
    clip = torch.randn(len(pts), D)
    seen = torch.rand(len(pts)) < 0.6
    out = net(pts, batch, clip, seen)
    q = 8
    counts = out.voxel_offsets.diff().tolist()
    assert [m.shape for m in out.mask_logits] == [(q, counts[0]), (q, counts[1])]
    assert out.class_embed.shape == (2, q, D) and sum(counts) == out.vox.num_voxels
    torch.testing.assert_close(out.class_embed.norm(dim=-1), torch.ones(2, q))
    assert out.clip.shape == (out.vox.num_voxels, D) and 0 < out.clip_mask.float().mean() < 1
    text = F.normalize(torch.randn(5, D), dim=1)
    loss = net.class_logits(out, text).sigmoid().sum() + sum(m.sigmoid().mean() for m in out.mask_logits)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.fusion.no_image.grad.abs().sum() > 0

    # drop-out 1.0 in training == no camera at all; the distillation targets are kept
    net.zero_grad()
    dropped_net = PanopticNet(tiny_config(camera_dropout=1.0)).train()
    dropped_net.load_state_dict(net.state_dict())
    dropped = dropped_net(pts, batch, clip, seen)
    lidar_only = dropped_net(pts, batch)
    for a, b in zip(dropped.mask_logits, lidar_only.mask_logits):
        torch.testing.assert_close(a, b)
    assert dropped.clip_mask is not None and lidar_only.clip is None
    dropped_net.eval()  # no drop-out at inference
    with_camera, without = dropped_net(pts, batch, clip, seen), dropped_net(pts, batch)
    assert not torch.allclose(with_camera.mask_logits[0], without.mask_logits[0])


def test_merge_hand_case() -> None:
    # classes: 0 road (stuff), 1 car (thing), 2 vegetation (stuff)
    thing = torch.tensor([False, True, False])
    big, small = 10.0, -10.0
    # 4 queries over 6 voxels: q0 road (v0, v1), q1 road too (v2), q2 car (v3, v4), q3 car (v5)
    mask = torch.full((4, 6), small)
    mask[0, :2] = big
    mask[1, 2] = big
    mask[2, 3:5] = big
    mask[3, 5] = big
    cls = torch.full((4, 3), -8.0)
    cls[0, 0], cls[1, 0], cls[2, 1], cls[3, 1] = 3.0, 1.0, 2.0, 2.5
    p2v = torch.tensor([5, 0, 1, 2, 3, 4, 4, -1, 3, 5])  # input order, one point outside the grid
    out = panoptic_merge(mask, cls, thing, p2v, min_points=1)
    assert out.semantic.tolist() == [1, 0, 0, 0, 1, 1, 1, -1, 1, 1]
    # stuff: both road queries merged into instance 0; things numbered in query order
    assert out.instance.tolist() == [2, 0, 0, 0, 1, 1, 1, 0, 1, 2]
    assert out.score[3].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert out.score[7] == 0
    # min_points 3: car #2 (2 points) dropped, road (3 points, two queries) kept, car #1 (4) kept
    out = panoptic_merge(mask, cls, thing, p2v, min_points=3)
    assert out.semantic.tolist() == [-1, 0, 0, 0, 1, 1, 1, -1, 1, -1]
    assert out.instance.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 1, 0]
    # a query below min_score loses its voxels to the next best query
    out = panoptic_merge(mask, cls, thing, p2v, min_points=1, min_score=0.9)
    assert out.semantic[3].item() == 0 and out.instance[3].item() == 0  # voxel 2 -> q0 (road), not q1
    with pytest.raises(ValueError, match="disagree"):
        panoptic_merge(mask, cls[:3], thing, p2v, min_points=1)


def test_panoptic_checkpoint_round_trip(tmp_path) -> None:
    from clip3d_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from clip3d_core.clip import ClipIdentity, tiny_clip_config
    from clip3d_core.model.panoptic import PanopticInfo

    torch.manual_seed(0)
    cfg = tiny_config()
    net = PanopticNet(cfg).eval()
    info = PanopticInfo(cfg.head, ("car", "bus"), 15)
    identity = ClipIdentity("clip3d-tiny", "random:0", D)
    path = save_checkpoint(tmp_path / "pan.pt", net, cfg.model, tiny_clip_config(), identity,
                           vocabulary=["road", "car", "bus"], panoptic=info)
    ckpt = load_checkpoint(path, identity)
    assert ckpt.panoptic == info
    loaded = ckpt.build_model()
    assert isinstance(loaded, PanopticNet)
    pts = cloud(500, 3)
    a, b = net(pts), loaded(pts)
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0])
    torch.testing.assert_close(a.class_embed, b.class_embed)
    with pytest.raises(CheckpointError, match="PanopticInfo"):
        save_checkpoint(tmp_path / "x.pt", net, cfg.model, tiny_clip_config(), identity)
    raw = torch.load(path, weights_only=True)
    raw["panoptic"]["head"]["num_thing_queries"] = 7  # a head that does not fit the weights
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "bad.pt")


def test_predict_panoptic_on_bad_clouds() -> None:
    """No point in range, or NaN intensities: every such point is unlabelled, nothing raises."""
    from clip3d_core.predictor import predict_panoptic

    torch.manual_seed(0)
    net = PanopticNet(tiny_config()).eval()
    text, thing = F.normalize(torch.randn(3, D), dim=1), torch.tensor([False, True, False])
    far = cloud(200, 0)
    far[:, :3] += 1000.0
    with torch.no_grad():
        (empty,) = predict_panoptic(net, far, text, thing, min_points=1)
        assert (empty.labels == -1).all() and (empty.extras["instances"] == 0).all() and not empty.valid.any()
        pts = cloud(400, 1)
        pts[::2, 3] = float("nan")
        both = predict_panoptic(net, torch.cat([pts, far]), text, thing, min_points=1,
                                batch_index=torch.cat([torch.zeros(400), torch.ones(200)]).long())
    assert (both[0].labels[::2] == -1).all() and (both[0].labels[1::2] >= 0).any()
    assert (both[1].labels == -1).all() and torch.isfinite(both[0].features).all()


def test_pooled_clip_scores_equal_hand_computation() -> None:
    """PFC baseline: each mask pools the frozen CLIP features of its camera-seen voxels; classes the
    fixed classifier names get p_in^(1-a) p_clip^a, novel classes p_clip alone, masks seeing nothing
    keep p_in (novel 0)."""
    from clip3d_core.model.panoptic import mask_pooled_clip, pooled_clip_probs

    # 3 queries over 4 voxels: q0 covers v0, v1 (seen); q1 covers v2 (unseen); q2 covers v2, v3
    mask = torch.tensor([[5.0, 2.0, -1.0, -3.0], [-2.0, -2.0, 4.0, -1.0], [-1.0, -4.0, 1.0, 3.0]])
    clip = torch.tensor([[2.0, 0.0], [0.0, 2.0], [float("nan"), 9.0], [0.0, 1.0]])  # v2 unseen: never read
    seen = torch.tensor([True, True, False, True])
    pooled, has = mask_pooled_clip(mask, clip, seen)
    r = math.sqrt(0.5)
    torch.testing.assert_close(pooled, torch.tensor([[r, r], [0.0, 0.0], [0.0, 1.0]]))
    assert has.tolist() == [True, False, True]

    # vocabulary: class 0 = x, class 1 = y (both named by the fixed classifier), class 2 (novel) = x + y
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    inf = float("inf")
    logits = torch.tensor([[0.0, 1.0, -inf], [2.0, -1.0, -inf], [-1.0, 0.5, -inf]])
    probs = pooled_clip_probs(logits, pooled, has, text, alpha=0.4, scale=10.0)

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def softmax(cos: list[float]) -> list[float]:
        e = [math.exp(10.0 * c) for c in cos]
        return [v / sum(e) for v in e]

    p0 = softmax([r, r, 1.0])  # q0's pooled feature is x + y: the novel class's direction
    p2 = softmax([0.0, 1.0, r])
    expected = torch.tensor([
        [sig(0.0) ** 0.6 * p0[0] ** 0.4, sig(1.0) ** 0.6 * p0[1] ** 0.4, p0[2]],
        [sig(2.0), sig(-1.0), 0.0],  # nothing seen in q1's mask: the fixed classifier alone
        [sig(-1.0) ** 0.6 * p2[0] ** 0.4, sig(0.5) ** 0.6 * p2[1] ** 0.4, p2[2]],
    ])
    torch.testing.assert_close(probs, expected)
    assert probs[0].argmax() == 2 and probs[2].argmax() == 1
    # max over names: a second name of class 2 equal to q2's pooled feature lifts its cosine to 1
    names = torch.cat([text, torch.tensor([[0.0, 1.0]])])
    name_class = torch.tensor([0, 1, 2, 2])
    by_names = pooled_clip_probs(logits, pooled, has, names, name_class, alpha=0.4, scale=10.0)
    p2 = softmax([0.0, 1.0, 1.0])
    assert by_names[2, 2].item() == pytest.approx(p2[2])


def test_fixed_classifier_names_its_base_classes_only() -> None:
    from clip3d_core.model.panoptic import FixedClassifier

    torch.manual_seed(0)
    head = FixedClassifier(D, (0, 2), init_bias=-4.0)
    embed = F.normalize(torch.randn(2, 3, D), dim=-1)
    logits = head(embed, torch.randn(4, D))  # the text only sets the vocabulary size
    own = head.linear(embed)
    torch.testing.assert_close(logits[..., [0, 2]], own)
    assert torch.isneginf(logits[..., [1, 3]]).all()
    assert head(embed, torch.randn(5, D), torch.tensor([0, 0, 1, 2, 3]), 4).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="lacks"):
        head(embed, torch.randn(2, D))
    with pytest.raises(ValueError, match="distinct base_classes"):
        PanopticHeadConfig(classifier="fixed")
    with pytest.raises(ValueError, match="pool_alpha"):
        PanopticHeadConfig(pool_alpha=1.5)


def test_pfc_baseline_novel_classes_come_only_from_pooled_clip(tmp_path) -> None:
    """`predict_panoptic` with a fixed-classifier (PFC) model: without a camera it never names a novel
    class; with CLIP features pointing at the novel class's text it does. Saved and loaded alike."""
    from clip3d_core.checkpoint import load_checkpoint, save_checkpoint
    from clip3d_core.clip import ClipIdentity, tiny_clip_config
    from clip3d_core.model.panoptic import PanopticInfo
    from clip3d_core.predictor import CameraFeatures, predict_panoptic

    torch.manual_seed(0)
    cfg = tiny_config(fusion=False, classifier="fixed", base_classes=(0, 1, 2))
    net = PanopticNet(cfg).eval()
    assert tuple(net.classifier.classes.tolist()) == (0, 1, 2)
    text = F.normalize(torch.randn(4, D), dim=1)  # class 3 is novel
    thing = torch.tensor([False, True, False, True])
    pts = cloud(600, 2)
    everywhere = torch.ones(len(pts), dtype=torch.bool)
    novel_feature = CameraFeatures(text[3].expand(len(pts), -1), everywhere)
    with torch.no_grad():
        (lidar,) = predict_panoptic(net, pts, text, thing, min_points=1)
        (unseen,) = predict_panoptic(net, pts, text, thing, min_points=1,
                                     camera=CameraFeatures(novel_feature.features, ~everywhere))
        (seen,) = predict_panoptic(net, pts, text, thing, min_points=1, camera=novel_feature)
    assert (lidar.labels >= 0).any() and not (lidar.labels == 3).any()
    assert torch.equal(unseen.labels, lidar.labels)  # no camera-seen voxel: the fixed classifier alone
    assert (seen.labels == 3).float().mean() > 0.5
    # a checkpoint keeps the classifier kind and its classes
    identity = ClipIdentity("clip3d-tiny", "random:0", D)
    path = save_checkpoint(tmp_path / "pfc.pt", net, cfg.model, tiny_clip_config(), identity,
                           vocabulary=["road", "car", "grass", "bus"],
                           panoptic=PanopticInfo(cfg.head, ("car", "bus"), 1))
    loaded = load_checkpoint(path, identity).build_model().eval()
    assert loaded.cfg.head == cfg.head
    with torch.no_grad():
        (again,) = predict_panoptic(loaded, pts, text, thing, min_points=1, camera=novel_feature)
    assert torch.equal(again.labels, seen.labels)
