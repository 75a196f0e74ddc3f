"""Panoptic quality: PQ = SQ x RQ per class, overall and split base / novel x things / stuff, plus mIoU.

Definitions (Kirillov et al. 2019, with the LiDAR conventions of the SemanticKITTI / nuScenes-panoptic
evaluators, whose numbers this reproduces exactly; tests cross-check nuscenes-devkit's PanopticEval):
- a segment is a (class, instance id) pair; stuff classes carry instance 0, so each forms one segment;
- points whose ground truth is ignored (-1) are removed from both ground truth and prediction first;
- a predicted and a ground-truth segment of the same class match when their IoU > 0.5 (unique);
- TP_c: matches, SQ_c = sum of their IoU / TP_c, RQ_c = TP_c / (TP_c + FP_c / 2 + FN_c / 2);
- unmatched ground-truth (FN) and predicted (FP) segments count only with >= ``min_points`` points
  (15 nuScenes, 50 SemanticKITTI); small matched segments still count as TP;
- a prediction of -1 (or any id outside [0, C)) belongs to no predicted segment;
- PQ / SQ / RQ means are over ALL classes of the group, a class never seen nor predicted counting 0
  (the devkits' convention: an evaluation set missing a class lowers the mean).
mIoU uses `clip3d_core.evaluation` (rows = ground truth) whose one intended difference from the devkits
is that a class with an empty union is left out of the mean instead of counting as 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip3d_core.config import ConfigError
from clip3d_core.data.panoptic import panoptic_spec
from clip3d_core.evaluation import ConfusionMatrix, EvaluationError, mean_iou
from clip3d_core.metrics import GroundTruth, MetricContext, register_metric
from clip3d_core.predictor import Prediction

MATCH_IOU = 0.5


def _as_int64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


def _segments(sem: np.ndarray, inst: np.ndarray, mult: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points -> (segment row per point, class per segment, points per segment)."""
    uniq, inverse, area = np.unique(sem * mult + inst, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), uniq // mult, area


@dataclasses.dataclass
class PanopticCounts:
    """Per-class accumulators [C] (one int64 / float64 array each, so a DDP run can all-reduce them)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PanopticCounts:
        z = np.zeros(num_classes, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(num_classes, dtype=np.float64))

    def sq_rq_pq(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[C] each; 0 where undefined (the devkits' eps convention)."""
        tp = self.tp.astype(np.float64)
        sq = np.divide(self.iou_sum, tp, out=np.zeros_like(tp), where=tp > 0)
        den = tp + 0.5 * self.fp + 0.5 * self.fn
        rq = np.divide(tp, den, out=np.zeros_like(tp), where=den > 0)
        return sq, rq, sq * rq


def panoptic_counts(pred_sem: Any, pred_inst: Any, gt_sem: Any, gt_inst: Any, num_classes: int, *,
                    min_points: int, ignore_index: int = -1) -> PanopticCounts:
    """TP / FP / FN / IoU sums of one frame (arrays of equal length; see the module doc)."""
    ps, pi, gs, gi = (_as_int64(a) for a in (pred_sem, pred_inst, gt_sem, gt_inst))
    if not ps.shape == pi.shape == gs.shape == gi.shape:
        raise EvaluationError(
            f"pred / gt arrays differ in length: {ps.shape} {pi.shape} {gs.shape} {gi.shape}")
    keep = gs != ignore_index
    ps, pi, gs, gi = ps[keep], pi[keep], gs[keep], gi[keep]
    if gs.size and (gs.min() < 0 or gs.max() >= num_classes):
        raise EvaluationError(f"ground-truth classes outside [0, {num_classes}) that are not {ignore_index}")
    if min(pi.min(initial=0), gi.min(initial=0)) < 0:
        raise EvaluationError("instance ids must be >= 0")
    out = PanopticCounts.zeros(num_classes)
    if gs.size == 0 and ps.size == 0:
        return out
    mult = int(max(pi.max(initial=0), gi.max(initial=0))) + 1
    g_of, g_cls, g_area = _segments(gs, gi, mult)
    has_pred = (ps >= 0) & (ps < num_classes)
    p_of = np.full(ps.shape, -1, dtype=np.int64)
    p_of[has_pred], p_cls, p_area = _segments(ps[has_pred], pi[has_pred], mult)

    same = has_pred & (ps == gs)  # segments only match within their class
    pair, inter = np.unique(g_of[same] * len(p_cls) + p_of[same], return_counts=True)
    g, p = pair // max(len(p_cls), 1), pair % max(len(p_cls), 1)
    iou = inter / (g_area[g] + p_area[p] - inter)
    hit = iou > MATCH_IOU  # > 0.5 makes the matching unique
    g_hit, p_hit = np.zeros(len(g_cls), bool), np.zeros(len(p_cls), bool)
    g_hit[g[hit]], p_hit[p[hit]] = True, True
    out.tp += np.bincount(g_cls[g[hit]], minlength=num_classes)
    out.iou_sum += np.bincount(g_cls[g[hit]], weights=iou[hit], minlength=num_classes)
    out.fn += np.bincount(g_cls[~g_hit & (g_area >= min_points)], minlength=num_classes)
    out.fp += np.bincount(p_cls[~p_hit & (p_area >= min_points)], minlength=num_classes)
    return out


