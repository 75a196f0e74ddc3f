"""A procedural street world with a ray-cast LiDAR and cameras: exact point and pixel labels."""

from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig, SceneConfig, SyntheticConfig
from clip3d_core.data.synthetic.dataset import SyntheticWorld, SyntheticWorldDataset
from clip3d_core.data.synthetic.world import CLASS_NAMES, THING_CLASSES

__all__ = [
    "CLASS_NAMES",
    "THING_CLASSES",
    "CameraConfig",
    "LidarConfig",
    "SceneConfig",
    "SyntheticConfig",
    "SyntheticWorld",
    "SyntheticWorldDataset",
]
