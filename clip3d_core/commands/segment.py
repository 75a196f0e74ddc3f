"""label a point cloud file (+ camera images) and draw a bird's-eye PNG

Examples:
  clip3d segment scan.bin --checkpoint model.pt --vocabulary car road 'person|pedestrian' --out out/
  clip3d segment 000008.bin --images 000008.png --calib 000008.txt --checkpoint fusion.pt --out out/
  clip3d segment LIDAR_TOP.pcd.bin --calib sample.pkl --checkpoint fusion.pt --out out/   # nuScenes
  clip3d segment scan.bin --allow-random --vocabulary car road --out out/   # UNTRAINED, plumbing only

Writes to --out: labels.npy (uint16, 65535 = unlabelled), labels.label (SemanticKITTI uint32
layout), scores.npy (float32), bev.png (classes coloured, legend), overlay_<camera>.png per
image, summary.json (counts per class, vocabulary, timings, model identity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "cloud", type=Path, help="point cloud: .bin (KITTI x,y,z,i; nuScenes .pcd.bin), .pcd, .npy"
    )
    parser.add_argument(
        "--columns", type=int, help="float32 values per point in a .bin (default 4; .pcd.bin 5)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, help="clip3d checkpoint (.pt)")
    model.add_argument(
        "--allow-random",
        action="store_true",
        help="no checkpoint: an UNTRAINED model with a random tiny CLIP (plumbing tests only)",
    )
    parser.add_argument(
        "--config", choices=["small", "default"], default="small", help="model preset for --allow-random"
    )
    parser.add_argument("--fusion", action="store_true", help="--allow-random: build a 2D-3D fusion model")
    parser.add_argument(
        "--vocabulary",
        nargs="+",
        default=[],
        metavar="ENTRY",
        help="class entries, synonyms joined by '|' (default: the checkpoint's vocabulary)",
    )
    parser.add_argument("--vocabulary-file", type=Path, help="one entry per line ('#' starts a comment)")
    parser.add_argument(
        "--embedding-bank",
        help="text embedding bank (.pt) instead of the CLIP text tower; 'checkpoint': the checkpoint's own",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--clip-checkpoint", type=Path, help="local CLIP weights overriding the checkpoint's"
    )
    weights.add_argument("--pretrained", metavar="TAG", help="open_clip tag overriding the checkpoint's")
    parser.add_argument("--images", nargs="+", type=Path, default=[], help="camera images (order of --calib)")
    parser.add_argument(
        "--calib",
        type=Path,
        help="KITTI calib .txt (one image) or an mmdetection3d info .pkl (KITTI or nuScenes)",
    )
    parser.add_argument("--camera", default="P2", help="projection matrix of a KITTI calib .txt (P0..P3)")
    parser.add_argument("--image-short-side", type=int, help="resize images to this short side for CLIP")
    parser.add_argument("--score-threshold", type=float, help="labels scoring below become unlabelled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bev-range", type=float, default=51.2, help="half width of the bird's-eye view (m)")


def _cameras(args: argparse.Namespace) -> tuple[list[np.ndarray], list[Any]]:
    """Images and one calibrated camera per image, from --images/--calib."""
    from clip3d_core.geometry import (
        NUSCENES_CAMERAS,
        camera_from_kitti_info,
        cameras_from_nuscenes_info,
        image_paths_from_info,
        info_sample,
        load_info_pickle,
        load_kitti_calib,
    )
    from clip3d_core.io import read_image

    if args.calib is None:
        if args.images:
            raise ValueError("--images need --calib (the camera calibration)")
        return [], []
    paths = list(args.images)
    if args.calib.suffix == ".pkl":
        info = load_info_pickle(args.calib)
        sample = info_sample(info)
        if "CAM2" in sample.get("images", {}):
            if len(paths) != 1:
                raise ValueError("a KITTI info .pkl calibrates one image: give exactly one --images")
            images = [read_image(paths[0])]
            return images, [camera_from_kitti_info(info, "CAM2", images[0].shape[:2])]
        if not paths:
            paths = image_paths_from_info(info, args.calib.parent)
        if len(paths) != len(NUSCENES_CAMERAS):
            raise ValueError(
                f"nuScenes info: give {len(NUSCENES_CAMERAS)} images in order {NUSCENES_CAMERAS}"
            )
        images = [read_image(p) for p in paths]
        return images, cameras_from_nuscenes_info(info, images[0].shape[:2])
    if len(paths) != 1:
        raise ValueError("a KITTI calib .txt calibrates one image: give exactly one --images")
    images = [read_image(paths[0])]
    return images, [load_kitti_calib(args.calib, images[0].shape[:2], camera=args.camera)]


def _vocabulary(args: argparse.Namespace) -> list[str]:
    from clip3d_core.commands.text_bank import _lines

    return list(args.vocabulary) + (_lines(args.vocabulary_file) if args.vocabulary_file else [])


def _segmenter(args: argparse.Namespace, vocabulary: list[str], tmp: Path) -> tuple[Any, Path | None]:
    from clip3d_core.checkpoint import build_untrained_checkpoint, load_checkpoint
    from clip3d_core.clip import load_clip, tiny_clip_config
    from clip3d_core.model import MODEL_PRESETS
    from clip3d_core.segmenter import Segmenter

    kwargs: dict[str, Any] = dict(
        device=args.device,
        embedding_bank=args.embedding_bank,
        vocabulary=vocabulary or None,
        score_threshold=args.score_threshold,
        image_short_side=args.image_short_side,
    )
    if args.checkpoint is None:
        if not args.allow_random:
            raise ValueError("give --checkpoint (or --allow-random for an untrained model, plumbing only)")
        log.warning("#" * 78)
        log.warning(
            "# NO CHECKPOINT: UNTRAINED %s model + RANDOM tiny CLIP. Labels are MEANINGLESS.", args.config
        )
        log.warning("#" * 78)
        clip_cfg = tiny_clip_config()
        preset = MODEL_PRESETS[args.config]
        dim = load_clip(clip_cfg).embed_dim
        path = build_untrained_checkpoint(
            tmp / "untrained.pt",
            preset(embed_dim=dim, fusion=args.fusion),
            clip_cfg,
            vocabulary=vocabulary or None,
        )
        return Segmenter.from_checkpoint(path, **kwargs), None
    if args.clip_checkpoint or args.pretrained:
        base = load_checkpoint(args.checkpoint).clip_config
        kwargs["clip"] = dataclasses.replace(
            base,
            checkpoint=str(args.clip_checkpoint) if args.clip_checkpoint else None,
            pretrained=args.pretrained,
            allow_random=False,
        )
    return Segmenter.from_checkpoint(args.checkpoint, **kwargs), args.checkpoint


def _write(
    args: argparse.Namespace,
    points: np.ndarray,
    result: Any,
    images: list[np.ndarray],
    cameras: list[Any],
    checkpoint: Path | None,
    identity: Any,
) -> dict[str, Any]:
    import torch

    from clip3d_core.geometry import project_points
    from clip3d_core.io import write_labels
    from clip3d_core.labels import UNLABELLED
    from clip3d_core.viz import bev_png, overlay_png

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "labels.npy", result.labels)
    # panoptic models: instance ids in the SemanticKITTI upper 16 bits too (per-frame ids stay small)
    write_labels(out / "labels.label", result.labels, result.instances)
    np.save(out / "scores.npy", result.scores)
    arrays = ["labels.npy", "labels.label", "scores.npy"]
    if result.instances is not None:
        np.save(out / "instances.npy", result.instances)
        arrays.append("instances.npy")
    untrained = checkpoint is None
    title = f"{args.cloud.name}" + ("  [UNTRAINED RANDOM MODEL]" if untrained else "")
    r = args.bev_range
    files = [
        bev_png(
            out / "bev.png",
            points[:, :3],
            result.labels,
            result.vocabulary,
            extent=(-r, -r, r, r),
            title=title,
            instances=result.instances,
        )
    ]
    if images:
        xyz = torch.from_numpy(np.ascontiguousarray(points[:, :3]))
        finite = torch.isfinite(xyz).all(dim=1)
        proj = project_points(torch.where(finite[:, None], xyz, torch.zeros_like(xyz)), cameras)
        for m, (image, cam) in enumerate(zip(images, cameras)):
            seen = (proj.visible[m] & finite).numpy()
            files.append(
                overlay_png(
                    out / f"overlay_{cam.name}.png",
                    image,
                    proj.uv[m].numpy()[seen],
                    result.labels[seen],
                    result.vocabulary,
                    depth=proj.depth[m].numpy()[seen],
                    title=f"{cam.name}" + ("  [UNTRAINED]" if untrained else ""),
                    instances=None if result.instances is None else result.instances[seen],
                )
            )
    summary = {
        "cloud": str(args.cloud),
        "points": len(points),
        "valid": int(result.valid.sum()),
        "labelled": int((result.labels != UNLABELLED).sum()),
        "class_counts": result.class_counts(),
        "mean_score": float(result.scores[result.valid].mean()) if result.valid.any() else 0.0,
        "vocabulary": result.vocabulary.as_dict(),
        "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
        "checkpoint": None if untrained else str(checkpoint),
        "untrained": untrained,
        "clip": str(identity),
        "cameras": [c.name for c in cameras],
        "score_threshold": args.score_threshold,
        "device": args.device,
        "files": [str(p.name) for p in files] + arrays,
    }
    if result.instances is not None:
        summary["instances"] = len(np.unique(result.instances[result.instances > 0]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> int:
    from clip3d_core.io import read_cloud

    try:
        points = read_cloud(args.cloud, columns=args.columns)
        images, cameras = _cameras(args)
        with tempfile.TemporaryDirectory(prefix="clip3d-segment-") as tmp:
            segmenter, checkpoint = _segmenter(args, _vocabulary(args), Path(tmp))
        result = segmenter.segment(points, images or None, cameras or None)
        summary = _write(args, points, result, images, cameras, checkpoint, segmenter.identity)
    except (ValueError, OSError) as exc:  # every clip3d input error is a ValueError subclass
        log.error("%s", exc)
        return 2
    width = max(len(n) for n in summary["class_counts"])
    print(
        f"{summary['points']} points, {summary['valid']} valid, {summary['labelled']} labelled -> {args.out}"
    )
    for name, count in sorted(summary["class_counts"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<{width}}  {count:>8}")
    print("  timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_ms"].items()))
    return 0
