"""The node with a real (tiny, untrained) clip3d checkpoint: in-process against the Segmenter API,
and as a subprocess (`python -m clip3d_ros.node --ros-args ...`) receiving a best-effort
~120k-point cloud through the loopback Fast DDS profile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python wheels (rclpy) not installed")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from clip3d_core.testing import shared_data_dir  # noqa: E402
from clip3d_ros import conversions as cv  # noqa: E402
from clip3d_ros.node import Clip3DNode  # noqa: E402
from clip3d_ros.testing import ros_domain_id, wait_for  # noqa: E402
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map, vocabulary_qos  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "config" / "fastdds_loopback.xml"
XYZI = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import tiny_clip_config
    from clip3d_core.model import ModelConfig

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return build_untrained_checkpoint(path, ModelConfig.small(embed_dim=32), tiny_clip_config())


@pytest.fixture(scope="module")
def context():
    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id(2))
    yield ctx
    rclpy.shutdown(context=ctx)



def lidar_scan() -> np.ndarray:
    """The real SemanticKITTI scan (123,389 points) when the shared data is there, else a synthetic
    120k-point sweep."""
    data = shared_data_dir()
    path = None if data is None else data / "semantickitti_scan" / "000000.bin"
    if path is not None and path.exists():
        raw = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    else:
        rng = np.random.default_rng(0)
        az, r = rng.uniform(-np.pi, np.pi, 120_000), rng.uniform(2, 50, 120_000)
        raw = np.stack(
            [r * np.cos(az), r * np.sin(az), rng.uniform(-2, 1, 120_000), rng.uniform(0, 1, 120_000)], 1
        )
    pts = np.zeros(len(raw), XYZI)
    for i, c in enumerate(XYZI.names):
        pts[c] = raw[:, i]
    return pts


def cloud_msg(pts: np.ndarray, sec: int) -> PointCloud2:
    msg = cv.array_to_cloud(pts)
    msg.header.stamp.sec = sec
    msg.header.frame_id = "velodyne"
    return msg


class Peer:
    def __init__(self, context: Context, ns: str, cloud_qos: QoSProfile) -> None:
        self.node = Node("peer", namespace=ns, context=context)
        self.outputs: list[PointCloud2] = []
        self.metas: list[dict] = []
        self.maps: list[dict] = []
        rel = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(PointCloud2, f"{ns}/clip3d/output/pointcloud", self.outputs.append, rel)
        self.node.create_subscription(
            String, f"{ns}/clip3d/labels_meta", lambda m: self.metas.append(parse_labels_meta(m)), rel
        )
        self.node.create_subscription(
            String,
            f"{ns}/clip3d/vocabulary",
            lambda m: self.maps.append(parse_vocabulary_map(m)),
            vocabulary_qos(),
        )
        self.pub = self.node.create_publisher(PointCloud2, f"{ns}/clip3d/input/pointcloud", cloud_qos)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)
        self.node.destroy_node()


def test_node_labels_exactly_like_the_segmenter(context, checkpoint) -> None:
    ns = f"/real{os.getpid()}"
    node = Clip3DNode(
        context=context,
        namespace=ns,
        parameter_overrides=[
            Parameter("checkpoint", value=str(checkpoint)),
            Parameter("qos.cloud.reliability", value="reliable"),
            Parameter("vocabulary", value=["car|automobile", "road", "building", "vegetation"]),
        ],
    )
    peer = Peer(context, ns, QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        assert wait_for(
            lambda: peer.pub.get_subscription_count() and node._cloud_pub.get_subscription_count(), 10
        )
        pts = lidar_scan()[:20_000]
        pts["x"][:3] = np.nan  # non-finite points: unlabelled, still in place
        peer.pub.publish(cloud_msg(pts, 10))
        assert wait_for(lambda: peer.outputs, 60), "no labelled cloud"
        got = cv.cloud_to_array(peer.outputs[0])
        np.testing.assert_array_equal(cv.xyz_of(got), cv.xyz_of(pts))
        seg = node._segmenter
        direct = seg.segment(cv.points_for_model(pts, "intensity"))
        # The node adds nothing to the model (spconv's CPU sums are not bit-reproducible: ~1e-4).
        assert (got["label"] == direct.labels).mean() > 0.999
        np.testing.assert_allclose(got["score"], direct.scores, atol=1e-3)
        labels = got["label"]
        assert (labels[:3] == 65535).all() and ((labels < 4) | (labels == 65535)).all()
        assert (labels < 4).mean() > 0.5  # most of the scan lies in the model's range
        meta = wait_for(lambda: peer.metas, 5)[0]
        assert meta["version"] == seg.vocabulary.version == wait_for(lambda: peer.maps, 5)[-1]["version"]

        # a live vocabulary change goes through the real text encoder
        assert node.set_parameters([Parameter("vocabulary", value=["car", "road"])])[0].successful
        assert wait_for(lambda: peer.maps and len(peer.maps[-1]["entries"]) == 2, 30)
        peer.pub.publish(cloud_msg(pts, 11))
        assert wait_for(lambda: len(peer.outputs) == 2, 60)
        got = cv.cloud_to_array(peer.outputs[1])
        assert ((got["label"] < 2) | (got["label"] == 65535)).all() and (got["label"] < 2).mean() > 0.5
        assert wait_for(lambda: len(peer.metas) == 2, 5)
        assert peer.metas[1]["version"] == meta["version"] + 1
    finally:
        executor.shutdown(timeout_sec=5)
        spin.join(timeout=5)
        node.destroy_node()
        peer.close()


def _node_process(checkpoint: Path | str, ns: str, domain: int, *extra: str) -> subprocess.Popen:
    env = os.environ | {
        "ROS_DOMAIN_ID": str(domain),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)  # deprecated name; Fast DDS 3 reads FASTDDS_*
    cmd = [
        sys.executable, "-m", "clip3d_ros.node", "--ros-args",
        "-r", f"__ns:={ns}",
        "-p", f"checkpoint:={checkpoint}",
        "-p", "qos.cloud.reliability:=best_effort",
        "-p", "vocabulary:=[car, road, building]",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_node_subprocess_labels_a_best_effort_120k_cloud_intact(context, checkpoint) -> None:
    ns = f"/sub{os.getpid()}"
    proc = _node_process(checkpoint, ns, ros_domain_id(2))
    peer = Peer(context, ns, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        pts = lidar_scan()
        assert len(pts) >= 120_000
        msg = cloud_msg(pts, 42)
        deadline = time.monotonic() + 120
        while not peer.outputs and time.monotonic() < deadline and proc.poll() is None:
            if peer.pub.get_subscription_count():
                peer.pub.publish(msg)  # best effort: repeat until one is labelled
            wait_for(lambda: peer.outputs, 2.0)
        assert peer.outputs, f"no output (node exit code {proc.poll()})"
        out = peer.outputs[0]
        assert out.header.stamp.sec == 42 and out.header.frame_id == "velodyne"
        got = cv.cloud_to_array(out)
        assert len(got) == len(pts)
        for c in XYZI.names:  # every point arrived intact and in order
            np.testing.assert_array_equal(got[c], pts[c])
        finite = np.isfinite(cv.xyz_of(pts)).all(axis=1)
        labels = got["label"]
        assert ((labels < 3) | (labels == 65535)).all() and (labels[finite] < 3).any()
        assert ((got["score"] >= 0) & (got["score"] <= 1)).all()
        assert (
            wait_for(lambda: peer.maps, 10)[-1]["version"] == wait_for(lambda: peer.metas, 10)[0]["version"]
        )
    finally:
        peer.close()
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    assert "labelling /sub" in output and "/clip3d/input/pointcloud" in output
    assert "XMLPARSER" not in output and "Error" not in output, output[-3000:]  # the profile parsed cleanly


def test_main_exits_with_a_reason_on_a_bad_checkpoint(tmp_path, capfd) -> None:
    from clip3d_ros.node import main

    bad = tmp_path / "missing.pt"
    assert main(["clip3d_node", "--ros-args", "-p", f"checkpoint:={bad}"]) == 1
    err = capfd.readouterr().err
    assert "cannot start" in err and str(bad) in err
    assert main(["clip3d_node", "--ros-args", "-p", "checkpoint:=''"]) == 1  # nothing to load at all
    assert "'checkpoint' is empty" in capfd.readouterr().err
