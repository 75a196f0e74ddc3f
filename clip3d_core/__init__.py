"""clip3d_core: open-vocabulary LiDAR segmentation by transferring CLIP into a sparse 3D network."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clip3d_core import _compat

_compat.apply()

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clip3d_core.segmenter import SegmentationResult, Segmenter

__all__ = ["SegmentationResult", "Segmenter", "__version__"]

# The inference API loads torch models and open_clip: imported on first use, so that
# `import clip3d_core` (every CLI command, the ROS node's startup) stays light.
_LAZY = {"Segmenter": "clip3d_core.segmenter", "SegmentationResult": "clip3d_core.segmenter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip3d_core' has no attribute {name!r}")
