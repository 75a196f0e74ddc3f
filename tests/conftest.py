"""Shared fixtures. Every process started from the tests stays on DDS loopback (DEVELOPERS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", "42")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
_PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_loopback.xml"
if _PROFILE.exists():
    os.environ.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", str(_PROFILE))
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(_PROFILE))

from clip3d_core.testing import shared_data_dir  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (or $CLIP3D_SHARED_DATA); the test is skipped when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real sample data absent: set CLIP3D_SHARED_DATA or place ../shared/data")
    return path
