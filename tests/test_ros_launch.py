"""ROS packaging: launch file, parameter file, Fast DDS profile, package.xml / setup.cfg / ament
marker and the colcon workspace link."""

from __future__ import annotations

import configparser
import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "clip3d.launch.py"


def _launch_available() -> bool:
    try:
        from launch_ros.actions import Node  # noqa: F401

        from launch import LaunchDescription  # noqa: F401  (the repo's launch/ folder is not it)
    except ImportError:
        return False
    return True


def test_launch_file_compiles() -> None:
    compile(LAUNCH.read_text(), str(LAUNCH), "exec")


@pytest.mark.skipif(
    not _launch_available(), reason="launch / launch_ros not installed (ROS apt packages only)"
)
def test_launch_description_has_the_node_profile_and_parameters() -> None:
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchContext

    spec = importlib.util.spec_from_file_location("clip3d_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    args = {a.name: a for a in ld.entities if isinstance(a, DeclareLaunchArgument)}
    assert {"params_file", "checkpoint", "use_sim_time", "fastdds_profile"} <= set(args)
    assert Path(args["params_file"].default_value[0].perform(LaunchContext())).name == "clip3d.yaml"
    context = LaunchContext()
    for a in args.values():
        a.visit(context)
    actions = [x for e in ld.entities if isinstance(e, OpaqueFunction) for x in e.execute(context)]
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    assert len(nodes) == 1 and nodes[0].node_executable == "clip3d_node"
    envs = {a.name[0].perform(context) for a in actions if type(a).__name__ == "SetEnvironmentVariable"}
    assert "FASTDDS_DEFAULT_PROFILES_FILE" in envs


def test_package_xml_is_format3_ament_python() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "clip3d_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "rmw_fastrtps_cpp"} <= deps


def test_ament_layout_and_workspace_link() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["develop"]["script_dir"] == cfg["install"]["install_scripts"] == "$base/lib/clip3d_ros"
    assert (REPO / "resource" / "clip3d_ros").is_file()
    link = REPO / "ros2_ws" / "src" / "clip3d"
    assert link.is_symlink() and link.resolve() == REPO.resolve()
    setup_py = (REPO / "setup.py").read_text()
    assert "share/ament_index/resource_index/packages" in setup_py and "package.xml" in setup_py


def test_fastdds_profile_is_loopback_shm_default() -> None:
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(REPO / "config" / "fastdds_loopback.xml").getroot()
    transports = {
        t.findtext("d:transport_id", namespaces=ns): t for t in root.iterfind(".//d:transport_descriptor", ns)
    }
    shm = next(t for t in transports.values() if t.findtext("d:type", namespaces=ns) == "SHM")
    assert int(shm.findtext("d:segment_size", namespaces=ns)) == 32 * 1024 * 1024
    udp = next(t for t in transports.values() if t.findtext("d:type", namespaces=ns) == "UDPv4")
    allowed = [i.get("name") for i in udp.iterfind("d:interfaces/d:allowlist/d:interface", ns)]
    assert allowed == ["127.0.0.1"]
    participant = root.find(".//d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.findtext("d:rtps/d:useBuiltinTransports", namespaces=ns) == "false"
    used = [t.text for t in participant.iterfind("d:rtps/d:userTransports/d:transport_id", ns)]
    assert set(used) == set(transports)


@pytest.mark.ros
def test_parameter_file_matches_the_declarations() -> None:
    """rcl parses config/clip3d.yaml for a node named clip3d and every value has the declared type."""
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python wheels (rclpy) not installed")
    from rclpy.context import Context
    from rclpy.node import Node

    from clip3d_ros.params import declare_parameters
    from clip3d_ros.testing import ros_domain_id

    ctx = Context()
    rclpy.init(
        context=ctx,
        domain_id=ros_domain_id(4),
        args=["x", "--ros-args", "--params-file", str(REPO / "config" / "clip3d.yaml")],
    )
    try:
        node = Node("clip3d", namespace="/some/ns", context=ctx)
        p = declare_parameters(node)
        assert p.vocabulary[0] == "car|automobile" and len(p.vocabulary) == 12
        assert (p.sync_slop, p.sync_queue_size, p.camera_timeout) == (0.05, 10, 0.15)
        assert p.qos_cloud.reliability == "best_effort" and p.qos_output.reliability == "reliable"
        assert [c.name for c in p.cameras] == ["front"]
        T = p.cameras[0].T_cam_lidar
        assert T.shape == (4, 4) and np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3))
        assert T[:3, :3] @ np.array([1.0, 0, 0]) @ np.array([0, 0, 1.0]) == 1.0  # LiDAR forward = optical z
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
