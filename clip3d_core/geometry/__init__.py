"""Camera models, LiDAR->image projection with occlusion, calibration parsers and voxelisation."""

from clip3d_core.geometry.calibration import (
    NUSCENES_CAMERAS,
    camera_from_camera_info,
    camera_from_kitti_info,
    cameras_from_nuscenes_info,
    image_paths_from_info,
    info_sample,
    load_info_pickle,
    load_kitti_calib,
    parse_kitti_calib,
)
from clip3d_core.geometry.camera import CalibrationError, PinholeCamera
from clip3d_core.geometry.projection import INVALID_UV, Projection, project_points
from clip3d_core.geometry.voxelize import Voxelization, grid_shape, voxel_mean, voxelize

__all__ = [
    "INVALID_UV",
    "NUSCENES_CAMERAS",
    "CalibrationError",
    "PinholeCamera",
    "Projection",
    "Voxelization",
    "camera_from_camera_info",
    "camera_from_kitti_info",
    "cameras_from_nuscenes_info",
    "grid_shape",
    "image_paths_from_info",
    "info_sample",
    "load_info_pickle",
    "load_kitti_calib",
    "parse_kitti_calib",
    "project_points",
    "voxel_mean",
    "voxelize",
]
