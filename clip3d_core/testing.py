"""Helpers shared by tests, benchmarks and demos (no pytest import here)."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real-sample folder: $CLIP3D_SHARED_DATA, else `<repo>/../shared/data`; None if absent."""
    env = os.environ.get("CLIP3D_SHARED_DATA")
    candidates = [Path(env)] if env else [_REPO.parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    return None
