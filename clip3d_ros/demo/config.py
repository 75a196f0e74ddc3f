"""Demo settings and the files it ships with (found in the source tree or the installed package)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clip3d_core.data.synthetic.config import SyntheticConfig

log = logging.getLogger(__name__)

PACKAGE = "clip3d_ros"
SOURCE_TREE = Path(__file__).resolve().parents[2]  # <repo>/clip3d_ros/demo/../..


def shipped_file(relative: str) -> Path:
    """A file the demo needs that lives beside the package, not in it (`training/...`,
    `config/...`): the source tree's when run from a checkout, else the installed copy in
    share/clip3d_ros (setup.py's data files: colcon's ament prefix, or sys.prefix for pip)."""
    candidates = [SOURCE_TREE / relative]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / relative)
    except (ImportError, LookupError, OSError):  # not in an ament prefix
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / relative)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative}: not in {[str(c.parent) for c in candidates]}")


NODE = "clip3d"
OUTPUT_TOPIC = f"/{NODE}/labelled_points"
OBJECTS_TOPIC = f"/{NODE}/objects"  # panoptic models: the launch file's and label-bag's default
META_TOPIC = f"/{NODE}/labels_meta"
VOCAB_TOPIC = f"/{NODE}/vocabulary"
# Set part-way through the replay: coarser classes, built from the synthetic world's class names
# (synonyms are averaged in text space, so a merged class still points where its members do).
VOCABULARY_V2 = [
    "road",
    "sidewalk",
    "building",
    "vegetation|tree|grass",
    "vehicle|car|truck|bus",
    "person|pedestrian|bicyclist|motorcyclist",
    "pole|traffic sign|traffic light",
]


@dataclass
class DemoConfig:
    out: Path
    seconds: float = 20.0
    rate_hz: float = 10.0
    seed: int = 0
    storage: str = "sqlite3"
    replay_rate: float = 1.0
    checkpoint: Path | None = None  # use this model instead of training one
    untrained: bool = False  # random weights (wiring checks, tests)
    train_config: Path = field(default_factory=lambda: shipped_file("training/synthetic_tiny.yaml"))
    cache_dir: Path | None = None  # trained checkpoints keyed by config hash (besides `out`)
    vocabulary_v2: list[str] = field(default_factory=lambda: list(VOCABULARY_V2))
    change_at: float = 0.4  # fraction of the replay after which the vocabulary changes
    pictures: int = 4  # frames drawn as PNGs
    workers: int = max(1, min(2, os.cpu_count() or 1))  # bag rendering processes
    domain_id: int | None = None  # None: $ROS_DOMAIN_ID, else derived from the process id
    synthetic: SyntheticConfig | None = None  # base world config; None: the training config's
    # torch threads of the node and of training: OpenMP threads spin-wait, so on a 2-core machine
    # shared with the replay and this recorder one thread is several times faster than two.
    node_threads: int = 1
    node_start_timeout: float = 180.0
    drain_timeout: float = 30.0  # after the replay: wait this long at most for the last outputs
