"""Bag tools: make-bag output, replay timing / clock / loop / QoS, label-bag output.

Real DDS on loopback (conftest sets the environment). This module runs on its own domain id and
topic prefix so parallel test runs of other suites cannot feed its subscribers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from clip3d_core.cli import main as clip3d_main
from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig, SyntheticConfig
from clip3d_core.data.synthetic.dataset import SyntheticWorld
from clip3d_ros import bag, conversions
from clip3d_ros.testing import ros_domain_id
from clip3d_ros.tools import make_bag
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402

DOMAIN = ros_domain_id(41)
PREFIX = f"/t{os.getpid()}"
T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # 10 Hz


# ------------------------------------------------------------------------------------ helpers
def write_image_bag(path: Path, n: int = 8, storage: str = "sqlite3") -> list[int]:
    """`n` tiny images at 10 Hz on PREFIX/image plus one latched vocabulary-like String."""
    stamps = [T0 + i * PERIOD for i in range(n)]
    with bag.BagWriter(path, storage) as w:
        w.add_topic(f"{PREFIX}/image", bag.T_IMAGE)
        w.add_topic(f"{PREFIX}/latched", bag.T_STRING, bag.QOS_LATCHED)
        w.write(f"{PREFIX}/latched", T0, bag.msg_class(bag.T_STRING)(data="hello"))
        for i, ns in enumerate(stamps):
            image = bag.image_msg(np.full((2, 3, 3), i, np.uint8), bag.header(ns, "cam"))
            w.write(f"{PREFIX}/image", ns, image)
    return stamps


class Received:
    """Arrival (monotonic s) and payload per topic, filled by subscription callbacks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_topic: dict[str, list[tuple[float, object]]] = defaultdict(list)

    def callback(self, topic: str, value=lambda m: m):
        def cb(msg: object) -> None:
            with self.lock:
                self.by_topic[topic].append((time.monotonic(), value(msg)))

        return cb

    def times(self, topic: str) -> np.ndarray:
        with self.lock:
            return np.array([t for t, _ in self.by_topic[topic]])

    def values(self, topic: str) -> list:
        with self.lock:
            return [v for _, v in self.by_topic[topic]]

    def wait(self, topic: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.by_topic[topic]) >= count:
                    return True
            time.sleep(0.02)
        return False


