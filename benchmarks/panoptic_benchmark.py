"""Open-vocabulary panoptic ablation on the synthetic world -- a SIMULATION (simulated CLIP teacher,
no pretrained CLIP image weights): does each of fusion, L_O and L_V help novel classes?

Rows (split synthetic_b13n4: novel bus, pedestrian, traffic cone = things, tree = stuff; the same
sparse U-Net + query decoder in every row):
  (a)  PFC-style baseline of the paper (P3Former + FC-CLIP): LiDAR features only, a fixed closed-set
       classifier trained on the base classes (``classifier: fixed``), no distillation; at inference
       each predicted mask pools the frozen CLIP features of its camera-seen voxels, novel classes are
       scored by that pooled feature alone, base classes by FC-CLIP's geometric ensemble
       p_in^0.6 * p_clip^0.4 (`clip3d_core.model.panoptic.pooled_clip_probs`)
  (a0) LiDAR only, the single cosine head, no distillation
  (b)  fusion + single cosine head
  (c)  (b) + object-level distillation L_O
  (d)  (b) + voxel-level distillation L_V
  (e)  (b) + L_O + L_V
  (b0) diagnostic: (b) without camera drop-out (run with --rows b0)

Worlds: "easy" (random 32-d text, independent teacher errors, 4 surround cameras), "easy_clean" (the
same with an error-free teacher: a diagnostic of the teacher's feature quality) and "hard" (the
transfer benchmark's hard world, training/synthetic_bench_hard.yaml: real CLIP ViT-B/32 text
geometry, CLIP-like teacher errors at ~36 % accuracy, clutter, one front camera; needs
../shared/data). Fused rows are also evaluated with the camera removed (``*_nocam`` keys), and the
data's camera coverage and teacher accuracy are measured, to explain what fusion does.

Every (row, seed) is trained once; results are written after every run (``--resume`` continues an
interrupted benchmark with the same arguments). Mean ± std over seeds. A script, not a test:

  nice -n 10 .venv/bin/python benchmarks/panoptic_benchmark.py --seeds 0 1 2 3 4 --iterations 250 \
      --rows a a0 b c d e b0
  nice -n 10 .venv/bin/python benchmarks/panoptic_benchmark.py --world easy_clean --seeds 0 1 2 \
      --iterations 250 --rows b e
  nice -n 10 .venv/bin/python benchmarks/panoptic_benchmark.py --world hard --seeds 0 1 2 \
      --iterations 250 --rows a e b a0 d c
(the committed results; docs/benchmark_worlds.md reads them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (compat shims before spconv)
from clip3d_core.config import from_dict
from clip3d_core.data import collate_frames
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorld
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig
from clip3d_core.data.synthetic.teacher import SimulatedTeacher, SimulatedTeacherConfig
from clip3d_core.data.synthetic.text_geometry import load_text_geometry
from clip3d_core.losses.terms.panoptic import default_panoptic_loss
from clip3d_core.model import ModelConfig
from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticModelConfig, PanopticNet
from clip3d_core.panoptic_quality import PanopticQuality
from clip3d_core.predictor import CameraFeatures, predict_panoptic
from clip3d_core.teacher import PointTargets, frame_point_targets
from clip3d_core.testing import shared_data_dir
from clip3d_core.training import load_train_config
from clip3d_core.training.panoptic import PanopticTask, training_losses

SPLIT = load_panoptic_split("synthetic_b13n4")
ROWS: dict[str, dict[str, Any]] = {
    "a": {"fusion": False, "classifier": "fixed", "w_object": 0.0, "w_voxel": 0.0,
          "label": "PFC-style baseline (fixed classifier, pooled CLIP)"},
    "a0": {"fusion": False, "w_object": 0.0, "w_voxel": 0.0, "label": "LiDAR only, cosine head"},
    "b": {"fusion": True, "w_object": 0.0, "w_voxel": 0.0, "label": "fusion + cosine head"},
    "c": {"fusion": True, "w_object": 1.0, "w_voxel": 0.0, "label": "(b) + L_O"},
    "d": {"fusion": True, "w_object": 0.0, "w_voxel": 1.0, "label": "(b) + L_V"},
    "e": {"fusion": True, "w_object": 1.0, "w_voxel": 1.0, "label": "(b) + L_O + L_V"},
    "b0": {"fusion": True, "w_object": 0.0, "w_voxel": 0.0, "camera_dropout": 0.0,
           "label": "(b) without camera drop-out"},
}
METRICS = ("pq", "pq_novel_things", "pq_novel_stuff", "pq_base", "rq", "sq", "miou")
DETAIL = ("pq_base_things", "pq_base_stuff", "rq_novel", "sq_novel", "miou_novel_things", "miou_novel_stuff",
          "novel_things_segmented", "novel_things_segmented_as_novel")
# the claims, as paired per-seed differences (same seed = same initialisation and batches)
PAIRS = (("b", "a0", "fusion"), ("c", "b", "L_O"), ("d", "b", "L_V"), ("e", "b", "L_O + L_V"),
         ("e", "d", "L_O on top of L_V"), ("e", "a", "the method vs the PFC-style baseline"),
         ("a0", "a", "cosine head vs fixed classifier + pooled CLIP (both LiDAR only)"),
         ("b0", "b", "no camera drop-out"))
EMBED_DIM = 32
HARD_CONFIG = Path(__file__).resolve().parents[1] / "training" / "synthetic_bench_hard.yaml"


World = tuple[SyntheticWorld, SimulatedTeacher, torch.Tensor]  # world, teacher, class texts [C, D]


def easy_world(noise: float = 0.1, confusion: float = 0.2) -> World:
    cams = tuple(CameraConfig(name=f"CAM_{i}", width=128, height=72, yaw_deg=90.0 * i) for i in range(4))
    world = SyntheticWorld(SyntheticConfig(seed=0, lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=512,
                                                                     max_range=40.0), cameras=cams))
    teacher = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, noise=noise, confusion_prob=confusion))
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(SPLIT.num_classes, EMBED_DIM, generator=g), dim=1)
    return world, teacher, text


def hard_world() -> World:
    """World and teacher exactly as training/synthetic_bench_hard.yaml configures them."""
    cfg = load_train_config(HARD_CONFIG)
    world = SyntheticWorld(from_dict(SyntheticConfig, cfg.data.options["world"], where="world"))
    teacher = SimulatedTeacher(from_dict(SimulatedTeacherConfig, cfg.teacher.options, where="teacher"))
    geometry = load_text_geometry(shared_data_dir(), SPLIT.classes, dim=EMBED_DIM)
    if geometry is None:
        raise SystemExit("the hard world needs the real CLIP text embeddings (CLIP3D_SHARED_DATA)")
    return world, teacher, torch.from_numpy(geometry.vectors).float()


# easy_clean: the easy world with an error-free teacher (patch features = area mix of the true classes'
# texts): what the teacher's errors cost the fused rows
WORLDS = {"easy": easy_world, "easy_clean": lambda: easy_world(0.0, 0.0), "hard": hard_world}


def build_data(world_name: str, train: int, val: int) -> dict[str, Any]:
    world, teacher, text = WORLDS[world_name]()
    frames = [world.frame(i * 3) for i in range(train + val)]
    targets = [frame_point_targets(teacher, f, text)[1] for f in frames]
    return {"text": text, "train": frames[:train], "val": frames[train:], "train_targets": targets[:train],
            "val_targets": targets[train:]}


def data_stats(data: dict[str, Any]) -> dict[str, float]:
    """Camera coverage and the teacher's accuracy (argmax cosine to the class texts) on held-out points."""
    seen = lab = right = right_base = lab_base = 0
    base = np.zeros(SPLIT.num_classes, dtype=bool)
    base[list(SPLIT.base_ids)] = True
    total = 0
    for f, t in zip(data["val"], data["val_targets"]):
        labels = torch.from_numpy(f.labels)
        vis = t.visible & (labels >= 0)
        pred = (t.features[vis] @ data["text"].t()).argmax(1)
        ok = pred == labels[vis]
        is_base = torch.from_numpy(base)[labels[vis]]
        total += len(labels)
        seen += int(t.visible.sum())
        lab += int(vis.sum())
        right += int(ok.sum())
        lab_base += int(is_base.sum())
        right_base += int((ok & is_base).sum())
    return {"camera_coverage": seen / total, "teacher_accuracy_visible": right / max(lab, 1),
            "teacher_accuracy_visible_base": right_base / max(lab_base, 1)}


