"""Approximate-time synchronisation of one LiDAR cloud with N camera images, by header stamps.

Two layers:

* `ApproximateTimeSynchronizer` - message_filters' Python `ApproximateTimeSynchronizer` policy on
  integer-nanosecond stamps: one queue per input keyed by stamp (oldest evicted beyond
  `queue_size`); on each arrival, look for one entry per other input within `slop` of it whose
  whole set spans less than `slop`, closest first; emit it and remove it from the queues. When
  message_filters is importable, `make_matcher` wraps the real one instead.
* `CloudCameraSync` - the node's policy around it. Full sets come from the matcher. A cloud never
  waits for a dead camera: once every camera is *decided* (it has delivered an image stamped at
  or after the cloud, so no later one can be nearer) or `camera_timeout` has passed since the
  cloud arrived, the cloud goes out with the nearest image of each camera within `slop` (possibly
  none). Every cloud in comes out exactly once, in stamp order; a stamp jumping backwards (a
  looped bag) resets the queues instead of wedging them (message_filters would evict the *new*
  messages as "oldest" forever).

Stamps are header stamps; `now_ns` is the caller's clock (the node's ROS clock, sim-time aware)
and is used only for the camera timeout. A steady backstop (`STEADY_BACKSTOP_S` of this host's
monotonic time since arrival) releases clouds even when that clock stands still: a bag's /clock
ends with its last message, and `ros2 bag play` without `--clock` never starts one.
"""

from __future__ import annotations

import itertools
import threading
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ApproximateTimeSynchronizer",
    "CloudCameraSync",
    "Matcher",
    "MessageFiltersSynchronizer",
    "SyncedFrame",
    "make_matcher",
    "message_filters_available",
]

NS = 1_000_000_000
STEADY_BACKSTOP_S = 1.0  # floor of the steady-time camera timeout (see the module docstring)


class Matcher(Protocol):
    """What `CloudCameraSync` needs from a synchroniser."""

    slop: float

    def add(self, index: int, stamp_ns: int, item: Any) -> tuple[Any, ...] | None: ...

    def reset(self) -> None: ...


class ApproximateTimeSynchronizer:
    """message_filters' ApproximateTimeSynchronizer policy without ROS types; thread-safe.

    `add` returns the matched items (input order) or None; registered callbacks get them too."""

    def __init__(self, num_inputs: int, queue_size: int, slop: float) -> None:
        if num_inputs < 1 or queue_size < 1 or not slop > 0:
            raise ValueError(
                f"need num_inputs >= 1, queue_size >= 1, slop > 0; got {num_inputs}, {queue_size}, {slop}"
            )
        self.queue_size = int(queue_size)
        self.slop = float(slop)
        self._queues: list[dict[int, Any]] = [{} for _ in range(num_inputs)]
        self._callbacks: list[Callable[..., None]] = []
        self._lock = threading.Lock()

    def register_callback(self, cb: Callable[..., None]) -> None:
        self._callbacks.append(cb)

    def reset(self) -> None:
        with self._lock:
            for q in self._queues:
                q.clear()

    def queued(self, index: int) -> list[int]:
        with self._lock:
            return sorted(self._queues[index])

    def add(self, index: int, stamp_ns: int, item: Any) -> tuple[Any, ...] | None:
        slop_ns = round(self.slop * NS)
        with self._lock:
            mine = self._queues[index]
            mine[stamp_ns] = item
            while len(mine) > self.queue_size:
                del mine[min(mine)]
            candidates: list[list[int]] = []
            for i, q in enumerate(self._queues):
                if i == index:
                    continue
                near = sorted((abs(s - stamp_ns), s) for s in q if abs(s - stamp_ns) <= slop_ns)
                if not near:
                    return None
                candidates.append([s for _, s in near])
            matched = None
            for combo in itertools.product(*candidates):
                stamps = list(combo)
                stamps.insert(index, stamp_ns)
                if max(stamps) - min(stamps) < slop_ns and all(s in q for s, q in zip(stamps, self._queues)):
                    matched = tuple(q.pop(s) for s, q in zip(stamps, self._queues))
                    break
        if matched is not None:
            for cb in self._callbacks:
                cb(*matched)
        return matched


