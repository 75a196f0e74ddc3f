"""per-stage latency and peak memory of the Segmenter

Times `Segmenter.segment` stage by stage (voxelise, backbone, classify, total: median and p90 over
--runs after --warmup) for each --config preset and --points size, each case in a fresh process so
its peak memory is its own: resident-set growth (ru_maxrss) on CPU, torch.cuda.max_memory_allocated
on GPU. Input: the real SemanticKITTI scan (random subsample, or tiled with jitter when more points
are asked for) when the shared data is present, else a synthetic cloud (uniform + ground plane).
Weights are random (speed does not depend on them); the text side is a random embedding table.

Example:
  clip3d bench --config small default --points 30000 120000 --runs 10 --json-out bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("voxelise", "backbone", "classify", "total")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", choices=["small", "default"], default=["small", "default"])
    parser.add_argument("--points", nargs="+", type=int, default=[30000, 120000])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--classes", type=int, default=20, help="vocabulary size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cloud", type=Path, help="input cloud (default: the shared SemanticKITTI scan)")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")


def bench_cloud(n: int, path: Path | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """[n, 4] float32 points and a description of where they came from."""
    from clip3d_core.io import read_cloud
    from clip3d_core.testing import shared_data_dir

    rng = np.random.default_rng(seed)
    if path is None and shared_data_dir() is not None:
        candidate = shared_data_dir() / "semantickitti_scan" / "000000.bin"
        path = candidate if candidate.is_file() else None
    if path is not None:
        base = read_cloud(path)[:, :4]
        if n <= len(base):
            return base[np.sort(rng.choice(len(base), n, replace=False))], f"{path.name} subsampled"
        copies = [base] + [
            base + rng.normal(0, 0.02, base.shape).astype(np.float32) * [1, 1, 1, 0]
            for _ in range(n // len(base))
        ]
        return np.concatenate(copies)[:n].astype(np.float32), f"{path.name} tiled with 2 cm jitter"
    ground = np.column_stack([rng.uniform(-50, 50, (n // 2, 2)), rng.normal(-1.7, 0.03, n // 2)])
    scatter = rng.uniform([-50, -50, -2], [50, 50, 2], (n - n // 2, 3))
    xyz = np.concatenate([ground, scatter])
    return np.column_stack([xyz, rng.uniform(0, 1, n)]).astype(np.float32), "synthetic (uniform + ground)"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _case(config: str, n: int, args: dict[str, Any]) -> dict[str, Any]:
    """One (config, size) measurement; runs in its own process."""
    import torch

    import clip3d_core  # noqa: F401  (compat fixes before spconv)
    from clip3d_core.clip import ClipIdentity, Vocabulary
    from clip3d_core.model import MODEL_PRESETS, Clip3DNet
    from clip3d_core.segmenter import Segmenter

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    cfg = MODEL_PRESETS[config]()
    device = torch.device(args["device"])
    model = Clip3DNet(cfg)
    seg = Segmenter(model, ClipIdentity("bench", "random:0", cfg.embed_dim), device=device)
    vocab = Vocabulary.from_strings([f"class {i}" for i in range(args["classes"])], version=1)
    seg.swap_vocabulary(vocab, torch.randn(len(vocab), cfg.embed_dim))
    points, source = bench_cloud(n, Path(args["cloud"]) if args["cloud"] else None)
    with torch.inference_mode():
        vox = model.voxelize(torch.from_numpy(points).to(device))
    rss_before = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    for _ in range(args["warmup"]):
        seg.segment(points)
    runs = [seg.segment(points).timings_ms for _ in range(args["runs"])]
    out: dict[str, Any] = {
        "config": config,
        "points": n,
        "voxels": vox.num_voxels,
        "valid_points": int(vox.valid.sum()),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input": source,
        "runs": args["runs"],
        "stages_ms": {
            s: {
                "median": float(np.median([r[s] for r in runs])),
                "p90": float(np.percentile([r[s] for r in runs], 90)),
            }
            for s in STAGES
        },
        "peak_rss_growth_mb": round(_peak_rss_mb() - rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20, 1)
    return out


def _table(results: list[dict[str, Any]], gpu: bool) -> str:
    head = ["config", "points", "voxels", "params M"] + [f"{s} med/p90 ms" for s in STAGES]
    head += ["GPU peak MB" if gpu else "RSS growth MB"]
    rows = [head]
    for r in results:
        st = r["stages_ms"]
        rows.append(
            [r["config"], str(r["points"]), str(r["voxels"]), f"{r['params_m']:.2f}"]
            + [f"{st[s]['median']:.1f} / {st[s]['p90']:.1f}" for s in STAGES]
            + [f"{r['cuda_peak_mb'] if gpu else r['peak_rss_growth_mb']:.1f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("--device %s but CUDA is not available", args.device)
        return 2
    if args.runs < 1 or args.warmup < 0 or min(args.points) < 1:
        log.error("--runs >= 1, --warmup >= 0 and --points >= 1 required")
        return 2
    case_args = {k: getattr(args, k) for k in ("runs", "warmup", "classes", "device", "threads")}
    case_args["cloud"] = str(args.cloud) if args.cloud else None
    env = {
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "python": sys.version.split()[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results = []
    ctx = mp.get_context("spawn")  # a fresh process per case: its own peak RSS, no shared caches
    for config in args.config:
        for n in args.points:
            log.info("bench %s @ %d points (%d warm-up + %d runs)", config, n, args.warmup, args.runs)
            with ctx.Pool(1) as pool:
                results.append(pool.apply(_case, (config, n, case_args)))
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"clip3d bench on {env['device']}, torch {env['torch']}, {env['threads']} threads; "
        f"input: {results[0]['input']}; "
        f"load average {env['load_average_at_start']} -> {env['load_average_at_end']}"
    )
    print(_table(results, args.device.startswith("cuda")))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"environment": env, "results": results}, indent=2))
        print(f"JSON: {args.json_out}")
    return 0
