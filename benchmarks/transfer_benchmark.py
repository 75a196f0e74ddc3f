"""Method benchmark: does the transfer from the 2D teacher into the 3D network work, step by step?

On the synthetic world with the SIMULATED teacher (see training/synthetic_bench.yaml), one table of
seen mIoU / unseen mIoU / hIoU on held-out frames with full ground truth:

  (a) the teacher's labels projected onto the points (argmax over all classes; points no camera
      sees get no label)
  (b) 3D model trained on seen-class ground truth only (cannot name unseen classes: ~0 unseen)
  (c) (b) + output-level teacher pseudo labels for the points without seen ground truth
  (d) (c) + MCFA feature alignment (semantic + spatial)
  (e) (d) + self-training (stage 2, continued from (d)'s model)
  (f) annotation-free: no ground truth at all, pseudo labels + MCFA + self-training

Scored twice: on all points, and on camera-visible points only (the region the teacher can label).
Prints Markdown + JSON and saves both under benchmarks/results/. A script, not a test:

  .venv/bin/python benchmarks/transfer_benchmark.py            # ~25 min on 1 CPU core
  .venv/bin/python benchmarks/transfer_benchmark.py --rows a c --set trainer.iterations=50
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import clip3d_core  # noqa: F401  (compat shims before open_clip / spconv)
from clip3d_core.checkpoint import load_checkpoint
from clip3d_core.config import to_dict
from clip3d_core.evaluation import EvaluationReport
from clip3d_core.training import Trainer, load_train_config
from clip3d_core.training.validation import evaluate, model_predictor, summary, teacher_predictor

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("transfer_benchmark")

ROWS: dict[str, str] = {
    "a": "(a) teacher labels projected onto points",
    "b": "(b) 3D, seen ground truth only",
    "c": "(c) + output-level pseudo labels",
    "d": "(d) + MCFA",
    "e": "(e) + self-training",
    "f": "(f) annotation-free",
}
NO_MCFA = ["loss.w_sem=0", "loss.w_spa=0"]
# Training runs: name -> (overrides on the benchmark config, {row: checkpoint file of the run}).
RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "seen_gt": (["pseudo.enabled=false", *NO_MCFA, "self_training.enabled=false"], {"b": "final.pt"}),
    "pseudo": ([*NO_MCFA, "self_training.enabled=false"], {"c": "final.pt"}),
    "mcfa_st": ([], {"d": "stage_clip_guided.pt", "e": "final.pt"}),
    "free": (["setting=annotation_free", "pseudo.restrict_to_unseen=false"], {"f": "final.pt"}),
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _table(results: dict[str, dict[str, Any]], scope: str) -> str:
    lines = ["| method | seen mIoU | unseen mIoU | hIoU | mIoU |", "|---|---:|---:|---:|---:|"]
    for row, r in results.items():
        m = r[scope]
        lines.append(f"| {ROWS[row]} | {_pct(m['miou_seen'])} | {_pct(m['miou_unseen'])} | {_pct(m['hiou'])} "
                     f"| {_pct(m['miou'])} |")
    return "\n".join(lines)


def _unseen_table(results: dict[str, dict[str, Any]], names: list[str], scope: str) -> str:
    lines = ["| method | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    for row, r in results.items():
        iou = r[scope]["unseen_iou"]
        lines.append(f"| {ROWS[row]} | " + " | ".join(_pct(iou[n]) for n in names) + " |")
    return "\n".join(lines)


def _record(report: EvaluationReport) -> dict[str, Any]:
    return {**summary(report),
            "unseen_iou": {report.class_names[i]: report.iou[i] for i in report.unseen},
            "iou": dict(zip(report.class_names, report.iou))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "training" / "synthetic_bench.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (e.g. trainer.iterations=50)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=sorted(ROWS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/clip3d_transfer_benchmark"),
                        help="run directories (checkpoints, TensorBoard)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/clip3d_bench_frames"),
                        help="ray-cast synthetic frames, reused across runs and invocations")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                        help="where transfer_benchmark.json/.md go")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    wall0, cpu0 = time.perf_counter(), time.process_time()
    base = [f"data.cache_dir={args.cache_dir}", *args.overrides]
    cfg = load_train_config(args.config, base)
    runs_info: dict[str, Any] = {}
    checkpoints: dict[str, Path] = {}
    trainer = None
    for run, (overrides, rows) in RUNS.items():
        if not set(rows) & set(args.rows):
            continue
        run_cfg = load_train_config(args.config, [*base, *overrides, f"name=bench_{run}"])
        w, c = time.perf_counter(), time.process_time()
        trainer = Trainer(run_cfg, out_dir=args.work_dir / run)
        result = trainer.fit()
        runs_info[run] = {
            "overrides": overrides,
            "iterations": result.iterations,
            "wall_s": round(time.perf_counter() - w, 1),
            "cpu_s": round(time.process_time() - c, 1),
            "metrics_at_stage_end": result.metrics,
            "last_logged": result.history[-1] if result.history else {},
        }
        checkpoints.update({row: result.out_dir / name for row, name in rows.items()})
        log.info("run %s: %s", run, runs_info[run]["metrics_at_stage_end"])

    # One evaluation pass over the held-out frames for every row (teacher included).
    if trainer is None:  # teacher-only invocation: build the pieces without training
        trainer = Trainer(load_train_config(args.config, [*base, "trainer.iterations=1"]),
                          out_dir=args.work_dir / "teacher_only")
    device = trainer.device
    predictors = {}
    if "a" in args.rows:
        if trainer.teacher is None:
            raise SystemExit("row (a) needs a teacher: keep pseudo labels or MCFA enabled in the config")
        predictors["a"] = teacher_predictor(trainer.teacher, trainer.text, cfg.pseudo.labels.temperature)
    for row in args.rows:
        if row in checkpoints:
            model = load_checkpoint(checkpoints[row]).build_model(device)
            predictors[row] = model_predictor(model, trainer.text, device)
    split = trainer.split
    results: dict[str, dict[str, Any]] = {row: {} for row in sorted(predictors)}
    e0 = time.process_time()
    for scope, visible in (("all_points", False), ("camera_visible", True)):
        reports = evaluate(predictors, trainer.val_set, split.classes, split.unseen_ids, visible_only=visible)
        for row, report in reports.items():
            results[row][scope] = _record(report)
    eval_cpu = time.process_time() - e0

    frames = [trainer.val_set[i] for i in range(len(trainer.val_set))]
    params = sum(p.numel() for p in trainer.bare.parameters())
    cams = cfg.data.synthetic.cameras
    sizes = {
        "train_frames": cfg.data.train_frames,
        "val_frames": cfg.data.val_frames,
        "points_per_frame_mean": round(sum(f.num_points for f in frames) / len(frames)),
        "cameras": [f"{c.name} {c.width}x{c.height}" for c in cams],
        "lidar": to_dict(cfg.data.synthetic.lidar),
        "stage1_iterations": cfg.trainer.iterations,
        "self_training_iterations": cfg.self_training.iterations,
        "batch_size": cfg.trainer.batch_size,
        "model_parameters": params,
        "embed_dim": trainer.model_cfg.embed_dim,
        "voxel_size": trainer.model_cfg.voxel_size,
        "clip": str(trainer.loaded.identity),
        "teacher": {"kind": cfg.teacher.kind, **cfg.teacher.options},
        "unseen_classes": list(split.unseen),
    }
    timing = {
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "evaluation_cpu_s": round(eval_cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} python {sys.version.split()[0]} torch {torch.__version__}",
    }
    record = {"benchmark": "transfer", "config": str(args.config), "overrides": args.overrides,
              "sizes": sizes, "timing": timing, "results": results, "runs": runs_info}

    unseen_names = list(split.unseen)
    md = "\n".join([
        "# Transfer benchmark (synthetic world, SIMULATED teacher)",
        "",
        "Held-out frames with full ground truth; IoU in %. The teacher is a simulation of dense CLIP",
        "built from rendered labels (patch blur, noise, object-level confusions), not CLIP itself.",
        "",
        "## All points",
        "",
        _table(results, "all_points"),
        "",
        "## Camera-visible points only (what the teacher can label)",
        "",
        _table(results, "camera_visible"),
        "",
        "## Unseen classes, IoU (all points)",
        "",
        _unseen_table(results, unseen_names, "all_points"),
        "",
        "## Sizes and time",
        "",
        f"- frames: {sizes['train_frames']} train / {sizes['val_frames']} held-out, "
        f"{sizes['points_per_frame_mean']} points per frame, cameras {', '.join(sizes['cameras'])}",
        f"- training: {sizes['stage1_iterations']} stage-1 iterations (+{sizes['self_training_iterations']} "
        f"self-training) x {sizes['batch_size']} frames; 3D model {params:,} parameters, "
        f"{sizes['voxel_size']} m voxels, D = {sizes['embed_dim']}",
        f"- time: {timing['cpu_s']:.0f} s CPU, {timing['wall_s']:.0f} s wall, "
        f"{timing['torch_threads']} torch thread(s); per run: "
        + ", ".join(f"{k} {v['cpu_s']:.0f} s" for k, v in runs_info.items()),
        "",
    ])
    print(md)
    print(json.dumps(record, indent=2))
    if not args.no_save:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "transfer_benchmark.json").write_text(json.dumps(record, indent=2))
        (args.results / "transfer_benchmark.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
