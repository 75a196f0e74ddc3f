"""Training engine: stage labels, config, a short CPU run (tiny CLIP + simulated teacher on the
synthetic world), bit-exact resume, Segmenter-loadable checkpoints and the train/evaluate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip3d_core.cli import main as cli_main
from clip3d_core.config import ConfigError
from clip3d_core.predictor import Prediction, restricted_logits
from clip3d_core.teacher import PointTargets
from clip3d_core.testing import assert_resumed_like_uninterrupted
from clip3d_core.training import Trainer, load_train_config
from clip3d_core.training.config import PseudoConfig, SelfTrainingConfig
from clip3d_core.training.distributed import DistInfo, IterationBatchSampler
from clip3d_core.training.engine import _lr_factor
from clip3d_core.training.stages import (
    SOURCE_GT,
    SOURCE_SELF,
    SOURCE_TEACHER,
    LabelSpace,
    Stage,
    clip_guided_targets,
    plan_stages,
    self_training_targets,
    stage_at,
)
from clip3d_core.training.state import complete_checkpoints
from clip3d_core.training.validation import FramePredictor, evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "synthetic_tiny.yaml"


# ------------------------------------------------------------------------------ config


def test_every_shipped_config_loads() -> None:
    configs = sorted((REPO / "training").glob("*.yaml"))
    assert {p.name for p in configs} >= {"synthetic_tiny.yaml", "synthetic_bench.yaml",
                                         "semantickitti_zeroshot.yaml", "nuscenes_zeroshot.yaml",
                                         "semantickitti_annotation_free.yaml"}
    for path in configs:
        cfg = load_train_config(path)
        assert cfg.trainer.iterations > 0, path


def test_overrides_and_bad_configs(tmp_path: Path) -> None:
    cfg = load_train_config(TINY, ["trainer.iterations=7", "loss.semantic.weight=0",
                                   "pseudo.labels.min_confidence=0.5", "data.unseen=[truck, bus]"])
    assert cfg.trainer.iterations == 7 and cfg.loss["semantic"].weight == 0.0
    assert cfg.pseudo.labels.min_confidence == 0.5 and cfg.data.unseen == ["truck", "bus"]
    assert cfg.total_iterations == 7 + cfg.self_training.iterations
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(TINY, ["trainer.iteratons=7"])
    with pytest.raises(ConfigError, match="setting"):
        load_train_config(TINY, ["setting=fully_supervised"])
    with pytest.raises(ConfigError, match="simulated"):
        load_train_config(TINY, ["data.dataset=semantickitti", "data.options={}"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_train_config(TINY, ["trainer.iterations"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="dense_last_block"):
        load_train_config(TINY, ["teacher.dense_last_block=attention"])
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        load_train_config(TINY, ["trainer.device=gpu"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_train_config(TINY, ["optim.lr=fast"])


# ------------------------------------------------------------------------------ stage logic


def _targets_for(features: torch.Tensor, visible: torch.Tensor) -> PointTargets:
    n = features.shape[0]
    return PointTargets(features=features, visible=visible, patch_index=torch.full((n,), -1),
                        patch_features=torch.zeros(0, features.shape[1]))


def test_clip_guided_labels_hide_unseen_gt_and_fill_from_the_teacher() -> None:
    text = torch.eye(4)  # classes 0..3; 2 and 3 unseen
    space = LabelSpace(4, (2, 3), "zero_shot")
    gt = torch.tensor([0, 1, 2, 3, -1, 1])
    # Teacher: point 2 looks like class 3 (unseen: kept); point 3 looks like seen class 0, which a
    # point without seen GT cannot be (seen labels are complete), so it gets no label; point 4 is
    # invisible (no label); point 5 has GT (teacher ignored).
    feats = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.1, 1], [1, 0, 0, 0.5],
                                      [0, 0, 1, 0], [0, 0, 1, 0]]), dim=1)
    visible = torch.tensor([True, True, True, True, False, True])
    cfg = PseudoConfig()
    out = clip_guided_targets(gt, _targets_for(feats, visible), text, cfg, space, 6)
    assert out.labels.tolist() == [0, 1, 3, -1, -1, 1]
    assert out.source.tolist() == [SOURCE_GT, SOURCE_GT, SOURCE_TEACHER, 0, 0, SOURCE_GT]

    unrestricted = clip_guided_targets(gt, _targets_for(feats, visible), text,
                                       PseudoConfig(restrict_to_unseen=False), space, 6)
    assert unrestricted.labels.tolist() == [0, 1, 3, 0, -1, 1]
    pt = _targets_for(feats, visible)
    no_pseudo = clip_guided_targets(gt, pt, text, PseudoConfig(enabled=False), space, 6)
    assert no_pseudo.labels.tolist() == [0, 1, -1, -1, -1, 1]  # seen GT only: unseen never supervised

    free = clip_guided_targets(gt, pt, text, cfg, LabelSpace(4, (2, 3), "annotation_free"), 6)
    assert free.labels.tolist() == [0, 1, 3, 0, -1, 2]  # no GT at all, every class a candidate
    assert (free.source != SOURCE_GT).all()


def test_self_training_labels_use_per_class_thresholds() -> None:
    space = LabelSpace(3, (2,), "zero_shot")
    gt = torch.tensor([0, 2, -1, -1, -1])
    # rows: GT seen; hidden unseen GT (-> no GT); confident unseen; unconfident; invalid
    logits = torch.tensor([[0.0, 5, 0], [0, 0, 9], [0, 0, 9], [0, 0, 0.1], [0, 0, 9]])
    valid = torch.tensor([True, True, True, True, False])
    cfg = SelfTrainingConfig(enabled=True, iterations=1)
    thresholds = torch.tensor([0.0, 0.0, 0.9])

    def prediction(allowed):  # what `predict` gives the stage-1 copy (restricted to `allowed`)
        restricted = restricted_logits(logits, allowed)
        scores, labels = restricted.softmax(1).max(1)
        return Prediction(features=torch.zeros(5, 1), logits=restricted, labels=labels, scores=scores,
                          valid=valid)

    out = self_training_targets(gt, prediction(space.unlabelled_candidates(True)), thresholds, cfg, space)
    # Restricted to the unseen class, every valid point is 100% class 2: thresholds pass all.
    assert out.labels.tolist() == [0, 2, 2, 2, -1]
    assert out.source.tolist() == [SOURCE_GT, SOURCE_SELF, SOURCE_SELF, SOURCE_SELF, 0]
    loose = self_training_targets(gt, prediction(None), thresholds, cfg, space)
    assert loose.labels.tolist() == [0, 2, 2, -1, -1]  # 0.1-logit row is ~35% sure: below 0.9
    fallback = torch.tensor([-1, -1, -1, 1, 1])
    kept = self_training_targets(gt, prediction(None), thresholds, cfg, space, fallback)
    assert kept.labels.tolist() == [0, 2, 2, 1, 1] and kept.source[3] == SOURCE_TEACHER


def test_stage_plan_and_learning_rate_schedule() -> None:
    cfg = load_train_config(TINY, ["trainer.iterations=10", "self_training.iterations=5"])
    stages = plan_stages(cfg)
    assert [(s.name, s.start, s.end) for s in stages] == [("clip_guided", 0, 10), ("self_training", 10, 15)]
    assert stage_at(stages, 9).name == "clip_guided" and stage_at(stages, 10).name == "self_training"
    assert stage_at(stages, 15) is None
    stage = Stage("s", 0, 100)
    assert _lr_factor(stage, 0, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert _lr_factor(stage, 10, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert _lr_factor(stage, 99, 10, "cosine", 0.0) < 0.01
    assert _lr_factor(Stage("s", 0, 10, lr_scale=0.5), 5, 0, "constant", 0.0) == 0.5


def test_iteration_sampler_shards_and_resumes() -> None:
    data = list(range(10))
    full = IterationBatchSampler(data, 2, DistInfo(), seed=3)
    it = iter(full)
    first = [next(it) for _ in range(12)]  # crosses two epochs (5 batches each)
    assert sorted(i for b in first[:5] for i in b) == data and first[:5] != first[5:10]  # reshuffled
    resumed = iter(IterationBatchSampler(data, 2, DistInfo(), seed=3, start_iteration=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    shards = [iter(IterationBatchSampler(data, 2, DistInfo(rank=r, world_size=2), seed=3)) for r in (0, 1)]
    seen = [{i for _ in range(2) for i in next(s)} for s in shards]
    assert not seen[0] & seen[1]  # disjoint per rank within an epoch


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path):
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_train_config(TINY, [f"data.options.cache_dir={frame_cache}"])
    trainer = Trainer(cfg, out_dir=out)
    return trainer, trainer.fit()


def test_training_lowers_the_loss_and_beats_chance(tiny_run) -> None:
    trainer, result = tiny_run
    assert result.iterations == trainer.cfg.total_iterations == 40
    ce = [h["loss/ce"] for h in result.history]
    assert ce[-1] < 0.75 * ce[0], ce
    assert 0.0 < result.history[0]["labels/teacher"] < 1.0  # pseudo labels were used in stage 1
    assert result.history[-1]["labels/self"] > 0.0  # and the model's own labels in stage 2
    # Held-out frames of the training distribution: far above predicting the majority class.
    model = trainer.bare.eval()
    def majority(frame):
        labels = torch.full((frame.num_points,), int(np.bincount(frame.labels[frame.labels >= 0]).argmax()))
        ones = torch.ones(frame.num_points)
        return Prediction(features=ones[:, None], logits=None, labels=labels, scores=ones, valid=ones > 0)

    predictors = {"model": FramePredictor(model, trainer.text, trainer.device), "majority": majority}
    results = evaluate(predictors, trainer.val_set, trainer.split.classes, trainer.split.unseen_ids)
    ours, chance = (results[name]["semantic"].compute()["miou"] for name in ("model", "majority"))
    assert ours > 3 * chance, (ours, chance)
    assert ours == pytest.approx(result.metrics["self_training"]["miou"])
    assert set(result.metrics) == {"clip_guided", "self_training"}


def test_run_directory_is_complete_and_self_describing(tiny_run) -> None:
    from clip3d_core.checkpoint import load_checkpoint

    trainer, result = tiny_run
    out = result.out_dir
    for name in ("config.yaml", "final.pt", "stage_clip_guided.pt", "stage_self_training.pt", "metrics.json",
                 "eval_self_training.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard scalars"
    iters = [i for i, _ in complete_checkpoints(out / "checkpoints")]
    assert iters == [20, 30, 40]  # every 10, the newest keep_checkpoints=3 kept
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt.meta["iteration"] == 40 and ckpt.meta["stage"] == "self_training"
    assert ckpt.meta["split"]["unseen"] == ["truck", "motorcyclist", "traffic sign", "traffic cone"]
    assert ckpt.vocabulary == list(trainer.split.vocabulary)
    assert json.loads((out / "metrics.json").read_text()) == result.metrics


def test_final_checkpoint_runs_in_the_segmenter(tiny_run) -> None:
    from clip3d_core.segmenter import Segmenter

    trainer, result = tiny_run
    seg = Segmenter.from_checkpoint(result.final_checkpoint)
    frame = trainer.val_set[0]
    out = seg.segment(frame.points)
    assert out.labels.shape == (frame.num_points,) and out.labels.dtype == np.uint16
    assert seg.vocabulary.names == list(trainer.split.classes)
    ours = FramePredictor(trainer.bare.eval(), trainer.text, trainer.device)(frame).labels.numpy()
    assert out.valid.mean() > 0.95  # same weights, same text vectors, the same `predict`: same labels
    np.testing.assert_array_equal(out.labels[out.valid].astype(np.int64), ours[out.valid])


def test_evaluate_command_writes_json_markdown_and_png(tiny_run, tmp_path: Path, frame_cache: Path) -> None:
    _, result = tiny_run
    code = cli_main(["evaluate", "--checkpoint", str(result.final_checkpoint), "--config", str(TINY),
                     "--set", f"data.options.cache_dir={frame_cache}", "--out", str(tmp_path / "eval"),
                     "--device", "cpu"])
    assert code == 0
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["miou"] == pytest.approx(result.metrics["self_training"]["miou"])
    assert record["unseen"] and record["num_frames"] == 4
    assert "mIoU unseen" in (tmp_path / "eval" / "eval.md").read_text()
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--config", str(TINY)]) == 2


# ------------------------------------------------------------------------------ resume


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, frame_cache: Path) -> None:
    overrides = ["trainer.iterations=4", "self_training.iterations=4", "trainer.checkpoint_every=3",
                 "self_training.calibration_frames=2", "trainer.precise_bn_batches=1",
                 "data.options.val_frames=1", f"data.options.cache_dir={frame_cache}", "trainer.log_every=1"]
    cfg = load_train_config(TINY, overrides)
    straight = Trainer(cfg, out_dir=tmp_path / "a")
    done = straight.fit()
    # Interrupted after iteration 7: the newest checkpoint is iteration 6, inside self-training,
    # so resuming must also restore the frozen stage-1 labeller and its thresholds.
    Trainer(cfg, out_dir=tmp_path / "b").fit(stop_at=7)
    resumed = Trainer(cfg, out_dir=tmp_path / "b", resume=True)
    assert resumed.iteration == 6 and resumed.thresholds is not None
    again = resumed.fit()
    assert again.iterations == done.iterations == 8
    assert_resumed_like_uninterrupted(straight, resumed, done, again)


def test_train_command(tmp_path: Path, frame_cache: Path) -> None:
    args = ["train", "--config", str(TINY), "--out", str(tmp_path / "run"), "--set", "trainer.iterations=2",
            "--set", "self_training.enabled=false", "--set", "trainer.precise_bn_batches=1",
            "--set", "data.options.val_frames=1", "--set", f"data.options.cache_dir={frame_cache}"]
    assert cli_main(args) == 0
    assert (tmp_path / "run" / "final.pt").is_file()
    assert cli_main(["train", "--config", str(TINY), "--set", "trainer.nope=1"]) == 2
