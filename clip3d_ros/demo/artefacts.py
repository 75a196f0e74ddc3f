"""Demo inputs, each reused from an earlier run when its inputs match: the drive bag and the model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import clip3d_core  # first: applies the torch/spconv compat fixes
from clip3d_core.data.synthetic.config import SyntheticConfig
from clip3d_ros.demo.config import DemoConfig
from clip3d_ros.tools import make_bag

log = logging.getLogger(__name__)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_world(train_config: Path) -> SyntheticConfig:
    """The synthetic world (sensors) the model is trained on, so the demo drives the same sensors."""
    from clip3d_core.training import load_train_config

    return load_train_config(train_config).data.typed_options().world


def prepare_bag(cfg: DemoConfig) -> tuple[Path, SyntheticConfig]:
    """The synthetic drive bag in `out/drive_bag`, rebuilt only when its recipe changed."""
    base = cfg.synthetic if cfg.synthetic is not None else training_world(cfg.train_config)
    synthetic = make_bag.drive_config(cfg.seconds, cfg.rate_hz, cfg.seed, base)
    recipe = {"synthetic": dataclasses.asdict(synthetic), "storage": cfg.storage}
    path, stamp = cfg.out / "drive_bag", cfg.out / "drive_bag.recipe.json"
    if path.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        log.info("reusing %s", path)
        return path, synthetic
    shutil.rmtree(path, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    make_bag.write_drive_bag(path, synthetic, storage=cfg.storage, workers=cfg.workers)
    stamp.write_text(json.dumps(recipe, indent=1))
    return path, synthetic


def prepare_checkpoint(cfg: DemoConfig, env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, how it was obtained)."""
    if cfg.checkpoint is not None:
        return cfg.checkpoint, {"source": "given", "path": str(cfg.checkpoint)}
    if cfg.untrained:
        from clip3d_core.checkpoint import build_untrained_checkpoint
        from clip3d_core.clip import tiny_clip_config
        from clip3d_core.data.synthetic.world import CLASS_NAMES
        from clip3d_core.model.config import ModelConfig

        path = cfg.out / "model" / "untrained.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_untrained_checkpoint(
                path, ModelConfig.small(embed_dim=32), tiny_clip_config(), vocabulary=list(CLASS_NAMES)
            )
        return path, {"source": "untrained", "path": str(path)}
    return train_checkpoint(cfg, env)


def train_checkpoint(cfg: DemoConfig, env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """`clip3d train --config <train_config>` unless a checkpoint of the same config text is cached."""
    key = _digest({"config": cfg.train_config.read_text(), "version": clip3d_core.__version__})
    cached = [cfg.out / "model" / f"trained-{key}.pt"]
    if cfg.cache_dir is not None:
        cached.append(cfg.cache_dir / f"demo-trained-{key}.pt")
    for path in cached:
        if path.is_file():
            log.info("reusing trained checkpoint %s", path)
            return path, {"source": "cache", "path": str(path), "config": str(cfg.train_config), "key": key}
    run_dir = cfg.out / "model" / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "clip3d_core.cli",
        "train",
        "--config",
        str(cfg.train_config),
        "--out",
        str(run_dir),
    ]
    log.info("training: %s", " ".join(cmd))
    t0 = time.monotonic()
    subprocess.run(cmd, env={"OMP_NUM_THREADS": str(cfg.node_threads), **env}, check=True)
    final = run_dir / "final.pt"
    if not final.is_file():
        raise FileNotFoundError(f"training finished without {final}")
    for path in cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(final, path)
    return cached[0], {
        "source": "trained",
        "path": str(cached[0]),
        "config": str(cfg.train_config),
        "key": key,
        "train_s": round(time.monotonic() - t0, 1),
    }


def checkpoint_vocabulary(path: Path) -> list[str]:
    from clip3d_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.vocabulary:
        return list(ckpt.vocabulary)
    from clip3d_core.data.synthetic.world import CLASS_NAMES

    return list(CLASS_NAMES)
