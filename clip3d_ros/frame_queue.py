"""The node's hand-over from callbacks to the worker: a bounded queue per sensor.

Policy: each sensor (the cloud's `frame_id`: several LiDARs may share a topic) keeps at most
`depth` frames waiting for the model; when a new frame finds its sensor's queue full, the oldest
waiting one is dropped (newest kept: latency stays bounded when the model is behind, and a burst
shorter than `depth` - two LiDARs with one stamp, two frames within a millisecond - loses
nothing). The worker takes frames in arrival order across sensors.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["FrameQueue"]


class FrameQueue:
    """Not thread-safe by itself: the node guards it with its worker condition."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self._queues: dict[Hashable, deque[tuple[int, Any]]] = {}
        self._seq = itertools.count()
        self.high_water = 0

    def put(self, key: Hashable, item: Any) -> int:
        """Queue `item` for sensor `key`; returns how many older frames were dropped for it."""
        q = self._queues.setdefault(key, deque())
        q.append((next(self._seq), item))
        dropped = 0
        while len(q) > self.depth:
            q.popleft()
            dropped += 1
        self.high_water = max(self.high_water, len(self))
        return dropped

    def pop(self) -> Any | None:
        """The earliest-queued frame of any sensor (None when empty)."""
        heads = [(q[0][0], key) for key, q in self._queues.items() if q]
        if not heads:
            return None
        _, key = min(heads)
        item = self._queues[key].popleft()[1]
        if not self._queues[key]:
            del self._queues[key]
        return item

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())
