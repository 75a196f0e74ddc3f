"""Method benchmark: does the transfer from the 2D teacher into the 3D network work, step by step?

On synthetic worlds with the SIMULATED teacher, one table per world of seen mIoU / unseen mIoU /
hIoU on held-out frames with full ground truth:

  (a) the teacher's labels projected onto the points (argmax over all classes; points no camera
      sees get no label)
  (b) 3D model trained on seen-class ground truth only (cannot name unseen classes: ~0 unseen)
  (c) (b) + output-level teacher pseudo labels for the points without seen ground truth
  (d) (c) + MCFA feature alignment (semantic + spatial)
  (e) (d) + self-training (stage 2, continued from (d)'s model)
  (f) annotation-free: no ground truth at all, pseudo labels + MCFA + self-training
  (g) (e) with the real-data configs' label rules (training/semantickitti_zeroshot.yaml: teacher
      labels filtered to each class's 70 % most confident points, self-training keeps 50 %)
  (h) (d) with 2D-3D fusion: trained with the teacher's frozen features of the camera-visible
      points (camera dropout 0.2 per frame) and evaluated with them, as the segmenter runs it with
      images
  (i) the model of (h) evaluated with every camera lost (LiDAR-only input)

Compare (h) and (i) with (d), the same training without fusion: camera-visible points are where
fusion can help; elsewhere all three see the same input.

Worlds (--worlds): "easy" (training/synthetic_bench.yaml: four cameras, every point labelled,
errors drawn independently, tiny random text tower), "hard" (training/synthetic_bench_hard.yaml:
real CLIP text geometry, CLIP-like teacher errors calibrated to MaskCLIP's accuracy, ~6 %
ignore-labelled clutter, one front camera seeing ~15 % of the points), "hard_surround" (hard with
the four cameras) and "hard_no_clutter" (hard without clutter: what clutter costs). Per world it
also reports the teacher's accuracy on visible points and where the ignore-labelled clutter goes:
the share that teacher pseudo labels (both rules) and each trained model call an unseen class.

Every trained row is trained once per seed (--seeds, default 0 1 2) and reported as mean ± std:
at this CPU-sized budget one run's seen mIoU moves by up to ~14 points between seeds, more than
most differences between rows. Scored twice: on all points, and on camera-visible points only (the
region the teacher can label). Prints Markdown + JSON; saves per world
transfer_benchmark_<world>.{json,md} and all worlds side by side in
transfer_benchmark_worlds.{json,md} (rebuilt from the saved worlds with --compare-only).
A script, not a test:

  .venv/bin/python benchmarks/transfer_benchmark.py --worlds easy hard --seeds 0 1 2 3 4 --jobs 2
  .venv/bin/python benchmarks/transfer_benchmark.py --worlds hard --rows a c --seeds 0 \\
      --set trainer.iterations=50
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import clip3d_core  # noqa: F401  (compat shims before open_clip / spconv)
from clip3d_core.checkpoint import load_checkpoint
from clip3d_core.config import to_dict
from clip3d_core.data.synthetic import SyntheticConfig
from clip3d_core.evaluation import EvaluationReport
from clip3d_core.metrics import SemanticMetric
from clip3d_core.teacher import frame_point_targets
from clip3d_core.training import Trainer, load_train_config
from clip3d_core.training.stages import SOURCE_TEACHER, clip_guided_targets
from clip3d_core.training.validation import FramePredictor, evaluate, summary, teacher_predictor

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("transfer_benchmark")

ROWS: dict[str, str] = {
    "a": "(a) teacher labels projected onto points",
    "b": "(b) 3D, seen ground truth only",
    "c": "(c) + output-level pseudo labels",
    "d": "(d) + MCFA",
    "e": "(e) + self-training",
    "f": "(f) annotation-free",
    "g": "(g) (e) with the real configs' label rules",
    "h": "(h) (d) + fusion, cameras on",
    "i": "(h) with every camera lost",
}
# training/semantickitti_zeroshot.yaml's label rules (pseudo labels and self-training).
REAL_RULES = ["pseudo.labels.confidence=prob", "pseudo.labels.top_fraction=0.7",
              "self_training.top_fraction=0.5"]
NO_MCFA = ["loss.semantic.weight=0", "loss.spatial.weight=0"]
# Training runs: name -> (overrides on the benchmark config, {row: checkpoint file of the run}).
RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "seen_gt": (["pseudo.enabled=false", *NO_MCFA, "self_training.enabled=false"], {"b": "final.pt"}),
    "pseudo": ([*NO_MCFA, "self_training.enabled=false"], {"c": "final.pt"}),
    "mcfa_st": ([], {"d": "stage_clip_guided.pt", "e": "final.pt"}),
    "free": (["setting=annotation_free", "pseudo.restrict_to_unseen=false"], {"f": "final.pt"}),
    "real_rules": (REAL_RULES, {"g": "final.pt"}),
    "fusion": (["model.fusion=true", "self_training.enabled=false"], {"h": "final.pt", "i": "final.pt"}),
}
CAMERAS_LOST = {"i"}  # rows evaluated without camera features
CONFIGS = REPO / "training"
_SURROUND = json.dumps([to_dict(c) for c in SyntheticConfig.surround(width=224, height=128).cameras])
# World -> (config, overrides).
WORLDS: dict[str, tuple[Path, list[str]]] = {
    "easy": (CONFIGS / "synthetic_bench.yaml", []),
    "hard": (CONFIGS / "synthetic_bench_hard.yaml", []),
    "hard_surround": (CONFIGS / "synthetic_bench_hard.yaml", [f"data.options.world.cameras={_SURROUND}"]),
    "hard_no_clutter": (CONFIGS / "synthetic_bench_hard.yaml",
                        ["data.options.world.scene.clutter_per_100m=0",
                         "data.options.world.scene.clutter_surfaces_per_100m=0"]),
}


# The benchmark scores every run on all held-out frames itself: a run's own end-of-stage
# evaluation (its log's metrics) only looks at a few, to save CPU.
RUN_OVERRIDES = ["data.max_val_frames=2"]
RUN_RECORD = "benchmark_run.json"  # what _train returned, beside the run's checkpoints
METRICS = ("miou_seen", "miou_unseen", "hiou", "miou", "accuracy")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(stats: dict[str, float | None]) -> str:
    if stats["mean"] is None:
        return "–"
    return _pct(stats["mean"]) + (f" ± {_pct(stats['std'])}" if stats["n"] > 1 else "")


def _table(results: dict[str, dict[str, Any]], scope: str) -> str:
    lines = ["| method | seen mIoU | unseen mIoU | hIoU | mIoU |", "|---|---:|---:|---:|---:|"]
    for row, r in results.items():
        m = r[scope]["stats"]
        lines.append(f"| {ROWS[row]} | " + " | ".join(_cell(m[k]) for k in METRICS[:4]) + " |")
    return "\n".join(lines)


def _unseen_table(results: dict[str, dict[str, Any]], names: list[str], scope: str) -> str:
    lines = ["| method | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    for row, r in results.items():
        iou = r[scope]["unseen_iou_mean"]
        lines.append(f"| {ROWS[row]} | " + " | ".join(_pct(iou[n]) for n in names) + " |")
    return "\n".join(lines)


def _record(metrics: dict[str, Any]) -> dict[str, Any]:
    semantic = metrics["semantic"]
    assert isinstance(semantic, SemanticMetric)
    report: EvaluationReport = semantic.report()
    return {**summary(metrics),
            "unseen_iou": {report.class_names[i]: report.iou[i] for i in report.unseen},
            "iou": dict(zip(report.class_names, report.iou))}


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of each summary metric and of each unseen class's IoU."""
    stats = {}
    for k in METRICS:
        mean, std = _mean_std([r[k] for r in per_seed])
        stats[k] = {"mean": mean, "std": std, "n": len(per_seed)}
    names = list(per_seed[0]["unseen_iou"])
    return {"stats": stats,
            "unseen_iou_mean": {n: _mean_std([r["unseen_iou"][n] for r in per_seed])[0] for n in names},
            "per_seed": per_seed}