def novel_thing_segments(labels: np.ndarray, instances: np.ndarray, gt_labels: np.ndarray,
                         gt_instances: np.ndarray) -> np.ndarray:
    """Per novel-thing ground-truth instance (>= min_points points) the class of the predicted
    segment overlapping it with IoU > 0.5, whatever that class (-1: none does; class-agnostic
    segmentation vs classification of the novel things)."""
    novel_thing = SPLIT.novel_mask() & SPLIT.spec.thing_mask()
    pred_id = np.where(labels >= 0, labels * 100_000 + instances, -1)
    out = []
    for key in np.unique(gt_labels * 100_000 + gt_instances):
        cls, inst = divmod(int(key), 100_000)
        gt = (gt_labels == cls) & (gt_instances == inst)
        if cls < 0 or inst == 0 or not novel_thing[cls] or gt.sum() < SPLIT.spec.min_points:
            continue
        ids, counts = np.unique(pred_id[gt], return_counts=True)
        best, inter = int(ids[counts.argmax()]), int(counts.max())
        union = int(gt.sum()) + int((pred_id == best).sum()) - inter
        out.append(best // 100_000 if best >= 0 and inter / union > 0.5 else -1)
    return np.array(out, dtype=np.int64)


def evaluate(model: PanopticNet, data: dict[str, Any], camera: bool) -> dict[str, float | None]:
    metric = PanopticQuality(SPLIT.classes, SPLIT.spec.thing_mask(), min_points=SPLIT.spec.min_points,
                             novel=SPLIT.novel_mask())
    thing = torch.from_numpy(SPLIT.spec.thing_mask())
    segments = []
    for f, pt in zip(data["val"], data["val_targets"]):
        with torch.no_grad():
            p = predict_panoptic(model, torch.from_numpy(f.points), data["text"], thing,
                                 min_points=SPLIT.spec.min_points,
                                 camera=CameraFeatures(pt.features, pt.visible) if camera else None)[0]
        metric.update(p.labels, p.extras["instances"], f.labels, f.instances)
        segments.append(novel_thing_segments(p.labels.numpy(), p.extras["instances"].numpy(), f.labels,
                                             f.instances))
    seg = np.concatenate(segments)
    novel = SPLIT.novel_mask()
    n = max(len(seg), 1)
    return {**metric.report().summary, "novel_things_count": len(seg),
            "novel_things_segmented": float((seg >= 0).sum() / n),
            "novel_things_segmented_as_novel": float(((seg >= 0) & novel[np.maximum(seg, 0)]).sum() / n)}


def run(row: dict[str, Any], seed: int, data: dict[str, Any], iterations: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    fixed = row.get("classifier") == "fixed"
    cfg = PanopticModelConfig(
        ModelConfig.small(embed_dim=EMBED_DIM, voxel_size=0.4,
                          point_range=(-40.0, -40.0, -4.0, 40.0, 40.0, 8.8)),
        PanopticHeadConfig(hidden=64, num_thing_queries=24, num_stuff_queries=len(SPLIT.base_stuff_ids),
                           num_layers=3, ffn=128, fusion=row["fusion"],
                           camera_dropout=row.get("camera_dropout", 0.2),
                           classifier="fixed" if fixed else "cosine",
                           base_classes=SPLIT.base_ids if fixed else ()))
    model = PanopticNet(cfg).train()
    loss = default_panoptic_loss()
    loss["object_distill"].weight, loss["voxel_distill"].weight = row["w_object"], row["w_voxel"]
    task = PanopticTask(SPLIT, data["text"], loss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    train, targets = data["train"], data["train_targets"]
    # without fusion and distillation training never reads the CLIP features
    reads_clip = row["fusion"] or row["w_object"] > 0 or row["w_voxel"] > 0
    t0 = time.perf_counter()
    for _ in range(iterations):
        pick = torch.randperm(len(train), generator=g)[:2].tolist()
        batch = collate_frames([train[i] for i in pick])
        pt = PointTargets.cat([targets[i] for i in pick]) if reads_clip else None
        parts = training_losses(model, task, batch, pt)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    result: dict[str, Any] = {"seed": seed, "train_seconds": round(train_s, 1),
                              "summary": evaluate(model, data, camera=True)}
    if row["fusion"]:  # what the fused model does with the camera taken away
        result["summary_nocam"] = evaluate(model, data, camera=False)
    return result


def mean_std(values: list[float | None]) -> str:
    v = [100 * x for x in values if x is not None]
    if not v:
        return "–"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def table(rows: dict[str, list[dict[str, Any]]], key: str = "summary",
          metrics: tuple[str, ...] = METRICS) -> list[str]:
    lines = ["| row | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for name, runs in rows.items():
        runs = [r for r in runs if key in r]
        if runs:
            cells = [mean_std([r[key].get(m) for r in runs]) for m in metrics]
            lines.append(f"| ({name}) {ROWS[name]['label']} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def paired(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per-seed differences of the claims' row pairs (points of %), mean ± std over common seeds."""
    metrics = ("pq_novel_things", "pq_novel_stuff", "pq_base", "pq", "miou_novel_things", "miou_novel_stuff")
    lines = ["| difference | what it measures | n | " + " | ".join(metrics) + " |",
             "|---|---|---:|" + "---:|" * len(metrics)]
    for x, y, what in PAIRS:
        by_seed = {r["seed"]: r["summary"] for r in rows.get(y, [])}
        both = [(r["summary"], by_seed[r["seed"]]) for r in rows.get(x, []) if r["seed"] in by_seed]
        if both:
            cells = [mean_std([None if a.get(m) is None or b.get(m) is None else a[m] - b[m]
                               for a, b in both]) for m in metrics]
            lines.append(f"| ({x}) − ({y}) | {what} | {len(both)} | " + " | ".join(cells) + " |")
    return lines


def report(args: argparse.Namespace, stats: dict[str, float], rows: dict[str, list[dict[str, Any]]],
           command: str) -> str:
    pct = {k: f"{100 * v:.1f} %" for k, v in stats.items()}
    lines = [
        f"# Panoptic benchmark, {args.world} synthetic world: a SIMULATION",
        "",
        "SIMULATED CLIP teacher (rendered ground truth + synthetic errors), no pretrained CLIP weights:",
        "these numbers measure the method's machinery on a synthetic world, not CLIP. Produced by:",
        "",
        f"    {command}",
        "",
        f"Split {SPLIT.name} (novel: bus, pedestrian, traffic cone = things; tree = stuff), "
        f"{args.iterations} iterations, batch 2, {args.train_frames} training / {args.val_frames} held-out "
        f"frames, seeds {args.seeds}; mean ± std over seeds (n = seeds finished), %.",
        f"Held-out data: camera coverage {pct['camera_coverage']} of points; teacher accuracy (argmax cosine)"
        f" on camera-seen labelled points {pct['teacher_accuracy_visible']} (base classes "
        f"{pct['teacher_accuracy_visible_base']}).",
        "",
        "Row (a) is the PFC-style baseline: no fusion, a fixed closed-set classifier over the base classes,",
        "no distillation; at inference novel classes are scored only by the frozen CLIP features pooled in",
        "each predicted mask, base classes by FC-CLIP's geometric ensemble (alpha 0.4).",
        "",
        *table(rows),
        "",
        "Paired per-seed differences (percentage points; positive = the first row is better):",
        "",
        *paired(rows),
        "",
        "Detail: base things / stuff; novel recognition (RQ) vs segmentation quality (SQ); novel mIoU (a",
        "smoother measure than PQ, where one stuff class's segment either passes IoU 0.5 or not); the",
        "share of novel-thing instances that some predicted segment overlaps with IoU > 0.5, of any",
        "class and of a novel class (class-agnostic segmentation vs classification; '–': runs made",
        "before this measure was added):",
        "",
        *table(rows, metrics=DETAIL),
        "",
        "Fused rows evaluated with the camera removed (LiDAR only at inference):",
        "",
        *table({k: v for k, v in rows.items() if ROWS[k]["fusion"]}, "summary_nocam"),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=list(WORLDS), default="easy")
    ap.add_argument("--rows", nargs="+", default=["a", "a0", "b", "c", "d", "e"], choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--train-frames", type=int, default=8)
    ap.add_argument("--val-frames", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of the same settings")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/panoptic_benchmark.py", *sys.argv[1:]])
    stem = "panoptic_benchmark" if args.world == "easy" else f"panoptic_benchmark_{args.world}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    settings = {"world": args.world, "iterations": args.iterations, "train_frames": args.train_frames,
                "val_frames": args.val_frames}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in args.rows}
    if args.report_only:
        old = json.loads(json_path.read_text())
        for k, v in old["settings"].items():
            setattr(args, k, v)
        args.seeds = old["seeds"]
        rows = {k: v["runs"] for k, v in old["rows"].items()}
        md_path.write_text(report(args, old["data"], rows, old["command"]))
        print(md_path.read_text())
        return
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == settings:
            for k in rows:
                rows[k] = [r for r in old["rows"].get(k, {}).get("runs", []) if r["seed"] in args.seeds]
    t0 = time.perf_counter()
    data = build_data(args.world, args.train_frames, args.val_frames)
    stats = data_stats(data)
    print(json.dumps({"data": stats}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seeds outside, rows inside: a partial result has every row
        for key in args.rows:
            if any(r["seed"] == seed for r in rows[key]):
                continue
            rows[key].append(run(ROWS[key], seed, data, args.iterations))
            print(key, json.dumps({m: rows[key][-1]["summary"].get(m) for m in METRICS}), flush=True)
            payload = {"command": command, "settings": settings, "seeds": args.seeds, "data": stats,
                       "rows": {k: {"label": ROWS[k]["label"], "runs": v} for k, v in rows.items()},
                       "seconds": round(time.perf_counter() - t0, 1)}
            json_path.write_text(json.dumps(payload, indent=2))
            md_path.write_text(report(args, stats, rows, command))
    print(report(args, stats, rows, command))


if __name__ == "__main__":
    main()
