"""The node in-process on real DDS (loopback, own domain and topic namespace), with the fake
segmenter: outputs, cameras, bad input, live vocabulary changes, parameters, sim time, clock jumps.

The model itself is exercised with a real tiny checkpoint in test_ros_real.py.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python wheels (rclpy) not installed")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from clip3d_core.clip import Vocabulary, VocabularyError  # noqa: E402
from clip3d_ros import conversions as cv  # noqa: E402
from clip3d_ros.node import Clip3DNode  # noqa: E402
from clip3d_ros.testing import FakeSegmenter, fake_labels, ros_domain_id, wait_for  # noqa: E402
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map, vocabulary_qos  # noqa: E402

pytestmark = pytest.mark.ros

XYZI = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])
T_CAM_LIDAR = [0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
_ns_counter = itertools.count()


@pytest.fixture(scope="module")
def context():
    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id(1))
    yield ctx
    rclpy.shutdown(context=ctx)



def stamp(sec: float) -> Any:
    from builtin_interfaces.msg import Time

    ns = round(sec * 1e9)
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def cloud_msg(
    t: float, n: int = 2000, seed: int = 0, dtype: np.dtype = XYZI, height: int = 1
) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    pts = np.zeros(n, dtype)
    for c in dtype.names:
        pts[c] = (rng.normal(0, 20, n) if c in "xyz" else rng.uniform(0, 100, n)).astype(pts[c].dtype)
    msg = cv.array_to_cloud(pts, height=height)
    msg.header.stamp = stamp(t)
    msg.header.frame_id = "lidar"
    return msg, pts


def image_msg(t: float, h: int = 48, w: int = 64, encoding: str = "rgb8") -> Image:
    img = Image(
        height=h, width=w, encoding=encoding, step=3 * w, data=bytes(np.full(h * w * 3, 90, np.uint8))
    )
    img.header.stamp, img.header.frame_id = stamp(t), "front_optical"
    return img


def info_msg(t: float, fx: float = 50.0, h: int = 48, w: int = 64) -> CameraInfo:
    info = CameraInfo(width=w, height=h, distortion_model="plumb_bob")
    info.k = [fx, 0.0, w / 2, 0.0, fx, h / 2, 0.0, 0.0, 1.0]
    info.p = [fx, 0.0, w / 2, 0.0, 0.0, fx, h / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.header.stamp, info.header.frame_id = stamp(t), "front_optical"
    return info


class Harness:
    """A Clip3DNode plus a peer node publishing its inputs and recording its outputs, spun by one
    executor thread; each harness lives in its own namespace."""

    def __init__(
        self, context: Context, segmenter: Any, params: dict[str, Any], subscribe: bool = True
    ) -> None:
        self.ns = f"/t{os.getpid()}_{next(_ns_counter)}"
        base = {
            "qos.cloud.reliability": "reliable",
            "qos.image.reliability": "reliable",
        }
        overrides = [Parameter(k, value=v) for k, v in {**base, **params}.items()]
        self.node = Clip3DNode(
            segmenter=segmenter, context=context, namespace=self.ns, parameter_overrides=overrides
        )
        self.peer = Node("peer", namespace=self.ns, context=context)
        self.lock = threading.Lock()
        self.outputs: list[PointCloud2] = []
        self.metas: list[dict] = []
        self.maps: list[dict] = []
        self.diagnostics: list[DiagnosticArray] = []
        rel = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        if subscribe:
            self.peer.create_subscription(
                PointCloud2, f"{self.ns}/clip3d/output/pointcloud", self._add(self.outputs), rel
            )
        self.peer.create_subscription(
            String, f"{self.ns}/clip3d/labels_meta", self._add(self.metas, parse_labels_meta), rel
        )
        map_qos = vocabulary_qos()
        map_qos.depth = 100
        self.peer.create_subscription(
            String, f"{self.ns}/clip3d/vocabulary", self._add(self.maps, parse_vocabulary_map), map_qos
        )
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self._add(self.diagnostics), 10)
        self.cloud_pub = self.peer.create_publisher(PointCloud2, f"{self.ns}/clip3d/input/pointcloud", rel)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.cloud_pub.get_subscription_count() > 0, 10), "node never subscribed"
        if subscribe:
            assert wait_for(lambda: self.node._cloud_pub.get_subscription_count() > 0, 10)
        # The start-up map is published before this peer exists; transient-local depth 1 replays only
        # the newest map to a late joiner, so a test that changes the vocabulary straight away would
        # otherwise race discovery and never see v1 (as a late subscriber should not).
        assert wait_for(lambda: self.maps, 10), "the start-up vocabulary map never arrived"

    def _add(self, store: list, convert: Callable[[Any], Any] = lambda m: m) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            with self.lock:
                store.append(convert(msg))

        return cb

    def publisher(self, msg_type: type, topic: str) -> Any:
        pub = self.peer.create_publisher(msg_type, f"{self.ns}/{topic}", QoSProfile(depth=50))
        assert wait_for(lambda: pub.get_subscription_count() > 0, 10), f"node never subscribed {topic}"
        return pub

    def publish_and_wait(self, msg: PointCloud2, timeout: float = 10.0) -> PointCloud2:
        n = len(self.outputs)
        self.cloud_pub.publish(msg)
        assert wait_for(lambda: len(self.outputs) > n, timeout), "no labelled cloud came back"
        return self.outputs[-1]

    def meta_for(self, out: PointCloud2) -> dict:
        key = (out.header.stamp.sec, out.header.stamp.nanosec)
        found = wait_for(
            lambda: [m for m in self.metas if (m["stamp"]["sec"], m["stamp"]["nanosec"]) == key], 5
        )
        assert found, f"no labels_meta for stamp {key}"
        return found[-1]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self.peer.destroy_node()


@pytest.fixture
def harness(context):
    made: list[Harness] = []

    def make(segmenter: Any = None, subscribe: bool = True, **params: Any) -> Harness:
        h = Harness(context, segmenter or FakeSegmenter(), params, subscribe)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def check_labelled(out: PointCloud2, pts: np.ndarray, vocab_entries: list[str]) -> np.ndarray:
    """Output = input header/points/order with the fake segmenter's labels and their colours."""
    got = cv.cloud_to_array(out)
    xyz = cv.xyz_of(pts)
    assert len(got) == len(pts)
    np.testing.assert_array_equal(cv.xyz_of(got), xyz)  # same points, same order, bit-exact
    labels = fake_labels(xyz, len(vocab_entries))
    np.testing.assert_array_equal(got["label"], labels)
    colours = np.vstack([Vocabulary.from_strings(vocab_entries).colours, [cv.UNLABELLED_RGB]])
    np.testing.assert_array_equal(cv.unpack_rgb(got["rgb"]), colours[np.minimum(labels, len(vocab_entries))])
    return got