def _train(job: tuple[Path, list[str], Path, bool]) -> dict[str, Any]:
    """One training run (in a worker process when --jobs > 1); with ``reuse``, a run whose final
    checkpoint is already in its directory is not trained again (an interrupted benchmark resumes)."""
    config, overrides, out_dir, reuse = job
    record = out_dir / RUN_RECORD
    if reuse and (out_dir / "final.pt").is_file():
        if record.is_file():
            return json.loads(record.read_text())
        return {"iterations": None, "wall_s": None, "cpu_s": None, "metrics_at_stage_end": {},
                "last_logged": {}, "out_dir": str(out_dir)}
    if not logging.getLogger().handlers:
        fmt = f"%(asctime)s %(levelname)s [{out_dir.name}] %(name)s: %(message)s"
        logging.basicConfig(level=logging.INFO, format=fmt)
    w, c = time.perf_counter(), time.process_time()
    result = Trainer(load_train_config(config, overrides), out_dir=out_dir).fit()
    info = {
        "iterations": result.iterations,
        "wall_s": round(time.perf_counter() - w, 1),
        "cpu_s": round(time.process_time() - c, 1),
        "metrics_at_stage_end": result.metrics,
        "last_logged": result.history[-1] if result.history else {},
        "out_dir": str(result.out_dir),
    }
    record.write_text(json.dumps(info, indent=2))
    return info


