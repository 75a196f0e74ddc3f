"""The demo's summary: label histograms (and, for panoptic models, objects) per vocabulary, latency
percentiles, summary.md."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from clip3d_core.clip.vocabulary import Vocabulary
from clip3d_ros import bag, conversions
from clip3d_ros.demo.config import OUTPUT_TOPIC
from clip3d_ros.tools import make_bag

log = logging.getLogger(__name__)


def vocabulary_from_map(vocab_map: dict[str, Any]) -> Vocabulary:
    return Vocabulary.from_strings(
        ["|".join(e["synonyms"]) for e in vocab_map["entries"]], version=int(vocab_map["version"])
    )


def label_statistics(
    labelled_bag: Path, vocabularies: dict[int, Vocabulary], versions: dict[int, int]
) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, Any]]]:
    """(points per class name for each vocabulary version, plus "unlabelled"; objects per version
    of a panoptic model's clouds, i.e. those with an `instance` field: frames, instances, per frame
    median / max, instances per class; {} for a semantic model)."""
    hist: dict[int, Counter[str]] = defaultdict(Counter)
    per_frame: dict[int, list[int]] = defaultdict(list)
    per_class: dict[int, Counter[str]] = defaultdict(Counter)
    reader = bag.open_reader(labelled_bag)
    try:
        conn = bag.require_topic(reader, OUTPUT_TOPIC, [bag.T_CLOUD])
        for _, _, msg in bag.iter_messages(reader, [conn]):
            stamp = bag.stamp_ns(msg.header)
            vocab = vocabularies[versions.get(stamp, max(vocabularies))]
            records = conversions.cloud_to_array(msg)
            labels = records["label"].astype(np.int64)
            counts = np.bincount(np.minimum(labels, len(vocab)), minlength=len(vocab) + 1)
            names = [*vocab.names, "unlabelled"]
            hist[vocab.version].update({n: int(c) for n, c in zip(names, counts) if c})
            if "instance" in records.dtype.names:
                ids, first = np.unique(records["instance"], return_index=True)
                kept = ids > 0  # one class per instance (the merge's segments)
                per_frame[vocab.version].append(int(kept.sum()))
                per_class[vocab.version].update(names[min(int(c), len(vocab))] for c in labels[first[kept]])
    finally:
        reader.close()
    objects = {
        v: {
            "frames": len(n),
            "instances": int(sum(n)),
            "per_frame_median": float(np.median(n)),
            "per_frame_max": int(max(n)),
            "per_class": dict(per_class[v].most_common()),
        }
        for v, n in sorted(per_frame.items())
    }
    return {v: dict(c.most_common()) for v, c in sorted(hist.items())}, objects


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(values.max()), 1),
        "mean": round(float(values.mean()), 1),
    }


def summary_markdown(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    lines = [
        "# clip3d demo",
        "",
        f"- drive: {s['bag']['frames']} frames ({s['bag']['seconds']} s at {s['bag']['rate_hz']} Hz), "
        f"replayed at x{s['replay']['rate']}",
        f"- model: {s['model']['source']} `{s['model']['path']}`",
        f"- frames in (clouds seen on {make_bag.CLOUD_TOPIC}): {s['frames_in']}; "
        f"frames out (labelled clouds): {s['frames_out']}",
        f"- vocabulary change: {s['vocabulary_change']['status']} at replay "
        f"{s['vocabulary_change'].get('at_s', '-')} s",
        f"- runtime: {s['runtime_s']['total']} s total "
        f"({', '.join(f'{k} {v} s' for k, v in s['runtime_s'].items() if k != 'total')})",
        "",
        "## Latency (header stamp -> labelled cloud received), ms",
        "",
        "| p50 | p90 | p99 | max | mean |",
        "|---|---|---|---|---|",
        f"| {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} | {lat['mean']} |",
        "",
        "## Labels per vocabulary version (points)",
        "",
    ]
    for version, hist in s["label_histogram"].items():
        total = sum(hist.values()) or 1
        lines += [
            f"### v{version} ({s['frames_per_version'].get(version, 0)} frames)",
            "",
            "| class | points | share |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {count} | {100 * count / total:.1f}% |" for name, count in hist.items()]
        lines.append("")
    if s.get("objects"):
        lines += [
            "## Objects (panoptic model: thing instances in the labelled clouds; boxes in the "
            "bird's-eye pictures)",
            "",
            f"MarkerArrays recorded on {s['objects_topic']}: {s['object_messages']}",
            "",
            "| vocabulary | frames | instances | per frame (median / max) | per class |",
            "|---|---|---|---|---|",
        ]
        for version, o in s["objects"].items():
            classes = ", ".join(f"{name} {count}" for name, count in o["per_class"].items()) or "-"
            lines.append(
                f"| v{version} | {o['frames']} | {o['instances']} | "
                f"{o['per_frame_median']:g} / {o['per_frame_max']} | {classes} |"
            )
        lines.append("")
    lines += ["## Pictures", ""]
    for p in s["pictures"]:
        lines.append(
            f"- v{p['vocabulary_version']}: ![]({p['bev']})"
            + (f" ![]({p['overlay']})" if "overlay" in p else "")
        )
    return "\n".join(lines) + "\n"