# ---------------------------------------------------------------------------------------- tests
def test_labels_a_cloud_with_header_order_fields_map_and_meta(harness) -> None:
    seg = FakeSegmenter()
    h = harness(seg, vocabulary=["car|automobile", "road", "tree"])
    msg, pts = cloud_msg(1000.0, n=3000)
    pts["x"][5] = np.nan
    msg.data = cv.array_to_cloud(pts).data
    out = h.publish_and_wait(msg)
    assert out.header == msg.header
    assert [f.name for f in out.fields] == ["x", "y", "z", "intensity", "label", "score", "rgb"]
    got = check_labelled(out, pts, ["car|automobile", "road", "tree"])
    np.testing.assert_array_equal(got["intensity"], pts["intensity"])
    assert got["label"][5] == 65535 and not out.is_dense
    assert (got["score"][got["label"] != 65535] == np.float32(1 / 3)).all()
    meta = h.meta_for(out)
    assert meta["version"] == 1 and meta["num_points"] == 3000 and meta["frame_id"] == "lidar"
    assert meta["lidar_only"] is True
    maps = wait_for(lambda: h.maps)  # transient local: a subscriber joining later still gets it
    assert maps[-1]["version"] == 1
    assert [e["name"] for e in maps[-1]["entries"]] == ["car", "road", "tree"]
    assert maps[-1]["entries"][0]["synonyms"] == ["car", "automobile"]
    t = h.node.timings[-1]
    assert t.num_points == 3000 and t.model_ms >= 0 and t.total_ms >= t.model_ms


