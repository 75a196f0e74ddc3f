"""Launch the clip3d node with its parameter file and the loopback Fast DDS profile.

    ros2 launch clip3d_ros clip3d.launch.py checkpoint:=/path/model.pt use_sim_time:=true

Arguments: params_file (default: the package's config/clip3d.yaml), checkpoint (overrides the
file's), use_sim_time, fastdds_profile (default: config/fastdds_loopback.xml; '' keeps the
environment's). Files are found in the installed package share, else next to this file (source
tree). Needs `launch` and `launch_ros` (a ROS 2 install).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import Action, LaunchContext, LaunchDescription

PACKAGE = "clip3d_ros"


def _share_dir() -> Path:
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            return Path(get_package_share_directory(PACKAGE))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1]  # source tree: <repo>/launch/..


def _profile_env(context: LaunchContext, *args: Any, **kwargs: Any) -> list[Action]:
    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if not profile:
        return []
    # Fast DDS 3 reads FASTDDS_*, older releases FASTRTPS_*; set both.
    return [
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile),
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", profile),
        SetEnvironmentVariable("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp"),
    ]


def _node(context: LaunchContext, *args: Any, **kwargs: Any) -> list[Action]:
    overrides = {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() == "true"}
    checkpoint = LaunchConfiguration("checkpoint").perform(context)
    if checkpoint:
        overrides["checkpoint"] = checkpoint
    return [
        Node(
            package=PACKAGE,
            executable="clip3d_node",
            name="clip3d",
            output="screen",
            emulate_tty=True,
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
        )
    ]


def generate_launch_description() -> LaunchDescription:
    share = _share_dir()
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=str(share / "config" / "clip3d.yaml"),
                description="node parameters",
            ),
            DeclareLaunchArgument(
                "checkpoint", default_value="", description="clip3d checkpoint; '' = the file's"
            ),
            DeclareLaunchArgument(
                "use_sim_time", default_value="false", description="follow /clock (bag replay)"
            ),
            DeclareLaunchArgument(
                "fastdds_profile",
                default_value=str(share / "config" / "fastdds_loopback.xml"),
                description="Fast DDS XML profile ('' = leave the environment alone)",
            ),
            OpaqueFunction(function=_profile_env),
            OpaqueFunction(function=_node),
        ]
    )
