"""The built-in loss terms (importing this package registers them)."""

from clip3d_core.losses.terms import ce, semantic, spatial

__all__ = ["ce", "semantic", "spatial"]