def test_other_layouts_and_organised_clouds_are_labelled(harness) -> None:
    h = harness(vocabulary=["a", "b", "c", "d"])
    layouts = {
        "float64": np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("intensity", "<f8")]),
        "big_endian": np.dtype([("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("intensity", ">u2")]),
        "int16": np.dtype([("x", "<i2"), ("y", "<i2"), ("z", "<i2")]),
    }
    for k, dtype in enumerate(layouts.values()):
        msg, pts = cloud_msg(1000.0 + k, n=500, dtype=dtype)
        out = h.publish_and_wait(msg)
        got = check_labelled(out, pts, ["a", "b", "c", "d"])
        assert ("intensity" in got.dtype.names) == ("intensity" in dtype.names)
    msg, pts = cloud_msg(1010.0, n=64 * 32, height=32)
    out = h.publish_and_wait(msg)
    assert (out.height, out.width) == (32, 64)  # organised in, organised out
    check_labelled(out, pts, ["a", "b", "c", "d"])


def test_named_intensity_field_missing_is_reported_and_the_cloud_still_labelled(harness) -> None:
    h = harness(vocabulary=["a", "b"], intensity_field="reflectivity")
    msg, pts = cloud_msg(1020.0, n=800)  # x, y, z, intensity: no "reflectivity"
    got = check_labelled(h.publish_and_wait(msg), pts, ["a", "b"])
    assert "intensity" not in got.dtype.names
    assert h.node.diagnostics.bad_inputs["missing_intensity"] == 1
    assert "reflectivity" in h.node.diagnostics.last_bad_input


def _bad_clouds() -> dict[str, PointCloud2]:
    bad = {}
    m, _ = cloud_msg(1.0, n=10, dtype=np.dtype([("intensity", "<f4"), ("ring", "<u2")]))
    bad["no_xyz"] = m
    m, _ = cloud_msg(2.0, n=10)
    m.data = m.data[:-3]
    bad["size_mismatch"] = m
    m, _ = cloud_msg(3.0, n=10)
    m.row_step = 4
    bad["row_step"] = m
    m, _ = cloud_msg(4.0, n=10)
    m.fields = [PointField(name="x", offset=0, datatype=99, count=1)]
    bad["datatype"] = m
    m, _ = cloud_msg(5.0, n=10)
    m.fields = [PointField(name=c, offset=20 + 4 * i, datatype=7, count=1) for i, c in enumerate("xyz")]
    bad["field_out_of_bounds"] = m
    m, _ = cloud_msg(6.0, n=5000)
    bad["too_many_points"] = m  # max_points is 4000 below
    return bad


def test_bad_clouds_are_skipped_and_the_node_keeps_serving(harness) -> None:
    h = harness(vocabulary=["a", "b"], max_points=4000)
    for kind, msg in _bad_clouds().items():
        before = sum(h.node.diagnostics.bad_inputs.values())
        h.cloud_pub.publish(msg)
        assert wait_for(lambda b=before: sum(h.node.diagnostics.bad_inputs.values()) > b), kind
    assert h.outputs == []
    assert h.node.diagnostics.bad_inputs["cloud"] == 6 and h.node.diagnostics.errors == 0
    assert "max_points" in h.node.diagnostics.last_bad_input
    empty, _ = cloud_msg(7.0, n=0)
    out = h.publish_and_wait(empty)  # an empty cloud is answered with an empty labelled cloud
    assert out.width == 0 and out.header.stamp == empty.header.stamp
    msg, pts = cloud_msg(8.0, n=1000)
    check_labelled(h.publish_and_wait(msg), pts, ["a", "b"])
    # ... and /diagnostics said so
    diag = wait_for(
        lambda: [
            a for a in h.diagnostics if any("bad_cloud" in [kv.key for kv in s.values] for s in a.status)
        ]
    )
    inputs = next(s for s in diag[-1].status if s.name == "clip3d: input")
    values = {kv.key: kv.value for kv in inputs.values}
    assert int(values["bad_cloud"]) == 6


def test_cameras_used_missing_and_broken(harness) -> None:
    seg = FakeSegmenter()
    h = harness(
        seg,
        vocabulary=["a", "b"],
        **{
            "cameras.names": ["front"],
            "cameras.front.image_topic": "front/image",
            "cameras.front.info_topic": "front/info",
            "cameras.front.T_cam_lidar": T_CAM_LIDAR,
            "sync.camera_timeout": 0.2,
            "diagnostics_period": 60.0,  # the levels checked below must not be consumed by the timer
        },
    )
    img_pub = h.publisher(Image, "front/image")
    info_pub = h.publisher(CameraInfo, "front/info")

    def frame(t: float, image: Image | None, info: CameraInfo | None) -> tuple[dict, int]:
        if info is not None:
            info_pub.publish(info)
            wait_for(
                lambda: (
                    h.node._cameras[0].info is not None
                    and h.node._cameras[0].info.header.stamp == info.header.stamp
                )
            )
        if image is not None:
            img_pub.publish(image)
        msg, pts = cloud_msg(t, n=800)
        out = h.publish_and_wait(msg)
        check_labelled(out, pts, ["a", "b"])
        return h.meta_for(out), seg.calls[-1][2]

    meta, n_images = frame(100.0, image_msg(100.01), info_msg(100.0))
    assert meta["cameras_used"] == ["front"] and not meta["lidar_only"] and n_images == 1
    # image half the CameraInfo size (e.g. a downscaled stream): camera model scaled, still used
    meta, n_images = frame(100.1, image_msg(100.1, h=24, w=32), None)
    assert meta["cameras_used"] == ["front"] and n_images == 1
    # dead camera: the cloud is labelled from LiDAR alone after the camera timeout
    t0 = time.monotonic()
    meta, n_images = frame(101.0, None, None)
    assert meta["lidar_only"] and meta["cameras_missing"] == ["front"] and n_images == 0
    assert time.monotonic() - t0 < 2.0
    # broken image encodings / sizes and zero intrinsics: camera dropped from that frame only
    broken = [
        (image_msg(102.0, encoding="32FC1"), None, "unsupported image encoding"),
        (
            Image(
                header=image_msg(103.0).header,
                height=48,
                width=64,
                encoding="rgb8",
                step=192,
                data=b"\x00" * 10,
            ),
            None,
            "data has 10 bytes",
        ),
        (image_msg(104.0), info_msg(104.0, fx=0.0), "focal"),
    ]
    for k, (img, info, why) in enumerate(broken):
        errors = h.node.diagnostics.cameras[0].errors
        meta, n_images = frame(102.0 + k, img, info)
        assert meta["lidar_only"] and n_images == 0, why
        assert h.node.diagnostics.cameras[0].errors == errors + 1
        assert why in h.node.diagnostics.cameras[0].last_error
    meta, n_images = frame(110.0, image_msg(110.0), info_msg(110.0))  # recovers
    assert meta["cameras_used"] == ["front"] and n_images == 1
    snap = h.node.diagnostics.snapshot()
    assert snap["lidar_only"] == 4 and snap["cameras"]["front"]["used"] == 3 and snap["errors"] == 0
    levels = {name: level for level, name, _, _ in h.node.diagnostics.statuses()}
    assert levels["clip3d: camera front"] == 1  # WARN: problems since the last report
    levels = {name: level for level, name, _, _ in h.node.diagnostics.statuses()}
    assert levels["clip3d: camera front"] == 0  # and it clears once they stop


def test_a_lost_image_costs_no_cloud(harness) -> None:
    """A cloud whose image was lost leaves together with the next matched cloud: both are labelled
    (the worker is idle, so nothing is superseded) and nothing counts as dropped."""
    seg = FakeSegmenter()
    h = harness(
        seg,
        **{
            "cameras.names": ["front"],
            "cameras.front.image_topic": "front/image",
            "cameras.front.info_topic": "front/info",
            "cameras.front.T_cam_lidar": T_CAM_LIDAR,
            "sync.camera_timeout": 10.0,  # only the next image can decide the first cloud
        },
        vocabulary=["a", "b"],
    )
    img_pub, info_pub = h.publisher(Image, "front/image"), h.publisher(CameraInfo, "front/info")
    info_pub.publish(info_msg(0.0))
    wait_for(lambda: h.node._cameras[0].info is not None)
    first, first_pts = cloud_msg(300.0, n=300)  # its image is lost
    second, second_pts = cloud_msg(300.1, n=300, seed=1)
    h.cloud_pub.publish(first)
    time.sleep(0.2)
    h.cloud_pub.publish(second)
    time.sleep(0.2)
    assert not h.outputs
    img_pub.publish(image_msg(300.1))  # completes the second, decides the first: both at once
    assert wait_for(lambda: len(h.outputs) == 2), f"{len(h.outputs)} labelled clouds"
    for out, pts, cameras in ((h.outputs[0], first_pts, []), (h.outputs[1], second_pts, ["front"])):
        check_labelled(out, pts, ["a", "b"])
        assert h.meta_for(out)["cameras_used"] == cameras
    assert h.node.diagnostics.dropped == 0


def test_compressed_camera(harness) -> None:
    from PIL import Image as PILImage

    seg = FakeSegmenter()
    h = harness(
        seg,
        vocabulary=["a"],
        **{
            "cameras.names": ["cam"],
            "cameras.cam.image_topic": "cam/compressed",
            "cameras.cam.info_topic": "cam/info",
            "cameras.cam.transport": "compressed",
            "cameras.cam.T_cam_lidar": T_CAM_LIDAR,
        },
    )
    img_pub, info_pub = h.publisher(CompressedImage, "cam/compressed"), h.publisher(CameraInfo, "cam/info")
    info_pub.publish(info_msg(5.0))
    wait_for(lambda: h.node._cameras[0].info is not None)
    buf = io.BytesIO()
    PILImage.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(buf, format="JPEG")
    img_pub.publish(CompressedImage(header=image_msg(5.0).header, format="jpeg", data=buf.getvalue()))
    msg, _ = cloud_msg(5.0, n=100)
    out = h.publish_and_wait(msg)
    assert h.meta_for(out)["cameras_used"] == ["cam"] and seg.calls[-1][2] == 1
    img_pub.publish(CompressedImage(header=image_msg(6.0).header, format="jpeg", data=b"\xff\xd8garbage"))
    msg, _ = cloud_msg(6.0, n=100)
    out = h.publish_and_wait(msg)
    assert h.meta_for(out)["lidar_only"] and "cannot decode" in h.node.diagnostics.cameras[0].last_error


def test_vocabulary_storm_keeps_every_frame_consistent(harness) -> None:
    seg = FakeSegmenter(encode_delay_s=0.01)
    h = harness(seg, vocabulary=["v0a", "v0b"])
    vocabularies = [[f"class{j}_{i}" for j in range(2 + i % 5)] for i in range(25)]
    results: list[bool] = []

    def storm() -> None:
        for vocab in vocabularies:
            results.append(h.node.set_parameters([Parameter("vocabulary", value=vocab)])[0].successful)
            bad = h.node.set_parameters([Parameter("vocabulary", value=[vocab[0], vocab[0].upper()])])[0]
            results.append(not bad.successful and "duplicate" in bad.reason)
            time.sleep(0.03)

    clouds = {}
    thread = threading.Thread(target=storm)
    thread.start()
    for k in range(40):  # a stream while the vocabulary changes underneath it; one frame in flight at
        # a time, so only the vocabulary hand-over (not CPU starvation on a busy host) could lose one
        msg, pts = cloud_msg(2000.0 + k * 0.04, n=1500, seed=k)
        clouds[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = pts
        h.publish_and_wait(msg)
        time.sleep(0.01)
    thread.join()
    assert all(results)
    assert len(h.outputs) == 40
    assert h.node.diagnostics.dropped == 0
    final = wait_for(lambda: h.maps and h.maps[-1]["version"] == max(seg.encoded) and h.maps)
    assert [e["name"] for e in final[-1]["entries"]] == vocabularies[-1]
    published = {m["version"]: [e["name"] for e in m["entries"]] for m in h.maps}
    versions = []
    for out in h.outputs:
        meta = h.meta_for(out)
        v = meta["version"]
        entries = seg.encoded[v]
        assert published.get(v) == entries, f"frame labelled with v{v}, whose map was never published"
        check_labelled(out, clouds[(out.header.stamp.sec, out.header.stamp.nanosec)], entries)
        versions.append(v)
    assert versions == sorted(versions)  # never back to an older vocabulary
    assert len(set(versions)) > 3  # the storm really happened during the stream


def test_parameter_changes_are_validated_with_reasons(harness) -> None:
    h = harness(vocabulary=["a", "b"])

    def set_(name: str, value: Any) -> Any:
        if value == []:  # an untyped empty list would be a byte array
            return h.node.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, value)])[0]
        return h.node.set_parameters([Parameter(name, value=value)])[0]

    for value, reason in [
        ([], "empty"),
        (["car", "Car"], "duplicate"),
        (["car", ""], "empty vocabulary entry"),
        (["car||auto"], "empty synonym"),
        ([f"c{i}" for i in range(1025)], "at most 1024"),
        (["x" * 300], "longer than"),
    ]:
        result = set_("vocabulary", value)
        assert not result.successful and reason in result.reason, (value[:3], result.reason)
    assert not set_("vocabulary", "car").successful  # wrong type
    assert not set_("score_threshold", 1.5).successful  # range
    assert not set_("device", "cuda:0").successful  # read-only
    assert h.node.get_parameter("vocabulary").value == ["a", "b"]
    assert set_("score_threshold", 0.6).successful and set_("sync.slop", 0.08).successful
    assert h.node._sync.slop == 0.08
    msg, pts = cloud_msg(50.0, n=400)
    got = cv.cloud_to_array(h.publish_and_wait(msg))
    assert (got["label"] == 65535).all()  # fake scores are 1/2 < 0.6: all below threshold
    assert set_("score_threshold", 0.0).successful
    assert set_("vocabulary", ["a", "b", "c"]).successful
    assert wait_for(lambda: h.maps and h.maps[-1]["version"] == 2)
    msg, pts = cloud_msg(51.0, n=400)
    out = h.publish_and_wait(msg)
    check_labelled(out, pts, ["a", "b", "c"])
    assert h.meta_for(out)["version"] == 2
    descriptor = h.node.describe_parameter("sync.camera_timeout")
    assert descriptor.description and descriptor.floating_point_range[0].to_value == 10.0
    assert h.node.describe_parameter("checkpoint").read_only


