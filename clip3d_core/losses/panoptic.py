"""Open-vocabulary panoptic losses (arXiv 2401.02402): Hungarian matching, focal classification over
base classes on the cosine logits, mask focal + dice, object-level (L_O) and voxel-level (L_V) CLIP
distillation. Pure functions on one sample's voxel tensors, and one function per term over a batch's
`PanopticLossState` (registered as loss terms in `clip3d_core.losses.terms.panoptic`).

Targets live on voxels (`voxel_targets`): each voxel takes the majority segment of its points, and a
voxel whose majority is unlabelled (ignored or novel points) is left out of the mask losses, so the
extent of a novel object is never supervised by a label. L_V needs no label at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from clip3d_core.model.panoptic import mask_pooled_clip


@dataclass(frozen=True)
class MatchingCost:
    """Weights of the Hungarian matching cost (Mask2Former's 2 / 5 / 5)."""

    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0


@dataclass
class VoxelTargets:
    """One sample's base-class segments on its voxels.

    masks [S, V] bool, classes [S] long (index into the dataset's classes), labelled [V] bool.
    """

    masks: Tensor
    classes: Tensor
    labelled: Tensor

    @property
    def num_segments(self) -> int:
        return int(self.classes.shape[0])


@dataclass
class Match:
    """Matched (query, segment) pairs of one sample."""

    query: Tensor  # [K] long
    segment: Tensor  # [K] long


def voxel_targets(segment: Tensor, segment_class: Tensor, point_to_voxel: Tensor, num_voxels: int
                  ) -> VoxelTargets:
    """Point segments (`PanopticTargets.segment`, -1 = none) -> majority segment per voxel.
    point_to_voxel [N] indexes this sample's voxels (-1 outside the grid); ties go to the lower id,
    "none" counting as id -1."""
    s = segment_class.shape[0]
    keep = point_to_voxel >= 0
    votes = torch.zeros(num_voxels, s + 1, dtype=torch.long, device=segment.device)
    votes.index_put_((point_to_voxel[keep], segment[keep] + 1), torch.ones_like(segment[keep]),
                     accumulate=True)
    winner = votes.argmax(dim=1) - 1
    masks = winner.unsqueeze(0) == torch.arange(s, device=segment.device).unsqueeze(1)
    present = masks.any(dim=1)  # a segment may lose every voxel to its neighbours
    return VoxelTargets(masks[present], segment_class[present].long(), winner >= 0)


def dice_loss(prob: Tensor, target: Tensor) -> Tensor:
    """[K, V] probabilities and {0, 1} targets -> [K] ``1 - (2|p t| + 1) / (|p| + |t| + 1)``."""
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


@torch.no_grad()
def hungarian_match(class_logits: Tensor, mask_logits: Tensor, targets: VoxelTargets, base_index: Tensor,
                    stuff_classes: Tensor, cfg: MatchingCost) -> Match:
    """Thing queries (all but the last ``len(stuff_classes)``) are matched to thing segments by the
    Hungarian algorithm on ``cost_class * -p(class) + cost_mask * BCE + cost_dice * dice`` (masks over
    labelled voxels); stuff query k is matched to the segment of ``stuff_classes[k]`` when present.

    class_logits [Q, C_base]; mask_logits [Q, V]; base_index [C] long: dataset class -> base column.
    """
    q_total, n_stuff = mask_logits.shape[0], stuff_classes.shape[0]
    n_thing = q_total - n_stuff
    is_stuff = (targets.classes.unsqueeze(1) == stuff_classes.unsqueeze(0)).any(dim=1)
    queries, segments = [], []
    # stuff: fixed assignment
    for k in range(n_stuff):
        hit = (targets.classes == stuff_classes[k]).nonzero().flatten()
        if hit.numel():
            queries.append(n_thing + k)
            segments.append(int(hit[0]))
    thing_seg = (~is_stuff).nonzero().flatten()
    if thing_seg.numel() and n_thing:
        lab = targets.labelled
        logits = mask_logits[:n_thing][:, lab].float()
        tgt = targets.masks[thing_seg][:, lab].float()
        prob = logits.sigmoid()
        v = max(int(lab.sum()), 1)
        # pairwise BCE: sum over voxels of -[t log p + (1 - t) log(1 - p)], as two matrix products
        pos, neg = F.softplus(-logits), F.softplus(logits)
        cost_mask = (pos @ tgt.t() + neg @ (1 - tgt).t()) / v
        cost_dice = 1 - (2 * prob @ tgt.t() + 1) / (prob.sum(1, keepdim=True) + tgt.sum(1).unsqueeze(0) + 1)
        cls_prob = class_logits[:n_thing].float().sigmoid()[:, base_index[targets.classes[thing_seg]]]
        cost = cfg.cost_class * -cls_prob + cfg.cost_mask * cost_mask + cfg.cost_dice * cost_dice
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        queries += rows.tolist()
        segments += thing_seg[torch.as_tensor(cols, dtype=torch.long)].tolist()
    device = mask_logits.device
    return Match(torch.tensor(queries, dtype=torch.long, device=device),
                 torch.tensor(segments, dtype=torch.long, device=device))


def classification_loss(class_logits: Tensor, match: Match, targets: VoxelTargets, base_index: Tensor, *,
                        alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss over the BASE classes, summed over queries and classes / matched count:
    a matched query's target is its segment's class, every other query's is all zeros."""
    onehot = torch.zeros_like(class_logits)
    onehot[match.query, base_index[targets.classes[match.segment]]] = 1.0
    loss = sigmoid_focal_loss(class_logits, onehot, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / max(match.query.numel(), 1)


def _matched_masks(mask_logits: Tensor, match: Match, targets: VoxelTargets) -> tuple[Tensor, Tensor] | None:
    """Matched queries' logits and target masks over the labelled voxels ([K, V_l] each); None when
    nothing is matched or labelled."""
    if match.query.numel() == 0 or not bool(targets.labelled.any()):
        return None
    logits = mask_logits[match.query][:, targets.labelled]
    return logits, targets.masks[match.segment][:, targets.labelled].to(logits.dtype)


def mask_focal_loss(mask_logits: Tensor, match: Match, targets: VoxelTargets, *, alpha: float, gamma: float
                    ) -> Tensor:
    """Binary focal loss of the matched queries' masks over labelled voxels, mean over voxels and matches."""
    pair = _matched_masks(mask_logits, match, targets)
    if pair is None:
        return mask_logits.sum() * 0.0
    return sigmoid_focal_loss(*pair, alpha=alpha, gamma=gamma, reduction="none").mean(dim=1).mean()


def mask_dice_loss(mask_logits: Tensor, match: Match, targets: VoxelTargets) -> Tensor:
    """Dice loss of the matched queries' masks over labelled voxels, mean over matches."""
    pair = _matched_masks(mask_logits, match, targets)
    if pair is None:
        return mask_logits.sum() * 0.0
    return dice_loss(pair[0].sigmoid(), pair[1]).mean()


def object_distillation_loss(class_embed: Tensor, mask_logits: Tensor, query: Tensor, clip: Tensor,
                             clip_mask: Tensor) -> Tensor:
    """L_O: mean over ``query`` of ``1 - cos(e_q, mean of the frozen CLIP features of the camera-seen
    voxels in q's predicted mask (p > 0.5))``. The mask only selects voxels (no gradient through it);
    queries whose mask holds no seen voxel are skipped."""
    pooled, has = mask_pooled_clip(mask_logits[query].detach(), clip, clip_mask)
    if not bool(has.any()):
        return class_embed.sum() * 0.0
    return (1 - F.cosine_similarity(class_embed[query[has]], pooled[has], dim=1)).mean()


def voxel_distillation_loss(class_embed: Tensor, mask_logits: Tensor, clip: Tensor, clip_mask: Tensor
                            ) -> Tensor:
    """L_V: per camera-seen voxel, ``1 - cos(sum_q sigmoid(m_qv) e_q, frozen CLIP feature)``, mean over
    those voxels; no label involved. Gradients reach both the masks and the class embeddings."""
    if not bool(clip_mask.any()):
        return class_embed.sum() * 0.0
    rebuilt = mask_logits[:, clip_mask].sigmoid().t() @ class_embed  # [V_seen, D]
    return (1 - F.cosine_similarity(rebuilt, clip[clip_mask], dim=1)).mean()


@dataclass
class PanopticLossState:
    """One batch's decoder outputs, voxel targets and matches: everything the panoptic loss terms read.

    mask_logits[b] [Q, V_b]; class_embed [B, Q, D]; class_logits [B, Q, C_base] on the BASE text;
    base_index [C] dataset class -> base column; clip[b] / clip_mask[b]: the sample's frozen voxel CLIP
    features [V_b, D] and [V_b] bool (None: no camera, no distillation).
    """

    mask_logits: list[Tensor]
    class_embed: Tensor
    class_logits: Tensor
    targets: list[VoxelTargets]
    matches: list[Match]
    base_index: Tensor
    clip: list[Tensor] | None = None
    clip_mask: list[Tensor] | None = None

    @classmethod
    def matched(cls, mask_logits: list[Tensor], class_embed: Tensor, class_logits: Tensor,
                targets: list[VoxelTargets], base_index: Tensor, stuff_classes: Tensor, cost: MatchingCost,
                clip: list[Tensor] | None = None, clip_mask: list[Tensor] | None = None) -> PanopticLossState:
        """Match every sample once (`hungarian_match`); the terms share the matches."""
        matches = [hungarian_match(class_logits[b], mask_logits[b], t, base_index, stuff_classes, cost)
                   for b, t in enumerate(targets)]
        return cls(mask_logits, class_embed, class_logits, targets, matches, base_index, clip, clip_mask)

    @property
    def batch_size(self) -> int:
        return len(self.targets)


def class_term(s: PanopticLossState, *, alpha: float, gamma: float) -> Tensor:
    return torch.stack([classification_loss(s.class_logits[b], s.matches[b], s.targets[b], s.base_index,
                                            alpha=alpha, gamma=gamma) for b in range(s.batch_size)]).mean()


def mask_term(s: PanopticLossState, *, alpha: float, gamma: float) -> Tensor:
    return torch.stack([mask_focal_loss(s.mask_logits[b], s.matches[b], s.targets[b], alpha=alpha,
                                        gamma=gamma) for b in range(s.batch_size)]).mean()


def dice_term(s: PanopticLossState) -> Tensor:
    return torch.stack([mask_dice_loss(s.mask_logits[b], s.matches[b], s.targets[b])
                        for b in range(s.batch_size)]).mean()


def object_term(s: PanopticLossState) -> Tensor:
    if s.clip is None or s.clip_mask is None:
        raise ValueError("object-level distillation needs the frozen CLIP voxel features")
    return torch.stack([object_distillation_loss(s.class_embed[b], s.mask_logits[b], s.matches[b].query,
                                                 s.clip[b], s.clip_mask[b])
                        for b in range(s.batch_size)]).mean()


def voxel_term(s: PanopticLossState) -> Tensor:
    if s.clip is None or s.clip_mask is None:
        raise ValueError("voxel-level distillation needs the frozen CLIP voxel features")
    return torch.stack([voxel_distillation_loss(s.class_embed[b], s.mask_logits[b], s.clip[b], s.clip_mask[b])
                        for b in range(s.batch_size)]).mean()


def base_class_index(num_classes: int, base_ids: tuple[int, ...] | list[int],
                     device: torch.device | None = None) -> Tensor:
    """[C] long: dataset class -> its column among the base classes (-1 for novel classes)."""
    index = np.full(num_classes, -1, dtype=np.int64)
    index[list(base_ids)] = np.arange(len(base_ids))
    return torch.as_tensor(index, device=device)
