"""Panoptic losses on hand-made cases: voxel targets, matching (optimal against brute force), focal
classification over base classes, mask focal + dice, object- and voxel-level distillation."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from clip3d_core.losses.panoptic import (
    Match,
    MatchingCost,
    PanopticLossState,
    VoxelTargets,
    base_class_index,
    class_term,
    classification_loss,
    dice_loss,
    dice_term,
    hungarian_match,
    mask_dice_loss,
    mask_focal_loss,
    mask_term,
    object_distillation_loss,
    object_term,
    voxel_distillation_loss,
    voxel_targets,
    voxel_term,
)
from clip3d_core.losses.registry import LossInputs, build_loss_terms, combine_losses
from clip3d_core.losses.terms.panoptic import default_panoptic_loss

COST = MatchingCost()
MASK_ALPHA, GAMMA = -1.0, 2.0  # the mask term's defaults


def test_voxel_targets_majority_and_unlabelled() -> None:
    # voxel 0: seg 0 x2, none x1 -> seg 0; voxel 1: none x2, seg 1 x1 -> unlabelled; voxel 2: seg 1;
    # voxel 3: seg 0 / seg 1 tie -> seg 0; one point outside the grid
    segment = torch.tensor([0, 0, -1, -1, -1, 1, 1, 0, 1, 1])
    p2v = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, -1])
    t = voxel_targets(segment, torch.tensor([4, 7]), p2v, 4)
    assert t.labelled.tolist() == [True, False, True, True]
    assert t.masks.tolist() == [[True, False, False, True], [False, False, True, False]]
    assert t.classes.tolist() == [4, 7]
    # a segment that wins no voxel disappears
    t = voxel_targets(torch.tensor([0, 0, 1]), torch.tensor([4, 7]), torch.tensor([0, 0, 0]), 1)
    assert t.classes.tolist() == [4] and t.num_segments == 1


def test_dice_loss_values() -> None:
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(t, t).item() == pytest.approx(0.0)
    assert dice_loss(1 - t, t).item() == pytest.approx(1 - 1 / 5)


def test_hungarian_match_is_optimal_and_stuff_is_fixed() -> None:
    g = torch.Generator().manual_seed(0)
    q, v = 6, 40  # 4 thing queries + 2 stuff queries (base stuff classes 5 and 6)
    mask_logits = torch.randn(q, v, generator=g) * 3
    class_logits = torch.randn(q, 4, generator=g)  # base classes: dataset ids 1, 2, 5, 6
    base_index = base_class_index(8, (1, 2, 5, 6))
    seg_of_voxel = torch.randint(-1, 4, (v,), generator=g)
    classes = torch.tensor([1, 2, 2, 6])  # three thing segments, one stuff (6)
    masks = seg_of_voxel.unsqueeze(0) == torch.arange(4).unsqueeze(1)
    targets = VoxelTargets(masks, classes, seg_of_voxel >= 0)
    stuff = torch.tensor([5, 6])
    m = hungarian_match(class_logits, mask_logits, targets, base_index, stuff, COST)
    pairs = dict(zip(m.query.tolist(), m.segment.tolist()))
    assert pairs[5] == 3 and 4 not in pairs  # stuff query of class 6 takes its segment; class 5 absent

    lab = targets.labelled

    def cost(qi: int, si: int) -> float:
        logits, tgt = mask_logits[qi, lab], masks[si, lab].float()
        bce = F.binary_cross_entropy_with_logits(logits, tgt)
        dice = dice_loss(logits.sigmoid()[None], tgt[None])[0]
        cls = class_logits[qi, base_index[classes[si]]].sigmoid()
        c = COST
        return float(c.cost_class * -cls + c.cost_mask * bce + c.cost_dice * dice)

    things = [0, 1, 2]
    best = min(sum(cost(qi, si) for qi, si in zip(perm, things))
               for perm in itertools.permutations(range(4), 3))
    got = sum(cost(qi, si) for qi, si in pairs.items() if si in things)
    assert sorted(si for si in pairs.values() if si in things) == things
    assert got == pytest.approx(best, rel=1e-5)


def focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    pt = p if target else 1 - p
    a = 1.0 if alpha < 0 else alpha if target else 1 - alpha  # alpha < 0: no class balancing
    return -a * (1 - pt) ** gamma * math.log(pt)


def test_classification_focal_over_base_classes() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0], [-2.0, 1.0]], requires_grad=True)
    base_index = base_class_index(4, (0, 3))  # dataset classes 0 and 3 are base (1, 2 novel)
    everywhere = torch.ones(5, dtype=torch.bool)
    targets = VoxelTargets(everywhere[None], torch.tensor([3]), everywhere)
    loss = classification_loss(logits, Match(torch.tensor([2]), torch.tensor([0])), targets, base_index,
                               alpha=0.25, gamma=2.0)
    # query 2 -> class 3 = base column 1; queries 0, 1 all negatives; normalised by 1 match
    expected = (focal(2.0, 0) + focal(-1.0, 0) + focal(0.5, 0) + focal(-3.0, 0) + focal(-2.0, 0)
                + focal(1.0, 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[2, 1] < 0 and logits.grad[0, 0] > 0


def test_mask_losses_ignore_unlabelled_voxels() -> None:
    masks = torch.tensor([[True, True, False, False, False]])
    labelled = torch.tensor([True, True, True, False, False])
    targets = VoxelTargets(masks, torch.tensor([0]), labelled)
    match = Match(torch.tensor([1]), torch.tensor([0]))
    perfect = torch.tensor([[0.0] * 5, [20.0, 20.0, -20.0, 5.0, -7.0]])
    alpha, gamma = MASK_ALPHA, GAMMA

    def mask_losses(logits: torch.Tensor, m: Match) -> tuple[torch.Tensor, torch.Tensor]:
        focal_part = mask_focal_loss(logits, m, targets, alpha=alpha, gamma=gamma)
        return focal_part, mask_dice_loss(logits, m, targets)

    focal_loss, dice = mask_losses(perfect, match)
    assert focal_loss.item() < 1e-8 and dice.item() < 1e-6  # voxels 3, 4 (unlabelled) do not count
    wrong = perfect.clone()
    wrong[1, 2] = 20.0
    focal_loss, dice = mask_losses(wrong, match)
    assert focal_loss.item() == pytest.approx(focal(20.0, 0, alpha=MASK_ALPHA) / 3, rel=1e-4)
    assert dice.item() == pytest.approx(1 - 5 / 6, rel=1e-4)
    none = mask_losses(perfect, Match(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    assert none[0].item() == 0 and none[1].item() == 0


def test_object_distillation() -> None:
    clip = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),
                       dim=1)
    seen = torch.tensor([True, True, False, True])
    mask_logits = torch.tensor([[5.0, 5.0, -5.0, -5.0],  # q0 over voxels 0, 1
                                [-5.0, -5.0, 5.0, -5.0]],  # q1 over voxel 2 only (unseen): skipped
                               requires_grad=True)
    target = F.normalize(clip[0] + clip[1], dim=0)
    embed = torch.stack([target, clip[3]]).requires_grad_(True)
    loss = object_distillation_loss(embed, mask_logits, torch.tensor([0, 1]), clip, seen)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    embed2 = torch.stack([F.normalize(torch.tensor([1.0, -1.0, 0.0]), dim=0), clip[3]]).requires_grad_(True)
    loss = object_distillation_loss(embed2, mask_logits, torch.tensor([0, 1]), clip, seen)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # orthogonal
    loss.backward()
    assert mask_logits.grad is None and embed2.grad[0].abs().sum() > 0 and embed2.grad[1].abs().sum() == 0


def test_voxel_distillation_needs_no_labels() -> None:
    clip = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]]), dim=1)
    seen = torch.tensor([True, True, True, False])
    mask_logits = torch.tensor([[30.0, 30.0, -30.0, 0.0], [-30.0, -30.0, 30.0, 0.0]], requires_grad=True)
    embed = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    assert voxel_distillation_loss(embed, mask_logits, clip, seen).item() == pytest.approx(0.0, abs=1e-6)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss = voxel_distillation_loss(swapped, mask_logits, clip, seen)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    blurred = torch.zeros(2, 4, requires_grad=True)  # both queries everywhere: rebuilt = (1, 1) direction
    loss = voxel_distillation_loss(embed, blurred, clip, seen)
    assert loss.item() == pytest.approx(1 - math.sqrt(0.5), rel=1e-5)
    loss.backward()
    assert blurred.grad[:, :3].abs().sum() > 0 and blurred.grad[:, 3].abs().sum() == 0  # unseen voxel
    assert voxel_distillation_loss(embed, mask_logits, clip, torch.zeros(4, dtype=torch.bool)).item() == 0


def test_panoptic_losses_batch() -> None:
    g = torch.Generator().manual_seed(1)
    base_index = base_class_index(3, (0, 1, 2))
    targets = [VoxelTargets(torch.tensor([[True, True, False], [False, False, True]]), torch.tensor([0, 2]),
                            torch.ones(3, dtype=torch.bool)),
               VoxelTargets(torch.zeros(0, 2, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                            torch.zeros(2, dtype=torch.bool))]
    masks = [torch.randn(4, v, generator=g, requires_grad=True) for v in (3, 2)]
    embed = F.normalize(torch.randn(2, 4, 5, generator=g), dim=-1).requires_grad_(True)
    logits = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    clip = [F.normalize(torch.randn(v, 5, generator=g), dim=1) for v in (3, 2)]
    seen = [torch.tensor([True, False, True]), torch.tensor([True, True])]
    stuff = torch.tensor([2])
    state = PanopticLossState.matched(masks, embed, logits, targets, base_index, stuff, COST,
                                      clip, seen)
    assert [m.query.tolist() for m in state.matches][1] == []  # nothing to match in the unlabelled sample
    terms = build_loss_terms(default_panoptic_loss())
    inputs = LossInputs(features=torch.zeros(5, 5), valid=torch.ones(5, dtype=torch.bool),
                        labels=torch.zeros(5, dtype=torch.long), text=torch.eye(3, 5),
                        logits=torch.zeros(5, 3),
                        point_targets=object(), extras={"panoptic": state})
    parts = combine_losses(terms, inputs)
    expected = {"panoptic_class": class_term(state, alpha=0.25, gamma=2.0),
                "panoptic_mask": mask_term(state, alpha=MASK_ALPHA, gamma=GAMMA),
                "panoptic_dice": dice_term(state),
                "object_distill": object_term(state), "voxel_distill": voxel_term(state)}
    for name, value in expected.items():
        assert parts.scalars[f"loss/{name}"] == pytest.approx(float(value.detach()), rel=1e-6), name
    weights = {k: v.weight for k, v in default_panoptic_loss().items()}
    weighted = sum(weights[k] * float(v.detach()) for k, v in expected.items())
    assert parts.total.item() == pytest.approx(weighted, rel=1e-5)
    parts.total.backward()
    assert masks[1].grad.abs().sum() > 0  # the unlabelled sample still learns through L_V
    # without teacher output the distillation terms are skipped; without panoptic state the terms refuse
    no_teacher = combine_losses(terms, dataclasses.replace(inputs, point_targets=None))
    assert "loss/voxel_distill" not in no_teacher.scalars and "loss/panoptic_dice" in no_teacher.scalars
    with pytest.raises(ValueError, match="PanopticLossState"):
        combine_losses(terms, dataclasses.replace(inputs, extras={}))
    with pytest.raises(ValueError, match="CLIP voxel features"):
        voxel_term(PanopticLossState.matched(masks, embed, logits, targets, base_index, stuff, COST))
