"""Open-vocabulary panoptic training and inference steps on collated frames (`collate_frames`).

`PanopticTask` holds what a split fixes (base classes, base-stuff queries, thing mask, text) and the
configured loss terms (`clip3d_core.losses.terms.panoptic`, weights in the `loss` list). The losses
see base-class text and base-class segments only (`PanopticSplit.training_targets`), while
`clip3d_core.predictor.predict_panoptic` scores every class of the vocabulary with the same cosine head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clip3d_core.clip.text import NameEmbeddings
from clip3d_core.data.panoptic import PanopticSplit
from clip3d_core.labels import IGNORE_INDEX
from clip3d_core.losses.panoptic import MatchingCost, PanopticLossState, base_class_index, voxel_targets
from clip3d_core.losses.registry import (
    LossInputs,
    LossParts,
    LossTermConfig,
    build_loss_terms,
    combine_losses,
)
from clip3d_core.losses.terms.panoptic import PANOPTIC_KEY, default_panoptic_loss
from clip3d_core.model.panoptic import PanopticNet, point_embeddings
from clip3d_core.teacher import PointTargets


@dataclass
class PanopticTask:
    """A split's fixed training inputs. text: the dataset classes' names (`NameEmbeddings`, a class
    scoring the maximum over its names), or [C, D] one embedding per class (label order)."""

    split: PanopticSplit
    text: Tensor | NameEmbeddings
    loss: Mapping[str, LossTermConfig] = field(default_factory=default_panoptic_loss)
    matching: MatchingCost = field(default_factory=MatchingCost)

    def __post_init__(self) -> None:
        self.terms = build_loss_terms(self.loss)
        text = self.text
        self.names = text if isinstance(text, NameEmbeddings) else \
            NameEmbeddings(text, torch.arange(text.shape[0], device=text.device), text.shape[0])
        # fixed by the split: built once on the text's device, not per training step
        device = self.names.text.device
        self.base_index = base_class_index(self.split.num_classes, self.split.base_ids, device)
        # dataset class of each stuff query (the base stuff classes, in class order)
        self.stuff_classes = torch.tensor(self.split.base_stuff_ids, dtype=torch.long, device=device)


def training_losses(model: PanopticNet, task: PanopticTask, batch: dict[str, Any],
                    point_targets: PointTargets | None, *, forward: nn.Module | None = None,
                    generator: torch.Generator | None = None) -> LossParts:
    """One forward pass and the configured loss terms of a collated batch (`combine_losses`; the
    distillation terms run only with ``point_targets``, the frozen teacher's per-point CLIP features).
    ``batch["points"]`` may be augmented and on any device; labels stay on the host. ``forward``: the
    module that runs the forward pass when it is not ``model`` itself (its DDP wrapper); ``generator``
    draws the camera drop-out (`PanopticNet.forward`)."""
    if batch["labels"] is None:
        raise ValueError("panoptic training needs labelled frames")
    head = model.cfg.head
    if head.classifier == "fixed" and tuple(head.base_classes) != tuple(task.split.base_ids):
        raise ValueError(f"the fixed classifier's classes {head.base_classes} are not the split's base "
                         f"classes {task.split.base_ids}")
    points, batch_index = batch["points"], batch["batch_index"]
    device = points.device
    clip = None if point_targets is None else point_targets.features
    seen = None if point_targets is None else point_targets.visible
    out = (forward or model)(points, batch_index, clip, seen, generator=generator)
    labels, instances = batch["labels"].numpy(), batch["instances"]
    instances = None if instances is None else instances.numpy()
    targets, vclip, vmask, semantic = [], [], [], []
    for b in range(batch["batch_size"]):
        lo, hi = int(batch["offsets"][b]), int(batch["offsets"][b + 1])
        t = task.split.training_targets(labels[lo:hi], None if instances is None else instances[lo:hi])
        semantic.append(torch.from_numpy(t.semantic))
        v0, v1 = int(out.voxel_offsets[b]), int(out.voxel_offsets[b + 1])
        targets.append(voxel_targets(torch.from_numpy(t.segment).to(device),
                                     torch.from_numpy(t.segment_class).to(device),
                                     out.sample_point_to_voxel(batch_index, b), v1 - v0))
        if out.clip is not None:
            vclip.append(out.clip[v0:v1])
            vmask.append(out.clip_mask[v0:v1])
    # base columns of the whole vocabulary's logits (a class: the max over its names): the cosine
    # head scores each class alone, the fixed classifier writes its outputs into exactly these columns
    names = task.names.to(device)
    class_logits = model.class_logits(out, names.text, names.name_class,
                                      names.num_classes)[..., list(task.split.base_ids)]
    state = PanopticLossState.matched(out.mask_logits, out.class_embed, class_logits, targets,
                                      task.base_index.to(device), task.stuff_classes.to(device),
                                      task.matching, vclip or None, vmask or None)
    features = point_embeddings(out)
    valid = out.vox.valid
    inputs = LossInputs(features=features, valid=valid,
                        labels=torch.where(valid, torch.cat(semantic).to(device), IGNORE_INDEX),
                        text=names.class_vectors(),
                        logits=model.classifier(features, names.text, names.name_class, names.num_classes),
                        point_targets=point_targets, extras={PANOPTIC_KEY: state})
    return combine_losses(task.terms, inputs)