@dataclasses.dataclass
class PanopticReport:
    """Fractions in [0, 1]. Groups: all, things, stuff, base, novel and their crossings."""

    class_names: list[str]
    pq: list[float]
    sq: list[float]
    rq: list[float]
    iou: list[float | None]
    summary: dict[str, float | None]  # e.g. "pq", "pq_things", "pq_novel_stuff", "rq_base", "miou"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        def pct(x: float | None) -> str:
            return "–" if x is None else f"{100 * x:.1f}"

        lines = ["| class | PQ | SQ | RQ | IoU |", "|---|---:|---:|---:|---:|"]
        for i, name in enumerate(self.class_names):
            lines.append(f"| {name} | {pct(self.pq[i])} | {pct(self.sq[i])} | {pct(self.rq[i])} "
                         f"| {pct(self.iou[i])} |")
        lines += ["", "| metric | value (%) |", "|---|---:|"]
        lines += [f"| {k} | {pct(v)} |" for k, v in self.summary.items()]
        return "\n".join(lines) + "\n"


class PanopticQuality:
    """Accumulates panoptic counts and the semantic confusion over frames; `report()` summarises.

    thing: [C] bool (True = thing class); novel: [C] bool or None (no base / novel split).
    """

    def __init__(self, class_names: Sequence[str], thing: Sequence[bool], *, min_points: int,
                 novel: Sequence[bool] | None = None, ignore_index: int = -1) -> None:
        self.class_names = list(class_names)
        c = len(self.class_names)
        self.thing = np.asarray(thing, dtype=bool)
        self.novel = None if novel is None else np.asarray(novel, dtype=bool)
        if self.thing.shape != (c,) or (self.novel is not None and self.novel.shape != (c,)):
            raise EvaluationError(f"thing / novel masks must have one entry per class ({c})")
        self.min_points, self.ignore_index = int(min_points), ignore_index
        self.counts = PanopticCounts.zeros(c)
        self.confusion = ConfusionMatrix(c, ignore_index=ignore_index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def update(self, pred_sem: Any, pred_inst: Any, gt_sem: Any, gt_inst: Any) -> None:
        """One frame (flat per-point arrays; several frames need separate calls: instance ids are
        per frame)."""
        f = panoptic_counts(pred_sem, pred_inst, gt_sem, gt_inst, self.num_classes,
                            min_points=self.min_points, ignore_index=self.ignore_index)
        for name in ("tp", "fp", "fn", "iou_sum"):
            getattr(self.counts, name).__iadd__(getattr(f, name))
        self.confusion.update(_as_int64(pred_sem), _as_int64(gt_sem))

    def groups(self) -> dict[str, np.ndarray]:
        """Group name -> [C] bool membership ("" = all classes)."""
        c = self.num_classes
        out = {"": np.ones(c, bool), "_things": self.thing, "_stuff": ~self.thing}
        if self.novel is not None:
            for split, m in (("_base", ~self.novel), ("_novel", self.novel)):
                out[split] = m
                out[f"{split}_things"] = m & self.thing
                out[f"{split}_stuff"] = m & ~self.thing
        return out

    def report(self) -> PanopticReport:
        sq, rq, pq = self.counts.sq_rq_pq()
        iou = self.confusion.iou()
        summary: dict[str, float | None] = {}
        for suffix, members in self.groups().items():
            if not members.any():
                continue
            for name, per_class in (("pq", pq), ("sq", sq), ("rq", rq)):
                summary[name + suffix] = float(per_class[members].mean())
            m = mean_iou(iou, np.flatnonzero(members).tolist())
            summary["miou" + suffix] = None if np.isnan(m) else m
        return PanopticReport(self.class_names, pq.tolist(), sq.tolist(), rq.tolist(),
                              [None if np.isnan(v) else float(v) for v in iou.tolist()], summary)


@register_metric("panoptic")
class PanopticMetric:
    """PQ / SQ / RQ overall and per group (things, stuff, base = seen, novel = unseen) of predictions
    carrying instance ids in ``Prediction.extras["instances"]``::

        evaluation:
          metrics:
            semantic: {}
            panoptic: {options: {dataset: nuscenes}}   # things and min_points of the dataset

    mIoU is left to the semantic metric (the keys would clash)."""

    @dataclass
    class Options:
        dataset: str = ""  # a `PanopticSpec` name: its things and minimum segment size
        things: list[str] = field(default_factory=list)  # overrides the dataset's things
        min_points: int = 0  # 0: the dataset's

    def __init__(self, context: MetricContext, options: Options) -> None:
        spec = panoptic_spec(options.dataset) if options.dataset else None
        things = set(options.things or (spec.things if spec else ()))
        if not things:
            raise ConfigError("panoptic metric: give options.dataset or options.things")
        min_points = options.min_points or (spec.min_points if spec else 0)
        if min_points < 1:
            raise ConfigError("panoptic metric: give options.min_points (or a dataset)")
        names = context.class_names
        novel = [i in set(context.unseen) for i in range(len(names))]
        self.quality = PanopticQuality(names, [n in things for n in names], min_points=min_points,
                                       novel=novel if context.unseen else None)

    def update(self, prediction: Prediction, truth: GroundTruth) -> None:
        if "instances" not in prediction.extras or truth.instances is None:
            raise ValueError("panoptic metric: the prediction has no instance ids or the frame none")
        self.quality.update(prediction.labels, prediction.extras["instances"], truth.labels, truth.instances)

    def state(self) -> list[Tensor]:
        c = self.quality.counts
        return [torch.from_numpy(a) for a in (c.tp, c.fp, c.fn, c.iou_sum)] + [self.quality.confusion.counts]

    def compute(self) -> dict[str, Any]:
        return {k: v for k, v in self.quality.report().summary.items() if not k.startswith("miou")}
