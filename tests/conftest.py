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
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(_PROFILE))

from clip3d_core.testing import shared_data_dir  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (or $CLIP3D_SHARED_DATA); the test is skipped when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real sample data absent: set CLIP3D_SHARED_DATA or place ../shared/data")
    return path


@pytest.fixture(scope="session")
def frame_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`data.options.cache_dir` for synthetic runs: each world's frames are ray-cast once per session
    (the cache is keyed by the world config, and frame i depends only on (config, i))."""
    return tmp_path_factory.mktemp("frames")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """torch on one CPU thread for the whole session (tests that need more threads set them):
    OpenMP threads spin-wait, so on a busy 2-core machine two threads run a tiny model up to ~10x
    slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
