"""`python -m clip3d_core.data.synthetic {bench,preview}`: per-frame timing, or a labelled preview PNG.

bench prints one JSON line and a table: median wall / CPU time per stage (LiDAR, each camera, whole
frame) over the frames of a drive, and the point count. preview writes camera RGB | camera labels |
bird's-eye view of the labelled LiDAR points for one frame.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import clip3d_core  # noqa: F401  (compat shims first)
from clip3d_core.data.synthetic.camera import render
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig, SyntheticConfig
from clip3d_core.data.synthetic.dataset import SyntheticWorld
from clip3d_core.data.synthetic.world import CLASS_NAMES


def _config(args: argparse.Namespace) -> SyntheticConfig:
    lidar = LidarConfig(pattern=args.pattern, beams={"hdl32": 32, "hdl64": 64, "vlp16": 16}[args.pattern],
                        azimuths=args.azimuths)
    cam = CameraConfig(width=args.width, height=args.height)
    if args.surround:
        cfg = SyntheticConfig.surround(args.seed, args.width, args.height)
        return SyntheticConfig(seed=args.seed, lidar=lidar, cameras=cfg.cameras)
    return SyntheticConfig(seed=args.seed, lidar=lidar, cameras=(cam,))


def _timed(fn) -> tuple[object, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench(args: argparse.Namespace) -> None:
    cfg = _config(args)
    world, t_build, _ = _timed(lambda: SyntheticWorld(cfg))
    rows: dict[str, list[tuple[float, float]]] = {}
    points = []
    indices = np.linspace(0, cfg.drive_frames - 1, args.frames).round().astype(int)
    for i in indices:
        pose, t = world.ego_pose(int(i)), world.time(int(i))
        rng = np.random.default_rng(int(i))
        scan, w, c = _timed(lambda pose=pose, t=t, rng=rng: world.lidar.scan(world.scene, pose, t, rng))
        rows.setdefault("lidar", []).append((w, c))
        points.append(len(scan.points))
        for cam, cc in zip(world.cameras, cfg.cameras):
            _, w, c = _timed(lambda cam=cam, cc=cc, pose=pose, t=t, rng=rng:
                             render(world.scene, cam, pose, t, rng, cc.max_depth))
            rows.setdefault(f"camera {cam.name} {cam.width}x{cam.height}", []).append((w, c))
        _, w, c = _timed(lambda i=i: world.frame(int(i)))
        rows.setdefault("frame", []).append((w, c))
    result = {
        "scene_build_ms": round(t_build * 1e3, 1),
        "primitives": len(world.scene),
        "lidar": f"{cfg.lidar.pattern} x {cfg.lidar.azimuths}",
        "points_median": int(np.median(points)),
        "frames": len(indices),
        "median_ms": {k: {"wall": round(float(np.median([w for w, _ in v])) * 1e3, 1),
                          "cpu": round(float(np.median([c for _, c in v])) * 1e3, 1)}
                      for k, v in rows.items()},
    }
    print(json.dumps(result))
    width = max(map(len, rows))
    print(f"\n{'stage':<{width}}  {'wall ms':>8}  {'cpu ms':>8}")
    for k, v in result["median_ms"].items():
        print(f"{k:<{width}}  {v['wall']:>8.1f}  {v['cpu']:>8.1f}")
    print(f"\n{result['primitives']} primitives, {result['points_median']} points/frame, "
          f"scene built in {result['scene_build_ms']} ms")


def preview(args: argparse.Namespace) -> None:
    from PIL import Image

    from clip3d_core.clip.vocabulary import Vocabulary

    sky = np.array([[135, 190, 235]], np.uint8)
    colours = np.vstack([Vocabulary.from_strings(CLASS_NAMES).colours, sky]).astype(np.uint8)
    frame = SyntheticWorld(_config(args)).frame(args.index)
    panels = []
    for image, labels in zip(frame.images, frame.pixel_labels):
        panels.append(np.concatenate([image, colours[labels]], axis=1))  # -1 (sky) -> last colour
    cam = np.concatenate(panels, axis=0)
    size = cam.shape[0]
    bev = np.full((size, size, 3), 255, np.uint8)
    extent = 50.0
    ij = ((frame.points[:, :2] + extent) / (2 * extent) * size).astype(int)
    ok = (ij >= 0).all(1) & (ij < size).all(1)
    bev[size - 1 - ij[ok, 0], size - 1 - ij[ok, 1]] = colours[frame.labels[ok]]
    out = Path(args.out)
    Image.fromarray(np.concatenate([cam, bev], axis=1)).save(out)
    print(f"wrote {out}: {frame.num_points} points, classes {sorted({CLASS_NAMES[i] for i in frame.labels})}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clip3d_core.data.synthetic", description=__doc__)
    parser.add_argument("command", choices=("bench", "preview"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pattern", default="hdl32", choices=("hdl32", "hdl64", "vlp16"))
    parser.add_argument("--azimuths", type=int, default=1024)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--surround", action="store_true", help="four cameras instead of one")
    parser.add_argument("--frames", type=int, default=10, help="bench: frames sampled along the drive")
    parser.add_argument("--index", type=int, default=0, help="preview: drive frame index")
    parser.add_argument("--out", default="synthetic_preview.png", help="preview: output PNG")
    args = parser.parse_args()
    bench(args) if args.command == "bench" else preview(args)


if __name__ == "__main__":
    main()
