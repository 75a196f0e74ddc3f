"""The node's parameters, declared once: each is a field of `NodeParams` / `CameraParams` whose
metadata (`param(...)`) holds its ROS name, description, range, choices and whether it changes
live. Everything else is generated from those fields:

* the ROS declarations (`declare_parameters`: descriptors with ranges, read-only flags),
* the typed values (`NodeParams`, `CameraParams`) and live updates (`NodeParams.changed`),
* the JSON schema of `config/clip3d.yaml` (`parameter_schema`; committed as
  `config/clip3d.schema.json`, the Autoware convention) and the parameter table of
  `docs/parameters.md` (`markdown_table`); tests check both files and the YAML's defaults
  against the fields: `python -m clip3d_ros.params --write` regenerates them.

Static settings (QoS, cameras, model) are read-only: changing them needs new subscriptions or a
new model, i.e. a restart. Live ones (vocabulary, thresholds, sync timing) are validated in the
node's on-set callback and applied between frames.

Topics are not parameters: the node reads `~/input/pointcloud` and writes `~/output/pointcloud`
(remapped in the launch file), cameras use `cameras.<name>.image_topic` / `info_topic`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from clip3d_core.clip.vocabulary import Vocabulary, VocabularyError
from clip3d_core.labels import MAX_CLASSES

__all__ = [
    "DEFAULT_VOCABULARY",
    "CameraParams",
    "NodeParams",
    "ParameterError",
    "QosParams",
    "declare_parameters",
    "markdown_table",
    "parameter_schema",
    "parse_vocabulary",
    "validate_change",
]

MAX_ENTRY_CHARS = 200  # CLIP's text context is 77 tokens; longer entries are certainly a mistake
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SCHEMA_FILE = "clip3d.schema.json"
DOCS_FILE = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"

DEFAULT_VOCABULARY = (
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
)


class ParameterError(ValueError):
    """A parameter value is invalid (bad enum value, wrong matrix size, ...)."""


@dataclass(frozen=True)
class Spec:
    """One ROS parameter: what `param()` stores in a field's metadata."""

    name: str  # ROS name ("sync.slop"); for cameras relative to "cameras.<name>."
    description: str
    live: bool = False
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    array_type: str = ""  # "string" | "double": element type of an array parameter


def param(name: str, default: Any, description: str, **spec: Any) -> Any:
    """A dataclass field that is a ROS parameter (see `Spec`)."""
    meta = {"ros": Spec(name, description, **spec)}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _specs(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    return [(f, f.metadata["ros"]) for f in fields(cls) if "ros" in f.metadata]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass(frozen=True)
class QosParams:
    reliability: str  # "reliable" | "best_effort"
    depth: int

    def profile(self) -> Any:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        rel = ReliabilityPolicy.RELIABLE if self.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.depth, reliability=rel)


RELIABILITY = ("reliable", "best_effort")


@dataclass(frozen=True)
class CameraParams:
    """`cameras.<name>.*`; "{name}" in a default stands for the camera's name."""

    name: str
    image_topic: str = param("image_topic", "/{name}/image_raw", "image topic")
    info_topic: str = param("info_topic", "/{name}/camera_info", "sensor_msgs/CameraInfo topic")
    transport: str = param(
        "transport", "raw", "raw (Image) | compressed (CompressedImage, jpeg/png)",
        choices=("raw", "compressed"),
    )  # fmt: skip
    frame_id: str = param("frame_id", "", "optical frame for TF; '' = the CameraInfo header frame")
    T_cam_lidar: list[float] = param(  # noqa: RUF009 (param() returns a field with a default_factory)
        "T_cam_lidar",
        [],
        "static 4x4 LiDAR -> camera-optical transform, 16 values row-major; [] = none",
        array_type="double",
    )
    calibration_file: str = param("calibration_file", "", "KITTI calib file (intrinsics + Tr_velo_to_cam)")
    kitti_camera: str = param("kitti_camera", "P2", "projection matrix in the KITTI file (P0..P3)")
    rectified: bool = param("rectified", False, "images are rectified; use CameraInfo P and R")

    @property
    def T(self) -> np.ndarray | None:
        """`T_cam_lidar` as a 4x4 matrix (None when not given)."""
        return np.asarray(self.T_cam_lidar, np.float64).reshape(4, 4) if len(self.T_cam_lidar) else None

    def check(self) -> None:
        if len(self.T_cam_lidar) not in (0, 16):
            raise ParameterError(
                f"cameras.{self.name}.T_cam_lidar needs 16 values (4x4 row-major),"
                f" got {len(self.T_cam_lidar)}"
            )