class BankSegmenter(FakeSegmenter):
    """A fake whose text comes from a fixed bank of phrases, as with the `embedding_bank` parameter."""

    BANK = frozenset({"car", "road", "tree"})

    def check_vocabulary(self, names: Vocabulary) -> None:
        missing = {s for e in names.entries for s in (e.name, *e.synonyms)} - self.BANK
        if missing:
            raise VocabularyError(f"not in the embedding bank: {sorted(missing)}")


def test_vocabulary_the_segmenter_cannot_encode_is_rejected_up_front(harness) -> None:
    seg = BankSegmenter()
    h = harness(seg, vocabulary=["car", "road"])
    result = h.node.set_parameters([Parameter("vocabulary", value=["car", "forklift"])])[0]
    assert not result.successful and "forklift" in result.reason
    assert h.node.get_parameter("vocabulary").value == ["car", "road"]  # still the one in force
    assert h.node.set_parameters([Parameter("vocabulary", value=["tree", "car"])])[0].successful
    assert wait_for(lambda: h.maps and [e["name"] for e in h.maps[-1]["entries"]] == ["tree", "car"])
    assert sorted(seg.encoded) == [1, 2]  # the rejected one was never encoded


def test_skips_work_without_subscribers(harness) -> None:
    seg = FakeSegmenter()
    h = harness(seg, subscribe=False)
    for k in range(3):
        msg, _ = cloud_msg(60.0 + k, n=100)
        h.cloud_pub.publish(msg)
    assert wait_for(lambda: h.node.diagnostics.skipped == 3)
    assert seg.calls == []


def test_sim_time_latency_and_looped_bag_reset(harness) -> None:
    seg = FakeSegmenter()
    h = harness(
        seg,
        use_sim_time=True,
        **{
            "cameras.names": ["front"],
            "cameras.front.image_topic": "front/image",
            "cameras.front.info_topic": "front/info",
            "cameras.front.T_cam_lidar": T_CAM_LIDAR,
        },
    )
    clock_pub = h.peer.create_publisher(Clock, "/clock", 10)
    img_pub, info_pub = h.publisher(Image, "front/image"), h.publisher(CameraInfo, "front/info")
    info_pub.publish(info_msg(0.0))
    wait_for(lambda: h.node._cameras[0].info is not None)

    def tick(t: float) -> dict:
        clock_pub.publish(Clock(clock=stamp(t + 0.05)))  # the bag clock runs 50 ms ahead of the data
        wait_for(lambda: abs(h.node.get_clock().now().nanoseconds - round((t + 0.05) * 1e9)) < 1000, 5)
        img_pub.publish(image_msg(t))
        msg, _ = cloud_msg(t, n=200)
        return h.meta_for(h.publish_and_wait(msg))

    for k in range(3):
        assert tick(500.0 + 0.1 * k)["cameras_used"] == ["front"]
    lat = h.node.timings[-1].header_to_publish_ms
    assert 45.0 <= lat < 1000.0  # sim-time latency, not wall time since 1970
    for k in range(3):  # the bag loops: stamps jump back 500 s
        assert tick(0.5 + 0.1 * k)["cameras_used"] == ["front"]
    assert h.node.diagnostics.sync_resets == 1
    snap = h.node.diagnostics.snapshot()
    assert snap["frames"] == 6
    assert 5.0 < snap["rate_in_hz"] < 20.0  # 10 Hz from the stamps since the jump, not 500 s spans


