"""PQ / SQ / RQ: hand-made cases and identical numbers to nuscenes-devkit's PanopticEval."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from clip3d_core.config import ConfigError
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.evaluation import EvaluationError
from clip3d_core.metrics import GroundTruth, MetricConfig, MetricContext, build_metrics, merged_results
from clip3d_core.panoptic_quality import PanopticQuality, panoptic_counts
from clip3d_core.predictor import Prediction


def devkit_panoptic_eval() -> type:
    """nuscenes-devkit's PanopticEval, loaded from its file: the package __init__ imports cv2 and more
    that the test-only install (--no-deps) leaves out."""
    spec = importlib.util.find_spec("nuscenes")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nuscenes-devkit not installed (pip install nuscenes-devkit==1.2.0 --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "eval" / "panoptic" / "panoptic_seg_evaluator.py"
    module_spec = importlib.util.spec_from_file_location("_devkit_panoptic_eval", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.PanopticEval


def test_hand_made_frame() -> None:
    # classes: 0 road (stuff), 1 car (thing); ignore -1
    gt_sem = np.array([0] * 30 + [1] * 20 + [1] * 20 + [-1] * 5)
    gt_inst = np.array([0] * 30 + [1] * 20 + [2] * 20 + [0] * 5)
    pred_sem, pred_inst = gt_sem.copy(), gt_inst.copy()
    pred_sem[-5:], pred_inst[-5:] = 1, 7  # predictions on ignored points vanish
    pred_sem[30:34] = 0  # 4 points of car 1 predicted road: road IoU 30/34, car 1 IoU 16/20
    pred_inst[30:34] = 0
    pred_inst[50:70] = 3  # car 2 under another id: still a match (IoU 1)
    c = panoptic_counts(pred_sem, pred_inst, gt_sem, gt_inst, 2, min_points=5)
    assert c.tp.tolist() == [1, 2] and c.fp.tolist() == [0, 0] and c.fn.tolist() == [0, 0]
    np.testing.assert_allclose(c.iou_sum, [30 / 34, 16 / 20 + 1.0])
    # split car 2 in halves: no half reaches IoU > 0.5 -> one FN and two FPs (each >= min_points)
    pred_inst[60:70] = 4
    c = panoptic_counts(pred_sem, pred_inst, gt_sem, gt_inst, 2, min_points=5)
    assert c.tp.tolist() == [1, 1] and c.fp.tolist() == [0, 2] and c.fn.tolist() == [0, 1]
    # ... unless the halves are below the minimum size (then they are not false positives)
    c = panoptic_counts(pred_sem, pred_inst, gt_sem, gt_inst, 2, min_points=11)
    assert c.fp.tolist() == [0, 0] and c.fn.tolist() == [0, 1]
    pred_sem[50:70] = -1  # no prediction at all for car 2
    metric = PanopticQuality(["road", "car"], [False, True], min_points=5, novel=[False, True])
    metric.update(pred_sem, pred_inst, gt_sem, gt_inst)
    r = metric.report()
    sq_car, rq_car = 16 / 20, 1 / (1 + 0.5)
    assert r.sq[1] == pytest.approx(sq_car) and r.rq[1] == pytest.approx(rq_car)
    assert r.summary["pq_novel_things"] == pytest.approx(sq_car * rq_car)
    assert r.summary["pq"] == pytest.approx((30 / 34 + sq_car * rq_car) / 2)
    assert r.summary["pq_base_stuff"] == pytest.approx(30 / 34) and "pq_novel_stuff" not in r.summary
    assert r.summary["miou"] == pytest.approx((30 / 34 + 16 / 40) / 2)
    assert "| car |" in r.to_markdown()


def test_input_checks() -> None:
    with pytest.raises(EvaluationError, match="differ in length"):
        panoptic_counts([0], [0], [0, 1], [0, 0], 2, min_points=1)
    with pytest.raises(EvaluationError, match="outside"):
        panoptic_counts([0], [0], [5], [0], 2, min_points=1)
    with pytest.raises(EvaluationError, match="one entry per class"):
        PanopticQuality(["a", "b"], [True], min_points=1)


def random_frame(rng: np.random.Generator, c: int, n: int) -> tuple[np.ndarray, ...]:
    """Ground truth with stuff (instance 0) and things, a prediction that keeps most segments, moves
    some points, merges / splits instances and predicts nothing or the wrong class here and there."""
    gt_sem = rng.integers(-1, c, n)
    gt_inst = np.where(gt_sem >= c // 2, rng.integers(1, 6, n), 0)  # upper half of the classes = things
    pred_sem, pred_inst = gt_sem.copy(), gt_inst.copy()
    moved = rng.random(n) < rng.uniform(0.05, 0.5)
    pred_sem[moved] = rng.integers(-1, c, moved.sum())
    pred_inst[moved] = rng.integers(0, 8, moved.sum())
    pred_inst[rng.random(n) < 0.1] += 10
    return pred_sem, pred_inst, gt_sem, gt_inst


@pytest.mark.parametrize("min_points", [1, 15, 50])
def test_identical_to_nuscenes_devkit(min_points: int) -> None:
    PanopticEval = devkit_panoptic_eval()
    rng = np.random.default_rng(min_points)
    c = 8
    ours = PanopticQuality([f"c{i}" for i in range(c)], np.arange(c) >= c // 2, min_points=min_points)
    ref = PanopticEval(c + 1, ignore=[0], min_points=min_points)  # devkit class 0 = ignore
    for _ in range(6):
        pred_sem, pred_inst, gt_sem, gt_inst = random_frame(rng, c, int(rng.integers(200, 3000)))
        ours.update(pred_sem, pred_inst, gt_sem, gt_inst)
        ref.addBatch(pred_sem + 1, pred_inst, gt_sem + 1, gt_inst)
    np.testing.assert_array_equal(ours.counts.tp, ref.pan_tp[1:])
    np.testing.assert_array_equal(ours.counts.fp, ref.pan_fp[1:])
    np.testing.assert_array_equal(ours.counts.fn, ref.pan_fn[1:])
    assert ours.counts.tp.sum() > 0 and ours.counts.fp.sum() > 0 and ours.counts.fn.sum() > 0
    pq, sq, rq, pq_all, sq_all, rq_all = ref.getPQ()
    r = ours.report()
    np.testing.assert_allclose(r.pq, pq_all[1:], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r.sq, sq_all[1:], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r.rq, rq_all[1:], rtol=1e-12, atol=1e-15)
    assert (r.summary["pq"], r.summary["sq"], r.summary["rq"]) == pytest.approx((pq, sq, rq), rel=1e-12)
    miou, _ = ref.getSemIoU()  # every class present here, so the empty-union convention does not differ
    assert r.summary["miou"] == pytest.approx(miou, rel=1e-12)


def test_devkit_agrees_on_hand_made_edge_cases() -> None:
    """An empty frame, a frame with no prediction, a class absent from everything (counts 0 in the
    means in both), a prediction entirely on ignored points."""
    PanopticEval = devkit_panoptic_eval()
    ours = PanopticQuality(["a", "b", "c"], [False, True, True], min_points=2)
    ref = PanopticEval(4, ignore=[0], min_points=2)
    frames = [
        (np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)),
        (np.full(6, -1), np.zeros(6, int), np.array([0, 0, 1, 1, 1, -1]), np.array([0, 0, 4, 4, 4, 0])),
        (np.array([1, 1, 1, 0]), np.array([2, 2, 2, 0]), np.array([-1, -1, -1, 0]), np.zeros(4, int)),
        (np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 2, 2, 0, 0]), np.array([1, 1, 1, 1, 0, 0]),
         np.array([5, 5, 5, 5, 0, 0])),
    ]
    for pred_sem, pred_inst, gt_sem, gt_inst in frames:
        ours.update(pred_sem, pred_inst, gt_sem, gt_inst)
        ref.addBatch(pred_sem + 1, pred_inst, gt_sem + 1, gt_inst)
    pq, sq, rq, pq_all, _, _ = ref.getPQ()
    r = ours.report()
    np.testing.assert_allclose(r.pq, pq_all[1:], atol=1e-15)
    assert (r.summary["pq"], r.summary["sq"], r.summary["rq"]) == pytest.approx((pq, sq, rq))
    assert r.pq[2] == 0.0 and r.iou[2] is None  # class c: never present, never predicted


def test_registered_panoptic_metric() -> None:
    """`evaluation.metrics: {panoptic: {options: {dataset: synthetic}}}` beside the semantic metric."""
    split = load_panoptic_split("synthetic_b13n4")
    context = MetricContext(split.classes, split.novel_ids)
    entries = {"semantic": MetricConfig(), "panoptic": MetricConfig(options={"dataset": "synthetic"})}
    metrics = build_metrics(entries, context)
    reference = PanopticQuality(split.classes, split.spec.thing_mask(), min_points=15,
                                novel=split.novel_mask())
    rng = np.random.default_rng(3)
    for _ in range(2):
        pred_sem, pred_inst, gt_sem, gt_inst = random_frame(rng, split.num_classes, 2000)
        n = len(pred_sem)
        prediction = Prediction(features=torch.zeros(n, 1), logits=None, labels=torch.from_numpy(pred_sem),
                                scores=torch.ones(n), valid=torch.ones(n, dtype=torch.bool),
                                extras={"instances": torch.from_numpy(pred_inst)})
        truth = GroundTruth(torch.from_numpy(gt_sem), torch.from_numpy(gt_inst))
        for m in metrics.values():
            m.update(prediction, truth)
        reference.update(pred_sem, pred_inst, gt_sem, gt_inst)
    results = merged_results(metrics)  # no key clash with the semantic metric's mIoU
    expected = reference.report().summary
    for key in ("pq", "sq", "rq", "pq_novel_things", "pq_novel_stuff", "pq_base_things"):
        assert results[key] == pytest.approx(expected[key]), key
    assert "miou" in results and "miou_novel" not in results
    for t in metrics["panoptic"].state():  # what DDP sums in place: two equal ranks
        t.add_(t.clone())
    assert metrics["panoptic"].compute()["pq"] == pytest.approx(expected["pq"])  # ratios unchanged
    assert int(metrics["panoptic"].quality.counts.tp.sum()) == 2 * int(reference.counts.tp.sum())
    with pytest.raises(ConfigError, match=r"options\.dataset or options\.things"):
        build_metrics({"panoptic": MetricConfig()}, context)
    custom = build_metrics({"panoptic": MetricConfig(options={"things": ["car"], "min_points": 5})}, context)
    assert custom["panoptic"].quality.thing.sum() == 1 and custom["panoptic"].quality.min_points == 5
    with pytest.raises(ValueError, match="no instance ids"):
        custom["panoptic"].update(dataclasses.replace(prediction, extras={}), truth)