@dataclass(frozen=True)
class NodeParams:
    checkpoint: str = param(
        "checkpoint", "", "clip3d checkpoint (.pt) to label with; required unless a segmenter is injected"
    )
    device: str = param("device", "cpu", "torch device for the model, e.g. cpu or cuda:0")
    precision: str = param(
        "runtime.precision", "fp32", "fp32 | fp16 | bf16 (CUDA): the 3D network and CLIP image tower"
    )
    sparse_backend: str = param(
        "runtime.sparse_backend", "", "'' = automatic | spconv | spconv_triton (checkpoints fit both)"
    )
    tf32: bool = param("runtime.tf32", False, "allow TF32 in float32 products and sparse convolutions (CUDA)")
    compile: bool = param(
        "runtime.compile", False, "torch.compile the model's dense parts (slow first frames)"
    )
    embedding_bank: str = param(
        "embedding_bank",
        "",
        "optional text embedding bank (.pt), 'checkpoint' for the checkpoint's own; '' = CLIP text tower",
    )
    vocabulary: list[str] = param(  # noqa: RUF009 (a field with a default_factory)
        "vocabulary",
        DEFAULT_VOCABULARY,
        f"class names; synonyms joined by '|' (e.g. 'car|automobile'); label i = entry i; 1..{MAX_CLASSES}"
        f" unique entries of at most {MAX_ENTRY_CHARS} characters",
        live=True,
        array_type="string",
    )
    score_threshold: float = param(
        "score_threshold", 0.0, "points scoring below this are published unlabelled (65535)", live=True,
        range=(0.0, 1.0),
    )  # fmt: skip
    budget_ms: float = param(
        "budget_ms", 100.0, "per-frame latency budget reported against in /diagnostics", live=True,
        range=(1.0, 60000.0),
    )  # fmt: skip
    intensity_field: str = param(
        "intensity_field", "", "input intensity field; '' = first of intensity, i, remission, reflectance"
    )
    max_points: int = param(
        "max_points", 2_000_000, "clouds with more points are rejected as bad input", live=True,
        range=(1, 50_000_000),
    )  # fmt: skip
    queue_depth: int = param(
        "queue.depth", 2,
        "frames waiting for the model per sensor (cloud frame_id); when full the oldest is dropped",
        range=(1, 100),
    )  # fmt: skip
    max_image_pixels: int = param(
        "max_image_pixels", 16_000_000,
        "camera images with more pixels are not used (camera diagnostic): bounds the encoder input",
        range=(1, 200_000_000),
    )  # fmt: skip
    max_image_aspect: float = param(
        "max_image_aspect", 4.0,
        "camera images more elongated than this (long / short side) are not used (camera diagnostic)",
        range=(1.0, 100.0),
    )  # fmt: skip
    skip_without_subscribers: bool = param(
        "skip_without_subscribers", True, "do not run the model while nobody subscribes to the output",
        live=True,
    )  # fmt: skip
    sync_slop: float = param(
        "sync.slop", 0.05, "max stamp difference (s) between a cloud and its images", live=True,
        range=(0.001, 1.0),
    )  # fmt: skip
    sync_queue_size: int = param(
        "sync.queue_size", 10, "messages queued per input while waiting for a match", range=(1, 100)
    )
    camera_timeout: float = param(
        "sync.camera_timeout", 0.15,
        "seconds a cloud waits for late images before it is labelled without them",
        live=True, range=(0.0, 10.0),
    )  # fmt: skip
    clock_jump_threshold: float = param(
        "sync.clock_jump_threshold", 1.0,
        "a stamp this many seconds older than its topic's newest resets the synchroniser (looped bag)",
        range=(0.0, 3600.0),
    )  # fmt: skip
    qos_cloud_reliability: str = param(
        "qos.cloud.reliability", "best_effort", "input cloud QoS", choices=RELIABILITY
    )
    qos_cloud_depth: int = param("qos.cloud.depth", 5, "input cloud QoS history depth", range=(1, 1000))
    qos_image_reliability: str = param(
        "qos.image.reliability", "best_effort", "image / camera_info QoS", choices=RELIABILITY
    )
    qos_image_depth: int = param("qos.image.depth", 5, "image QoS history depth", range=(1, 1000))
    qos_output_reliability: str = param(
        "qos.output.reliability", "reliable", "labelled cloud QoS", choices=RELIABILITY
    )
    qos_output_depth: int = param("qos.output.depth", 5, "labelled cloud QoS history depth", range=(1, 1000))
    camera_names: list[str] = param(  # noqa: RUF009 (a field with a default_factory)
        "cameras.names", [], "camera names; per name the cameras.<name>.* parameters apply; [] = LiDAR only",
        array_type="string",
    )  # fmt: skip
    lidar_frame: str = param(
        "lidar_frame", "", "LiDAR frame for TF lookups; '' = the cloud's header frame_id"
    )
    use_tf: bool = param(
        "use_tf", True, "look camera extrinsics up in TF (when tf2_ros is available) before static ones"
    )
    diagnostics_period: float = param(
        "diagnostics_period", 1.0, "seconds between /diagnostics reports", range=(0.1, 60.0)
    )
    cameras: tuple[CameraParams, ...] = ()  # from cameras.names + cameras.<name>.*

    def qos(self, which: str) -> QosParams:
        """QoS of "cloud", "image" or "output"."""
        return QosParams(getattr(self, f"qos_{which}_reliability"), int(getattr(self, f"qos_{which}_depth")))

    @property
    def qos_cloud(self) -> QosParams:
        return self.qos("cloud")

    @property
    def qos_image(self) -> QosParams:
        return self.qos("image")

    @property
    def qos_output(self) -> QosParams:
        return self.qos("output")

    def changed(self, values: dict[str, Any]) -> NodeParams:
        """A copy with live parameters changed (`values`: ROS name -> value; others ignored)."""
        by_name = {s.name: f.name for f, s in _specs(NodeParams) if s.live}
        updates = {
            by_name[k]: _typed(v, type(getattr(self, by_name[k]))) for k, v in values.items() if k in by_name
        }
        return dataclasses.replace(self, **updates)