def test_diagnostics_report_budget_and_vocabulary(harness) -> None:
    seg = FakeSegmenter(segment_delay_s=0.03)
    h = harness(seg, vocabulary=["a", "b"], budget_ms=5.0, diagnostics_period=0.2)
    for k in range(3):
        msg, _ = cloud_msg(70.0 + k * 0.1, n=100)
        h.publish_and_wait(msg)

    def report() -> Any:
        for arr in reversed(h.diagnostics):
            names = {s.name: s for s in arr.status}
            pipe = names.get("clip3d: pipeline")
            if pipe is not None and {kv.key: kv.value for kv in pipe.values}.get("frames") == "3":
                return names
        return None

    names = wait_for(report, 5)
    assert names, "no /diagnostics report with the three frames"
    pipe = {kv.key: kv.value for kv in names["clip3d: pipeline"].values}
    assert names["clip3d: pipeline"].level == b"\x01" and "over budget" in names["clip3d: pipeline"].message
    assert float(pipe["latency_p50_ms"]) >= 30.0 and float(pipe["model_p50_ms"]) >= 30.0
    assert abs(float(pipe["rate_in_hz"]) - 10.0) < 0.5  # from header stamps, not arrival times
    vocab = {kv.key: kv.value for kv in names["clip3d: vocabulary"].values}
    assert vocab["version"] == "1" and vocab["names"] == "a, b"


def test_vocabulary_map_json_is_the_documented_shape(harness) -> None:
    h = harness(vocabulary=["car|automobile", "traffic cone"])
    raw = wait_for(lambda: h.maps)[-1]
    assert set(raw) == {"version", "entries"}
    assert raw["entries"][1] == {
        "id": 1,
        "name": "traffic cone",
        "synonyms": ["traffic cone"],
        "colour": list(map(int, Vocabulary.from_strings(["traffic cone"]).colours[0])),
    }
    json.dumps(raw)  # plain JSON types only


