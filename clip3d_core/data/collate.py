"""Batching: list[Frame] -> a dict of concatenated point tensors plus per-sample camera data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clip3d_core.data.frame import Frame, FrameError


def collate_frames(frames: Sequence[Frame]) -> dict[str, Any]:
    """Concatenate points of B frames (the sparse-conv layout) and keep cameras per sample.

    Returns:
      points [N, 4] float32, batch_index [N] long, offsets [B + 1] long (sample b owns
      points[offsets[b]:offsets[b + 1]]), labels / instances [N] long or None when no frame has
      them (frames without them contribute -1 / 0), images / cameras: per-sample lists (images stay
      uint8 HxWx3 numpy, what `DenseClipEncoder.prepare` takes), pixel_labels: per-sample lists of
      [H, W] long tensors or None, poses: per-sample [4, 4] float64 tensors or None, frame_ids,
      stamps_ns [B] long, class_names, batch_size.
    """
    if not frames:
        raise FrameError("cannot collate an empty batch")
    class_names = frames[0].class_names
    for f in frames[1:]:
        if f.class_names != class_names:
            raise FrameError(f"frames {frames[0].frame_id!r} and {f.frame_id!r} use different class lists")
    counts = torch.tensor([f.num_points for f in frames], dtype=torch.long)
    offsets = torch.zeros(len(frames) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)

    def cat(name: str, fill: int) -> torch.Tensor | None:
        arrays = [getattr(f, name) for f in frames]
        if all(a is None for a in arrays):
            return None
        parts = [np.full(f.num_points, fill, np.int64) if a is None else np.asarray(a, np.int64)
                 for f, a in zip(frames, arrays)]
        return torch.from_numpy(np.concatenate(parts))

    any_pixels = any(f.pixel_labels is not None for f in frames)
    return {
        "points": torch.from_numpy(np.concatenate([np.asarray(f.points, np.float32) for f in frames])),
        "batch_index": torch.repeat_interleave(torch.arange(len(frames)), counts),
        "offsets": offsets,
        "labels": cat("labels", -1),
        "instances": cat("instances", 0),
        "images": [list(f.images) for f in frames],
        "cameras": [list(f.cameras) for f in frames],
        "pixel_labels": [[torch.from_numpy(m) for m in f.pixel_labels] if f.pixel_labels is not None else None
                         for f in frames] if any_pixels else None,
        "poses": [torch.from_numpy(f.pose) if f.pose is not None else None for f in frames],
        "frame_ids": [f.frame_id for f in frames],
        "stamps_ns": torch.tensor([f.stamp_ns for f in frames], dtype=torch.long),
        "class_names": class_names,
        "batch_size": len(frames),
    }
