"""The panoptic merge's optional spatial split of thing segments (`panoptic_merge(instance_gap=)`):
one query's points that form separate clusters become separate instances, on hand-made clouds; off
(0 / None, and checkpoints saved before the setting existed) is the paper's merge; the checkpoint's
`PanopticInfo.instance_gap` is what the Segmenter merges with, and training configs set it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clip3d_core.checkpoint import load_checkpoint
from clip3d_core.clip.text import name_classes
from clip3d_core.model.panoptic_merge import panoptic_merge, query_components
from clip3d_core.predictor import predict_panoptic
from clip3d_core.segmenter import Segmenter, thing_mask
from clip3d_core.testing import PANOPTIC_THINGS, tiny_panoptic_checkpoint

THING = torch.tensor([False, True])  # class 0 road (stuff), class 1 car (thing)


def blob(centre: tuple[float, float, float], n: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(centre) + (torch.rand(n, 3, generator=g) - 0.5) * spread


def one_voxel_per_point(queries: list[int], classes: list[int], num_queries: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask logits making point i's voxel i go to query ``queries[i]``; query q predicts ``classes[q]``."""
    n = len(queries)
    mask = torch.full((num_queries, n), -6.0)
    mask[torch.tensor(queries), torch.arange(n)] = 6.0
    cls = torch.full((num_queries, 2), -6.0)
    cls[torch.arange(num_queries), torch.tensor(classes)] = 3.0
    return mask, cls, torch.arange(n)


def test_far_clusters_of_one_query_become_two_instances_touching_ones_one() -> None:
    # query 0 (car): blobs at x = 0 and x = 15 m; query 1 (car): two blobs 0.2 m apart (touching)
    pts = torch.cat([blob((0, 0, 0), 30, 0), blob((15, 0, 0), 20, 1), blob((5, 5, 0), 25, 2),
                     blob((5.5, 5, 0), 25, 3)])
    mask, cls, p2v = one_voxel_per_point([0] * 50 + [1] * 50, [1, 1], 2)
    off = panoptic_merge(mask, cls, THING, p2v, min_points=5)
    assert off.instance.unique().tolist() == [1, 2]  # the paper's merge: one instance per query
    on = panoptic_merge(mask, cls, THING, p2v, min_points=5, points=pts, instance_gap=1.0)
    # ids 1..K in (query, lowest cell) order: far blobs of query 0 are 1 (x = 0) and 2 (x = 15)
    assert on.instance[:30].unique().tolist() == [1] and on.instance[30:50].unique().tolist() == [2]
    assert on.instance[50:].unique().tolist() == [3]  # touching blobs stay one object
    assert torch.equal(on.semantic, off.semantic) and torch.equal(on.score, off.score)
    # input order does not change which points share an id, nor the numbering
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(4))
    shuffled = panoptic_merge(mask, cls, THING, p2v[perm], min_points=5, points=pts[perm], instance_gap=1.0)
    assert torch.equal(shuffled.instance, on.instance[perm])


def test_connectivity_is_transitive_and_bounded_by_the_gap() -> None:
    # a chain of points 0.8 m apart is one component at gap 1.0; points 2.5 m apart never connect
    chain = torch.tensor([[0.8 * i, 0.0, 0.0] for i in range(10)])
    comp, k = query_components(torch.zeros(10, dtype=torch.long), chain, 1.0)
    assert k == 1 and (comp == 0).all()
    far = torch.tensor([[2.5 * i, 0.3, -0.2] for i in range(4)])
    comp, k = query_components(torch.zeros(4, dtype=torch.long), far, 1.0)
    assert k == 4 and comp.tolist() == [0, 1, 2, 3]
    # the same place in two queries: two components (never shared between queries)
    comp, k = query_components(torch.tensor([1, 0]), torch.zeros(2, 3), 1.0)
    assert k == 2 and comp.tolist() == [1, 0]
    comp, k = query_components(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), 1.0)
    assert k == 0 and comp.numel() == 0


