"""The vocabulary map and per-frame label metadata as std_msgs/String JSON.

* `~/vocabulary` (transient-local, reliable, depth 1): `{"version", "entries": [{"id", "name",
  "synonyms", "colour": [r, g, b]}]}` - published whenever the active vocabulary changes, so late
  subscribers and bag recorders get the one in force.
* `~/labels_meta` (reliable, volatile): one `{"stamp": {"sec", "nanosec"}, "frame_id", "version",
  "num_points", "cameras_used", "cameras_missing", "lidar_only"}` per labelled cloud, published just
  before the cloud. The labelled cloud keeps the input header untouched, so consumers join the two
  by header stamp + frame_id; `version` names the vocabulary map whose ids the cloud's labels index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LABELS_META_TOPIC",
    "VOCABULARY_TOPIC",
    "VocabularyMapError",
    "labels_meta_message",
    "labels_meta_payload",
    "labels_meta_qos",
    "parse_labels_meta",
    "parse_vocabulary_map",
    "vocabulary_message",
    "vocabulary_qos",
]

VOCABULARY_TOPIC = "~/vocabulary"
LABELS_META_TOPIC = "~/labels_meta"


class VocabularyMapError(ValueError):
    """A vocabulary map or labels-meta message is not valid JSON of the documented shape."""


def vocabulary_message(vocab: Any) -> Any:
    """`clip3d_core.clip.Vocabulary` -> std_msgs/String of its map (`Vocabulary.as_dict`; ids are
    list positions = label values)."""
    from std_msgs.msg import String

    return String(data=json.dumps(vocab.as_dict(), separators=(",", ":")))


def parse_vocabulary_map(data: str | Any) -> dict[str, Any]:
    """JSON text (or a String message) -> validated map dict."""
    payload = _load(data)
    try:
        version = int(payload["version"])
        entries = payload["entries"]
        ok = isinstance(entries, list) and all(
            isinstance(e, dict)
            and e.get("id") == i
            and isinstance(e.get("name"), str)
            and isinstance(e.get("synonyms"), list)
            and len(e.get("colour", ())) == 3
            for i, e in enumerate(entries)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VocabularyMapError(f"vocabulary map lacks version/entries: {exc}") from exc
    if not ok:
        raise VocabularyMapError(
            "vocabulary map entries must be {id (= position), name, synonyms, colour[3]}"
        )
    return {"version": version, "entries": entries}


def labels_meta_payload(
    stamp: Any,
    frame_id: str,
    version: int,
    num_points: int,
    cameras_used: Sequence[str],
    cameras_missing: Sequence[str],
) -> dict[str, Any]:
    return {
        "stamp": {"sec": int(stamp.sec), "nanosec": int(stamp.nanosec)},
        "frame_id": frame_id,
        "version": int(version),
        "num_points": int(num_points),
        "cameras_used": list(cameras_used),
        "cameras_missing": list(cameras_missing),
        "lidar_only": not cameras_used,
    }


def labels_meta_message(*args: Any, **kwargs: Any) -> Any:
    """`labels_meta_payload(...)` as a std_msgs/String."""
    from std_msgs.msg import String

    return String(data=json.dumps(labels_meta_payload(*args, **kwargs), separators=(",", ":")))


def parse_labels_meta(data: str | Any) -> dict[str, Any]:
    payload = _load(data)
    missing = {"stamp", "frame_id", "version", "num_points"} - set(payload)
    if missing:
        raise VocabularyMapError(f"labels meta lacks {sorted(missing)}")
    return payload


def vocabulary_qos() -> Any:
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )


def labels_meta_qos() -> Any:
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)


def _load(data: str | Any) -> dict[str, Any]:
    text = data if isinstance(data, str) else getattr(data, "data", None)
    if not isinstance(text, str):
        raise VocabularyMapError(f"expected JSON text or a std_msgs/String, got {type(data).__name__}")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VocabularyMapError(f"not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise VocabularyMapError(f"expected a JSON object, got {type(payload).__name__}")
    return payload
