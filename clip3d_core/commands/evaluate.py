"""evaluate a checkpoint (mIoU / seen / unseen / hIoU) on a config's held-out frames

Writes <out>/eval.json, <out>/eval.md (per-class table + summary) and <out>/confusion.png. A config
with ``setting: panoptic`` scores a panoptic checkpoint with its configured metrics (PQ ...) and
writes <out>/eval.json only.
Example:
  clip3d evaluate --checkpoint runs/tiny/final.pt --config training/synthetic_tiny.yaml --out runs/tiny/eval
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="clip3d checkpoint (.pt)")
    parser.add_argument("--config", type=Path, required=True,
                        help="training YAML whose data section names the evaluation frames and split")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--out", type=Path, help="output folder (default: <checkpoint dir>/eval_<name>)")
    parser.add_argument("--frames", choices=["val", "train"], default="val", help="which frames to score")
    parser.add_argument("--max-frames", type=int, help="score at most this many frames")
    parser.add_argument("--visible-only", action="store_true", help="score only points a camera sees")
    parser.add_argument("--score-threshold", type=float,
                        help="points scoring below it are unlabelled, as the segmenter does "
                             "(default: the config's evaluation.score_threshold)")
    parser.add_argument("--no-cameras", action="store_true",
                        help="fusion models: score the LiDAR-only path (as when every camera fails)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from clip3d_core.checkpoint import CheckpointError
    from clip3d_core.clip import ClipLoadError, VocabularyError
    from clip3d_core.config import ConfigError
    from clip3d_core.data import DatasetError, SplitError
    from clip3d_core.metrics import SemanticMetric
    from clip3d_core.training import load_train_config
    from clip3d_core.training.distributed import resolve_device
    from clip3d_core.training.validation import FramePredictor, evaluate, load_for_evaluation, summary
    from clip3d_core.viz import confusion_png

    try:
        cfg = load_train_config(args.config, args.overrides)
        if cfg.setting == "panoptic":
            return _run_panoptic(args, cfg)
        device = resolve_device(args.device)
        cameras = cfg.evaluation.cameras and not args.no_cameras
        setup = load_for_evaluation(args.checkpoint, cfg, device, cameras=cameras)
    except (ConfigError, ClipLoadError, CheckpointError, DatasetError, SplitError, VocabularyError) as exc:
        log.error("%s", exc)
        return 2
    split = setup.split
    frames = setup.val_set if args.frames == "val" else setup.train_set
    if args.max_frames is not None:
        frames = Subset(frames, range(min(args.max_frames, len(frames))))
    threshold = cfg.evaluation.score_threshold if args.score_threshold is None else args.score_threshold
    predictor = FramePredictor(setup.model, setup.text, device, teacher=setup.teacher,
                               score_threshold=threshold)
    metrics = evaluate({"model": predictor}, frames, split.classes, split.unseen_ids,
                       metrics=cfg.evaluation.metrics, visible_only=args.visible_only, progress=True)["model"]
    semantic = metrics.get("semantic")
    if not isinstance(semantic, SemanticMetric):
        log.error("clip3d evaluate writes the semantic report: keep evaluation.metrics.semantic")
        return 2
    report = semantic.report()
    out = args.out or args.checkpoint.parent / f"eval_{args.checkpoint.stem}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(args.checkpoint), "config": str(args.config), "frames": args.frames,
              "num_frames": len(frames), "visible_only": args.visible_only, "split": split.to_dict(),
              "score_threshold": threshold, "cameras": setup.teacher is not None,
              "metrics": summary(metrics), **report.to_dict()}
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    title = f"{args.checkpoint.name} on {len(frames)} {args.frames} frames"
    (out / "eval.md").write_text(f"# {title}\n\n{report.to_markdown()}")
    confusion_png(out / "confusion.png", report.confusion, split.classes, title=title)
    print(report.to_markdown())
    print(f"written to {out}")
    return 0


def _run_panoptic(args: argparse.Namespace, cfg: object) -> int:
    """Panoptic checkpoints: the config's metrics on its evaluation frames (one process; a class
    scores the maximum over its names)."""
    from clip3d_core.training.panoptic_trainer import PanopticTrainer

    out = args.out or args.checkpoint.parent / f"eval_{args.checkpoint.stem}"
    cfg.trainer.device = args.device  # type: ignore[attr-defined]
    trainer = PanopticTrainer(cfg, out_dir=out)  # type: ignore[arg-type]
    trainer.load_checkpoint(args.checkpoint)
    metrics = trainer.evaluate()
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(args.checkpoint), "config": str(args.config),
              "split": trainer.panoptic_split.to_dict(), "metrics": metrics}
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"written to {out}")
    return 0
