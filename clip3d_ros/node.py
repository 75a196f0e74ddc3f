"""`clip3d` ROS 2 node: LiDAR PointCloud2 (+ camera images) -> labelled PointCloud2.

Data flow (callbacks never block; one worker thread runs the model):

    cloud ── layout check ─┐                 ┌─► FrameQueue ──► worker: labelling.decode_cloud,
    (bad: counted, never   ├─► CloudCameraSync┘   (per sensor,     cameras, label_frame, build
     queued)               │   (approx. time,       `queue.depth`,   cloud, publish ~/labels_meta
    images, infos ─────────┘    camera timeout)      newest kept)     + output
    parameter `vocabulary` ─► on-set validation ─► encoder thread (encode_vocabulary) ─► worker
                              swaps it in between two frames, publishes ~/vocabulary, then labels.

Topics are relative and remapped in the launch file (breaking change: they used to be the
`cloud_topic` / `output_topic` parameters, default /points and ~/labelled_points):
* `~/input/pointcloud` (launch default /points): the LiDAR cloud.
* `~/output/pointcloud` (launch default /clip3d/labelled_points): input header, same points in
  the same order (and
  the same height/width for organised clouds); fields x, y, z, [intensity], label (uint16, 65535 =
  unlabelled), score, rgb (vocabulary colour; grey when unlabelled), and for panoptic models
  instance (uint32, 0 = none / stuff).
* `~/output/objects` (panoptic models; built only when subscribed): visualization_msgs/MarkerArray,
  DELETEALL then one oriented box + "class score" text per thing instance (`clip3d_ros.markers`).
* `~/vocabulary` (transient local): the vocabulary map, re-published on every change.
* `~/labels_meta`: per labelled cloud `{stamp, frame_id, version, ...}` - the version of the
  vocabulary its labels index (the cloud header stays the input's, untouched).
* `/diagnostics`: rate, latency vs budget, drops, unsynchronised frames, cameras, vocabulary.

Frame-loss policy: a cloud's layout (header and field table: sizes, x/y/z, max_points) is checked
on the callback thread, so a malformed cloud is counted as bad input and never takes a valid
frame's place. Valid frames wait in a bounded queue per sensor (`frame_id`), `queue.depth` deep
(default 2); a frame is dropped only when its sensor's queue is full, i.e. the model is behind,
and then the oldest waiting one goes (`clip3d_ros.frame_queue`). /diagnostics shows drops, the
queue depth and its high-water mark.

Bad input (missing x/y/z, size mismatches, unknown encodings, zero intrinsics, ...) is logged
(throttled), counted in /diagnostics and skipped; a broken camera (bad image, calibration that
does not survive scaling to the image, an image beyond `max_image_pixels` / `max_image_aspect`)
only removes that camera from the frame; a bad intensity field only removes the intensity. All
stamps come from message headers; the node clock (sim time under bag replay) only times the
camera timeout and the header-to-publish latency.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from clip3d_core.clip import VocabularyError
from clip3d_core.geometry import CalibrationError, PinholeCamera, load_kitti_calib
from clip3d_ros.conversions import (
    CloudFormatError,
    array_to_cloud,
    check_cloud,
    msg_to_rgb,
    transform_to_matrix,
)
from clip3d_ros.diagnostics import PipelineDiagnostics
from clip3d_ros.frame_queue import FrameQueue
from clip3d_ros.labelling import CAMERA_ERRORS, CameraResolver, ImageLimits, decode_cloud, label_frame
from clip3d_ros.markers import frame_boxes, object_markers
from clip3d_ros.params import (
    CameraParams,
    NodeParams,
    ParameterError,
    declare_parameters,
    parse_vocabulary,
    validate_change,
)
from clip3d_ros.sync import CloudCameraSync, MessageFiltersSynchronizer, SyncedFrame, make_matcher
from clip3d_ros.vocabulary_map import (
    LABELS_META_TOPIC,
    VOCABULARY_TOPIC,
    labels_meta_message,
    labels_meta_qos,
    vocabulary_message,
    vocabulary_qos,
)

try:  # TF is optional: static extrinsics from parameters / calibration files otherwise
    from tf2_ros import Buffer as TfBuffer
    from tf2_ros import TransformListener
except ImportError:
    TfBuffer = TransformListener = None

__all__ = ["Clip3DNode", "FrameTiming", "SegmenterLike", "main", "run"]

NODE_NAME = "clip3d"
# Relative topics (ROS / Autoware convention), remapped in the launch file.
INPUT_TOPIC = "~/input/pointcloud"
OUTPUT_TOPIC = "~/output/pointcloud"
OBJECTS_TOPIC = "~/output/objects"
LOG_THROTTLE_S = 5.0
SYNC_POLL_PERIOD_S = 0.02


class SegmenterLike(Protocol):
    """The part of `clip3d_core.segmenter.Segmenter` the node uses (injectable for tests)."""

    @property
    def vocabulary(self) -> Any: ...

    @property
    def panoptic(self) -> Any: ...  # PanopticInfo for panoptic models (output gains `instance`), else None

    def check_vocabulary(self, names: list[str]) -> None: ...

    def encode_vocabulary(self, names: list[str]) -> tuple[Any, Any]: ...

    def swap_vocabulary(self, vocabulary: Any, text: Any) -> bool: ...

    def segment(
        self,
        points: np.ndarray,
        images: Any = None,
        cameras: Any = None,
        *,
        score_threshold: float | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class FrameTiming:
    """Where one frame's time went (ms). `wait` = cloud arrival -> worker start (sync + queue)."""

    stamp_ns: int
    receipt_ns: int  # node clock when the cloud arrived
    num_points: int
    cameras_used: int
    wait_ms: float
    convert_in_ms: float
    model_ms: float
    convert_out_ms: float
    publish_ms: float
    total_ms: float  # worker start -> published
    header_to_publish_ms: float


