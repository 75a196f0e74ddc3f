"""Metrics against IoUs computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import clip3d_core  # noqa: F401
from clip3d_core.evaluation import (
    ConfusionMatrix,
    EvaluationError,
    EvaluationReport,
    harmonic_iou,
    mean_iou,
    per_class_iou,
)
from clip3d_core.viz import confusion_png

NAMES = ["road", "car", "pole"]
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, -1, 1])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 65535])  # last: a labelled point left unlabelled
# rows = GT: road [2,1,0], car [0,1,1] + 1 missed, pole [1,0,2]
# IoU road = 2/(2+1+1) = .5, car = 1/(1+1+2) = .25, pole = 2/(2+1+1) = .5


def _cm() -> ConfusionMatrix:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    return cm


def test_confusion_counts_and_iou_by_hand():
    cm = _cm()
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert cm.counts[:, 3].tolist() == [0, 1, 0]
    torch.testing.assert_close(cm.iou(), torch.tensor([0.5, 0.25, 0.5], dtype=torch.float64))


def test_report_miou_seen_unseen_hiou_by_hand():
    rep = _cm().report(NAMES, unseen=[1])
    assert rep.miou == pytest.approx(1.25 / 3)
    assert rep.miou_seen == pytest.approx(0.5) and rep.miou_unseen == pytest.approx(0.25)
    assert rep.hiou == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert rep.accuracy == pytest.approx(5 / 9) and rep.num_points == 9
    assert rep.support == [3, 3, 3] and rep.seen == [0, 2] and rep.unseen == [1]
    plain = _cm().report(NAMES)
    assert plain.hiou is None and plain.miou_seen is None and plain.miou == pytest.approx(1.25 / 3)


def test_batches_accumulate_like_one_pass_and_numpy_inputs():
    cm = ConfusionMatrix(3)
    cm.update(PRED[:4].numpy(), TARGET[:4].numpy().astype(np.int32))
    cm.update(PRED[4:], TARGET[4:])
    assert torch.equal(cm.counts, _cm().counts)
    other = _cm().merge(_cm())
    assert torch.equal(other.counts, 2 * _cm().counts)
    cm.reset()
    assert int(cm.counts.sum()) == 0


def test_absent_class_is_nan_and_excluded_but_false_positives_count():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]))
    iou = cm.iou()
    # class 2 never in GT but predicted once -> IoU 0, in the mean; class 3 nowhere -> NaN, out.
    assert iou[0] == 1.0 and iou[1] == 0.0 and iou[2] == 0.0 and math.isnan(iou[3])
    assert mean_iou(iou) == pytest.approx(1 / 3)
    assert mean_iou(iou, [0, 3]) == pytest.approx(1.0)
    assert math.isnan(mean_iou(iou, [3]))
    rep = cm.report(["a", "b", "c", "d"], unseen=[3])
    assert rep.miou_unseen is None and rep.hiou is None and rep.iou[3] is None


def test_harmonic_iou_edges():
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(0.6, 0.3) == pytest.approx(0.4)
    assert math.isnan(harmonic_iou(0.5, math.nan))


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(EvaluationError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(EvaluationError, match="sizes"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(EvaluationError, match="class names"):
        _cm().report(["a", "b"])
    with pytest.raises(EvaluationError, match="unseen"):
        _cm().report(NAMES, unseen=[5])
    with pytest.raises(EvaluationError):
        per_class_iou(torch.zeros(3, 5))
    with pytest.raises(EvaluationError):
        ConfusionMatrix(0)


def test_json_round_trip_and_markdown():
    rep = _cm().report(NAMES, unseen=[1])
    data = json.loads(rep.to_json())
    assert data["hiou"] == pytest.approx(1 / 3) and data["confusion"][1] == [0, 1, 1]
    assert EvaluationReport.from_json(rep.to_json()) == rep
    nan_rep = EvaluationReport.from_confusion(torch.zeros(2, 2), ["a", "b"])
    assert json.loads(nan_rep.to_json())["miou"] is None  # strict JSON: no NaN literal
    md = rep.to_markdown()
    assert "| car | unseen | 25.0 | 3 |" in md
    assert "| road | seen | 50.0 | 3 |" in md
    assert "| hIoU | 33.3 |" in md and "| mIoU | 41.7 |" in md
    assert "–" in nan_rep.to_markdown()


def test_confusion_png(tmp_path):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 7]), torch.tensor([0, 1, 0, 1]))  # class 2 row empty: blank, no crash
    out = confusion_png(tmp_path / "sub" / "cm.png", cm.counts.numpy(), NAMES, title="test")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 300
        # Not blank: the normalised cells are drawn in several shades.
        assert len(set(im.convert("RGB").getdata())) > 10
    rep = cm.report(NAMES)
    assert confusion_png(tmp_path / "rep.png", rep.confusion, rep.class_names).is_file()
    with pytest.raises(EvaluationError):
        confusion_png(tmp_path / "x.png", cm.counts.numpy(), ["a"])