class MessageFiltersSynchronizer:
    """The same interface over message_filters' own ApproximateTimeSynchronizer (items must be
    messages with `header.stamp`, as there)."""

    def __init__(self, num_inputs: int, queue_size: int, slop: float) -> None:
        import message_filters

        self._mf = message_filters
        self._num_inputs, self.queue_size, self._slop = num_inputs, int(queue_size), float(slop)
        self._matched: list[tuple[Any, ...]] = []
        self._build()

    def _build(self) -> None:
        self._inputs = [self._mf.SimpleFilter() for _ in range(self._num_inputs)]
        self._sync = self._mf.ApproximateTimeSynchronizer(self._inputs, self.queue_size, self._slop)
        self._sync.registerCallback(lambda *msgs: self._matched.append(msgs))

    @property
    def slop(self) -> float:
        return self._slop

    @slop.setter
    def slop(self, value: float) -> None:
        from rclpy.duration import Duration

        self._slop = float(value)
        self._sync.slop = Duration(seconds=self._slop)

    def reset(self) -> None:
        self._build()

    def add(self, index: int, stamp_ns: int, item: Any) -> tuple[Any, ...] | None:
        self._matched.clear()
        self._inputs[index].signalMessage(item)
        return self._matched[0] if self._matched else None


def message_filters_available() -> bool:
    try:
        import message_filters  # noqa: F401
    except ImportError:
        return False
    return True


def make_matcher(
    num_inputs: int, queue_size: int, slop: float, *, prefer_message_filters: bool = True
) -> Matcher:
    """message_filters' synchroniser where importable (and wanted), else the built-in one."""
    if prefer_message_filters and message_filters_available():
        return MessageFiltersSynchronizer(num_inputs, queue_size, slop)
    return ApproximateTimeSynchronizer(num_inputs, queue_size, slop)


@dataclass
class SyncedFrame:
    """A cloud with the image chosen for each camera (None where the camera had none in time)."""

    cloud: Any
    stamp_ns: int
    receipt_ns: int
    images: tuple[Any | None, ...]
    matched: bool  # True: a full approximate-time set; False: released by timeout / decided cameras

    @property
    def complete(self) -> bool:
        return all(img is not None for img in self.images)

    @property
    def missing(self) -> list[int]:
        return [i for i, img in enumerate(self.images) if img is None]


@dataclass
class _Pending:
    cloud: Any
    stamp_ns: int
    receipt_ns: int
    steady_ns: int  # this host's monotonic clock at arrival (the backstop)