def _typed(value: Any, kind: type) -> Any:
    return list(value) if kind is list else kind(value)


def live_parameters() -> frozenset[str]:
    return frozenset(s.name for _, s in _specs(NodeParams) if s.live)


# ------------------------------------------------------------------------------------ ROS side
def _descriptor(spec: Spec, name: str, default: Any) -> Any:
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    constraints = f"one of {', '.join(spec.choices)}" if spec.choices else ""
    d = ParameterDescriptor(
        name=name, description=spec.description, read_only=not spec.live, additional_constraints=constraints
    )
    if spec.range is not None:
        lo, hi = spec.range
        if isinstance(default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        else:
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
    return d


def _declare(node: Any, cls: type, prefix: str = "", fill: dict[str, str] | None = None) -> dict[str, Any]:
    """Declare `cls`'s parameters on `node` -> {field name: value} (overrides applied)."""
    from rclpy.parameter import Parameter

    array_types = {"string": Parameter.Type.STRING_ARRAY, "double": Parameter.Type.DOUBLE_ARRAY}
    values = {}
    for f, spec in _specs(cls):
        name, default = prefix + spec.name, _default(f)
        if isinstance(default, str) and fill:
            default = default.format(**fill)
        descriptor = _descriptor(spec, name, default)
        if spec.array_type:
            # rclpy types an empty-list default as a byte array: declare by type, default applied here.
            p = node.declare_parameter(name, array_types[spec.array_type], descriptor)
            value = list(p.value) if p.type_ != Parameter.Type.NOT_SET else list(default)
        else:
            value = node.declare_parameter(name, default, descriptor).value
        if spec.choices:
            value = str(value).strip().lower().replace("-", "_")
            if value not in spec.choices:
                raise ParameterError(f"{name} must be one of {list(spec.choices)}, got {value!r}")
        values[f.name] = value
    return values


def declare_parameters(node: Any) -> NodeParams:
    """Declare every parameter on `node` (overrides from YAML / --ros-args apply) -> typed values.

    Raises `ParameterError` for invalid static settings (the node cannot start with them)."""
    v = _declare(node, NodeParams)
    parse_vocabulary(v["vocabulary"])
    names = [n.strip() for n in v["camera_names"] if n.strip()]
    if len(set(names)) != len(names):
        raise ParameterError(f"cameras.names has duplicates: {names}")
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad:
        raise ParameterError(
            f"camera names must be alphanumeric/underscore (they form parameter names): {bad}"
        )
    cameras = []
    for n in names:
        cam = CameraParams(name=n, **_declare(node, CameraParams, f"cameras.{n}.", {"name": n}))
        cam.check()
        cameras.append(cam)
    return NodeParams(**{**v, "camera_names": names, "cameras": tuple(cameras)})


def parse_vocabulary(entries: Any) -> Vocabulary:
    """The vocabulary of a parameter value (parsed once, here); `ParameterError` saying why not."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ParameterError(f"vocabulary: expected a list of strings, got {type(entries).__name__}")
    if not entries:
        raise ParameterError("vocabulary is empty")
    if len(entries) > MAX_CLASSES:
        raise ParameterError(f"vocabulary: {len(entries)} entries; at most {MAX_CLASSES}")
    long = [e for e in entries if isinstance(e, str) and len(e) > MAX_ENTRY_CHARS]
    if long:
        raise ParameterError(
            f"vocabulary: entry longer than {MAX_ENTRY_CHARS} characters: {long[0][:40]!r}..."
        )
    try:
        return Vocabulary.from_strings(list(entries))
    except VocabularyError as exc:
        raise ParameterError(f"vocabulary: {exc}") from exc


def validate_change(params: Sequence[Any]) -> tuple[str | None, Vocabulary | None]:
    """The on-set check of live changes: (rejection reason or None, the parsed new vocabulary if
    one is set). Ranges are enforced by rclpy from the descriptors."""
    vocabulary = None
    for p in params:
        if p.name == "vocabulary":
            try:
                vocabulary = parse_vocabulary(p.value)
            except ParameterError as exc:
                return f"vocabulary rejected: {exc}", None
    return None, vocabulary


# ------------------------------------------------------------------------------------ schema / docs
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema_of(f: dataclasses.Field, spec: Spec) -> dict[str, Any]:
    default = _default(f)
    if spec.array_type:
        item = {"string": {"type": "string"}, "double": {"type": "number"}}[spec.array_type]
        out: dict[str, Any] = {"type": "array", "items": item}
    else:
        out = {"type": _JSON_TYPES[type(default)]}
    out["description"] = spec.description
    out["default"] = list(default) if isinstance(default, list | tuple) else default
    if spec.choices:
        out["enum"] = list(spec.choices)
    if spec.range is not None:
        out["minimum"], out["maximum"] = spec.range
    return out


def _nest(tree: dict[str, Any], dotted: str, leaf: dict[str, Any]) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        node = tree.setdefault(part, {"type": "object", "properties": {}, "additionalProperties": False})
        tree = node["properties"]
    tree[last] = leaf


def parameter_schema() -> dict[str, Any]:
    """JSON schema (draft-07) of the node's parameter file, from the field declarations."""
    props: dict[str, Any] = {"use_sim_time": {"type": "boolean", "description": "ROS: follow /clock"}}
    for f, spec in _specs(NodeParams):
        _nest(props, spec.name, _schema_of(f, spec))
    camera: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    for f, spec in _specs(CameraParams):
        camera["properties"][spec.name] = _schema_of(f, spec)
    props["cameras"]["additionalProperties"] = camera  # cameras.<name>.*
    node = {"type": "object", "properties": props, "additionalProperties": False}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Parameters for the clip3d node (generated by python -m clip3d_ros.params --write)",
        "type": "object",
        "definitions": {"clip3d": node},
        "patternProperties": {
            ".*": {
                "type": "object",
                "properties": {"ros__parameters": {"$ref": "#/definitions/clip3d"}},
                "required": ["ros__parameters"],
            }
        },
    }


