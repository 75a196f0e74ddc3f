"""Datasets yielding `Frame`s: SemanticKITTI, nuScenes-lidarseg, a procedural synthetic world."""

from clip3d_core.data.collate import collate_frames
from clip3d_core.data.errors import DatasetError
from clip3d_core.data.frame import Frame, FrameError
from clip3d_core.data.nuscenes import NUSCENES_CLASSES, NuScenesLidarSegDataset
from clip3d_core.data.semantickitti import SEMANTICKITTI_CLASSES, SemanticKittiDataset
from clip3d_core.data.splits import SplitError, ZeroShotSplit, load_split
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorld, SyntheticWorldDataset

__all__ = [
    "NUSCENES_CLASSES",
    "SEMANTICKITTI_CLASSES",
    "DatasetError",
    "Frame",
    "FrameError",
    "NuScenesLidarSegDataset",
    "SemanticKittiDataset",
    "SplitError",
    "SyntheticConfig",
    "SyntheticWorld",
    "SyntheticWorldDataset",
    "ZeroShotSplit",
    "collate_frames",
    "load_split",
]