def test_small_fragments_are_dropped_and_stuff_is_not_split() -> None:
    # query 0 car: 40 points + a 3-point fragment 20 m away; query 1 road: two blobs 30 m apart
    pts = torch.cat([blob((0, 0, 0), 40, 0), blob((20, 0, 0), 3, 1), blob((0, 10, 0), 10, 2),
                     blob((30, 10, 0), 10, 3)])
    mask, cls, p2v = one_voxel_per_point([0] * 43 + [1] * 20, [1, 0], 2)
    on = panoptic_merge(mask, cls, THING, p2v, min_points=5, points=pts, instance_gap=1.0)
    assert on.instance[:40].unique().tolist() == [1] and (on.semantic[:40] == 1).all()
    fragment = slice(40, 43)
    assert (on.semantic[fragment] == -1).all() and (on.instance[fragment] == 0).all()
    assert (on.score[fragment] == 0).all()
    assert (on.semantic[43:] == 0).all() and (on.instance[43:] == 0).all()  # stuff: one segment, kept
    # without the split the fragment belongs to the car's 43 points and is kept
    off = panoptic_merge(mask, cls, THING, p2v, min_points=5)
    assert (off.semantic[:43] == 1).all() and off.instance[:43].unique().tolist() == [1]


def test_off_is_the_papers_merge() -> None:
    """0 and None are the merge without the split; a gap wider than the cloud connects every query's
    points, so the split path then gives exactly the same ids, labels and scores."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        q, v, n, c = 9, 300, 1200, 4
        mask = torch.randn(q, v, generator=g) * 3
        cls = torch.randn(q, c, generator=g) * 2
        thing = torch.tensor([False, True, True, False])
        p2v = torch.randint(-1, v, (n,), generator=g)
        pts = torch.rand(n, 4, generator=g) * 20
        ref = panoptic_merge(mask, cls, thing, p2v, min_points=3)
        assert ref.instance.max() > 0
        for gap in (0, 0.0, None):
            out = panoptic_merge(mask, cls, thing, p2v, min_points=3, points=pts, instance_gap=gap)
            assert all(torch.equal(a, b) for a, b in zip(vars(out).values(), vars(ref).values(), strict=True))
        wide = panoptic_merge(mask, cls, thing, p2v, min_points=3, points=pts, instance_gap=100.0)
        assert all(torch.equal(a, b) for a, b in zip(vars(wide).values(), vars(ref).values(), strict=True))
    with pytest.raises(ValueError, match="needs the sample's points"):
        panoptic_merge(mask, cls, thing, p2v, min_points=3, instance_gap=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        panoptic_merge(mask, cls, thing, p2v, min_points=3, points=pts, instance_gap=-1.0)


def test_the_checkpoint_carries_the_gap_and_old_checkpoints_merge_as_before(tmp_path) -> None:
    old_path = tiny_panoptic_checkpoint(tmp_path / "old.pt")
    raw = torch.load(old_path, weights_only=True)
    del raw["panoptic"]["instance_gap"]  # saved before the field existed
    torch.save(raw, old_path)
    assert load_checkpoint(old_path).panoptic.instance_gap == 0.0
    gap_path = tiny_panoptic_checkpoint(tmp_path / "gap.pt", instance_gap=0.5)
    assert load_checkpoint(gap_path).panoptic.instance_gap == 0.5

    rng = np.random.default_rng(0)
    xyz = rng.uniform([-15, -15, -1.7], [15, 15, 1.3], (3000, 3))
    pts = np.concatenate([xyz, rng.uniform(size=(3000, 1))], 1).astype(np.float32)
    old, gap = Segmenter.from_checkpoint(old_path), Segmenter.from_checkpoint(gap_path)
    assert replace(gap.panoptic, instance_gap=0.0) == old.panoptic
    thing = torch.from_numpy(thing_mask(old.vocabulary, PANOPTIC_THINGS))
    names = name_classes(old.vocabulary.entries)
    for seg, instance_gap in ((old, 0.0), (gap, 0.5)):
        with torch.inference_mode():
            (ref,) = predict_panoptic(seg.model, torch.from_numpy(pts), seg.text_embeddings, thing,
                                      min_points=5, instance_gap=instance_gap, name_class=names)
        np.testing.assert_array_equal(seg.segment(pts).instances, ref.extras["instances"].numpy())
    a, b = old.segment(pts), gap.segment(pts)  # same weights (same seed): the split refines the ids
    assert a.instances.max() > 0 and not np.array_equal(a.instances, b.instances)
    for i in np.unique(b.instances[b.instances > 0]):
        assert len(np.unique(a.instances[b.instances == i])) == 1  # each split instance inside one of old