def test_calibration_file_gives_intrinsics_and_extrinsics(harness, tmp_path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(
        "P2: 50 0 32 5 0 50 24 0 0 0 1 0\n"  # fx=50 and a 0.1 m baseline (P[0,3] = fx * 0.1)
        "R0_rect: 1 0 0 0 1 0 0 0 1\n"
        "Tr_velo_to_cam: 0 -1 0 0 0 0 -1 0 1 0 0 0\n"
    )
    seg = FakeSegmenter()
    h = harness(
        seg,
        **{
            "cameras.names": ["cam2"],
            "cameras.cam2.image_topic": "cam2/image",
            "cameras.cam2.info_topic": "cam2/info",  # nothing is published there
            "cameras.cam2.calibration_file": str(calib),
        },
    )
    img_pub = h.publisher(Image, "cam2/image")
    img_pub.publish(image_msg(9.0))
    msg, _ = cloud_msg(9.0, n=300)
    out = h.publish_and_wait(msg)
    assert h.meta_for(out)["cameras_used"] == ["cam2"]
    (cam,) = seg.last_cameras
    assert (cam.fx, cam.cx, cam.width, cam.height) == (50.0, 32.0, 64, 48)
    np.testing.assert_allclose(cam.T_cam_lidar[:3, 3], [0.1, 0, 0])  # the stereo baseline folded in
    np.testing.assert_allclose(cam.T_cam_lidar[:3, :3], np.reshape(T_CAM_LIDAR, (4, 4))[:3, :3])


def test_real_kitti_frame_with_png_and_calibration(harness, shared_data) -> None:
    root = shared_data / "kitti_object" / "training"
    seg = FakeSegmenter()
    h = harness(
        seg,
        vocabulary=["car", "road", "building"],
        **{
            "cameras.names": ["image_2"],
            "cameras.image_2.image_topic": "image_2/compressed",
            "cameras.image_2.transport": "compressed",
            "cameras.image_2.calibration_file": str(root / "calib" / "000000.txt"),
        },
    )
    img_pub = h.publisher(CompressedImage, "image_2/compressed")
    png = CompressedImage(format="png", data=(root / "image_2" / "000000.png").read_bytes())
    png.header.stamp = stamp(20.0)
    img_pub.publish(png)
    raw = np.fromfile(root / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)
    pts = np.zeros(len(raw), XYZI)
    for i, c in enumerate(XYZI.names):
        pts[c] = raw[:, i]
    msg = cv.array_to_cloud(pts)
    msg.header.stamp, msg.header.frame_id = stamp(20.0), "velodyne"
    out = h.publish_and_wait(msg, timeout=20)
    assert h.meta_for(out)["cameras_used"] == ["image_2"]
    check_labelled(out, pts, ["car", "road", "building"])
    (cam,) = seg.last_cameras
    from PIL import Image as PILImage

    with PILImage.open(root / "image_2" / "000000.png") as png_image:
        w, hgt = png_image.size
    assert (cam.width, cam.height) == (w, hgt) and abs(cam.fx - 707.0493) < 1e-3
    # LiDAR points ahead of the car project into the image with the file's calibration
    xyz = cv.xyz_of(pts)
    ahead = xyz[(xyz[:, 0] > 15) & (np.abs(xyz[:, 1]) < 2)]  # nearer ground points fall below the frame
    cam_pts = (cam.T_cam_lidar[:3, :3] @ ahead.T).T + cam.T_cam_lidar[:3, 3]
    uv = (cam.K @ cam_pts.T).T
    uv = uv[:, :2] / uv[:, 2:]
    assert ((uv[:, 0] > 0) & (uv[:, 0] < w) & (uv[:, 1] > 0) & (uv[:, 1] < hgt)).mean() > 0.9


def test_slow_model_drops_old_frames_counts_them_and_labels_the_newest(harness) -> None:
    seg = FakeSegmenter(segment_delay_s=0.5)
    h = harness(seg, diagnostics_period=0.2)
    stamps = []
    for k in range(10):
        msg, _ = cloud_msg(300.0 + 0.02 * k, n=200)
        stamps.append(msg.header.stamp)
        h.cloud_pub.publish(msg)
        time.sleep(0.02)
    assert wait_for(lambda: h.node.diagnostics.clouds == 10, 2)  # callbacks never waited for the model
    snap = lambda: h.node.diagnostics.snapshot()  # noqa: E731
    assert wait_for(lambda: snap()["frames"] + snap()["dropped"] == 10, 10)
    assert snap()["dropped"] >= 5 and snap()["frames"] >= 2
    assert wait_for(lambda: len(h.outputs) == snap()["frames"], 5)
    assert wait_for(
        lambda: h.outputs and h.outputs[-1].header.stamp == stamps[-1], 5
    )  # the newest is labelled
    msg, _ = cloud_msg(301.0, n=200)
    h.cloud_pub.publish(msg)
    time.sleep(0.1)  # the worker is inside the 0.5 s model call now
    t0 = time.monotonic()  # parameters do not wait for the model (0.5 s) that is running now
    assert h.node.set_parameters([Parameter("score_threshold", value=0.1)])[0].successful
    assert time.monotonic() - t0 < 0.3


# ------------------------------------------------------------------ issue 8: no valid frame lost to a bad one
def test_a_malformed_cloud_never_displaces_the_valid_one_before_it(harness) -> None:
    """Valid cloud at t, the same cloud cut by 10 bytes 1 ms later: every valid one is labelled and
    every bad one counted as bad input (it used to push the valid one out of the worker's slot)."""
    h = harness(FakeSegmenter(segment_delay_s=0.02), vocabulary=["a", "b"])
    stamps = []
    for k in range(6):
        good, _ = cloud_msg(400.0 + k, n=2000, seed=k)
        bad, _ = cloud_msg(400.001 + k, n=2000, seed=k)
        bad.data = bad.data[:-10]
        h.cloud_pub.publish(good)
        h.cloud_pub.publish(bad)
        stamps.append(good.header.stamp)
        time.sleep(0.1)
    assert wait_for(lambda: len(h.outputs) == 6 and h.node.diagnostics.bad_inputs["cloud"] == 6, 5), (
        f"{len(h.outputs)} of 6 valid clouds labelled, {h.node.diagnostics.snapshot()}"
    )
    assert [o.header.stamp for o in h.outputs] == stamps
    assert h.node.diagnostics.dropped == 0


def test_sensors_sharing_a_stamp_are_all_labelled(harness) -> None:
    """Three LiDARs on one topic with the same stamp: nothing is dropped while the model keeps up
    between stamps (it used to keep only the newest waiting frame); the queue shows in the
    snapshot and in /diagnostics."""
    sensors = ("lidar_left", "lidar_right", "lidar_top")
    h = harness(FakeSegmenter(segment_delay_s=0.02), vocabulary=["a", "b"], diagnostics_period=0.2)
    sent = []
    for k in range(4):
        for frame_id in sensors:
            msg, _ = cloud_msg(500.0 + k, n=1500, seed=k)
            msg.header.frame_id = frame_id
            h.cloud_pub.publish(msg)
            sent.append((k, frame_id))
        time.sleep(0.2)
    assert wait_for(lambda: len(h.outputs) == 12, 5), f"{len(h.outputs)} of 12 labelled"
    got = sorted((o.header.stamp.sec - 500, o.header.frame_id) for o in h.outputs)
    assert got == sorted(sent)
    snap = h.node.diagnostics.snapshot()
    assert snap["dropped"] == 0 and snap["queue_high_water"] >= 1
    diag = wait_for(
        lambda: [a for a in h.diagnostics if any(s.name == "clip3d: pipeline" for s in a.status)], 5
    )
    values = {kv.key: kv.value for s in diag[-1].status if s.name == "clip3d: pipeline" for kv in s.values}
    assert values["queue_limit_per_sensor"] == "2" and "queue_high_water" in values


def test_a_slow_model_drops_per_sensor_and_keeps_the_newest(harness) -> None:
    h = harness(
        FakeSegmenter(segment_delay_s=0.3), vocabulary=["a", "b"], **{"queue.depth": 2, "qos.cloud.depth": 50}
    )
    for k in range(6):
        for frame_id in ("a", "b"):
            msg, _ = cloud_msg(600.0 + 0.01 * k, n=200)
            msg.header.frame_id = frame_id
            h.cloud_pub.publish(msg)
            time.sleep(0.005)
    snap = lambda: h.node.diagnostics.snapshot()  # noqa: E731
    assert wait_for(lambda: snap()["frames"] + snap()["dropped"] == 12, 10), snap()
    newest = {(o.header.frame_id, o.header.stamp.nanosec) for o in h.outputs}
    for frame_id in ("a", "b"):  # each sensor's newest frame made it, whatever the other one did
        assert wait_for(lambda f=frame_id: (f, 50_000_000) in {
            (o.header.frame_id, o.header.stamp.nanosec) for o in h.outputs
        }, 5), newest
    assert snap()["queue_high_water"] <= 4


def test_bad_layouts_are_bad_input_and_a_bad_intensity_costs_only_the_intensity(harness) -> None:
    h = harness(vocabulary=["a", "b"])
    hollow, _ = cloud_msg(700.0, n=50)  # width 0 but 800 bytes: not an empty scan
    hollow.width = 0
    hollow.row_step = 0
    h.cloud_pub.publish(hollow)
    assert wait_for(lambda: h.node.diagnostics.bad_inputs["cloud"] == 1, 5)
    assert "carries 800 bytes" in h.node.diagnostics.last_bad_input
    three = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 3 + [("<f4", (3,))]})
    pts = np.zeros(300, three)
    rng = np.random.default_rng(0)
    for c in "xyz":
        pts[c] = rng.normal(0, 20, 300)
    msg = cv.array_to_cloud(pts)
    msg.header.stamp, msg.header.frame_id = stamp(701.0), "lidar"
    got = check_labelled(h.publish_and_wait(msg), pts, ["a", "b"])  # labelled from x, y, z
    assert "intensity" not in got.dtype.names
    assert h.node.diagnostics.bad_inputs["bad_intensity"] == 1
    assert len(h.outputs) == 1  # the hollow cloud got no (empty) answer


