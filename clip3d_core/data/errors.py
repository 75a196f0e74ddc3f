"""Errors of the data layer."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset folder or file is missing or malformed."""