@dataclass
class _Camera:
    params: CameraParams
    resolver: CameraResolver
    info: CameraInfo | None = None
    kitti: dict[tuple[int, int], PinholeCamera] | None = None  # calibration file per image size
    tf_fallbacks: int = 0  # frames whose TF lookup failed (static extrinsics used instead)


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class Clip3DNode(Node):
    """Open-vocabulary LiDAR segmentation node (see the module docstring).

    `segmenter`: anything with the `SegmenterLike` methods; by default the `checkpoint` parameter
    is loaded with `Segmenter.from_checkpoint`."""

    def __init__(self, segmenter: SegmenterLike | None = None, **node_kwargs: Any) -> None:
        # Worker / encoder hand-over state (guarded by the two conditions); set first, so that
        # destroy_node works on a node whose construction failed (bad parameters, no checkpoint).
        self._stop = False
        self._work = threading.Condition()
        self._queue: FrameQueue | None = None
        self._pending_swap: tuple[Any, Any] | None = None
        self._encode = threading.Condition()
        self._worker: threading.Thread | None = None
        self._encoder: threading.Thread | None = None
        super().__init__(NODE_NAME, **node_kwargs)
        self.params: NodeParams = declare_parameters(self)
        p = self.params
        self._segmenter = segmenter if segmenter is not None else self._load_segmenter(p)
        self._last_log: dict[str, float] = {}
        self.timings: deque[FrameTiming] = deque(maxlen=1000)

        self._camera_names = [c.name for c in p.cameras]  # cameras are read-only parameters
        self._queue = FrameQueue(p.queue_depth)
        self.diagnostics = PipelineDiagnostics(self._camera_names, p.budget_ms)
        self.diagnostics.on_queue(0, 0, p.queue_depth)
        self._sync = CloudCameraSync(
            len(p.cameras),
            queue_size=p.sync_queue_size,
            slop=p.sync_slop,
            camera_timeout=p.camera_timeout,
            jump_threshold=p.clock_jump_threshold,
            matcher=make_matcher(len(p.cameras) + 1, p.sync_queue_size, p.sync_slop) if p.cameras else None,
        )
        self._sync_resets = 0
        limits = ImageLimits(p.max_image_pixels, p.max_image_aspect)
        self._cameras = [
            _Camera(c, CameraResolver(c.name, rectified=c.rectified, limits=limits)) for c in p.cameras
        ]
        self._tf_buffer = None
        if p.use_tf and p.cameras and TfBuffer is not None:
            self._tf_buffer = TfBuffer()
            self._tf_listener = TransformListener(self._tf_buffer, self)

        self._cloud_pub = self.create_publisher(PointCloud2, OUTPUT_TOPIC, p.qos_output.profile())
        self._meta_pub = self.create_publisher(String, LABELS_META_TOPIC, labels_meta_qos())
        self._vocab_pub = self.create_publisher(String, VOCABULARY_TOPIC, vocabulary_qos())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._panoptic = self._segmenter.panoptic is not None  # one model for the node's life
        self._objects_pub = (  # panoptic models only: semantic ones have no instances
            self.create_publisher(MarkerArray, OBJECTS_TOPIC, p.qos_output.profile())
            if self._panoptic else None
        )

        self._vocab_request: Any = None
        self._checked_vocabulary: Any = None  # parsed by the on-set check, handed to the encoder
        self.active_vocabulary: Any = None
        self._start_vocabulary(parse_vocabulary(p.vocabulary))

        self._cloud_sub = self.create_subscription(
            PointCloud2, INPUT_TOPIC, self._guarded("cloud", self._on_cloud), p.qos_cloud.profile()
        )
        for i, cam in enumerate(p.cameras):
            img_type = CompressedImage if cam.transport == "compressed" else Image
            self.create_subscription(
                img_type,
                cam.image_topic,
                self._guarded(cam.name, self._image_callback(i)),
                p.qos_image.profile(),
            )
            self.create_subscription(
                CameraInfo, cam.info_topic, self._info_callback(i), p.qos_image.profile()
            )
        # Steady timers: on the ROS clock they would stop with /clock (end of a bag, a replay
        # without --clock), taking camera timeouts and /diagnostics with them.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        if p.cameras:
            self.create_timer(SYNC_POLL_PERIOD_S, self._guarded("sync", self._poll_sync), clock=steady)
        self.create_timer(
            p.diagnostics_period, self._guarded("diagnostics", self._publish_diagnostics), clock=steady
        )
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._on_parameters_set)

        self._worker = threading.Thread(target=self._work_loop, name="clip3d-worker", daemon=True)
        self._encoder = threading.Thread(target=self._encode_loop, name="clip3d-vocabulary", daemon=True)
        self._worker.start()
        self._encoder.start()
        extras = [
            name
            for name, on in (
                ("TF extrinsics", self._tf_buffer is not None),
                ("message_filters sync", isinstance(self._sync.matcher, MessageFiltersSynchronizer)),
            )
            if on
        ]
        self.get_logger().info(
            f"labelling {self._cloud_sub.topic_name} -> {self._cloud_pub.topic_name} with "
            f"{len(self.active_vocabulary)} "
            f"classes, cameras {self._camera_names or 'none'}{''.join(', ' + e for e in extras)}"
        )

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _load_segmenter(p: NodeParams) -> SegmenterLike:
        if not p.checkpoint:
            raise ParameterError("parameter 'checkpoint' is empty: set it to a clip3d checkpoint (.pt)")
        from clip3d_core.model.sparse_backend import SparseBackendError
        from clip3d_core.runtime import RuntimeOptionError, RuntimeOptions
        from clip3d_core.segmenter import Segmenter

        try:  # the runtime.* parameters are checked where they are defined
            runtime = RuntimeOptions(
                backend=p.sparse_backend or None, precision=p.precision, tf32=p.tf32, compile=p.compile
            )
            # The node's vocabulary is encoded here, once (not the checkpoint's first).
            return Segmenter.from_checkpoint(
                p.checkpoint,
                device=p.device,
                embedding_bank=p.embedding_bank or None,
                vocabulary=p.vocabulary,
                runtime=runtime,
            )
        except (RuntimeOptionError, SparseBackendError) as exc:
            raise ParameterError(f"runtime.*: {exc}") from exc
        except VocabularyError as exc:
            raise ParameterError(f"initial vocabulary unusable: {exc}") from exc

    def _start_vocabulary(self, vocab: Any) -> None:
        """Announce the start-up vocabulary: the segmenter's when it already has it (a loaded
        checkpoint), else encoded now (an injected segmenter)."""
        current = self._segmenter.vocabulary
        if current is not None and current.to_strings() == vocab.to_strings():
            self._announce_vocabulary(current)
            return
        try:
            self._install_vocabulary(*self._segmenter.encode_vocabulary(vocab))
        except VocabularyError as exc:
            raise ParameterError(f"initial vocabulary unusable: {exc}") from exc

    def destroy_node(self) -> None:
        with self._work:
            self._stop = True
            self._work.notify_all()
        with self._encode:
            self._encode.notify_all()
        for t in (self._worker, self._encoder):
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(timeout=WORKER_JOIN_S)
        super().destroy_node()

    # ------------------------------------------------------------------ helpers
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _throttled(self, key: str, text: str, level: str = "error") -> None:
        """Log `text` at most every LOG_THROTTLE_S per `key` (error or warning)."""
        now = time.monotonic()
        if now - self._last_log.get(key, -np.inf) < LOG_THROTTLE_S:
            return
        self._last_log[key] = now
        # One call site per severity: rclpy refuses a severity change at the same call site.
        if level == "error":
            self.get_logger().error(text)
        else:
            self.get_logger().warning(text)

    def _bad_input(self, kind: str, reason: str) -> None:
        self.diagnostics.on_bad_input(kind, reason)
        self._throttled(f"bad-{kind}", f"skipping bad {kind}: {reason}")

    def _guarded(self, what: str, fn: Callable[..., None]) -> Callable[..., None]:
        """An executor callback that reports instead of raising: an exception escaping a callback
        would end `spin()` and with it the node."""

        def callback(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                self.diagnostics.on_error(f"{what}: {type(exc).__name__}: {exc}")
                self._throttled(f"callback-{what}", f"{what} callback failed: {type(exc).__name__}: {exc}")

        return callback

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_cloud(self, msg: PointCloud2) -> None:
        stamp = _stamp_ns(msg.header.stamp)
        self.diagnostics.on_cloud(stamp)
        if self.params.skip_without_subscribers and self._cloud_pub.get_subscription_count() == 0:
            self.diagnostics.on_skipped()
            return
        try:  # header and field table only (no copy): a bad cloud never enters the queue
            check_cloud(msg, self.params.max_points)
        except CloudFormatError as exc:
            self._bad_input("cloud", str(exc))
            return
        self._dispatch(self._sync.add_cloud(msg, stamp, self._now_ns()))

    def _image_callback(self, camera: int) -> Any:
        def on_image(msg: Image | CompressedImage) -> None:
            stamp = _stamp_ns(msg.header.stamp)
            self.diagnostics.on_image(camera, stamp)
            self._dispatch(self._sync.add_image(camera, msg, stamp, self._now_ns()))

        return on_image

    def _info_callback(self, camera: int) -> Any:
        def on_info(msg: CameraInfo) -> None:
            self._cameras[camera].info = msg

        return on_info

    def _poll_sync(self) -> None:
        self._dispatch(self._sync.poll(self._now_ns()))

    def _dispatch(self, frames: list[SyncedFrame]) -> None:
        if self._sync.resets != self._sync_resets:
            self._sync_resets = self._sync.resets
            self.diagnostics.on_sync_reset()
            self.get_logger().warning("header stamps jumped backwards (looped bag?): synchroniser reset")
        if not frames:
            return
        with self._work:  # the policy: see the module docstring and clip3d_ros.frame_queue
            dropped = sum(self._queue.put(f.cloud.header.frame_id, f) for f in frames)
            depth, high = len(self._queue), self._queue.high_water
            self._work.notify_all()
        self.diagnostics.on_queue(depth, high, self._queue.depth)
        if dropped:
            self.diagnostics.on_dropped(dropped)

    def _publish_diagnostics(self) -> None:
        self._diag_pub.publish(self.diagnostics.message(self.get_clock().now().to_msg(), NODE_NAME))

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        reason, vocabulary = validate_change(params)
        if reason is None and vocabulary is not None:
            try:  # what only the segmenter knows, e.g. a class missing from its embedding bank
                self._segmenter.check_vocabulary(vocabulary)
            except VocabularyError as exc:
                reason = f"vocabulary rejected: {exc}"
        self._checked_vocabulary = vocabulary if reason is None else None
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        """Live changes (already accepted): the typed values, then what holds a copy of them."""
        self.params = self.params.changed({p.name: p.value for p in params})
        self.diagnostics.budget_ms = self.params.budget_ms
        self._sync.slop = self.params.sync_slop
        self._sync.camera_timeout = self.params.camera_timeout
        if self._checked_vocabulary is not None and any(p.name == "vocabulary" for p in params):
            with self._encode:
                self._vocab_request, self._checked_vocabulary = self._checked_vocabulary, None
                self._encode.notify_all()

    # ------------------------------------------------------------------ vocabulary (encoder thread)
    def _encode_loop(self) -> None:
        while True:
            with self._encode:
                while self._vocab_request is None and not self._stop:
                    self._encode.wait()
                if self._stop:
                    return
                names, self._vocab_request = self._vocab_request, None
            try:
                encoded = self._segmenter.encode_vocabulary(names)
            except Exception as exc:  # the old vocabulary stays active; say why
                self.diagnostics.on_vocabulary_failure(str(exc))
                self.get_logger().error(f"vocabulary update failed, keeping the current one: {exc}")
                continue
            with self._work:
                self._pending_swap = encoded  # a newer encoding supersedes one not yet installed
                self._work.notify_all()

    def _install_vocabulary(self, vocab: Any, text: Any) -> None:
        if self._segmenter.swap_vocabulary(vocab, text) is False:
            return  # an older encoding than the one installed
        self._announce_vocabulary(vocab)

    def _announce_vocabulary(self, vocab: Any) -> None:
        self.active_vocabulary = vocab
        self._vocab_pub.publish(vocabulary_message(vocab))
        self.diagnostics.on_vocabulary(vocab.version, vocab.names)
        self.get_logger().info(f"vocabulary v{vocab.version}: {len(vocab)} classes")

    # ------------------------------------------------------------------ worker thread
    def _work_loop(self) -> None:
        while True:
            with self._work:
                while not self._queue and self._pending_swap is None and not self._stop:
                    self._work.wait()
                if self._stop:
                    return
                swap, self._pending_swap = self._pending_swap, None
                frame = self._queue.pop()
                depth = len(self._queue)
            self.diagnostics.on_queue(depth)
            if swap is not None:  # between frames: no frame sees two vocabularies
                try:
                    self._install_vocabulary(*swap)
                except Exception as exc:  # e.g. text embeddings of the wrong shape: keep the old one
                    if not self.context.ok():
                        return
                    self.diagnostics.on_vocabulary_failure(f"{type(exc).__name__}: {exc}")
                    self._throttled("swap", f"vocabulary swap failed, keeping the current one: {exc}")
            if frame is not None:
                try:
                    self._process(frame)
                except Exception as exc:  # never let one frame take the node down
                    if not self.context.ok():  # shutting down (Ctrl-C): the publishers are gone
                        return
                    self.diagnostics.on_error(f"{type(exc).__name__}: {exc}")
                    self._throttled("process", f"frame failed: {type(exc).__name__}: {exc}")

    def _process(self, frame: SyncedFrame) -> None:
        start_ns = self._now_ns()
        t0 = time.perf_counter()
        msg: PointCloud2 = frame.cloud
        try:
            cloud = decode_cloud(msg, self.params.intensity_field, self.params.max_points)
        except CloudFormatError as exc:
            self._bad_input("cloud", str(exc))
            return
        for kind, reason in cloud.issues:  # labelled anyway
            self.diagnostics.on_bad_input(kind, reason)
            self._throttled(kind, f"{reason}: labelling the cloud anyway", "warning")
        images, cameras, used = self._frame_cameras(frame, msg)
        t1 = time.perf_counter()

        labelled = label_frame(
            self._segmenter.segment,
            cloud,
            images,
            cameras,
            vocabulary=self.active_vocabulary,
            score_threshold=self.params.score_threshold or None,
            panoptic=self._panoptic,
        )
        vocab, out = labelled.vocabulary, labelled.records
        t2 = time.perf_counter()

        out_msg = array_to_cloud(out, msg.header, height=labelled.height)
        names = self._camera_names
        missing = [i for i in range(len(names)) if i not in used]
        meta = labels_meta_message(
            msg.header.stamp,
            msg.header.frame_id,
            vocab.version,
            len(out),
            [names[i] for i in used],
            [names[i] for i in missing],
        )
        t3 = time.perf_counter()
        self._meta_pub.publish(meta)  # first, so a consumer holding the cloud can already look it up
        self._cloud_pub.publish(out_msg)
        if self._objects_pub is not None and self._objects_pub.get_subscription_count() > 0:
            boxes = frame_boxes(out)
            self._objects_pub.publish(object_markers(boxes, vocab.names, vocab.colours, msg.header))
        t4 = time.perf_counter()

        end_ns = self._now_ns()
        timing = FrameTiming(
            stamp_ns=frame.stamp_ns,
            receipt_ns=frame.receipt_ns,
            num_points=len(out),
            cameras_used=len(used),
            wait_ms=(start_ns - frame.receipt_ns) / 1e6,
            convert_in_ms=(t1 - t0) * 1e3,
            model_ms=(t2 - t1) * 1e3,
            convert_out_ms=(t3 - t2) * 1e3,
            publish_ms=(t4 - t3) * 1e3,
            total_ms=(t4 - t0) * 1e3,
            header_to_publish_ms=(end_ns - frame.stamp_ns) / 1e6,
        )
        self.timings.append(timing)
        self.diagnostics.on_frame(
            frame.stamp_ns, timing.total_ms, timing.model_ms, timing.header_to_publish_ms, used, missing
        )
        if missing:
            self._throttled(
                "missing-cameras",
                f"labelled without camera(s) {[names[i] for i in missing]} (missing, late or unusable)",
                "warning",
            )

    # ------------------------------------------------------------------ cameras (worker thread)
    def _frame_cameras(
        self, frame: SyncedFrame, cloud: PointCloud2
    ) -> tuple[list[np.ndarray], list[PinholeCamera], dict[int, int]]:
        """Decoded images and their cameras for the frame; `used`: camera index -> image stamp."""
        images, cameras, used = [], [], {}
        for i, image in enumerate(frame.images):
            if image is None:
                continue
            try:
                rgb = msg_to_rgb(image)
                camera = self._camera_model(i, image, rgb.shape[:2], cloud)
            except Exception as exc:  # a broken camera never costs the cloud: it goes out without it
                known = isinstance(exc, CAMERA_ERRORS)
                why = str(exc) if known else f"{type(exc).__name__}: {exc}"
                self.diagnostics.on_camera_error(i, why)
                self._throttled(f"camera-{i}", f"camera {self._cameras[i].params.name}: {why}")
                continue
            images.append(rgb)
            cameras.append(camera)
            used[i] = _stamp_ns(image.header.stamp)
        return images, cameras, used

    def _camera_model(self, i: int, image: Any, hw: tuple[int, int], cloud: PointCloud2) -> PinholeCamera:
        """Intrinsics from the latest CameraInfo (else the calibration file), extrinsics from TF, else
        the `T_cam_lidar` parameter, else the calibration file; scaled to the decoded image size."""
        cam = self._cameras[i]
        p = cam.params
        info = cam.info
        T = self._tf_extrinsics(cam, image, cloud)
        if T is None:
            T = p.T
        if info is not None:
            if T is None:
                if not p.calibration_file:
                    raise CalibrationError(
                        f"no extrinsics: no TF, no cameras.{p.name}.T_cam_lidar and no calibration_file"
                    )
                T = self._kitti_camera(cam, (int(info.height), int(info.width))).T_cam_lidar
            return cam.resolver.from_info(info, T, hw)
        if not p.calibration_file:
            raise CalibrationError(f"no CameraInfo received on {p.info_topic} and no calibration_file")
        model = self._kitti_camera(cam, hw)
        if T is not None:
            model = model.with_extrinsics(T).validate()
        return cam.resolver.fit(model, hw)

    def _kitti_camera(self, cam: _Camera, hw: tuple[int, int]) -> PinholeCamera:
        cam.kitti = cam.kitti or {}
        if hw not in cam.kitti:
            cam.kitti[hw] = load_kitti_calib(
                cam.params.calibration_file, hw, cam.params.kitti_camera, cam.params.name
            )
        return cam.kitti[hw]

    def _tf_extrinsics(self, cam: _Camera, image: Any, cloud: PointCloud2) -> np.ndarray | None:
        if self._tf_buffer is None:
            return None
        info = cam.info
        camera_frame = (
            cam.params.frame_id or (info.header.frame_id if info is not None else "") or image.header.frame_id
        )
        lidar_frame = self.params.lidar_frame or cloud.header.frame_id
        try:
            tf = self._tf_buffer.lookup_transform(
                camera_frame, lidar_frame, Time.from_msg(cloud.header.stamp)
            )
        except Exception as exc:  # tf2 raises several unrelated types; fall back to static extrinsics
            cam.tf_fallbacks += 1
            if cam.tf_fallbacks == 1:  # a tree that is simply not published would log every frame
                self.get_logger().warning(
                    f"camera {cam.params.name}: no TF {lidar_frame} -> {camera_frame} ({exc}); using the "
                    "static extrinsics (T_cam_lidar / calibration_file). Logged once."
                )
            return None
        return transform_to_matrix(tf.transform)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SPIN_PERIOD_S = 0.1  # how often the spin loop looks at the stop flag: the stop latency
WORKER_JOIN_S = 1.0  # on shutdown, how long a frame still in the model is waited for


def main(args: list[str] | None = None, *, segmenter: SegmenterLike | None = None) -> int:
    """Run the node until SIGINT / SIGTERM; the exit code (1: it could not start).

    rclpy's own signal handling is off: it shuts the context down from inside the signal handler
    and a second SIGINT (`ros2 launch` without a terminal sends two) then aborted the process in
    C++. Here a signal only sets a flag the spin loop checks every SPIN_PERIOD_S; further signals
    are no-ops, and the node stops within ~0.1 s plus at most WORKER_JOIN_S of a running frame."""
    from rclpy.signals import SignalHandlerOptions

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    node = None
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        node = Clip3DNode(segmenter)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError) as exc:  # bad configuration / checkpoint: say why, exit 1
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run(args: list[str] | None = None, *, segmenter: SegmenterLike | None = None) -> None:
    """Console-script entry point (`clip3d_node`, `python -m clip3d_ros.node`): `main`, then exit
    without running interpreter and C++ static teardown, which can abort (rc 134) while a model
    call or DDS thread is still live. Everything the node owns is already closed by then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until main installs its handler
    try:
        code = main(args, segmenter=segmenter)
    except KeyboardInterrupt:
        code = 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
