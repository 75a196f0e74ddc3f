"""Recording what the node publishes (raw CDR) into the labelled bag, with per-frame latency."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clip3d_ros import bag, markers
from clip3d_ros.demo.config import META_TOPIC, OBJECTS_TOPIC, OUTPUT_TOPIC, VOCAB_TOPIC
from clip3d_ros.tools import make_bag
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map

log = logging.getLogger(__name__)


class Recorder:
    """Subscribes (raw CDR) to the input cloud and the node's outputs; writes the outputs to a bag.

    Latency per frame = arrival of the labelled cloud - arrival of the input cloud with the same
    header stamp, both seen here (one host clock). The bag is written by a thread of its own:
    callbacks only enqueue (and sqlite connections must stay in the thread that opened them)."""

    def __init__(self, node: Any, path: Path, storage: str, start_ns: int) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import String
        from visualization_msgs.msg import MarkerArray

        self.start_ns = start_ns
        self.lock = threading.Lock()
        self.input_arrival: dict[int, float] = {}
        self.output_arrival: dict[int, float] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.vocabularies: dict[int, dict[str, Any]] = {}
        self.object_messages = 0  # MarkerArrays of a panoptic model (none from a semantic one)
        self._queue: queue.Queue[tuple[str, int, bytes] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._opened = threading.Event()
        self._thread = threading.Thread(
            target=self._write_loop, args=(path, storage), name="recorder", daemon=True
        )
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            raise self._error
        latched = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        cloud = make_bag.CLOUD_TOPIC
        node.create_subscription(PointCloud2, cloud, self._on_input, QoSProfile(depth=50), raw=True)
        node.create_subscription(PointCloud2, OUTPUT_TOPIC, self._on_output, QoSProfile(depth=10), raw=True)
        node.create_subscription(String, META_TOPIC, self._on_meta, QoSProfile(depth=50), raw=True)
        node.create_subscription(String, VOCAB_TOPIC, self._on_vocabulary, latched, raw=True)
        node.create_subscription(MarkerArray, OBJECTS_TOPIC, self._on_objects, QoSProfile(depth=10), raw=True)

    def _write_loop(self, path: Path, storage: str) -> None:
        try:
            with bag.BagWriter(path, storage) as writer:
                writer.add_topic(OUTPUT_TOPIC, bag.T_CLOUD)
                writer.add_topic(META_TOPIC, bag.T_STRING)
                writer.add_topic(VOCAB_TOPIC, bag.T_STRING, bag.QOS_LATCHED)
                writer.add_topic(OBJECTS_TOPIC, markers.T_MARKER_ARRAY)
                self._opened.set()
                while (item := self._queue.get()) is not None:
                    writer.write_raw(*item)
        except Exception as exc:  # reported by close()
            self._error = exc
            self._opened.set()

    def close(self) -> None:
        """Finish the bag (everything received so far is in it); counts stay readable."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing the labelled bag failed: {self._error}") from self._error

    def _on_input(self, raw: bytes) -> None:
        now = time.monotonic()
        with self.lock:
            self.input_arrival.setdefault(bag.peek_stamp_ns(raw), now)

    def _on_output(self, raw: bytes) -> None:
        now = time.monotonic()
        stamp = bag.peek_stamp_ns(raw)
        with self.lock:
            self.output_arrival[stamp] = now
        self._queue.put((OUTPUT_TOPIC, stamp, raw))

    def _on_objects(self, raw: bytes) -> None:
        msg = bag.deserialize(raw, markers.T_MARKER_ARRAY)  # a sequence first: no header to peek at
        if not msg.markers:  # the node always sends its DELETEALL (the cloud's header) first
            log.warning("empty objects MarkerArray")
            return
        with self.lock:
            self.object_messages += 1
        self._queue.put((OBJECTS_TOPIC, bag.stamp_ns(msg.markers[0].header), raw))

    def _on_meta(self, raw: bytes) -> None:
        try:
            meta = parse_labels_meta(bag.deserialize(raw, bag.T_STRING).data)
        except ValueError as exc:
            log.warning("bad labels_meta message: %s", exc)
            return
        stamp = meta["stamp"]["sec"] * 1_000_000_000 + meta["stamp"]["nanosec"]
        with self.lock:
            self.meta[stamp] = meta
        self._queue.put((META_TOPIC, stamp, raw))

    def _on_vocabulary(self, raw: bytes) -> None:
        try:
            vocab = parse_vocabulary_map(bag.deserialize(raw, bag.T_STRING).data)
        except ValueError as exc:
            log.warning("bad vocabulary map message: %s", exc)
            return
        with self.lock:
            # Bag time of a map = the newest data stamp seen, so it sorts before the clouds using it.
            stamp = max([*self.output_arrival, *self.input_arrival, self.start_ns])
            self.vocabularies[vocab["version"]] = vocab
        self._queue.put((VOCAB_TOPIC, stamp, raw))

    def playing_s(self) -> float:
        """Seconds since the first input cloud arrived (0 before)."""
        with self.lock:
            first = min(self.input_arrival.values(), default=None)
        return 0.0 if first is None else time.monotonic() - first

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.input_arrival), len(self.output_arrival)

    def latencies_ms(self) -> np.ndarray:
        with self.lock:
            return np.array(
                [
                    (t - self.input_arrival[s]) * 1e3
                    for s, t in self.output_arrival.items()
                    if s in self.input_arrival
                ]
            )


def _drain(recorder: Recorder, timeout: float) -> None:
    """After the replay: wait until the node has answered every frame it took (no new output
    for a few seconds) or `timeout`."""
    deadline, quiet = time.monotonic() + timeout, 0.0
    last = recorder.counts()[1]
    while time.monotonic() < deadline and quiet < 3.0:
        time.sleep(0.25)
        now = recorder.counts()[1]
        quiet = 0.0 if now != last else quiet + 0.25
        last = now