def markdown_table() -> str:
    """The parameter table of docs/parameters.md."""

    def row(name: str, f: dataclasses.Field, spec: Spec) -> str:
        default = _default(f)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        shown = shown.replace("|", "\\|")  # (a pipe ends a table cell even inside code)
        extra = []
        if spec.range is not None:
            extra.append(f"range {spec.range[0]:g}..{spec.range[1]:g}")
        if spec.choices:
            extra.append(" \\| ".join(spec.choices))
        desc = spec.description.replace("|", "\\|") + (f" ({'; '.join(extra)})" if extra else "")
        return f"| `{name}` | `{shown}` | {'live' if spec.live else 'restart'} | {desc} |"

    lines = [
        "# clip3d node parameters",
        "",
        "Generated from `clip3d_ros/params.py` (`python -m clip3d_ros.params --write`); the schema of",
        "`config/clip3d.yaml` is `config/clip3d.schema.json`. *live*: `ros2 param set` applies it",
        "between frames; *restart*: read-only.",
        "",
        "Topics (remapped in `launch/clip3d.launch.py`): input `~/input/pointcloud`, output",
        "`~/output/pointcloud`, cameras as `cameras.<name>.image_topic` / `info_topic`.",
        "",
        "| parameter | default | changes | description |",
        "|---|---|---|---|",
    ]
    lines += [row(s.name, f, s) for f, s in _specs(NodeParams)]
    lines += [row(f"cameras.<name>.{s.name}", f, s) for f, s in _specs(CameraParams)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the parameter schema and docs table.")
    parser.add_argument("--write", action="store_true", help="rewrite the files")
    args = parser.parse_args(argv)
    want = {
        CONFIG_DIR / SCHEMA_FILE: json.dumps(parameter_schema(), indent=2) + "\n",
        DOCS_FILE: markdown_table(),
    }
    stale = [p for p, text in want.items() if not p.is_file() or p.read_text() != text]
    if args.write:
        for p in stale:
            p.write_text(want[p])
            print(f"wrote {p}")
        return 0
    for p in stale:
        print(f"stale: {p} (python -m clip3d_ros.params --write)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