def _clutter_pseudo(evaluator: Trainer, rules: dict[str, list[str]], base: list[str], config: Path,
                    frames: int) -> dict[str, dict[str, float | int]]:
    """Where the ignore-labelled points of the first `frames` training frames go under the
    teacher's stage-1 pseudo labels, per label rule: the share called an unseen class, and how
    many of the unseen pseudo labels sit on clutter or on the right unseen class."""
    split, text, teacher = evaluator.split, evaluator.text, evaluator.teacher
    unseen = torch.tensor(split.unseen_ids)
    out: dict[str, dict[str, float | int]] = {}
    for rule, overrides in rules.items():
        pseudo_cfg = load_train_config(config, [*base, *overrides]).pseudo
        n = {"ignore_points": 0, "ignore_visible": 0, "ignore_to_unseen": 0, "unseen_pseudo": 0,
             "unseen_pseudo_on_ignore": 0, "unseen_pseudo_correct": 0}
        for i in range(min(frames, len(evaluator.train_set))):
            frame = evaluator.train_set[i]
            _, pt = frame_point_targets(teacher, frame, text)
            gt = torch.as_tensor(frame.labels).long()
            targets = clip_guided_targets(gt, pt, text, pseudo_cfg, evaluator.space, gt.shape[0])
            to_unseen = (targets.source == SOURCE_TEACHER) & torch.isin(targets.labels, unseen)
            ignore = gt < 0
            n["ignore_points"] += int(ignore.sum())
            n["ignore_visible"] += int((ignore & pt.visible).sum())
            n["ignore_to_unseen"] += int((ignore & to_unseen).sum())
            n["unseen_pseudo"] += int(to_unseen.sum())
            n["unseen_pseudo_on_ignore"] += int((to_unseen & ignore).sum())
            n["unseen_pseudo_correct"] += int((to_unseen & (targets.labels == gt)).sum())
        out[rule] = {**n,
                     "ignore_to_unseen_share": n["ignore_to_unseen"] / max(1, n["ignore_points"]),
                     "ignore_visible_to_unseen_share": n["ignore_to_unseen"] / max(1, n["ignore_visible"]),
                     "unseen_pseudo_on_ignore_share":
                         n["unseen_pseudo_on_ignore"] / max(1, n["unseen_pseudo"]),
                     "unseen_pseudo_precision": n["unseen_pseudo_correct"] / max(1, n["unseen_pseudo"])}
    return out


def _clutter_predicted(predictors: dict[str, Any], frames: list[Any], unseen: list[int]) -> dict[str, float]:
    """Share of the held-out ignore-labelled points each predictor calls an unseen class."""
    ids = torch.tensor(unseen)
    out = {}
    for row, predict in predictors.items():
        hit = total = 0
        for frame in frames:
            ignore = torch.as_tensor(frame.labels) < 0
            total += int(ignore.sum())
            hit += int((ignore & torch.isin(predict(frame).labels, ids)).sum())
        out[row] = hit / total if total else None
    return out


