"""Resumable training state: RNG streams and the optimizer/scheduler sidecar of each checkpoint.

A training checkpoint is two files written by rank 0:
- `iter_XXXXXXX.pt`: a standard clip3d model checkpoint (`clip3d_core.checkpoint`), directly
  loadable by `Segmenter.from_checkpoint`, whose `meta` says which run/stage/iteration made it;
- `iter_XXXXXXX.state.pt`: what resuming needs besides the weights (optimizer, scheduler, AMP
  scaler, iteration, stage, per-rank RNG states, self-training thresholds).
The sidecar is written last, so a checkpoint counts as complete only when both files exist.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state.pt"
_NAME = re.compile(r"^iter_(\d{7,})\.pt$")


class ResumeError(ValueError):
    """A resume was requested but no usable training state exists."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:07d}.pt"


def state_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name[: -len(".pt")] + STATE_SUFFIX)


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(iteration, model path) of every checkpoint with its sidecar, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m and state_path(path).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(model_path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, state_path(model_path))


def load_state(model_path: Path) -> dict[str, Any]:
    path = state_path(model_path)
    try:
        # Our own file: optimizer state and numpy RNG tuples are not plain tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ResumeError(f"cannot read training state {path}: {exc}") from exc


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (0 = keep all)."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(directory)[:-keep]:
        for p in (path, state_path(path)):
            p.unlink(missing_ok=True)
        log.debug("pruned %s", path)
