"""per-stage latency and peak memory of the Segmenter

Times `Segmenter.segment` stage by stage (voxelise, backbone, [image], classify, total: median and
p90 over --runs after --warmup) for every combination of --head, --config, --points, --precision and
--backend, with the runtime options --tf32/--compile. --head panoptic times a `PanopticNet` (the
--config backbone + the default query decoder, served as a panoptic checkpoint is: half of the
vocabulary thing classes) through the same call, with its decoder and merge as stages of their own.
--fusion-cameras N times a fusion model fed N random --image-size images through a random-weight
--clip-model instead of the LiDAR-only model.
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the resident-set growth (ru_maxrss),
each case then in a fresh process so its peak is its own. CUDA times come from CUDA events with one
synchronisation per frame (--stage-sync: a synchronisation per stage).

Input: the real SemanticKITTI scan (random subsample, or tiled with jitter when more points are
asked for) when the shared data is present, else a synthetic cloud (uniform + ground plane).
Weights are random (speed does not depend on them); the text side is a random embedding table.
--time-budget-s bounds a case: timed runs stop once it is spent (at least one), and a case still
running at three times it is stopped and reported as such. Results are written after every case.

Examples:
  clip3d bench --config small default --points 30000 120000 --runs 10 --json-out bench.json
  clip3d bench --head semantic panoptic --config small --points 30000 120000 --threads 2
  clip3d bench --device cuda --precision fp32 fp16 --backend spconv spconv_triton --md-out b.md
  clip3d bench --device cuda --fusion-cameras 6 --image-size 448 800 --clip-model ViT-B-16
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("voxelise", "backbone", "image", "decoder", "merge", "classify", "total")
_KEYS = ("tag", "head", "config", "points", "backend", "precision", "tf32", "compile", "cameras")  # a case
PANOPTIC_MIN_POINTS = 15  # the merge's minimum segment size: nuScenes' standard
HFOV_DEG = 70.0  # ring cameras: six of them overlap a little, as on nuScenes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--head", nargs="+", choices=["semantic", "panoptic"], default=["semantic"],
        help="semantic: Clip3DNet; panoptic: PanopticNet (query decoder + panoptic merge)",
    )
    parser.add_argument("--config", nargs="+", choices=["small", "default"], default=["small", "default"])
    parser.add_argument("--points", nargs="+", type=int, default=[30000, 120000])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--classes", type=int, default=20, help="vocabulary size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backend", nargs="+", default=["auto"], choices=["auto", "spconv", "spconv_triton"],
        help="sparse-conv backends to compare (auto: clip3d_core.model.sparse_backend's choice)",
    )
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 products and sparse convs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the dense parts")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--stage-sync", action="store_true", help="synchronise at every stage boundary")
    parser.add_argument(
        "--fusion-cameras", type=int, default=0,
        help="0: LiDAR-only model; N: a fusion model fed N ring cameras (CLIP image tower included)",
    )
    parser.add_argument("--image-size", nargs=2, type=int, default=[448, 800], metavar=("H", "W"))
    parser.add_argument(
        "--image-short-side", type=int, help="short side fed to the ViT (default: the image's own: no resize)"
    )
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model, random weights")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cloud", type=Path, help="input cloud (default: the shared SemanticKITTI scan)")
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="per case (see above)")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the cases here (quick checks: no worker start-up; cumulative peaks, no hard stop)",
    )
    parser.add_argument("--tag", default="", help="a label stored with every result (e.g. the check's phase)")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    parser.add_argument("--md-out", type=Path, help="write the results as a markdown table here")


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


def ring_cameras(count: int, height: int, width: int) -> list[Any]:
    """``count`` cameras evenly spaced in yaw around the LiDAR (the first looking forward)."""
    from clip3d_core.data.synthetic.camera import camera_from_config
    from clip3d_core.data.synthetic.config import CameraConfig

    return [
        camera_from_config(
            CameraConfig(f"CAM_{i}", width=width, height=height, hfov_deg=HFOV_DEG, yaw_deg=360.0 * i / count)
        )
        for i in range(count)
    ]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _segmenter(case: dict[str, Any], device: Any) -> Any:
    """The Segmenter of one case, with a random vocabulary."""
    import torch

    import clip3d_core  # noqa: F401  (compat fixes before spconv)
    from clip3d_core.clip import ClipConfig, ClipIdentity, Vocabulary, load_clip
    from clip3d_core.clip.dense import DenseClipEncoder
    from clip3d_core.model import MODEL_PRESETS, Clip3DNet
    from clip3d_core.model.panoptic import PanopticHeadConfig, PanopticInfo, PanopticModelConfig, PanopticNet
    from clip3d_core.runtime import RuntimeOptions
    from clip3d_core.segmenter import Segmenter

    torch.manual_seed(0)
    preset = MODEL_PRESETS[case["config"]]
    backend = None if case["backend"] == "auto" else case["backend"]
    runtime = RuntimeOptions(
        backend=backend,
        precision=case["precision"],
        tf32=case["tf32"],
        compile=case["compile"],
        compile_backend=case["compile_backend"],
        stage_sync=case["stage_sync"],
    )
    fusion = bool(case["cameras"])
    loaded = None
    if fusion:
        loaded = load_clip(ClipConfig(model_name=case["clip_model"], allow_random=True), device)
    cfg = preset(embed_dim=loaded.embed_dim, fusion=True) if loaded is not None else preset()
    names = [f"class {i}" for i in range(case["classes"])]
    panoptic = None
    if case["head"] == "panoptic":
        head = PanopticHeadConfig(fusion=fusion)
        model = PanopticNet(PanopticModelConfig(cfg, head), backend=backend)
        panoptic = PanopticInfo(head, tuple(names[: len(names) // 2]), PANOPTIC_MIN_POINTS)
    else:
        model = Clip3DNet(cfg, backend=backend)
    if loaded is not None:
        seg = Segmenter(
            model, loaded.identity, panoptic=panoptic, dense=DenseClipEncoder(loaded), device=device,
            runtime=runtime, image_short_side=case["image_short_side"] or min(case["image_size"]),
        )
    else:
        seg = Segmenter(model, ClipIdentity("bench", "random:0", cfg.embed_dim), panoptic=panoptic,
                        device=device, runtime=runtime)
    vocab = Vocabulary.from_strings(names, version=1)
    seg.swap_vocabulary(vocab, torch.randn(len(vocab), cfg.embed_dim))
    return seg


def _case(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement; runs in a worker process. Failures are results too (``error``)."""
    started = time.perf_counter()
    out: dict[str, Any] = {k: case[k] for k in _KEYS}
    try:
        out.update(_measure(case, started))
    except Exception as exc:  # one case's failure (a backend that cannot run, OOM) is reported, not fatal
        log.exception("case %s failed", out)
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    out["case_s"] = round(time.perf_counter() - started, 1)
    return out


