"""Launch the clip3d node with its parameter file and the loopback Fast DDS profile.

    ros2 launch clip3d_ros clip3d.launch.py checkpoint:=/path/model.pt use_sim_time:=true
    ros2 launch launch/clip3d.launch.py ...        # from a source tree, without an ament install

Arguments: params_file (default: the package's config/clip3d.yaml), checkpoint (overrides the
file's), use_sim_time, fastdds_profile (default: config/fastdds_loopback.xml; '' keeps the
environment's), input_topic / output_topic / objects_topic (what the node's relative
`~/input/pointcloud`, `~/output/pointcloud` and `~/output/objects` are remapped to; defaults /points,
/clip3d/labelled_points and /clip3d/objects, label-bag's name for the objects), rviz (true: also start
RViz with config/clip3d.rviz: the labelled cloud coloured by `rgb`, and the instance boxes of a
panoptic model).

Files and the executable come from the installed package (ament index) when there is one; else
(AMENT_PREFIX_PATH unset or without clip3d_ros) from the source tree next to this file and the
`clip3d_node` on PATH (`pip install -e .`), or the launch fails saying what is missing. Needs
`launch` and `launch_ros` (a ROS 2 install).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import Action, LaunchContext, LaunchDescription

PACKAGE = "clip3d_ros"


SOURCE_TREE = Path(__file__).resolve().parents[1]  # <repo>/launch/.. when run from a checkout


def _installed_share() -> Path | None:
    """The package's share directory in the ament index; None when it is not installed there
    (ament_index_python raises OSError, not PackageNotFoundError, when AMENT_PREFIX_PATH is unset)."""
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except (ImportError, LookupError, OSError):
        return None


def _share_dir() -> Path:
    return _installed_share() or SOURCE_TREE


def _profile_env(context: LaunchContext, *args: Any, **kwargs: Any) -> list[Action]:
    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if not profile:
        return []
    # FASTDDS_* only: the FASTRTPS_* name makes Fast DDS 3 log a deprecation warning per process.
    return [
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile),
        SetEnvironmentVariable("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp"),
    ]


def _executable() -> dict[str, str]:
    """Node(...) arguments naming the node executable: the installed package's, else the
    `clip3d_node` console script on PATH."""
    if _installed_share() is not None:
        return {"package": PACKAGE, "executable": "clip3d_node"}
    found = shutil.which("clip3d_node")
    if found is None:
        raise RuntimeError(
            f"{PACKAGE} is not installed in an ament prefix (AMENT_PREFIX_PATH is unset or does not "
            "contain it) and no clip3d_node is on PATH: `source install/setup.bash` after colcon "
            "build, or `pip install -e .` in the repository"
        )
    return {"executable": found}


def _node(context: LaunchContext, *args: Any, **kwargs: Any) -> list[Action]:
    overrides = {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() == "true"}
    checkpoint = LaunchConfiguration("checkpoint").perform(context)
    if checkpoint:
        overrides["checkpoint"] = checkpoint
    remappings = [
        ("~/input/pointcloud", LaunchConfiguration("input_topic").perform(context)),
        ("~/output/pointcloud", LaunchConfiguration("output_topic").perform(context)),
        ("~/output/objects", LaunchConfiguration("objects_topic").perform(context)),
    ]
    return [
        Node(
            **_executable(),
            name="clip3d",
            output="screen",
            emulate_tty=True,
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            remappings=remappings,
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
            DeclareLaunchArgument(
                "input_topic", default_value="/points", description="LiDAR PointCloud2 topic"
            ),
            DeclareLaunchArgument(
                "output_topic",
                default_value="/clip3d/labelled_points",
                description="labelled PointCloud2 topic",
            ),
            DeclareLaunchArgument(
                "objects_topic",
                default_value="/clip3d/objects",
                description="instance boxes (MarkerArray; panoptic models only)",
            ),
            DeclareLaunchArgument("rviz", default_value="false", description="also start RViz"),
            OpaqueFunction(function=_profile_env),
            OpaqueFunction(function=_node),
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                arguments=["-d", str(share / "config" / "clip3d.rviz")],
                condition=IfCondition(LaunchConfiguration("rviz")),
            ),
        ]
    )
