"""The built-in loss terms (importing this package registers them)."""

from clip3d_core.losses.terms import ce, panoptic, semantic, spatial

__all__ = ["ce", "panoptic", "semantic", "spatial"]