def _measure(case: dict[str, Any], started: float) -> dict[str, Any]:
    import torch

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_mb()
    seg = _segmenter(case, device)
    model = seg.model  # on the backend and device the runtime chose
    points, source = bench_cloud(case["points"], Path(case["cloud"]) if case["cloud"] else None)
    images = cameras = None
    if case["cameras"]:
        h, w = case["image_size"]
        cameras = ring_cameras(case["cameras"], h, w)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in cameras]
    with torch.inference_mode():
        vox = model.voxelize(torch.from_numpy(points).to(device))
    for _ in range(max(case["warmup"], 1 if case["compile"] else 0)):
        seg.segment(points, images, cameras)
    warm_s = time.perf_counter() - started
    runs: list[dict[str, float]] = []
    instances = []  # instances per frame (panoptic): random weights, so only that the merge made some
    while len(runs) < case["runs"] and (not runs or time.perf_counter() - started < case["time_budget_s"]):
        out = seg.segment(points, images, cameras)
        runs.append(out.timings_ms)
        if out.instances is not None:
            instances.append(len(np.unique(out.instances[out.instances > 0])))
    result: dict[str, Any] = {
        "backend": model.backbone.backend,
        "voxels": vox.num_voxels,
        "valid_points": int(vox.valid.sum()),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input": source,
        "image_size": case["image_size"] if case["cameras"] else None,
        "clip_model": case["clip_model"] if case["cameras"] else None,
        "runs": len(runs),
        "truncated": len(runs) < case["runs"],
        "warmup_s": round(warm_s, 1),
        "stages_ms": {
            s: {
                "median": float(np.median([r[s] for r in runs])),
                "p90": float(np.percentile([r[s] for r in runs], 90)),
            }
            for s in STAGES
            if s in runs[0]
        },
        "peak_rss_growth_mb": round(_peak_rss_mb() - rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if seg.panoptic is not None:
        result["decoder"] = {k: getattr(seg.panoptic.head, k) for k in
                             ("hidden", "num_thing_queries", "num_stuff_queries", "num_layers", "ffn")}
        result["instances_median"] = float(np.median(instances))
    if cuda:
        result["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20, 1)
    return result


def _cell(r: dict[str, Any], stage: str) -> str:
    st = r.get("stages_ms", {}).get(stage)
    return f"{st['median']:.1f} / {st['p90']:.1f}" if st else "-"


def decoder_merge_share(r: dict[str, Any]) -> float | None:
    """(decoder + merge) / total of the medians: the panoptic head's share of a frame (None: a
    semantic case)."""
    st = r.get("stages_ms", {})
    if "decoder" not in st or not st["total"]["median"]:
        return None
    return (st["decoder"]["median"] + st["merge"]["median"]) / st["total"]["median"]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per case: what ran, stage medians / p90 in ms, the panoptic decoder + merge share of
    the total, peak memory; failures say why."""
    head = ["tag", "head", "config", "points", "cams", "backend", "prec", "tf32", "compile", "voxels", "runs"]
    head += [f"{s} ms" for s in STAGES] + ["dec+merge", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [
            r.get("tag") or "-", r.get("head", "semantic"), r["config"], str(r["points"]),
            str(r.get("cameras") or 0), r["backend"], r["precision"], "on" if r.get("tf32") else "off",
            "on" if r.get("compile") else "off",
        ]
        if "error" in r:
            row += ["-", "0"] + ["-"] * (len(STAGES) + 1) + [f"failed: {r['error'][:120]}"]
        else:
            peak = r.get("cuda_peak_mb", r.get("peak_rss_growth_mb"))
            share = decoder_merge_share(r)
            row += [str(r["voxels"]), f"{r['runs']}{' (budget)' if r.get('truncated') else ''}"]
            row += [_cell(r, s) for s in STAGES]
            row += ["-" if share is None else f"{100 * share:.0f} %", f"{peak:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    from clip3d_core.model import sparse_backend

    env: dict[str, Any] = {
        "device": device if device != "cpu" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "sparse_backends": {k: v or "ok" for k, v in sparse_backend.available().items()},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    for package in ("spconv", "spconv_triton", "triton", "open_clip"):
        try:
            env[package] = __import__(package).__version__
        except Exception:  # absent or broken: the version is just not reported
            env[package] = None
    return env


def _cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        "device": args.device, "runs": args.runs, "warmup": args.warmup, "classes": args.classes,
        "threads": args.threads, "cloud": str(args.cloud) if args.cloud else None, "tf32": args.tf32,
        "compile": args.compile, "compile_backend": args.compile_backend, "stage_sync": args.stage_sync,
        "cameras": args.fusion_cameras, "image_size": list(args.image_size),
        "image_short_side": args.image_short_side, "clip_model": args.clip_model,
        "time_budget_s": args.time_budget_s, "tag": args.tag,
    }
    # Backends vary slowest so one GPU worker serves all of a backend's cases.
    return [
        {**common, "backend": b, "head": h, "config": c, "points": n, "precision": p}
        for b, h, c, n, p in itertools.product(
            args.backend, args.head, args.config, args.points, args.precision
        )
    ]


def _write(args: argparse.Namespace, env: dict[str, Any], results: list[dict[str, Any]]) -> None:
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    if args.md_out:
        args.md_out.parent.mkdir(parents=True, exist_ok=True)
        args.md_out.write_text(f"clip3d bench on {env['device']}, torch {env['torch']}\n\n"
                               + markdown_table(results) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("--device %s but CUDA is not available", args.device)
        return 2
    if args.runs < 1 or args.warmup < 0 or min(args.points) < 1 or args.fusion_cameras < 0:
        log.error("--runs >= 1, --warmup >= 0, --points >= 1 and --fusion-cameras >= 0 required")
        return 2
    env = environment(args.device)
    cuda = args.device.startswith("cuda")
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")  # fresh processes: no state shared with this one
    # `timeout` (check.sh) stops a phase with SIGTERM: leave through `finally`, ending the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    pool = None
    try:
        for i, case in enumerate(cases := _cases(args)):
            if args.in_process:
                results.append(_case(case))
                _write(args, env, results)
                continue
            # CPU: a process per case (its own peak RSS). GPU: one per backend (peaks reset per case).
            if pool is None or not cuda or case["backend"] != cases[i - 1]["backend"]:
                if pool is not None:
                    pool.terminate()
                pool = ctx.Pool(1)
            log.info("bench %s", {k: case[k] for k in _KEYS})
            limit = 3 * args.time_budget_s + 60
            try:
                result = pool.apply_async(_case, (case,)).get(timeout=limit)
            except mp.TimeoutError:
                pool.terminate()
                pool = None
                result = {k: case[k] for k in _KEYS}
                result["error"] = f"stopped after {limit:.0f} s (3x --time-budget-s + 60)"
            results.append(result)
            _write(args, env, results)  # after every case: a stopped run keeps what it measured
    finally:
        if pool is not None:
            pool.terminate()
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(args, env, results)
    print(
        f"clip3d bench on {env['device']}, torch {env['torch']}; input: "
        f"{next((r['input'] for r in results if 'input' in r), '-')}; "
        f"load average {env['load_average_at_start']} -> {env['load_average_at_end']}"
    )
    print(markdown_table(results))
    if args.json_out:
        print(f"JSON: {args.json_out}")
    return 0 if all("error" not in r for r in results) else 1