def _camera_harness(harness: Any, **params: Any) -> Any:
    return harness(
        FakeSegmenter(),
        vocabulary=["a", "b"],
        **{
            "cameras.names": ["front"],
            "cameras.front.image_topic": "front/image",
            "cameras.front.info_topic": "front/info",
            "cameras.front.T_cam_lidar": T_CAM_LIDAR,
            "sync.camera_timeout": 0.2,
            **params,
        },
    )


def _camera_frame(h: Any, t: float, image: Image, info: CameraInfo) -> dict:
    img_pub, info_pub = h.publisher(Image, "front/image"), h.publisher(CameraInfo, "front/info")
    info_pub.publish(info)
    assert wait_for(lambda: h.node._cameras[0].info is not None)
    img_pub.publish(image)
    msg, pts = cloud_msg(t, n=500)
    out = h.publish_and_wait(msg)
    check_labelled(out, pts, ["a", "b"])
    return h.meta_for(out)


def test_a_camera_model_that_overflows_when_scaled_removes_the_camera_not_the_frame(harness) -> None:
    h = _camera_harness(harness)
    info = info_msg(800.0, h=24, w=32)
    info.k = [1e308, 0.0, 16.0, 0.0, 1e308, 12.0, 0.0, 0.0, 1.0]  # valid at 32x24, inf at 64x48
    meta = _camera_frame(h, 800.0, image_msg(800.0, h=48, w=64), info)
    assert meta["cameras_missing"] == ["front"]
    cam = h.node.diagnostics.cameras[0]
    assert cam.errors == 1 and "non-finite" in cam.last_error


def test_an_elongated_image_is_not_fed_to_the_encoder(harness) -> None:
    h = _camera_harness(harness)
    meta = _camera_frame(h, 900.0, image_msg(900.0, h=2, w=1600), info_msg(900.0, h=2, w=1600))
    assert meta["cameras_missing"] == ["front"]
    assert "max_image_aspect" in h.node.diagnostics.cameras[0].last_error


