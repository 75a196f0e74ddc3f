"""ROS packaging: launch file, parameter file, Fast DDS profile, package.xml / setup.cfg / ament
marker and the colcon workspace link."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
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
def test_launch_description_has_the_node_profile_and_parameters(monkeypatch) -> None:
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

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
    assert len(nodes) == 1 and Path(nodes[0].node_executable).name == "clip3d_node"
    envs = {a.name[0].perform(context) for a in actions if type(a).__name__ == "SetEnvironmentVariable"}
    assert "FASTDDS_DEFAULT_PROFILES_FILE" in envs


def test_package_xml_is_format3_ament_python() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "clip3d_ros"
    assert root.find("export/build_type").text == "ament_python"
    assert root.find("buildtool_depend") is None  # ament_python is no rosdep key
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "rmw_fastrtps_cpp"} <= deps


# Imported top-level module -> its rosdep key. Modules missing here must come from pip (below).
ROSDEP_KEYS = {
    "rclpy": "rclpy",
    "sensor_msgs": "sensor_msgs",
    "std_msgs": "std_msgs",
    "diagnostic_msgs": "diagnostic_msgs",
    "rosgraph_msgs": "rosgraph_msgs",
    "rcl_interfaces": "rcl_interfaces",
    "builtin_interfaces": "builtin_interfaces",
    "visualization_msgs": "visualization_msgs",
    "tf2_ros": "tf2_ros_py",
    "message_filters": "message_filters",
    "launch": "launch",
    "launch_ros": "launch_ros",
    "ament_index_python": "ament_index_python",
    "numpy": "python3-numpy",
    "yaml": "python3-yaml",
    "PIL": "python3-pil",
    "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib",
    "scipy": "python3-scipy",
    "rosbags": "python3-rosbags-pip",
}
PIP_ONLY = {"torch", "torchvision", "open_clip", "spconv", "nuscenes"}  # documented in package.xml
DECLARED_UNIMPORTED = {"rmw_fastrtps_cpp", "geometry_msgs"}  # the RMW the profile is for; tf2's messages


def _imported_modules() -> set[str]:
    files = [*(REPO / "clip3d_ros").rglob("*.py"), *(REPO / "clip3d_core").rglob("*.py"), LAUNCH]
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"clip3d_core", "clip3d_ros"}


def test_package_xml_declares_exactly_what_the_package_imports() -> None:
    deps = {e.text for e in ET.parse(REPO / "package.xml").getroot().findall("exec_depend")}
    imported = _imported_modules()
    unknown = imported - set(ROSDEP_KEYS) - PIP_ONLY
    assert not unknown, f"imported but neither a rosdep key nor pip-only: {sorted(unknown)}"
    needed = {ROSDEP_KEYS[m] for m in imported if m in ROSDEP_KEYS}
    assert needed <= deps, f"imported but not declared: {sorted(needed - deps)}"
    assert deps - needed <= DECLARED_UNIMPORTED, f"declared but never imported: {sorted(deps - needed)}"


def _colcon_setup_information(cwd: Path) -> dict:
    """What colcon-python-setup-py does to read a package (the same script, in a subprocess):
    the setup() distribution's attributes as a repr that must parse with ast.literal_eval."""
    code = ";".join(
        [
            "import sys",
            "from distutils.core import run_setup",
            "dist = run_setup('setup.py', script_args=('--dry-run',), stop_after='config')",
            "skip = ('cmdclass', 'distclass', 'ext_modules', 'metadata')",
            "data = {k: v for k, v in dist.__dict__.items() if not k.startswith('_') and not callable(v)"
            " and k not in skip and k not in dist.display_option_names}",
            "sys.stdout.write(repr(data))",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout)


def test_colcon_can_read_the_package_metadata() -> None:
    info = _colcon_setup_information(REPO)
    assert info["python_requires"] == ">=3.10"
    assert any(r.startswith("pytest") for r in info["extras_require"]["test"])  # colcon test's pytest
    data = dict(info["data_files"])
    assert {"pyproject.toml", "README.md", "package.xml"} <= set(data["share/clip3d_ros"])


def test_symlink_install_layout_builds(tmp_path: Path) -> None:
    """colcon --symlink-install links only setup.py, setup.cfg, top-level packages and data files
    into build/: the metadata must be found from those alone."""
    info = _colcon_setup_information(REPO)
    items = {"setup.py", "setup.cfg"} | {p for p in info["packages"] if "." not in p}
    items |= {src for _, sources in info["data_files"] for src in sources}
    for item in items:
        dst = tmp_path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(REPO / item)
    out = subprocess.run(
        [sys.executable, "setup.py", "--name", "--version"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["clip3d", "0.1.0"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("colcon", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    is None,
    reason="colcon not installed (pip install colcon-common-extensions, or a ROS install)",
)
def test_colcon_build_symlink_install_and_test_run(tmp_path: Path) -> None:
    colcon = shutil.which("colcon", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "clip3d").symlink_to(REPO)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def colcon_run(*args: str) -> str:
        out = subprocess.run([colcon, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return out.stdout

    for extra in ([], ["--symlink-install"]):
        shutil.rmtree(tmp_path / "build", ignore_errors=True)
        shutil.rmtree(tmp_path / "install", ignore_errors=True)
        colcon_run("build", "--packages-select", "clip3d_ros", *extra)
        assert (tmp_path / "install/clip3d_ros/lib/clip3d_ros/clip3d_node").is_file()
        assert (tmp_path / "install/clip3d_ros/share/clip3d_ros/launch/clip3d.launch.py").exists()
    colcon_run("test", "--packages-select", "clip3d_ros", "--pytest-args", "-k", "frame_queue")
    result = colcon_run("test-result", "--all")
    tests = int(result.split("Summary: ")[1].split()[0])
    assert tests >= 1, result  # colcon used to run 0 tests and call it a success


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
def test_parameter_file_matches_the_declarations(tmp_path: Path) -> None:
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
        T = p.cameras[0].T
        assert T.shape == (4, 4) and np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3))
        assert T[:3, :3] @ np.array([1.0, 0, 0]) @ np.array([0, 0, 1.0]) == 1.0  # LiDAR forward = optical z
        assert (p.precision, p.sparse_backend, p.tf32, p.compile) == ("fp32", "", False, False)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    _check_runtime_parameters(p, tmp_path)


def _check_runtime_parameters(p, tmp_path: Path) -> None:
    """The runtime.* parameters reach the segmenter; impossible ones stop the start with their reason."""
    import dataclasses

    import torch

    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import tiny_clip_config
    from clip3d_core.model import ModelConfig
    from clip3d_ros.node import Clip3DNode
    from clip3d_ros.params import ParameterError

    ckpt = build_untrained_checkpoint(tmp_path / "m.pt", ModelConfig.small(embed_dim=32), tiny_clip_config(),
                                      vocabulary=["car", "road"])
    seg = Clip3DNode._load_segmenter(dataclasses.replace(p, checkpoint=str(ckpt), precision="fp16"))
    assert seg.model.dtype == torch.float16 and seg.runtime.options.precision == "fp16"
    for bad, match in ((dict(precision="int8"), "precision"), (dict(sparse_backend="minkowski"), "backend"),
                       (dict(precision="bf16"), "bf16 needs a CUDA device")):
        if bad.get("precision") == "bf16" and torch.cuda.is_available():
            continue
        with pytest.raises(ParameterError, match=match):
            Clip3DNode._load_segmenter(dataclasses.replace(p, checkpoint=str(ckpt), **bad))


def _load_launch_module():
    spec = importlib.util.spec_from_file_location("clip3d_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not _launch_available(), reason="launch / launch_ros not installed (ROS apt packages only)"
)
def test_launch_without_ament_prefix_path_uses_the_source_tree_or_says_why(monkeypatch, tmp_path) -> None:
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchContext

    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no clip3d_node anywhere
    ld = _load_launch_module().generate_launch_description()  # used to raise OSError here
    args = {a.name: a for a in ld.entities if isinstance(a, DeclareLaunchArgument)}
    assert Path(args["params_file"].default_value[0].perform(LaunchContext())) == REPO / "config/clip3d.yaml"
    context = LaunchContext()
    for a in args.values():
        a.visit(context)
    node_fn = [e for e in ld.entities if isinstance(e, OpaqueFunction)][-1]
    with pytest.raises(RuntimeError, match="AMENT_PREFIX_PATH"):
        node_fn.execute(context)
    exe = tmp_path / "clip3d_node"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (node,) = node_fn.execute(context)
    assert node.node_executable == str(exe)
    remaps = ["".join(part.perform(context) for part in k) for k, _ in node._Node__remappings]
    assert remaps == ["~/input/pointcloud", "~/output/pointcloud", "~/output/objects"]
    targets = ["".join(part.perform(context) for part in v) for _, v in node._Node__remappings]
    assert targets == ["/points", "/clip3d/labelled_points", "/clip3d/objects"]


@pytest.mark.slow
def test_launch_testing_runs_the_node_from_a_source_tree_and_stops_it(monkeypatch, tmp_path) -> None:
    """launch_testing (tests/launch_tests/clip3d_launch.py) on the launch file, AMENT_PREFIX_PATH
    unset: the node starts labelling and exits 0 when launch shuts it down (SIGINT)."""
    pytest.importorskip("launch_testing", reason="launch_testing not installed (ROS apt packages only)")
    if not _launch_available():
        pytest.skip("launch / launch_ros not installed (ROS apt packages only)")
    from launch_testing.loader import LoadTestsFromPythonModule
    from launch_testing.test_runner import LaunchTestRunner

    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import tiny_clip_config
    from clip3d_core.model import ModelConfig

    ckpt = build_untrained_checkpoint(
        tmp_path / "tiny.pt", ModelConfig.small(embed_dim=32), tiny_clip_config()
    )
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CLIP3D_LAUNCH_TEST_CHECKPOINT", str(ckpt))
    spec = importlib.util.spec_from_file_location(
        "clip3d_launch_test", REPO / "tests" / "launch_tests" / "clip3d_launch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runner = LaunchTestRunner(LoadTestsFromPythonModule(module))
    runner.validate()
    results = runner.run()
    assert results, "no launch test ran"
    for run, result in results.items():
        assert result.wasSuccessful(), f"{run}: {result.errors or result.failures}"
        assert result.testsRun >= 2


def test_rviz_config_shows_the_labelled_cloud_by_rgb_and_the_objects() -> None:
    import yaml

    from clip3d_ros.tools.label_bag import OBJECTS_TOPIC

    view = yaml.safe_load((REPO / "config" / "clip3d.rviz").read_text())
    displays = view["Visualization Manager"]["Displays"]
    (cloud,) = [d for d in displays if d["Class"].endswith("PointCloud2")]
    assert cloud["Color Transformer"] == "RGB8" and cloud["Topic"]["Value"] == "/clip3d/labelled_points"
    # the launch file's default objects_topic, the topic label-bag writes; reliable like qos.output
    (objects,) = [d for d in displays if d["Class"] == "rviz_default_plugins/MarkerArray"]
    assert objects["Topic"]["Value"] == OBJECTS_TOPIC == "/clip3d/objects"
    assert objects["Topic"]["Reliability Policy"] == "Reliable" and objects["Enabled"]
    assert set(objects["Namespaces"]) == {"objects", "labels"}  # clip3d_ros.markers' namespaces
    assert 'default_value="/clip3d/objects"' in LAUNCH.read_text()
    assert "config/*.rviz" in (REPO / "setup.py").read_text()  # installed into share/clip3d_ros/config
    assert "clip3d.rviz" in LAUNCH.read_text()


def _yaml_parameters() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config" / "clip3d.yaml").read_text())["/**/clip3d"]["ros__parameters"]


def test_parameter_file_validates_against_the_generated_schema() -> None:
    import json

    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (the test extra)")
    from clip3d_ros.params import main, parameter_schema

    schema = json.loads((REPO / "config" / "clip3d.schema.json").read_text())
    assert schema == parameter_schema() and main([]) == 0  # committed schema and docs table are current
    import yaml

    document = yaml.safe_load((REPO / "config" / "clip3d.yaml").read_text())
    jsonschema.validate(document, schema)
    document["/**/clip3d"]["ros__parameters"]["queue"]["depth"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        jsonschema.validate(document, schema)
    document["/**/clip3d"]["ros__parameters"]["queue"] = {"depth": 2, "size": 3}  # a typo'd name
    with pytest.raises(jsonschema.ValidationError, match="size"):
        jsonschema.validate(document, schema)


def test_parameter_file_defaults_are_the_declared_ones() -> None:
    """Defaults are written once (the dataclass fields): the YAML repeats them and must agree, except
    the example camera it configures."""
    import dataclasses

    from clip3d_ros.params import NodeParams

    values = _yaml_parameters()
    for f in dataclasses.fields(NodeParams):
        spec = f.metadata.get("ros")
        if spec is None or spec.name.startswith("cameras."):
            continue
        node = values
        for part in spec.name.split("."):
            node = node[part]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert node == default, spec.name