class CloudCameraSync:
    """LiDAR-pivoted synchroniser (see the module docstring). Thread-safe; all methods return the
    frames that became ready, oldest first. `matcher` (input 0 = cloud, i + 1 = camera i) defaults
    to the built-in `ApproximateTimeSynchronizer`, which takes any items; `make_matcher` picks
    message_filters' where importable (items must then be messages with headers)."""

    def __init__(
        self,
        num_cameras: int,
        *,
        queue_size: int = 10,
        slop: float = 0.05,
        camera_timeout: float = 0.15,
        jump_threshold: float = 1.0,
        matcher: Matcher | None = None,
    ) -> None:
        if num_cameras < 0:
            raise ValueError(f"num_cameras must be >= 0, got {num_cameras}")
        self.num_cameras = num_cameras
        self.queue_size = int(queue_size)
        self._slop = float(slop)
        self.camera_timeout = float(camera_timeout)
        self.jump_threshold = float(jump_threshold)
        self._matcher = matcher
        if num_cameras and matcher is None:
            self._matcher = ApproximateTimeSynchronizer(num_cameras + 1, queue_size, slop)
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._images: list[list[tuple[int, Any]]] = [[] for _ in range(num_cameras)]  # sorted by stamp
        self._latest: list[int | None] = [None] * (num_cameras + 1)
        self._lock = threading.RLock()
        self.resets = 0

    # ------------------------------------------------------------------ settings
    @property
    def matcher(self) -> Matcher | None:
        return self._matcher

    @property
    def slop(self) -> float:
        return self._slop

    @slop.setter
    def slop(self, value: float) -> None:
        with self._lock:
            self._slop = float(value)
            if self._matcher is not None:
                self._matcher.slop = float(value)

    # ------------------------------------------------------------------ inputs
    def add_cloud(self, cloud: Any, stamp_ns: int, now_ns: int) -> list[SyncedFrame]:
        with self._lock:
            out = self._check_jump(0, stamp_ns)
            if self.num_cameras == 0:
                return [*out, SyncedFrame(cloud, stamp_ns, now_ns, (), True)]
            if stamp_ns in self._pending:  # a second cloud with this stamp: the first goes out as is
                out.append(self._partial(self._pending.pop(stamp_ns)))
            self._pending[stamp_ns] = _Pending(cloud, stamp_ns, now_ns, time.monotonic_ns())
            self._pending.move_to_end(stamp_ns)
            out += self._match(0, stamp_ns, cloud)
            out += self._release(now_ns)
            return out

    def add_image(self, camera: int, image: Any, stamp_ns: int, now_ns: int) -> list[SyncedFrame]:
        with self._lock:
            out = self._check_jump(camera + 1, stamp_ns)
            buf = self._images[camera]
            pos = bisect_left([s for s, _ in buf], stamp_ns)
            if pos < len(buf) and buf[pos][0] == stamp_ns:
                buf[pos] = (stamp_ns, image)
            else:
                buf.insert(pos, (stamp_ns, image))
                del buf[: max(len(buf) - self.queue_size, 0)]
            out += self._match(camera + 1, stamp_ns, image)
            out += self._release(now_ns)
            return out

    def poll(self, now_ns: int) -> list[SyncedFrame]:
        """Release clouds whose camera timeout has expired (call periodically)."""
        with self._lock:
            return self._release(now_ns)

    def flush(self) -> list[SyncedFrame]:
        """Release every pending cloud now (shutdown)."""
        with self._lock:
            out = [self._partial(p) for p in self._pending.values()]
            self._pending.clear()
            return out

    def reset(self) -> list[SyncedFrame]:
        """Forget all queued images and stamps; pending clouds are released (not lost)."""
        with self._lock:
            out = self.flush()
            for buf in self._images:
                buf.clear()
            self._latest = [None] * (self.num_cameras + 1)
            if self._matcher is not None:
                self._matcher.reset()
            self.resets += 1
            return out

    # ------------------------------------------------------------------ internals
    def _check_jump(self, index: int, stamp_ns: int) -> list[SyncedFrame]:
        latest = self._latest[index]
        out: list[SyncedFrame] = []
        if latest is not None and stamp_ns < latest - round(self.jump_threshold * NS):
            out = self.reset()
        self._latest[index] = stamp_ns if self._latest[index] is None else max(self._latest[index], stamp_ns)
        return out

    def _match(self, index: int, stamp_ns: int, item: Any) -> list[SyncedFrame]:
        matched = self._matcher.add(index, stamp_ns, item) if self._matcher is not None else None
        if matched is None:
            return []
        cloud = matched[0]
        key = next((k for k, p in self._pending.items() if p.cloud is cloud), None)
        if key is None:  # already released by timeout: this set comes too late
            return []
        p = self._pending.pop(key)
        # Frames leave in stamp order: older clouds still waiting go first, with what they have.
        older = sorted(k for k in self._pending if k < p.stamp_ns)
        out = [self._partial(self._pending.pop(k)) for k in older]
        return [*out, SyncedFrame(p.cloud, p.stamp_ns, p.receipt_ns, tuple(matched[1:]), True)]

    def _decided(self, camera: int, stamp_ns: int) -> bool:
        # Stamps rise per camera, so once it delivered an image stamped at or after the cloud, no
        # later image can be nearer to it: its best image (or its absence) is known.
        latest = self._latest[camera + 1]
        return latest is not None and latest >= stamp_ns

    def _nearest(self, camera: int, stamp_ns: int) -> tuple[int, Any] | None:
        slop_ns = round(self._slop * NS)
        best = min(self._images[camera], key=lambda e: abs(e[0] - stamp_ns), default=None)
        return best if best is not None and abs(best[0] - stamp_ns) <= slop_ns else None

    def _partial(self, p: _Pending) -> SyncedFrame:
        chosen = [self._nearest(c, p.stamp_ns) for c in range(self.num_cameras)]
        return SyncedFrame(
            p.cloud, p.stamp_ns, p.receipt_ns, tuple(None if c is None else c[1] for c in chosen), False
        )

    def _release(self, now_ns: int) -> list[SyncedFrame]:
        timeout_ns = round(self.camera_timeout * NS)
        steady_now, backstop_ns = time.monotonic_ns(), round(max(self.camera_timeout, STEADY_BACKSTOP_S) * NS)
        keys = sorted(self._pending)
        last = -1  # release every cloud up to the newest one that is due (stamp order)
        for i, key in enumerate(keys):
            p = self._pending[key]
            if now_ns < p.receipt_ns:  # the clock went backwards: re-anchor instead of waiting forever
                p.receipt_ns = now_ns
            due = (
                len(keys) - i > self.queue_size
                or now_ns - p.receipt_ns >= timeout_ns
                or steady_now - p.steady_ns >= backstop_ns
                or all(self._decided(c, p.stamp_ns) for c in range(self.num_cameras))
            )
            if due:
                last = i
        return [self._partial(self._pending.pop(k)) for k in keys[: last + 1]]