def test_sigint_stops_the_node_fast_and_a_second_one_is_harmless(context) -> None:
    """The console-script entry with a frame in a slow model call: two SIGINTs 50 ms apart (what
    `ros2 launch` without a terminal sends) -> exit code 0 well within launch's 5 s escalation."""
    import signal
    import subprocess
    import sys

    ns = f"/sig{os.getpid()}"
    code = (
        "from clip3d_ros.node import run; from clip3d_ros.testing import FakeSegmenter; "
        "run(segmenter=FakeSegmenter(segment_delay_s=3.0))"
    )
    cmd = [sys.executable, "-c", code, "--ros-args", "-r", f"__ns:={ns}", "-r", "~/input/pointcloud:=points",
           "-p", "skip_without_subscribers:=false", "-p", "qos.cloud.reliability:=reliable"]  # fmt: skip
    env = os.environ | {"ROS_DOMAIN_ID": str(ros_domain_id(1)), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peer = Node("sigint_peer", namespace=ns, context=context)
    try:
        pub = peer.create_publisher(PointCloud2, f"{ns}/points", QoSProfile(depth=5))
        assert wait_for(lambda: pub.get_subscription_count() > 0, 30), "node never subscribed"
        msg, _ = cloud_msg(1.0, n=100)
        pub.publish(msg)
        time.sleep(0.5)  # the worker is inside the 3 s model call now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        peer.destroy_node()
    assert proc.returncode == 0, output[-2000:]
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop"
    assert "terminate called" not in output and "Traceback" not in output, output[-2000:]


def _rosbags_inputs() -> list[Any]:
    """rosbags PointCloud2 inputs: organised 8x16, point- and row-padded, big-endian."""
    from clip3d_ros import bag

    rng = np.random.default_rng(3)
    out = []
    organised = np.zeros(128, XYZI)
    big = np.zeros(100, np.dtype([("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("intensity", ">u2")]))
    padded = np.zeros(
        60,
        np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4, "offsets": [0, 4, 8, 16],
                  "itemsize": 24}),
    )  # fmt: skip
    for arr in (organised, big, padded):
        for c in arr.dtype.names:
            arr[c] = rng.normal(0, 20, len(arr)) if c in "xyz" else rng.uniform(0, 100, len(arr))
    for k, (arr, height) in enumerate(((organised, 8), (big, 1), (padded, 6))):
        msg = bag.cloud_msg(arr, bag.header(5_000_000_000 + k * 100_000_000, "lidar"), height=height)
        if arr is padded:  # 8 bytes of row padding after each of the 6 rows of 10 points
            rows = np.asarray(msg.data).reshape(6, -1)
            msg.data = np.concatenate([rows, np.zeros((6, 8), np.uint8)], axis=1).reshape(-1)
            msg.row_step += 8
        out.append(msg)
    return out


def test_node_and_label_bag_write_byte_identical_clouds(harness, tmp_path) -> None:
    """One labelling path: the node's published cloud and label-bag's recorded one are the same
    message (every field, the same data bytes) for organised, padded and big-endian inputs."""
    from rclpy.serialization import deserialize_message

    from clip3d_ros import bag
    from clip3d_ros.tools.label_bag import BagLabeller, LabelOptions

    names = ["a", "b", "c"]
    inputs = _rosbags_inputs()
    in_bag = tmp_path / "in"
    with bag.BagWriter(in_bag) as writer:
        writer.add_topic("/lidar/points", bag.T_CLOUD)
        for msg in inputs:
            writer.write("/lidar/points", bag.stamp_ns(msg.header), msg)
    seg = FakeSegmenter()
    seg.swap_vocabulary(*seg.encode_vocabulary(names))
    stats = BagLabeller(seg, LabelOptions(progress=False)).run(in_bag, tmp_path / "out")
    assert stats.labelled == 3
    reader = bag.open_reader(tmp_path / "out")
    try:
        conn = bag.require_topic(reader, "/clip3d/labelled_points", [bag.T_CLOUD])
        from_bag = [bytes(raw) for _, _, raw in reader.messages([conn])]
    finally:
        reader.close()

    h = harness(vocabulary=names)
    for msg, want in zip(inputs, from_bag, strict=True):
        rclpy_msg = deserialize_message(bytes(bag.typestore().serialize_cdr(msg, bag.T_CLOUD)), PointCloud2)
        out = h.publish_and_wait(rclpy_msg)
        assert (out.height, out.width) == (msg.height, msg.width)
        recorded = deserialize_message(want, PointCloud2)  # (CDR alignment padding is not data)
        assert bytes(out.data) == bytes(recorded.data)
        assert out == recorded  # header, height, width, fields, endianness, steps, is_dense


def test_a_panoptic_model_publishes_the_instance_field(harness, tmp_path) -> None:
    """A real (tiny, untrained) panoptic Segmenter in the node: the output cloud gains `instance`
    uint32 after the semantic fields, equal to what `Segmenter.segment` gives for the points."""
    from clip3d_core.segmenter import Segmenter
    from clip3d_core.testing import PANOPTIC_VOCABULARY, tiny_panoptic_checkpoint

    names = list(PANOPTIC_VOCABULARY)
    path = tiny_panoptic_checkpoint(tmp_path / "pan.pt")
    seg = Segmenter.from_checkpoint(path)
    h = harness(seg, vocabulary=names)
    objects: list[MarkerArray] = []
    h.peer.create_subscription(MarkerArray, f"{h.ns}/clip3d/output/objects", h._add(objects),
                               QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    assert wait_for(lambda: h.node._objects_pub.get_subscription_count() > 0, 10)
    rng = np.random.default_rng(4)
    pts = np.zeros(3000, XYZI)
    pts["x"], pts["y"] = rng.uniform(-15, 15, 3000), rng.uniform(-15, 15, 3000)
    pts["z"], pts["intensity"] = rng.uniform(-1.7, 1.3, 3000), rng.uniform(0, 1, 3000)
    msg = cv.array_to_cloud(pts)
    msg.header.stamp, msg.header.frame_id = stamp(2000.0), "lidar"
    out = h.publish_and_wait(msg, timeout=30.0)
    assert [f.name for f in out.fields] == ["x", "y", "z", "intensity", "label", "score", "rgb", "instance"]
    assert {f.name: f.datatype for f in out.fields}["instance"] == PointField.UINT32
    got = cv.cloud_to_array(out)
    want = seg.segment(cv.points_for_model(pts, "intensity"))
    assert want.instances is not None and want.instances.max() > 0
    # spconv on CPU sums in a thread-dependent order: an id may differ only at float ties
    assert np.mean(got["instance"] == want.instances) > 0.999
    assert np.mean(got["label"] == want.labels) > 0.999
    # ~/output/objects: the frame's boxes (DELETEALL first), one cube + one text per instance id
    assert wait_for(lambda: objects, 10), "no MarkerArray came back"
    clear, *rest = objects[-1].markers
    assert clear.action == Marker.DELETEALL and clear.header == out.header
    cubes = sorted(m.id for m in rest if m.type == Marker.CUBE)
    assert cubes == sorted(int(i) for i in np.unique(got["instance"][got["instance"] > 0]))
    assert len(rest) == 2 * len(cubes)


class _FakeTfBuffer:
    """tf2_ros.Buffer's lookup_transform: a fixed transform, or the exception tf2 raises when
    nothing is published; records the lookups."""

    def __init__(self, T: np.ndarray | None) -> None:
        self.T, self.lookups = T, []

    def lookup_transform(self, target: str, source: str, when: Any) -> Any:
        from geometry_msgs.msg import TransformStamped

        from clip3d_ros.bag import quaternion_from_matrix

        self.lookups.append((target, source, when.nanoseconds))
        if self.T is None:
            raise LookupError(f'"{target}" passed to lookupTransform argument target_frame does not exist')
        msg = TransformStamped()
        q = quaternion_from_matrix(self.T[:3, :3])
        msg.transform.rotation.x, msg.transform.rotation.y, msg.transform.rotation.z = q[:3]
        msg.transform.rotation.w = q[3]
        msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = self.T[:3, 3]
        return msg


def test_tf_extrinsics_are_looked_up_at_the_cloud_stamp(harness) -> None:
    h = _camera_harness(harness)
    T_tf = np.array([[0.0, -1, 0, 0.5], [0, 0, -1, 0.2], [1, 0, 0, -0.1], [0, 0, 0, 1]])
    h.node._tf_buffer = buffer = _FakeTfBuffer(T_tf)
    meta = _camera_frame(h, 950.0, image_msg(950.0), info_msg(950.0))
    assert meta["cameras_used"] == ["front"]
    assert buffer.lookups == [("front_optical", "lidar", 950 * 10**9)]  # camera <- LiDAR at the cloud stamp
    np.testing.assert_allclose(h.node._segmenter.last_cameras[0].T_cam_lidar, T_tf, atol=1e-12)


def test_without_published_tf_the_static_extrinsics_are_used_and_it_is_logged_once(harness) -> None:
    h = _camera_harness(harness)
    h.node._tf_buffer = buffer = _FakeTfBuffer(None)
    warnings: list[str] = []
    logger = h.node.get_logger()
    h.node.get_logger = lambda: type("L", (), {"warning": lambda _, m: warnings.append(m),
                                                 "error": logger.error, "info": logger.info})()  # fmt: skip
    for k in range(3):
        meta = _camera_frame(h, 960.0 + k, image_msg(960.0 + k), info_msg(960.0 + k))
        assert meta["cameras_used"] == ["front"]
        np.testing.assert_allclose(
            h.node._segmenter.last_cameras[0].T_cam_lidar, np.reshape(T_CAM_LIDAR, (4, 4))
        )
    assert len(buffer.lookups) == 3
    tf_warnings = [w for w in warnings if "no TF" in w]
    assert len(tf_warnings) == 1 and "static extrinsics" in tf_warnings[0]


def test_a_live_vocabulary_change_is_parsed_once_and_the_start_up_one_encoded_once(
    harness, monkeypatch
) -> None:
    seg = FakeSegmenter()
    seg.swap_vocabulary(*seg.encode_vocabulary(["car", "road"]))  # as Segmenter.from_checkpoint leaves it
    h = harness(seg, vocabulary=["car", "road"])
    assert sorted(seg.encoded) == [1]  # the node took the segmenter's encoding: no second one
    parses = []
    original = Vocabulary.from_strings.__func__
    counted = classmethod(lambda cls, *a, **k: parses.append(a) or original(cls, *a, **k))
    monkeypatch.setattr(Vocabulary, "from_strings", counted)
    assert h.node.set_parameters([Parameter("vocabulary", value=["tree", "car"])])[0].successful
    assert wait_for(lambda: h.maps and [e["name"] for e in h.maps[-1]["entries"]] == ["tree", "car"])
    assert len(parses) == 1 and sorted(seg.encoded) == [1, 2]
