"""The node's parameters: declarations (descriptions, ranges, read-only flags), typed values, and
validation of live changes.

Static settings (topics, QoS, cameras, model) are read-only: changing them needs new subscriptions
or a new model, i.e. a restart. Live ones (vocabulary, thresholds, sync timing) are validated in the
node's on-set callback and applied between frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter

from clip3d_core.clip.vocabulary import MAX_ENTRIES, Vocabulary, VocabularyError

__all__ = [
    "DEFAULT_VOCABULARY",
    "LIVE_PARAMETERS",
    "CameraParams",
    "NodeParams",
    "ParameterError",
    "QosParams",
    "declare_parameters",
    "validate_change",
    "validate_vocabulary",
]

MAX_ENTRY_CHARS = 200  # CLIP's text context is 77 tokens; longer entries are certainly a mistake

DEFAULT_VOCABULARY = [
    "car|automobile",
    "truck",
    "bus",
    "pedestrian|person",
    "bicycle|cyclist",
    "motorcycle",
    "road",
    "sidewalk",
    "building",
    "vegetation|tree",
    "pole",
    "traffic sign",
]


class ParameterError(ValueError):
    """A parameter value is invalid (bad enum value, wrong matrix size, ...)."""


@dataclass(frozen=True)
class QosParams:
    reliability: str  # "reliable" | "best_effort"
    depth: int

    def profile(self) -> Any:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        rel = ReliabilityPolicy.RELIABLE if self.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.depth, reliability=rel)


@dataclass(frozen=True)
class CameraParams:
    name: str
    image_topic: str
    info_topic: str
    transport: str  # "raw" (sensor_msgs/Image) | "compressed" (sensor_msgs/CompressedImage)
    frame_id: str  # optical frame for TF; "" = the CameraInfo / Image header frame
    T_cam_lidar: np.ndarray | None  # static extrinsics (LiDAR -> camera optical), None = not given
    calibration_file: str  # KITTI calib file: intrinsics + extrinsics fallback
    kitti_camera: str
    rectified: bool  # images are rectified (*_rect topics): use P and R of CameraInfo


@dataclass(frozen=True)
class NodeParams:
    checkpoint: str
    device: str
    precision: str
    sparse_backend: str
    tf32: bool
    compile: bool
    embedding_bank: str
    vocabulary: list[str]
    score_threshold: float
    budget_ms: float
    cloud_topic: str
    output_topic: str
    intensity_field: str
    max_points: int
    queue_depth: int
    max_image_pixels: int
    max_image_aspect: float
    skip_without_subscribers: bool
    sync_slop: float
    sync_queue_size: int
    camera_timeout: float
    clock_jump_threshold: float
    qos_cloud: QosParams
    qos_image: QosParams
    qos_output: QosParams
    cameras: list[CameraParams]
    lidar_frame: str
    use_tf: bool
    diagnostics_period: float


@dataclass(frozen=True)
class _Spec:
    name: str
    default: Any
    description: str
    read_only: bool = True
    range: tuple[float, float] | None = None
    constraints: str = ""
    array_type: str = ""  # "string" | "double": the element type of an array whose default is empty


def _specs() -> list[_Spec]:
    return [
        _Spec(
            "checkpoint", "", "clip3d checkpoint (.pt) to label with; required unless a segmenter is injected"
        ),
        _Spec("device", "cpu", "torch device for the model, e.g. cpu or cuda:0"),
        _Spec("runtime.precision", "fp32", "fp32 | fp16 | bf16 (CUDA): the 3D network and CLIP image tower"),
        _Spec("runtime.sparse_backend", "", "'' = automatic | spconv | spconv_triton (checkpoints fit both)"),
        _Spec("runtime.tf32", False, "allow TF32 in float32 products and sparse convolutions (CUDA)"),
        _Spec("runtime.compile", False, "torch.compile the model's dense parts (slow first frames)"),
        _Spec(
            "embedding_bank",
            "",
            "optional text embedding bank (.pt), 'checkpoint' for the checkpoint's own; '' = CLIP text tower",
        ),
        _Spec(
            "vocabulary",
            DEFAULT_VOCABULARY,
            "class names; synonyms joined by '|' (e.g. 'car|automobile'); label i = entry i",
            read_only=False,
            constraints=f"1..{MAX_ENTRIES} unique non-empty entries of at most {MAX_ENTRY_CHARS} characters",
        ),
        _Spec(
            "score_threshold",
            0.0,
            "points scoring below this are published unlabelled (65535)",
            False,
            (0.0, 1.0),
        ),
        _Spec(
            "budget_ms",
            100.0,
            "per-frame latency budget reported against in /diagnostics",
            False,
            (1.0, 60000.0),
        ),
        _Spec("cloud_topic", "/points", "input sensor_msgs/PointCloud2 topic"),
        _Spec("output_topic", "~/labelled_points", "labelled sensor_msgs/PointCloud2 topic"),
        _Spec(
            "intensity_field", "", "input intensity field; '' = first of intensity, i, remission, reflectance"
        ),
        _Spec(
            "max_points",
            2_000_000,
            "clouds with more points are rejected as bad input",
            False,
            (1, 50_000_000),
        ),
        _Spec(
            "queue.depth",
            2,
            "frames waiting for the model per sensor (cloud frame_id); when full the oldest is dropped",
            True,
            (1, 100),
        ),
        _Spec(
            "max_image_pixels",
            16_000_000,
            "camera images with more pixels are not used (camera diagnostic): bounds the encoder input",
            True,
            (1, 200_000_000),
        ),
        _Spec(
            "max_image_aspect",
            4.0,
            "camera images more elongated than this (long / short side) are not used (camera diagnostic)",
            True,
            (1.0, 100.0),
        ),
        _Spec(
            "skip_without_subscribers",
            True,
            "do not run the model while nobody subscribes to the labelled cloud",
            read_only=False,
        ),
        _Spec(
            "sync.slop", 0.05, "max stamp difference (s) between a cloud and its images", False, (0.001, 1.0)
        ),
        _Spec("sync.queue_size", 10, "messages queued per input while waiting for a match", True, (1, 100)),
        _Spec(
            "sync.camera_timeout",
            0.15,
            "seconds a cloud waits for late images before it is labelled without them",
            False,
            (0.0, 10.0),
        ),
        _Spec(
            "sync.clock_jump_threshold",
            1.0,
            "a stamp this many seconds older than its topic's newest resets the synchroniser (looped bag)",
            True,
            (0.0, 3600.0),
        ),
        _Spec("qos.cloud.reliability", "best_effort", "input cloud QoS: reliable | best_effort"),
        _Spec("qos.cloud.depth", 5, "input cloud QoS history depth", True, (1, 1000)),
        _Spec("qos.image.reliability", "best_effort", "image / camera_info QoS: reliable | best_effort"),
        _Spec("qos.image.depth", 5, "image QoS history depth", True, (1, 1000)),
        _Spec("qos.output.reliability", "reliable", "labelled cloud QoS: reliable | best_effort"),
        _Spec("qos.output.depth", 5, "labelled cloud QoS history depth", True, (1, 1000)),
        _Spec(
            "cameras.names",
            [],
            "camera names; per name the cameras.<name>.* parameters apply; [] = LiDAR only",
            array_type="string",
        ),
        _Spec("lidar_frame", "", "LiDAR frame for TF lookups; '' = the cloud's header frame_id"),
        _Spec(
            "use_tf", True, "look camera extrinsics up in TF (when tf2_ros is available) before static ones"
        ),
        _Spec("diagnostics_period", 1.0, "seconds between /diagnostics reports", True, (0.1, 60.0)),
    ]


def _camera_specs(name: str) -> list[_Spec]:
    p = f"cameras.{name}."
    return [
        _Spec(p + "image_topic", f"/{name}/image_raw", f"camera {name}: image topic"),
        _Spec(p + "info_topic", f"/{name}/camera_info", f"camera {name}: sensor_msgs/CameraInfo topic"),
        _Spec(p + "transport", "raw", f"camera {name}: raw (Image) | compressed (CompressedImage, jpeg/png)"),
        _Spec(p + "frame_id", "", f"camera {name}: optical frame for TF; '' = the CameraInfo header frame"),
        _Spec(
            p + "T_cam_lidar",
            [],
            f"camera {name}: static 4x4 LiDAR -> camera-optical transform, 16 values row-major; [] = none",
            array_type="double",
        ),
        _Spec(p + "calibration_file", "", f"camera {name}: KITTI calib file (intrinsics + Tr_velo_to_cam)"),
        _Spec(p + "kitti_camera", "P2", f"camera {name}: projection matrix in the KITTI file (P0..P3)"),
        _Spec(p + "rectified", False, f"camera {name}: images are rectified; use CameraInfo P and R"),
    ]


def _descriptor(spec: _Spec) -> ParameterDescriptor:
    d = ParameterDescriptor(
        name=spec.name,
        description=spec.description,
        read_only=spec.read_only,
        additional_constraints=spec.constraints,
    )
    if spec.range is not None:
        lo, hi = spec.range
        if isinstance(spec.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        else:
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
    return d


_ARRAY_TYPES = {"string": Parameter.Type.STRING_ARRAY, "double": Parameter.Type.DOUBLE_ARRAY}


def _declare(node: Node, specs: Sequence[_Spec]) -> dict[str, Any]:
    values = {}
    for s in specs:
        if s.array_type:
            # rclpy types an empty-list default as a byte array; declaring by type keeps the real
            # one (the parameter stays unset unless overridden).
            p = node.declare_parameter(s.name, _ARRAY_TYPES[s.array_type], _descriptor(s))
            values[s.name] = list(p.value) if p.type_ != Parameter.Type.NOT_SET else list(s.default)
        else:
            values[s.name] = node.declare_parameter(s.name, s.default, _descriptor(s)).value
    return values


def _qos(values: dict[str, Any], which: str) -> QosParams:
    rel = str(values[f"qos.{which}.reliability"]).strip().lower().replace("-", "_")
    if rel not in ("reliable", "best_effort"):
        raise ParameterError(f"qos.{which}.reliability must be reliable or best_effort, got {rel!r}")
    return QosParams(rel, int(values[f"qos.{which}.depth"]))


def _camera(node: Node, name: str) -> CameraParams:
    values = _declare(node, _camera_specs(name))
    p = f"cameras.{name}."
    transport = str(values[p + "transport"]).strip().lower()
    if transport not in ("raw", "compressed"):
        raise ParameterError(f"{p}transport must be raw or compressed, got {transport!r}")
    T = None
    if len(values[p + "T_cam_lidar"]):
        T = np.asarray(values[p + "T_cam_lidar"], dtype=np.float64)
        if T.size != 16:
            raise ParameterError(f"{p}T_cam_lidar needs 16 values (4x4 row-major), got {T.size}")
        T = T.reshape(4, 4)
    return CameraParams(
        name=name,
        image_topic=values[p + "image_topic"],
        info_topic=values[p + "info_topic"],
        transport=transport,
        frame_id=values[p + "frame_id"],
        T_cam_lidar=T,
        calibration_file=values[p + "calibration_file"],
        kitti_camera=values[p + "kitti_camera"],
        rectified=bool(values[p + "rectified"]),
    )


def declare_parameters(node: Node) -> NodeParams:
    """Declare every parameter on `node` (overrides from YAML / --ros-args apply) -> typed values.

    Raises `ParameterError` for invalid static settings (the node cannot start with them)."""
    v = _declare(node, _specs())
    reason = validate_vocabulary(v["vocabulary"])
    if reason:
        raise ParameterError(f"vocabulary: {reason}")
    names = [n.strip() for n in v["cameras.names"] if n.strip()]
    if len(set(names)) != len(names):
        raise ParameterError(f"cameras.names has duplicates: {names}")
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad:
        raise ParameterError(
            f"camera names must be alphanumeric/underscore (they form parameter names): {bad}"
        )
    return NodeParams(
        checkpoint=v["checkpoint"],
        device=v["device"],
        precision=v["runtime.precision"],
        sparse_backend=v["runtime.sparse_backend"],
        tf32=bool(v["runtime.tf32"]),
        compile=bool(v["runtime.compile"]),
        embedding_bank=v["embedding_bank"],
        vocabulary=list(v["vocabulary"]),
        score_threshold=float(v["score_threshold"]),
        budget_ms=float(v["budget_ms"]),
        cloud_topic=v["cloud_topic"],
        output_topic=v["output_topic"],
        intensity_field=v["intensity_field"],
        max_points=int(v["max_points"]),
        queue_depth=int(v["queue.depth"]),
        max_image_pixels=int(v["max_image_pixels"]),
        max_image_aspect=float(v["max_image_aspect"]),
        skip_without_subscribers=bool(v["skip_without_subscribers"]),
        sync_slop=float(v["sync.slop"]),
        sync_queue_size=int(v["sync.queue_size"]),
        camera_timeout=float(v["sync.camera_timeout"]),
        clock_jump_threshold=float(v["sync.clock_jump_threshold"]),
        qos_cloud=_qos(v, "cloud"),
        qos_image=_qos(v, "image"),
        qos_output=_qos(v, "output"),
        cameras=[_camera(node, n) for n in names],
        lidar_frame=v["lidar_frame"],
        use_tf=bool(v["use_tf"]),
        diagnostics_period=float(v["diagnostics_period"]),
    )


# Parameters the node applies while running (all others are read-only).
LIVE_PARAMETERS = frozenset(s.name for s in _specs() if not s.read_only)


def validate_vocabulary(entries: Sequence[str]) -> str | None:
    """None when `entries` is a usable vocabulary, else the reason it is not."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        return f"expected a list of strings, got {type(entries).__name__}"
    if not entries:
        return "vocabulary is empty"
    if len(entries) > MAX_ENTRIES:
        return f"{len(entries)} entries; at most {MAX_ENTRIES}"
    long = [e for e in entries if isinstance(e, str) and len(e) > MAX_ENTRY_CHARS]
    if long:
        return f"entry longer than {MAX_ENTRY_CHARS} characters: {long[0][:40]!r}..."
    try:
        Vocabulary.from_strings(entries)
    except VocabularyError as exc:
        return str(exc)
    return None


def validate_change(params: Sequence[Parameter]) -> str | None:
    """The on-set check for live changes: None to accept, else the rejection reason."""
    for p in params:
        if p.name == "vocabulary":
            reason = validate_vocabulary(p.value)
            if reason:
                return f"vocabulary rejected: {reason}"
    return None
