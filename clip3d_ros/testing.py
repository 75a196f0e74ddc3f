"""Helpers for the ROS tests and the node benchmark (no pytest import here).

`FakeSegmenter` stands in for `clip3d_core.segmenter.Segmenter` where the model is not what is
being measured: it has the same vocabulary API (versions, atomic swap) and a cheap, deterministic
labelling rule that depends on the vocabulary, so a frame labelled with the wrong vocabulary is
detectable: label = floor(|x| * 10) mod len(vocabulary); non-finite points are unlabelled.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from clip3d_core.clip import Vocabulary
from clip3d_core.labels import UNLABELLED
from clip3d_core.segmenter import SegmentationResult

__all__ = ["FakeSegmenter", "fake_labels", "ros_domain_id", "wait_for"]


def fake_labels(xyz: np.ndarray, num_classes: int) -> np.ndarray:
    """`FakeSegmenter`'s rule, for checking its output: uint16 [N]."""
    xyz = np.asarray(xyz, dtype=np.float32)
    finite = np.isfinite(xyz).all(axis=1)
    labels = np.full(len(xyz), UNLABELLED, dtype=np.uint16)
    labels[finite] = (np.floor(np.abs(xyz[finite, 0]) * 10).astype(np.int64) % num_classes).astype(np.uint16)
    return labels


class FakeSegmenter:
    """Vocabulary versions and swaps like the real Segmenter; labels by `fake_labels`.

    `encode_delay_s` / `segment_delay_s` simulate text-encoder and model time. `encoded` maps each
    version handed out to its entries; `calls` records (version, num_points, num_images) per frame,
    `last_cameras` the cameras of the last one."""

    def __init__(self, encode_delay_s: float = 0.0, segment_delay_s: float = 0.0) -> None:
        self.encode_delay_s = encode_delay_s
        self.segment_delay_s = segment_delay_s
        self._versions = itertools.count(1)
        self._lock = threading.Lock()
        self._state: tuple[Vocabulary, np.ndarray] | None = None
        self.encoded: dict[int, list[str]] = {}
        self.calls: list[tuple[int, int, int]] = []
        self.last_cameras: list[Any] = []
        self.panoptic = None  # a semantic model: no `instance` field

    @property
    def vocabulary(self) -> Vocabulary | None:
        return None if self._state is None else self._state[0]

    def check_vocabulary(self, names: list[str] | Vocabulary) -> None:
        if not isinstance(names, Vocabulary):
            Vocabulary.from_strings(names)  # any valid vocabulary encodes

    def encode_vocabulary(self, names: list[str]) -> tuple[Vocabulary, np.ndarray]:
        version = next(self._versions)
        vocab = (
            Vocabulary(names.entries, version=version)
            if isinstance(names, Vocabulary)
            else Vocabulary.from_strings(names, version=version)
        )
        time.sleep(self.encode_delay_s)
        with self._lock:
            self.encoded[vocab.version] = vocab.to_strings()
        return vocab, np.eye(len(vocab), dtype=np.float32)

    def swap_vocabulary(self, vocabulary: Vocabulary, text: Any) -> bool:
        with self._lock:
            if self._state is not None and vocabulary.version < self._state[0].version:
                return False
            self._state = (vocabulary, text)
        return True

    def segment(
        self,
        points: np.ndarray,
        images: list[np.ndarray] | None = None,
        cameras: list[Any] | None = None,
        *,
        score_threshold: float | None = None,
    ) -> SegmentationResult:
        state = self._state
        if state is None:
            raise RuntimeError("no vocabulary installed")
        vocab = state[0]
        t0 = time.perf_counter()
        time.sleep(self.segment_delay_s)
        labels = fake_labels(points[:, :3], len(vocab))
        valid = labels != UNLABELLED
        scores = np.where(valid, 1.0 / len(vocab), 0.0).astype(np.float32)
        if score_threshold is not None:
            labels[valid & (scores < score_threshold)] = UNLABELLED
        with self._lock:
            self.calls.append((vocab.version, len(points), len(images or ())))
            self.last_cameras = list(cameras or ())
        total = (time.perf_counter() - t0) * 1e3
        return SegmentationResult(labels, scores, vocab, valid, {"total": total})


def ros_domain_id(offset: int) -> int:
    """A ROS domain id for one test module: distinct per module (`offset`) and per process, so
    concurrent test runs on one host do not hear each other (ids 20..99 here). CLIP3D_TEST_DOMAIN_ID
    pins one id for all (several runs sharing a host each take their own)."""
    pinned = os.environ.get("CLIP3D_TEST_DOMAIN_ID", "")
    if pinned:
        return int(pinned)
    return 20 + (os.getpid() * 7 + offset * 31) % 80


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, poll_s: float = 0.01) -> Any:
    """Poll `pred` until it returns something truthy or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    return pred()
