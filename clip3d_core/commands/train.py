"""train a model from a YAML config (CLIP-guided stage, self-training, annotation-free, panoptic)

Examples:
  clip3d train --config training/synthetic_tiny.yaml --out runs/tiny
  clip3d train --config training/synthetic_tiny.yaml --out runs/tiny --resume
  clip3d train --config training/synthetic_panoptic_tiny.yaml --out runs/panoptic_tiny [--resume]
  clip3d train --config training/semantickitti_zeroshot.yaml --set data.root=/data/kitti \\
      --set trainer.iterations=20
Many GPUs / nodes: torchrun --nproc_per_node 8 -m clip3d_core.cli train --config ...
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training YAML (see training/)")
    parser.add_argument("--out", type=Path, help="run directory (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in <out>/checkpoints")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (YAML syntax), e.g. --set trainer.iterations=20; "
                        "repeatable")


def run(args: argparse.Namespace) -> int:
    from clip3d_core.checkpoint import CheckpointError
    from clip3d_core.clip import ClipLoadError
    from clip3d_core.config import ConfigError
    from clip3d_core.data import DatasetError, SplitError
    from clip3d_core.training import load_train_config, make_trainer
    from clip3d_core.training.distributed import cleanup
    from clip3d_core.training.state import ResumeError

    try:
        cfg = load_train_config(args.config, args.overrides)
        trainer = make_trainer(cfg, out_dir=args.out, resume=args.resume)
        result = trainer.fit()
    except (ConfigError, ClipLoadError, CheckpointError, DatasetError, SplitError, ResumeError) as exc:
        log.error("%s", exc)
        cleanup()
        return 2
    info = trainer.info
    cleanup()
    if info.is_main:
        print(json.dumps({"final_checkpoint": str(result.final_checkpoint), "iterations": result.iterations,
                          "metrics": result.metrics}, indent=2))
    return 0