def stamp_of(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def clock_of(msg) -> int:
    return msg.clock.sec * 1_000_000_000 + msg.clock.nanosec


@pytest.fixture(scope="module")
def ros():
    """A private rclpy context on this module's domain with an executor spinning in a thread."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN, signal_handler_options=SignalHandlerOptions.NO)
    executor = SingleThreadedExecutor(context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield context, executor
    executor.shutdown()
    thread.join(timeout=5)
    rclpy.try_shutdown(context=context)


@pytest.fixture()
def listener(ros):
    """(node, Received) with subscriptions added by the test; the node is removed afterwards."""
    context, executor = ros
    node = rclpy.create_node(f"listener_{time.monotonic_ns()}", context=context)
    received = Received()
    yield node, received
    executor.remove_node(node)
    node.destroy_node()


def subscribe_images_and_clock(node, executor, received: Received) -> None:
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    node.create_subscription(Image, f"{PREFIX}/image", received.callback("image", stamp_of), 50)
    node.create_subscription(Clock, "/clock", received.callback("clock", clock_of), QoSProfile(depth=1000))
    executor.add_node(node)


def env_for_subprocess() -> dict[str, str]:
    return dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")


# ------------------------------------------------------------------------------------ replay
def test_quaternion_round_trip_and_tf_lookup() -> None:
    rng = np.random.default_rng(0)
    rotations = [np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(20)]
    rotations = [R * np.sign(np.linalg.det(R)) for R in rotations]
    rotations += [np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])]  # 180 degrees
    for R in rotations:
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, rng.normal(size=3)
        (msg,) = bag.tf_message([("a", "b", T)], T0).transforms
        np.testing.assert_allclose(conversions.transform_to_matrix(msg.transform), T, atol=1e-9)
        assert msg.transform.rotation.w >= 0
    # base -> lidar and base -> cam in a TF message: lookup(cam, lidar) composes through base.
    T_base_lidar = np.eye(4)
    T_base_lidar[:3, 3] = (1.0, 0.0, 1.8)
    T_base_cam = np.eye(4)
    T_base_cam[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # optical frame looking along base x
    T_base_cam[:3, 3] = (1.3, 0.0, 1.6)
    msg = bag.deserialize(
        bag.typestore().serialize_cdr(
            bag.tf_message([("base", "lidar", T_base_lidar), ("base", "cam", T_base_cam)], T0), bag.T_TF
        ),
        bag.T_TF,
    )
    tree = bag.StaticTransforms.from_messages([msg])
    T_cam_lidar = tree.lookup("cam", "lidar")
    np.testing.assert_allclose(T_cam_lidar, np.linalg.inv(T_base_cam) @ T_base_lidar, atol=1e-9)
    with pytest.raises(bag.BagError, match="no static transform"):
        tree.lookup("cam", "radar")


def test_replay_rate_scales_spacing(tmp_path: Path, ros, listener) -> None:
    from clip3d_ros.tools.replay import BagPlayer, ReplayOptions

    context, executor = ros
    node, received = listener
    stamps = write_image_bag(tmp_path / "b", n=8)
    subscribe_images_and_clock(node, executor, received)
    spacing = {}
    for rate in (1.0, 2.0):
        before = len(received.times("image"))
        pub_node = rclpy.create_node(f"player_{int(rate)}", context=context)
        player = BagPlayer(
            pub_node,
            tmp_path / "b",
            ReplayOptions(rate=rate, topics=[f"{PREFIX}/image"], wait_for=[f"{PREFIX}/image"]),
        )
        try:
            stats = player.play()
            assert received.wait("image", before + len(stamps), 5.0)
        finally:
            player.close()
            pub_node.destroy_node()
        assert stats.published[f"{PREFIX}/image"] == len(stamps)
        arrivals = received.times("image")[before:]
        assert received.values("image")[before:] == stamps  # order and header stamps kept
        spacing[rate] = float(np.median(np.diff(arrivals)))
        span = arrivals[-1] - arrivals[0]
        assert span == pytest.approx(0.7 / rate, rel=0.25)
    assert spacing[1.0] == pytest.approx(0.1, abs=0.025)
    assert spacing[2.0] == pytest.approx(0.05, abs=0.02)


def test_replay_cli_clock_matches_header_stamps(tmp_path: Path, ros, listener) -> None:
    _, executor = ros
    node, received = listener
    stamps = write_image_bag(tmp_path / "b", n=6, storage="mcap")
    subscribe_images_and_clock(node, executor, received)
    cmd = [
        sys.executable,
        "-m",
        "clip3d_core.cli",
        "replay",
        str(tmp_path / "b"),
        "--clock",
        "50",
        "--wait-for",
        f"{PREFIX}/image",
        "--wait-timeout",
        "20",
    ]
    proc = subprocess.run(cmd, env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert received.wait("image", len(stamps), 5.0)
    time.sleep(0.2)
    clocks = received.values("clock")
    assert received.values("image") == stamps
    # Every header stamp went out on /clock (just before its message), time never went back,
    # and ticks were published in between (50 Hz over 0.5 s of bag).
    assert set(stamps) <= set(clocks)
    assert all(b >= a for a, b in itertools.pairwise(clocks))
    assert len(clocks) >= len(stamps) + 10
    assert clocks[0] == stamps[0] and clocks[-1] == stamps[-1]


def test_replay_loop_jumps_back_and_latched_topic_reaches_late_joiner(tmp_path: Path, ros, listener) -> None:
    from std_msgs.msg import String

    from clip3d_ros.tools.replay import BagPlayer, ReplayOptions

    context, executor = ros
    node, received = listener
    stamps = write_image_bag(tmp_path / "b", n=4)
    subscribe_images_and_clock(node, executor, received)
    pub_node = rclpy.create_node("player_loop", context=context)
    player = BagPlayer(
        pub_node,
        tmp_path / "b",
        ReplayOptions(rate=4.0, loop=True, max_loops=2, clock_hz=100.0, wait_for=[f"{PREFIX}/image"]),
    )
    try:
        stats = player.play()
        assert received.wait("image", 2 * len(stamps), 5.0)
        # The latched topic keeps its transient-local QoS: a subscriber created after playing
        # still gets it.
        late = Received()
        node.create_subscription(
            String,
            f"{PREFIX}/latched",
            late.callback("latched", lambda m: m.data),
            QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL),
        )
        assert late.wait("latched", 1, 5.0)
        assert late.values("latched") == ["hello"]
    finally:
        player.close()
        pub_node.destroy_node()
    assert stats.loops == 2
    assert received.values("image") == stamps + stamps
    clocks = np.array(received.values("clock"), dtype=np.int64)
    jumps = np.flatnonzero(np.diff(clocks) < 0)
    assert len(jumps) == 1, "clock must jump back exactly once (at the loop restart)"
    assert clocks[jumps[0] + 1] == stamps[0]


# ------------------------------------------------------------------------------------ make-bag
def tiny_world(frames: int = 3) -> SyntheticConfig:
    """A 16-beam LiDAR and a 96x64 camera: ~2.8k points and ~0.25 s per frame."""
    base = SyntheticConfig(
        lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=256),
        cameras=(CameraConfig(width=96, height=64),),
    )
    return make_bag.drive_config(frames / 10.0, 10.0, seed=3, base=base)


@pytest.fixture(scope="module")
def drive_bag(tmp_path_factory) -> tuple[Path, SyntheticConfig]:
    cfg = tiny_world(3)
    path = tmp_path_factory.mktemp("drive") / "bag"
    make_bag.write_drive_bag(path, cfg, storage="sqlite3", labels=True, progress=False)
    return path, cfg


def read_all(path: Path) -> dict[str, list[tuple[int, object]]]:
    reader = bag.open_reader(path)
    try:
        out: dict[str, list[tuple[int, object]]] = defaultdict(list)
        for conn, ts, msg in bag.iter_messages(reader, reader.connections):
            out[conn.topic].append((ts, msg))
        return out
    finally:
        reader.close()


def test_make_bag_matches_the_synthetic_world(drive_bag) -> None:
    path, cfg = drive_bag
    assert bag.storage_of(path) == "sqlite3"
    msgs = read_all(path)
    assert {k: len(v) for k, v in msgs.items()} == {
        "/lidar/points": 3,
        "/camera/front/image_raw": 3,
        "/camera/front/camera_info": 3,
        "/tf_static": 1,
        "/lidar/labels": 3,
        "/lidar/label_classes": 1,
    }
    world = SyntheticWorld(cfg)
    frames = [world.frame(i) for i in range(3)]
    stamps = [f.stamp_ns for f in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    for topic in ("/lidar/points", "/camera/front/image_raw", "/camera/front/camera_info", "/lidar/labels"):
        # bag timestamps = header stamps = simulation time, in order
        assert [ts for ts, _ in msgs[topic]] == stamps
        assert [bag.stamp_ns(m.header) for _, m in msgs[topic]] == stamps
    for (_, cloud), (_, labels), (_, image), (_, info), frame in zip(
        msgs["/lidar/points"],
        msgs["/lidar/labels"],
        msgs["/camera/front/image_raw"],
        msgs["/camera/front/camera_info"],
        frames,
    ):
        assert cloud.header.frame_id == "lidar"
        assert [(f.name, f.datatype, f.offset) for f in cloud.fields] == [
            ("x", 7, 0),
            ("y", 7, 4),
            ("z", 7, 8),
            ("intensity", 7, 12),
        ]
        records = conversions.cloud_to_array(cloud)
        np.testing.assert_array_equal(conversions.points_for_model(records, "intensity"), frame.points)
        gt = conversions.cloud_to_array(labels)
        np.testing.assert_array_equal(
            gt["label"].astype(np.int64), np.where(frame.labels < 0, 65535, frame.labels)
        )
        assert image.encoding == "rgb8" and image.header.frame_id == "camera_front_optical_frame"
        np.testing.assert_array_equal(conversions.msg_to_rgb(image), frame.images[0])
        cam = frame.cameras[0]
        np.testing.assert_allclose(np.reshape(info.k, (3, 3)), cam.K)
        np.testing.assert_allclose(np.reshape(info.p, (3, 4))[:, :3], cam.K)
        assert (
            info.distortion_model == "plumb_bob"
            and len(info.d) == 5
            and (info.width, info.height) == (96, 64)
        )
    tf = bag.StaticTransforms.from_messages([m for _, m in msgs["/tf_static"]])
    np.testing.assert_allclose(
        tf.lookup("camera_front_optical_frame", "lidar"), frames[0].cameras[0].T_cam_lidar, atol=1e-9
    )
    classes = parse_vocabulary_map(msgs["/lidar/label_classes"][0][1].data)
    assert [e["name"] for e in classes["entries"]] == list(frames[0].class_names)


def test_make_bag_cli_mcap_compressed(tmp_path: Path) -> None:
    out = tmp_path / "bag"
    assert clip3d_main(["make-bag", str(out), "--seconds", "0.2", "--storage", "mcap", "--compressed"]) == 0
    assert bag.storage_of(out) == "mcap" and list(out.glob("*.mcap"))
    msgs = read_all(out)
    assert {k: len(v) for k, v in msgs.items()} == {
        "/lidar/points": 2,
        "/camera/front/image_raw/compressed": 2,
        "/camera/front/camera_info": 2,
        "/tf_static": 1,
    }
    (_, jpeg), (_, info) = msgs["/camera/front/image_raw/compressed"][0], msgs["/camera/front/camera_info"][0]
    assert jpeg.format == "jpeg"
    assert conversions.msg_to_rgb(jpeg).shape == (info.height, info.width, 3)
    # the default world: a 32-beam sweep, tens of thousands of finite points
    records = conversions.cloud_to_array(msgs["/lidar/points"][0][1])
    assert len(records) > 10_000 and np.isfinite(conversions.xyz_of(records)).all()
    # refuses to overwrite
    assert clip3d_main(["make-bag", str(out), "--seconds", "0.1"]) == 2


# ------------------------------------------------------------------------------------ label-bag
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import tiny_clip_config
    from clip3d_core.model.config import ModelConfig

    path = tmp_path_factory.mktemp("model") / "untrained.pt"
    return build_untrained_checkpoint(
        path,
        ModelConfig.small(embed_dim=32),
        tiny_clip_config(),
        vocabulary=["road", "building", "car|vehicle"],
    )


def test_label_bag_cli_writes_node_compatible_output(
    tmp_path: Path, drive_bag, checkpoint: Path, capsys
) -> None:
    from clip3d_core.segmenter import Segmenter

    in_path, _ = drive_bag
    out = tmp_path / "labelled"
    vocabulary = ["road|street", "building", "car", "tree"]
    rc = clip3d_main(
        [
            "label-bag",
            str(in_path),
            str(out),
            "--checkpoint",
            str(checkpoint),
            "--vocabulary",
            *vocabulary,
            "--camera",
            "/camera/front/image_raw",
            "/camera/front/camera_info",
            "--copy",
            "/tf_static",
            "/camera/front/camera_info",
            "--storage",
            "mcap",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labelled"] == 3 and report["failed"] == 0 and report["cameras_used"] == {"front": 3}
    assert bag.storage_of(out) == "mcap"
    inputs, outputs = read_all(in_path), read_all(out)
    assert {k: len(v) for k, v in outputs.items()} == {
        "/clip3d/labelled_points": 3,
        "/clip3d/labels_meta": 3,
        "/clip3d/vocabulary": 1,
        "/tf_static": 1,
        "/camera/front/camera_info": 3,
    }
    vocab_map = parse_vocabulary_map(outputs["/clip3d/vocabulary"][0][1].data)
    assert [e["name"] for e in vocab_map["entries"]] == ["road", "building", "car", "tree"]
    assert vocab_map["entries"][0]["synonyms"] == ["road", "street"]
    segmenter = Segmenter.from_checkpoint(checkpoint, vocabulary=vocabulary)
    colours = np.vstack([segmenter.vocabulary.colours, [conversions.UNLABELLED_RGB]])
    for (ts_in, cloud_in), (ts_out, cloud_out), (_, meta) in zip(
        inputs["/lidar/points"], outputs["/clip3d/labelled_points"], outputs["/clip3d/labels_meta"]
    ):
        assert ts_in == ts_out and cloud_out.header == cloud_in.header
        rec_in, rec_out = conversions.cloud_to_array(cloud_in), conversions.cloud_to_array(cloud_out)
        # the node's output layout, same points in the same order
        expected_dtype = conversions.labelled_points(
            np.zeros((0, 3), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.uint16),
            np.zeros(0, np.float32),
            np.zeros((0, 3), np.uint8),
        ).dtype
        assert rec_out.dtype == expected_dtype
        for name in ("x", "y", "z", "intensity"):
            np.testing.assert_array_equal(rec_out[name], rec_in[name])
        result = segmenter.segment(conversions.points_for_model(rec_in, "intensity"))
        # spconv on CPU sums in a thread-dependent order: scores agree to float noise, and a label
        # may flip only where two classes tie within that noise.
        assert np.mean(rec_out["label"] == result.labels) > 0.999
        np.testing.assert_allclose(rec_out["score"], result.scores, atol=1e-4)
        np.testing.assert_array_equal(
            conversions.unpack_rgb(rec_out["rgb"]), colours[np.minimum(rec_out["label"].astype(np.int64), 4)]
        )
        m = parse_labels_meta(meta.data)
        assert m["version"] == vocab_map["version"] and m["num_points"] == len(rec_in)
        assert m["cameras_used"] == ["front"] and bag.stamp_ns(cloud_in.header) == (
            m["stamp"]["sec"] * 1_000_000_000 + m["stamp"]["nanosec"]
        )


def test_label_bag_writes_instances_for_a_panoptic_checkpoint(tmp_path: Path, drive_bag, capsys) -> None:
    """A panoptic checkpoint: the labelled clouds gain `instance` (uint32, the node's layout), equal to
    what `Segmenter.segment` gives for the same points."""
    from clip3d_core.segmenter import Segmenter
    from clip3d_core.testing import PANOPTIC_VOCABULARY, tiny_panoptic_checkpoint

    vocabulary = list(PANOPTIC_VOCABULARY)
    ckpt = tiny_panoptic_checkpoint(tmp_path / "pan.pt")
    in_path, _ = drive_bag
    out = tmp_path / "labelled"
    rc = clip3d_main(["label-bag", str(in_path), str(out), "--checkpoint", str(ckpt),
                      "--vocabulary", *vocabulary, "--threads", "1"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["labelled"] == 3
    segmenter = Segmenter.from_checkpoint(ckpt, vocabulary=vocabulary)
    empty = np.zeros(0, np.float32)
    expected_dtype = conversions.labelled_points(
        np.zeros((0, 3), np.float32), empty, np.zeros(0, np.uint16), empty, np.zeros((0, 3), np.uint8),
        np.zeros(0, np.uint32),
    ).dtype
    clouds = [(i, o) for (_, i), (_, o) in zip(read_all(in_path)["/lidar/points"],
                                               read_all(out)["/clip3d/labelled_points"])]
    assert len(clouds) == 3
    for cloud_in, cloud_out in clouds:
        rec_in, rec_out = conversions.cloud_to_array(cloud_in), conversions.cloud_to_array(cloud_out)
        assert rec_out.dtype == expected_dtype
        result = segmenter.segment(conversions.points_for_model(rec_in, "intensity"))
        assert result.instances is not None and result.instances.max() > 0
        # spconv on CPU sums in a thread-dependent order: an id may differ only at float ties
        assert np.mean(rec_out["instance"] == result.instances) > 0.999
    # /clip3d/objects: per cloud the node's MarkerArray (DELETEALL, then a cube + a text per instance)
    objects = read_all(out)["/clip3d/objects"]
    assert len(objects) == 3
    for (_, cloud_out), (_, arr) in zip(clouds, objects):
        ids = np.unique(conversions.cloud_to_array(cloud_out)["instance"])
        clear, *rest = arr.markers
        assert clear.action == 3 and len(rest) == 2 * int((ids > 0).sum())
        assert sorted({m.id for m in rest}) == [int(i) for i in ids[ids > 0]]


def test_label_bag_skips_bad_clouds_and_keeps_going(
    tmp_path: Path, checkpoint: Path
) -> None:
    from clip3d_core.segmenter import Segmenter
    from clip3d_ros.tools.label_bag import BagLabeller, LabelOptions

    good = np.zeros(5, make_bag.XYZI)
    good["x"] = np.arange(5)
    bad = np.zeros(5, np.dtype({"names": ["a", "b", "c"], "formats": ["<f4"] * 3}))  # no x/y/z
    with bag.BagWriter(tmp_path / "in", "sqlite3") as w:
        w.add_topic("/cloud", bag.T_CLOUD)
        for i, records in enumerate((good, bad, good)):
            w.write("/cloud", T0 + i * PERIOD, bag.cloud_msg(records, bag.header(T0 + i * PERIOD, "lidar")))
    stats = BagLabeller(
        Segmenter.from_checkpoint(checkpoint), LabelOptions(cloud_topic="/cloud", progress=False)
    ).run(tmp_path / "in", tmp_path / "out")
    assert (stats.clouds, stats.labelled, stats.failed) == (3, 2, 1)
    outputs = read_all(tmp_path / "out")
    assert [ts for ts, _ in outputs["/clip3d/labelled_points"]] == [T0, T0 + 2 * PERIOD]
    with pytest.raises(bag.BagError, match="no topic"):
        BagLabeller(Segmenter.from_checkpoint(checkpoint), LabelOptions(cloud_topic="/nope")).run(
            tmp_path / "in", tmp_path / "out2"
        )


def test_label_bag_needs_no_ros_runtime(tmp_path: Path, drive_bag, checkpoint: Path) -> None:
    """label-bag with every ROS Python package made unimportable: rosbags only."""
    in_path, _ = drive_bag
    blocker = (
        "import sys\nfor m in ('rclpy', 'sensor_msgs', 'std_msgs', 'builtin_interfaces', 'rosgraph_msgs'):\n"
    )
    blocker += (
        "    sys.modules[m] = None\nfrom clip3d_core.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        blocker,
        "label-bag",
        str(in_path),
        str(tmp_path / "out"),
        "--checkpoint",
        str(checkpoint),
        "--max-frames",
        "1",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["labelled"] == 1
    assert {k: len(v) for k, v in read_all(tmp_path / "out").items()} == {
        "/clip3d/labelled_points": 1,
        "/clip3d/labels_meta": 1,
        "/clip3d/vocabulary": 1,
    }


def _cloud_bag(path: Path, clouds: int = 2, storage: str = "sqlite3") -> None:
    rng = np.random.default_rng(len(path.name))
    with bag.BagWriter(path, storage) as w:
        w.add_topic("/lidar/points", bag.T_CLOUD)
        for k in range(clouds):
            pts = np.zeros(50, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))
            for c in "xyz":
                pts[c] = rng.normal(0, 10, 50)
            ns = 1_000_000_000 * (k + 1)
            w.write("/lidar/points", ns, bag.cloud_msg(pts, bag.header(ns, "lidar")))


def _fake_labeller():
    from clip3d_ros.testing import FakeSegmenter
    from clip3d_ros.tools.label_bag import BagLabeller, LabelOptions

    seg = FakeSegmenter()
    seg.swap_vocabulary(*seg.encode_vocabulary(["a", "b"]))
    return BagLabeller(seg, LabelOptions(progress=False))


def test_label_bags_shards_a_fleet_writes_mcap_and_resumes(tmp_path: Path) -> None:
    from clip3d_ros.tools.label_bag import Shard, label_bags

    fleet = tmp_path / "fleet"
    for name in ("d", "a", "c", "b"):
        _cloud_bag(fleet / name)
    extra = tmp_path / "e"
    _cloud_bag(extra, clouds=3)
    out = tmp_path / "out"
    # two processes (torchrun ranks) share the sorted list a, b, c, d, e: each bag exactly once
    runs = [label_bags(_fake_labeller(), [fleet, extra], out, Shard(r, 2)) for r in (0, 1)]
    assert [sorted(r) for r in runs] == [["a", "c", "e"], ["b", "d"]]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "d", "e"]
    assert all(bag.storage_of(out / n) == "mcap" for n in "abcde")  # the rosbag2 default since Iron
    assert runs[0]["e"].labelled == 3
    # a run killed while writing c: finished bags are skipped, c is redone from scratch
    (out / "c").rename(out / "c.partial")
    (out / "c.partial" / "junk").write_text("half-written")
    again = label_bags(_fake_labeller(), [fleet, extra], out, Shard(0, 1))
    assert {k for k, v in again.items() if v is not None} == {"c"} and again["c"].labelled == 2
    assert not (out / "c.partial").exists() and bag.storage_of(out / "c") == "mcap"


def test_label_bag_shard_from_torchrun_environment(monkeypatch) -> None:
    from clip3d_ros.tools.label_bag import Shard

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.from_env() == Shard(3, 4)
    assert Shard.from_env("1/2") == Shard(1, 2)
    assert Shard(1, 2).mine([Path(str(i)) for i in range(5)]) == [Path("1"), Path("3")]
    with pytest.raises(ValueError):
        Shard.from_env("2/2")
