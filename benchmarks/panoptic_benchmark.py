"""Open-vocabulary panoptic ablation on the synthetic world (SIMULATED CLIP teacher, random text):
which of fusion, L_O and L_V help novel classes?

Rows (all the same decoder and one cosine head; split synthetic_b13n4: novel bus, pedestrian,
traffic cone = things, tree = stuff):
  (a0) LiDAR only (no fusion), no distillation
  (b)  fusion + single cosine head
  (c)  (b) + object-level distillation L_O
  (d)  (b) + voxel-level distillation L_V
  (e)  (b) + L_O + L_V
The paper's PFC-style baseline (fixed classifier, novel classes by pooled CLIP features) is not
implemented yet. Every row is trained once per seed and reported as mean ± std over seeds of PQ,
PQ novel things, PQ novel stuff, RQ, SQ and mIoU on held-out frames. A script, not a test:

  .venv/bin/python benchmarks/panoptic_benchmark.py --seeds 0 1 2 --iterations 150
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (compat shims before spconv)
from clip3d_core.data import collate_frames
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorld
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig
from clip3d_core.data.synthetic.teacher import SimulatedTeacher, SimulatedTeacherConfig
from clip3d_core.losses.terms.panoptic import default_panoptic_loss
from clip3d_core.model import ModelConfig
from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticModelConfig, PanopticNet
from clip3d_core.panoptic_quality import PanopticQuality
from clip3d_core.predictor import CameraFeatures, predict_panoptic
from clip3d_core.teacher import PointTargets, frame_point_targets
from clip3d_core.training.panoptic import PanopticTask, training_losses

SPLIT = load_panoptic_split("synthetic_b13n4")
ROWS: dict[str, dict[str, Any]] = {
    "a0": {"fusion": False, "w_object": 0.0, "w_voxel": 0.0, "label": "LiDAR only"},
    "b": {"fusion": True, "w_object": 0.0, "w_voxel": 0.0, "label": "fusion + cosine head"},
    "c": {"fusion": True, "w_object": 1.0, "w_voxel": 0.0, "label": "(b) + L_O"},
    "d": {"fusion": True, "w_object": 0.0, "w_voxel": 1.0, "label": "(b) + L_V"},
    "e": {"fusion": True, "w_object": 1.0, "w_voxel": 1.0, "label": "(b) + L_O + L_V"},
}
METRICS = ("pq", "pq_novel_things", "pq_novel_stuff", "pq_base", "rq", "sq", "miou")
EMBED_DIM = 32


def world_frames(train: int, val: int) -> tuple[list, list]:
    cams = tuple(CameraConfig(name=f"CAM_{i}", width=128, height=72, yaw_deg=90.0 * i) for i in range(4))
    world = SyntheticWorld(SyntheticConfig(seed=0, lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=512,
                                                                     max_range=40.0), cameras=cams))
    frames = [world.frame(i * 3) for i in range(train + val)]
    return frames[:train], frames[train:]


def teacher_targets(frames: list, text: torch.Tensor) -> list[PointTargets]:
    teacher = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, noise=0.1, confusion_prob=0.2))
    return [frame_point_targets(teacher, f, text)[1] for f in frames]


def run(row: dict[str, Any], seed: int, data: dict[str, Any], iterations: int) -> dict[str, float | None]:
    torch.manual_seed(seed)
    cfg = PanopticModelConfig(
        ModelConfig.small(embed_dim=EMBED_DIM, voxel_size=0.4,
                          point_range=(-40.0, -40.0, -4.0, 40.0, 40.0, 8.8)),
        PanopticHeadConfig(hidden=64, num_thing_queries=24, num_stuff_queries=len(SPLIT.base_stuff_ids),
                           num_layers=3, ffn=128, fusion=row["fusion"]))
    model = PanopticNet(cfg).train()
    loss = default_panoptic_loss()
    loss["object_distill"].weight, loss["voxel_distill"].weight = row["w_object"], row["w_voxel"]
    task = PanopticTask(SPLIT, data["text"], loss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    train, targets = data["train"], data["train_targets"]
    for _ in range(iterations):
        pick = torch.randperm(len(train), generator=g)[:2].tolist()
        batch = collate_frames([train[i] for i in pick])
        pt = PointTargets.cat([targets[i] for i in pick])
        distill = row["w_object"] > 0 or row["w_voxel"] > 0
        # without fusion and distillation the CLIP features are not used at all
        parts = training_losses(model, task, batch, pt if (row["fusion"] or distill) else None)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
    model.eval()
    metric = PanopticQuality(SPLIT.classes, SPLIT.spec.thing_mask(), min_points=SPLIT.spec.min_points,
                             novel=SPLIT.novel_mask())
    thing = torch.from_numpy(SPLIT.spec.thing_mask())
    for f, pt in zip(data["val"], data["val_targets"]):
        with torch.no_grad():
            p = predict_panoptic(model, torch.from_numpy(f.points), data["text"], thing,
                                 min_points=SPLIT.spec.min_points,
                                 camera=CameraFeatures(pt.features, pt.visible) if row["fusion"] else None)[0]
        metric.update(p.labels, p.extras["instances"], f.labels, f.instances)
    summary = metric.report().summary
    return {k: summary.get(k) for k in METRICS}


def mean_std(values: list[float | None]) -> str:
    v = [100 * x for x in values if x is not None]
    if not v:
        return "–"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--train-frames", type=int, default=6)
    ap.add_argument("--val-frames", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(SPLIT.num_classes, EMBED_DIM, generator=g), dim=1)
    train, val = world_frames(args.train_frames, args.val_frames)
    data = {"text": text, "train": train, "val": val, "train_targets": teacher_targets(train, text),
            "val_targets": teacher_targets(val, text)}
    results: dict[str, list[dict[str, float | None]]] = {}
    for key in args.rows:
        results[key] = [run(ROWS[key], seed, data, args.iterations) for seed in args.seeds]
        print(key, json.dumps(results[key]), flush=True)
    lines = [f"Synthetic world, split {SPLIT.name}, {args.iterations} iterations, seeds {args.seeds} "
             f"(mean ± std, %); SIMULATED teacher", "",
             "| row | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for key in args.rows:
        cells = [mean_std([r[m] for r in results[key]]) for m in METRICS]
        lines.append(f"| ({key}) {ROWS[key]['label']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": {k: {"label": ROWS[k]["label"], "runs": results[k]} for k in args.rows},
               "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "panoptic_benchmark.json").write_text(json.dumps(payload, indent=2))
    (args.out / "panoptic_benchmark.md").write_text(table)


if __name__ == "__main__":
    main()
