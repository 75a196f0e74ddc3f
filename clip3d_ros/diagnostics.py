"""Node health -> diagnostic_msgs/DiagnosticArray on /diagnostics.

`PipelineDiagnostics` is a thread-safe accumulator the node feeds from its callbacks and worker;
`message()` turns it into one DiagnosticStatus per concern (pipeline, input, each camera,
vocabulary). Levels look at what happened since the previous report, so a transient problem
shows as WARN for one period and clears; totals stay in the values. Rates come from header stamps
(data time), so they are right under bag replay at any speed.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CameraHealth", "PipelineDiagnostics", "percentile", "stamp_rate_hz"]

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def stamp_rate_hz(stamps: Sequence[int]) -> float:
    """Messages per second over a window of header stamps (ns); nan with fewer than two."""
    if len(stamps) < 2:
        return float("nan")
    span = max(stamps) - min(stamps)
    return (len(stamps) - 1) * 1e9 / span if span > 0 else float("nan")


@dataclass
class CameraHealth:
    name: str
    images: int = 0
    used: int = 0
    missing: int = 0
    errors: int = 0
    last_error: str = ""
    stamps: deque[int] = field(default_factory=lambda: deque(maxlen=50))
    offsets_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))  # |image - cloud| stamps


@dataclass
class _Since:
    """Counters at the previous report, to tell fresh problems from old ones."""

    dropped: int = 0
    errors: int = 0
    bad_inputs: int = 0
    camera_missing: dict[int, int] = field(default_factory=dict)
    camera_errors: dict[int, int] = field(default_factory=dict)
    vocabulary_failures: int = 0


class PipelineDiagnostics:
    def __init__(self, camera_names: Sequence[str], budget_ms: float, window: int = 200) -> None:
        self.budget_ms = float(budget_ms)
        self.cameras = [CameraHealth(n) for n in camera_names]
        self._lock = threading.Lock()
        self._cloud_stamps: deque[int] = deque(maxlen=50)
        self._out_stamps: deque[int] = deque(maxlen=50)
        self._total_ms: deque[float] = deque(maxlen=window)
        self._model_ms: deque[float] = deque(maxlen=window)
        self._header_to_publish_ms: deque[float] = deque(maxlen=window)
        self.clouds = 0
        self.frames = 0
        self.lidar_only = 0
        self.unsynchronised = 0
        self.dropped = 0
        self.queue_depth = 0
        self.queue_high_water = 0
        self.queue_limit = 0
        self.skipped = 0
        self.errors = 0
        self.last_error = ""
        self.sync_resets = 0
        self.bad_inputs: Counter[str] = Counter()
        self.last_bad_input = ""
        self.vocabulary_version: int | None = None
        self.vocabulary_names: list[str] = []
        self.vocabulary_failures = 0
        self.last_vocabulary_failure = ""
        self._since = _Since()

    # ------------------------------------------------------------------ events
    def on_cloud(self, stamp_ns: int) -> None:
        with self._lock:
            self.clouds += 1
            self._cloud_stamps.append(stamp_ns)

    def on_image(self, camera: int, stamp_ns: int) -> None:
        with self._lock:
            cam = self.cameras[camera]
            cam.images += 1
            cam.stamps.append(stamp_ns)

    def on_frame(
        self,
        stamp_ns: int,
        total_ms: float,
        model_ms: float,
        header_to_publish_ms: float,
        used: dict[int, int],
        missing: Sequence[int],
    ) -> None:
        """A labelled cloud went out; `used` maps camera index -> its image stamp."""
        with self._lock:
            self.frames += 1
            self._out_stamps.append(stamp_ns)
            self._total_ms.append(total_ms)
            self._model_ms.append(model_ms)
            self._header_to_publish_ms.append(header_to_publish_ms)
            for i, image_stamp in used.items():
                self.cameras[i].used += 1
                self.cameras[i].offsets_ms.append(abs(image_stamp - stamp_ns) / 1e6)
            for i in missing:
                self.cameras[i].missing += 1
            if missing:
                self.unsynchronised += 1
            if self.cameras and not used:
                self.lidar_only += 1

    def on_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def on_queue(self, depth: int, high_water: int | None = None, limit: int | None = None) -> None:
        """Frames waiting for the model now; the most ever waiting; the per-sensor limit."""
        with self._lock:
            self.queue_depth = int(depth)
            if high_water is not None:
                self.queue_high_water = max(self.queue_high_water, int(high_water))
            if limit is not None:
                self.queue_limit = int(limit)

    def on_skipped(self) -> None:
        with self._lock:
            self.skipped += 1

    def on_bad_input(self, kind: str, reason: str) -> None:
        with self._lock:
            self.bad_inputs[kind] += 1
            self.last_bad_input = f"{kind}: {reason}"

    def on_camera_error(self, camera: int, reason: str) -> None:
        with self._lock:
            self.cameras[camera].errors += 1
            self.cameras[camera].last_error = reason

    def on_error(self, reason: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = reason

    def on_sync_reset(self) -> None:
        with self._lock:
            self.sync_resets += 1
            # Rates come from stamp spans: windows mixing both sides of a 500 s jump read ~0 Hz.
            self._cloud_stamps.clear()
            self._out_stamps.clear()
            for cam in self.cameras:
                cam.stamps.clear()

    def on_vocabulary(self, version: int, names: Sequence[str]) -> None:
        with self._lock:
            self.vocabulary_version = int(version)
            self.vocabulary_names = list(names)

    def on_vocabulary_failure(self, reason: str) -> None:
        with self._lock:
            self.vocabulary_failures += 1
            self.last_vocabulary_failure = reason

    # ------------------------------------------------------------------ reports
    def snapshot(self) -> dict[str, Any]:
        """Plain numbers (tests, benchmarks, logs)."""
        with self._lock:
            return {
                "clouds": self.clouds,
                "frames": self.frames,
                "dropped": self.dropped,
                "queue_depth": self.queue_depth,
                "queue_high_water": self.queue_high_water,
                "skipped": self.skipped,
                "errors": self.errors,
                "lidar_only": self.lidar_only,
                "unsynchronised": self.unsynchronised,
                "sync_resets": self.sync_resets,
                "bad_inputs": dict(self.bad_inputs),
                "rate_in_hz": stamp_rate_hz(self._cloud_stamps),
                "rate_out_hz": stamp_rate_hz(self._out_stamps),
                "latency_p50_ms": percentile(self._total_ms, 50),
                "latency_p99_ms": percentile(self._total_ms, 99),
                "model_p50_ms": percentile(self._model_ms, 50),
                "header_to_publish_p50_ms": percentile(self._header_to_publish_ms, 50),
                "header_to_publish_p99_ms": percentile(self._header_to_publish_ms, 99),
                "vocabulary_version": self.vocabulary_version,
                "cameras": {
                    c.name: {"images": c.images, "used": c.used, "missing": c.missing, "errors": c.errors}
                    for c in self.cameras
                },
            }

    def statuses(self, hardware_id: str = "clip3d") -> list[tuple[int, str, str, list[tuple[str, str]]]]:
        """(level, name, message, [(key, value)]) per concern; advances the 'since last report' marks."""
        snap = self.snapshot()
        with self._lock:
            out = [self._pipeline(snap), self._input(snap)]
            out += [self._camera(i, snap) for i in range(len(self.cameras))]
            out.append(self._vocabulary())
            self._since = _Since(
                dropped=self.dropped,
                errors=self.errors,
                bad_inputs=sum(self.bad_inputs.values()),
                camera_missing={i: c.missing for i, c in enumerate(self.cameras)},
                camera_errors={i: c.errors for i, c in enumerate(self.cameras)},
                vocabulary_failures=self.vocabulary_failures,
            )
        return [(lvl, f"{hardware_id}: {name}", msg, kv) for lvl, name, msg, kv in out]

    def message(self, stamp: Any, hardware_id: str = "clip3d") -> Any:
        """A diagnostic_msgs/DiagnosticArray stamped `stamp` (builtin_interfaces/Time)."""
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        arr = DiagnosticArray()
        arr.header.stamp = stamp
        for level, name, msg, kv in self.statuses(hardware_id):
            arr.status.append(
                DiagnosticStatus(
                    level=bytes([level]),
                    name=name,
                    message=msg,
                    hardware_id=hardware_id,
                    values=[KeyValue(key=k, value=v) for k, v in kv],
                )
            )
        return arr

    # ------------------------------------------------------------------ per concern
    def _pipeline(self, s: dict[str, Any]) -> tuple[int, str, str, list[tuple[str, str]]]:
        new_drops = self.dropped - self._since.dropped
        new_errors = self.errors - self._since.errors
        p99 = s["latency_p99_ms"]
        level, msg = OK, f"{s['frames']} frames labelled"
        if new_drops:
            level, msg = WARN, (
                f"{new_drops} frames dropped: model behind (queue of {self.queue_limit} per sensor full)"
            )
        if p99 == p99 and p99 > self.budget_ms:
            level, msg = WARN, f"p99 latency {p99:.1f} ms over budget {self.budget_ms:.1f} ms"
        if new_errors:
            level, msg = ERROR, f"{new_errors} frames failed: {self.last_error}"
        if s["clouds"] == 0:
            level, msg = WARN, "no cloud received yet"
        kv = [
            ("frames", s["frames"]),
            ("clouds_received", s["clouds"]),
            ("rate_in_hz", _f(s["rate_in_hz"])),
            ("rate_out_hz", _f(s["rate_out_hz"])),
            ("latency_p50_ms", _f(s["latency_p50_ms"])),
            ("latency_p99_ms", _f(p99)),
            ("model_p50_ms", _f(s["model_p50_ms"])),
            ("header_to_publish_p50_ms", _f(s["header_to_publish_p50_ms"])),
            ("header_to_publish_p99_ms", _f(s["header_to_publish_p99_ms"])),
            ("budget_ms", _f(self.budget_ms)),
            ("dropped_frames", s["dropped"]),
            ("queue_depth", s["queue_depth"]),
            ("queue_high_water", s["queue_high_water"]),
            ("queue_limit_per_sensor", self.queue_limit),
            ("unsynchronised_frames", s["unsynchronised"]),
            ("lidar_only_frames", s["lidar_only"]),
            ("skipped_no_subscribers", s["skipped"]),
            ("sync_resets", s["sync_resets"]),
            ("processing_errors", s["errors"]),
            ("last_error", self.last_error),
        ]
        return level, "pipeline", msg, [(k, str(v)) for k, v in kv]

    def _input(self, s: dict[str, Any]) -> tuple[int, str, str, list[tuple[str, str]]]:
        total = sum(self.bad_inputs.values())
        new = total - self._since.bad_inputs
        level, msg = (
            (WARN, f"{new} bad messages skipped; last {self.last_bad_input}") if new else (OK, "inputs ok")
        )
        kv = [("bad_messages", str(total)), ("last_bad_message", self.last_bad_input)]
        kv += [(f"bad_{kind}", str(n)) for kind, n in sorted(self.bad_inputs.items())]
        return level, "input", msg, kv

    def _camera(self, i: int, s: dict[str, Any]) -> tuple[int, str, str, list[tuple[str, str]]]:
        c = self.cameras[i]
        new_missing = c.missing - self._since.camera_missing.get(i, 0)
        new_errors = c.errors - self._since.camera_errors.get(i, 0)
        level, msg = OK, "ok"
        if new_missing:
            level, msg = WARN, f"missing or late in {new_missing} frames (labelled without it)"
        if new_errors:
            level, msg = WARN, f"{new_errors} unusable images/calibrations: {c.last_error}"
        if c.images == 0:
            level, msg = (ERROR, "no image received") if s["frames"] else (WARN, "no image received yet")
        kv = [
            ("images", str(c.images)),
            ("rate_hz", _f(stamp_rate_hz(c.stamps))),
            ("used_frames", str(c.used)),
            ("missing_frames", str(c.missing)),
            ("sync_offset_p50_ms", _f(percentile(c.offsets_ms, 50))),
            ("errors", str(c.errors)),
            ("last_error", c.last_error),
        ]
        return level, f"camera {c.name}", msg, kv

    def _vocabulary(self) -> tuple[int, str, str, list[tuple[str, str]]]:
        new = self.vocabulary_failures - self._since.vocabulary_failures
        if self.vocabulary_version is None:
            level, msg = WARN, "no vocabulary active yet"
        elif new:
            level, msg = WARN, f"vocabulary update failed: {self.last_vocabulary_failure}"
        else:
            level, msg = OK, f"version {self.vocabulary_version}, {len(self.vocabulary_names)} classes"
        names = ", ".join(self.vocabulary_names)
        kv = [
            ("version", str(self.vocabulary_version)),
            ("size", str(len(self.vocabulary_names))),
            ("names", names if len(names) <= 400 else names[:397] + "..."),
            ("update_failures", str(self.vocabulary_failures)),
            ("last_failure", self.last_vocabulary_failure),
        ]
        return level, "vocabulary", msg, kv


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:.2f}"
