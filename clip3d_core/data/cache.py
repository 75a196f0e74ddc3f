"""`FrameCache`: remembers the frames of a deterministic dataset, in memory and optionally on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from clip3d_core.config import to_dict
from clip3d_core.data.frame import Frame

log = logging.getLogger(__name__)


class FrameCache(Dataset[Frame]):
    """Remembers the frames of a deterministic dataset: in memory and, with `directory`, on disk
    (one pickle per frame under a key of the dataset description). Synthetic frames take seconds
    to ray-cast, and the same frames are revisited every epoch."""

    def __init__(self, dataset: Dataset[Frame], *, key: str, directory: str | Path | None = None,
                 memory: bool = True) -> None:
        self.dataset = dataset
        self.memory = memory
        self._frames: dict[int, Frame] = {}
        self.directory = None if directory is None else Path(directory) / key
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.dataset.class_names)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Frame:
        if index in self._frames:
            return self._frames[index]
        frame = None
        path = None if self.directory is None else self.directory / f"{index:06d}.pkl"
        if path is not None and path.is_file():
            try:
                with open(path, "rb") as f:
                    frame = pickle.load(f)  # our own cache files
            except (OSError, pickle.UnpicklingError, EOFError) as exc:
                log.warning("frame cache %s unreadable (%s): regenerating", path, exc)
        if frame is None:
            frame = self.dataset[index]
            if path is not None:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    pickle.dump(frame, f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, path)
        if self.memory:
            self._frames[index] = frame
        return frame


def synthetic_key(cfg: Any) -> str:
    """Cache folder of a synthetic world config: frame i depends only on (config, i)."""
    return "synthetic-" + hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