def _clutter_table(record: dict[str, Any]) -> str:
    lines = ["| label source | share of ignore-labelled points called an unseen class |", "|---|---:|"]
    for rule, c in record["clutter"]["pseudo_labels"].items():
        lines.append(f"| teacher pseudo labels, {rule} rule (training frames, all / camera-visible) | "
                     f"{_pct(c['ignore_to_unseen_share'])} / {_pct(c['ignore_visible_to_unseen_share'])} |")
    for row, shares in record["clutter"]["predicted"].items():
        mean, std = _mean_std(shares)
        stats = {"mean": mean, "std": std, "n": len(shares)}
        lines.append(f"| {ROWS[row]} (held-out frames) | " + _cell(stats) + " |")
    lines += ["", "| label rule | unseen pseudo labels on clutter | unseen pseudo-label precision |",
              "|---|---:|---:|"]
    for rule, c in record["clutter"]["pseudo_labels"].items():
        lines.append(f"| {rule} | {_pct(c['unseen_pseudo_on_ignore_share'])} | "
                     f"{_pct(c['unseen_pseudo_precision'])} |")
    return "\n".join(lines)


def run_world(world: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Train and evaluate every requested row on one world; (JSON record, Markdown)."""
    config, world_overrides = WORLDS[world]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    base = [f"data.options.cache_dir={args.cache_dir}", *world_overrides, *args.overrides]
    cfg = load_train_config(config, base)
    work = args.work_dir / world
    # Built once for evaluation (teacher, text, held-out frames); also caches the frames on disk
    # before the training workers start, so they do not ray-cast the same frames concurrently.
    evaluator = Trainer(load_train_config(config, [*base, "trainer.iterations=1"]),
                        out_dir=work / "evaluation")
    for i in range(len(evaluator.train_set)):
        evaluator.train_set[i]
    jobs = {
        (run, seed): (config, [*base, *RUN_OVERRIDES, *overrides, f"trainer.seed={seed}",
                               f"name=bench_{world}_{run}_s{seed}"],
                      work / f"{run}_s{seed}", args.reuse_runs)
        for seed in args.seeds
        for run, (overrides, rows) in RUNS.items()
        if set(rows) & set(args.rows)
    }
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = dict(zip(jobs, pool.map(_train, jobs.values())))
    else:
        done = {key: _train(job) for key, job in jobs.items()}
    # Workers' CPU is not this process's; reused runs' CPU is unknown when they did not record it.
    train_cpu = sum(info["cpu_s"] or 0.0 for info in done.values())
    for (run, seed), info in done.items():
        log.info("%s run %s seed %d: %s", world, run, seed, info["metrics_at_stage_end"])

    # One evaluation pass over the held-out frames per seed (the teacher row once: it has no seed).
    device = evaluator.device
    split = evaluator.split
    frames = [evaluator.val_set[i] for i in range(len(evaluator.val_set))]
    per_seed: dict[str, dict[str, list[dict[str, Any]]]] = {}
    clutter_predicted: dict[str, list[float | None]] = {}
    e0 = time.process_time()
    for i, seed in enumerate(args.seeds):
        predictors = {}
        if "a" in args.rows and i == 0:
            if evaluator.teacher is None:
                raise SystemExit("row (a) needs a teacher: keep pseudo labels or MCFA enabled in the config")
            predictors["a"] = teacher_predictor(evaluator.teacher, evaluator.text,
                                                cfg.pseudo.labels.temperature)
        for run, (_, rows) in RUNS.items():
            for row, name in rows.items():
                if row in args.rows:
                    model = load_checkpoint(Path(done[run, seed]["out_dir"]) / name).build_model(device)
                    teacher = None if row in CAMERAS_LOST else evaluator.teacher
                    predictors[row] = FramePredictor(model, evaluator.text, device, teacher=teacher)
        for scope, visible in (("all_points", False), ("camera_visible", True)):
            reports = evaluate(predictors, evaluator.val_set, split.classes, split.unseen_ids,
                               visible_only=visible)
            for row, report in reports.items():
                per_seed.setdefault(row, {}).setdefault(scope, []).append(_record(report))
        for row, share in _clutter_predicted(predictors, frames, list(split.unseen_ids)).items():
            clutter_predicted.setdefault(row, []).append(share)
    eval_cpu = time.process_time() - e0
    results = {row: {scope: _aggregate(recs) for scope, recs in per_seed[row].items()}
               for row in sorted(per_seed)}
    rules = {"benchmark": [], "real-config": REAL_RULES}
    clutter = {"pseudo_labels": _clutter_pseudo(evaluator, rules, base, config, args.clutter_frames)
               if evaluator.teacher is not None else {},
               "predicted": {row: clutter_predicted[row] for row in sorted(clutter_predicted)},
               "ignore_share_held_out": sum(int((f.labels < 0).sum()) for f in frames)
               / max(1, sum(f.num_points for f in frames))}

    params = sum(p.numel() for p in evaluator.bare.parameters())
    data = cfg.data.typed_options()
    cams = data.world.cameras
    sizes = {
        "train_frames": data.train_frames,
        "val_frames": data.val_frames,
        "points_per_frame_mean": round(sum(f.num_points for f in frames) / len(frames)),
        "cameras": [f"{c.name} {c.width}x{c.height}" for c in cams],
        "lidar": to_dict(data.world.lidar),
        "stage1_iterations": cfg.trainer.iterations,
        "self_training_iterations": cfg.self_training.iterations,
        "batch_size": cfg.trainer.batch_size,
        "seeds": args.seeds,
        "model_parameters": params,
        "embed_dim": evaluator.model_cfg.embed_dim,
        "voxel_size": evaluator.model_cfg.voxel_size,
        "text": str(evaluator.identity),
        "teacher": {"kind": cfg.teacher.kind, **cfg.teacher.options},
        "unseen_classes": list(split.unseen),
    }
    timing = {
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0 + (train_cpu if args.jobs > 1 else 0.0), 1),
        "training_cpu_s": round(train_cpu, 1),
        "evaluation_cpu_s": round(eval_cpu, 1),
        "jobs": args.jobs,
        "torch_threads_per_run": cfg.trainer.cpu_threads or torch.get_num_threads(),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores) python {sys.version.split()[0]} "
                   f"torch {torch.__version__}",
    }
    runs_info = {f"{run}_s{seed}": {"overrides": RUNS[run][0], **info} for (run, seed), info in done.items()}
    record = {"benchmark": "transfer", "world": world, "config": str(config), "overrides": base[1:],
              "sizes": sizes, "timing": timing, "results": results, "clutter": clutter, "runs": runs_info}

    per_run = {run: statistics.fmean(cpu) for run in RUNS
               if (cpu := [done[run, s]["cpu_s"] for s in args.seeds if done.get((run, s), {}).get("cpu_s")])}
    md = "\n".join([
        f"# Transfer benchmark, {world} world (synthetic, SIMULATED teacher)",
        "",
        "Held-out frames with full ground truth; IoU in %, mean ± sample std over "
        f"{len(args.seeds)} training seed(s) {args.seeds}.",
        "The teacher is a simulation of dense CLIP built from rendered labels, not CLIP itself; its row",
        f"has no seed. Config {config.name} {' '.join(world_overrides)}".rstrip(),
        "",
        "## All points",
        "",
        _table(results, "all_points"),
        "",
        "## Camera-visible points only (what the teacher can label)",
        "",
        _table(results, "camera_visible"),
        "",
        "## Unseen classes, mean IoU (all points)",
        "",
        _unseen_table(results, list(split.unseen), "all_points"),
        "",
        f"## Ignore-labelled points ({_pct(clutter['ignore_share_held_out'])} % of the held-out points)",
        "",
        _clutter_table(record) if clutter["pseudo_labels"] else "(no teacher)",
        "",
        "## Sizes and time",
        "",
        f"- frames: {sizes['train_frames']} train / {sizes['val_frames']} held-out, "
        f"{sizes['points_per_frame_mean']} points per frame, cameras {', '.join(sizes['cameras'])}",
        f"- training: {sizes['stage1_iterations']} stage-1 iterations (+{sizes['self_training_iterations']} "
        f"self-training) x {sizes['batch_size']} frames, per seed; 3D model {params:,} parameters, "
        f"{sizes['voxel_size']} m voxels, D = {sizes['embed_dim']}; text {sizes['text']}",
        f"- time: {timing['cpu_s']:.0f} s CPU, {timing['wall_s']:.0f} s wall, {args.jobs} run(s) at once, "
        f"{timing['torch_threads_per_run']} torch thread(s) each; mean CPU per training run: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in per_run.items()),
        "",
    ])
    return record, md


def compare(records: dict[str, dict[str, Any]]) -> str:
    """All worlds side by side: each row's unseen mIoU and hIoU (all points) per world."""
    worlds = list(records)
    head = "| method | " + " | ".join(f"{w} unseen mIoU | {w} hIoU" for w in worlds) + " |"
    lines = [head, "|---" + "|---:|---:" * len(worlds) + "|"]
    rows = sorted({r for rec in records.values() for r in rec["results"]})
    for row in rows:
        cells = []
        for w in worlds:
            m = records[w]["results"].get(row, {}).get("all_points", {}).get("stats")
            cells += ["–", "–"] if m is None else [_cell(m["miou_unseen"]), _cell(m["hiou"])]
        lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
    unseen_names = list(records[worlds[0]]["sizes"]["unseen_classes"])
    per_class = ["| method | " + " | ".join(f"{w} {n}" for w in worlds for n in unseen_names) + " |",
                 "|---" + "|---:" * (len(worlds) * len(unseen_names)) + "|"]
    for row in rows:
        cells = [_pct(records[w]["results"][row]["all_points"]["unseen_iou_mean"].get(n))
                 if row in records[w]["results"] else "–" for w in worlds for n in unseen_names]
        per_class.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
    teacher = []
    for w in worlds:
        a = records[w]["results"].get("a", {}).get("camera_visible")
        if a is not None:
            teacher.append(f"{w} {_pct(a['stats']['accuracy']['mean'])} %")
    seeds = {w: records[w]["sizes"]["seeds"] for w in worlds}
    return "\n".join([
        "# Transfer benchmark: worlds side by side (synthetic, SIMULATED teacher)",
        "",
        f"Seeds per world: {seeds}. IoU in %, all points, mean ± sample std over seeds.",
        "",
        "\n".join(lines),
        "",
        "Unseen classes, mean IoU over seeds (all points):",
        "",
        "\n".join(per_class),
        "",
        "Teacher per-point accuracy on camera-visible labelled points: " + ", ".join(teacher),
        "",
        *[f"- {w}: config {records[w]['config'].rsplit('/', 1)[-1]} {' '.join(records[w]['overrides'])}, "
          f"{records[w]['sizes']['stage1_iterations']} + {records[w]['sizes']['self_training_iterations']} "
          f"iterations, {records[w]['sizes']['points_per_frame_mean']} points per frame, cameras "
          f"{', '.join(records[w]['sizes']['cameras'])}, ignore-labelled "
          f"{_pct(records[w].get('clutter', {}).get('ignore_share_held_out'))} % of held-out points"
          for w in worlds],
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", choices=list(WORLDS), default=["easy", "hard"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (e.g. trainer.iterations=50)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=sorted(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds; every row is trained once per seed, reported as mean ± std")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once, each in its own process (trainer.cpu_threads each)")
    parser.add_argument("--clutter-frames", type=int, default=32,
                        help="training frames over which the teacher's pseudo labels on clutter are counted")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/clip3d_transfer_benchmark"),
                        help="run directories (checkpoints, TensorBoard)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/clip3d_bench_frames"),
                        help="ray-cast synthetic frames, reused across runs and invocations")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                        help="where transfer_benchmark_<world>.json/.md and transfer_benchmark_worlds.* go")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="keep runs whose final checkpoint is already in --work-dir (resume a benchmark)")
    parser.add_argument("--compare-only", action="store_true",
                        help="rebuild transfer_benchmark_worlds.* from the saved per-world results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    records = {}
    for world in args.worlds:
        path = args.results / f"transfer_benchmark_{world}.json"
        if args.compare_only:
            records[world] = json.loads(path.read_text())
            continue
        records[world], md = run_world(world, args)
        print(md)
        if not args.no_save:
            args.results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records[world], indent=2))
            path.with_suffix(".md").write_text(md)
    md = compare(records)
    print(md)
    if not args.no_save:
        (args.results / "transfer_benchmark_worlds.json").write_text(
            json.dumps({w: {k: r.get(k) for k in ("config", "overrides", "sizes", "results", "clutter")}
                        for w, r in records.items()}, indent=2))
        (args.results / "transfer_benchmark_worlds.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
