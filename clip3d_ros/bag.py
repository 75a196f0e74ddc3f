"""rosbag2 I/O without a ROS runtime (rosbags): typestore, reader/writer, message builders.

Everything here works on rosbags' own message classes (plain dataclasses), so the bag tools run
where no ROS is installed. Reading messages into numpy needs nothing bag-specific:
`clip3d_ros.conversions` reads by attribute (`cloud_to_array`, `msg_to_rgb`, `camera_from_info_msg`,
`transform_to_matrix`) and works on rosbags messages as on rclpy ones. Building messages here uses
the same field layout (`conversions.layout_from_dtype`), so a cloud written to a bag and one the
node publishes are byte-identical for the same records.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rosbags.interfaces import (
    Connection,
    Nodetype,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore

from clip3d_ros import conversions

log = logging.getLogger(__name__)

# Kilted's definitions; every message used here is field-for-field identical in Humble and Jazzy.
STORE = Stores.ROS2_KILTED
# Metadata v8 keeps `offered_qos_profiles` a YAML string, which rosbag2 from Humble to Kilted reads.
BAG_VERSION = 8
STORAGES: dict[str, StoragePlugin] = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}

T_CLOUD = "sensor_msgs/msg/PointCloud2"
T_IMAGE = "sensor_msgs/msg/Image"
T_COMPRESSED = "sensor_msgs/msg/CompressedImage"
T_CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
T_TF = "tf2_msgs/msg/TFMessage"
T_STRING = "std_msgs/msg/String"


class BagError(ValueError):
    """A bag is missing or unreadable, or lacks / mistypes a topic a tool needs."""


@functools.cache
def typestore() -> Any:
    return get_typestore(STORE)


def msg_class(msgtype: str) -> type:
    return typestore().types[msgtype]


_NUMPY = {"bool": np.bool_, "byte": np.uint8, "octet": np.uint8, "char": np.uint8, "int8": np.int8,
          "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
          "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64}


def new_msg(msgtype: str) -> Any:
    """A rosbags message with every field zero / empty, like an rclpy constructor without arguments
    (rosbags classes take every field), so one builder can fill rclpy and rosbags messages."""
    _, fields = typestore().fielddefs[msgtype]
    return msg_class(msgtype)(**{name: _zero(desc) for name, desc in fields})


def _zero(desc: Any) -> Any:
    kind, rest = desc
    if kind == Nodetype.NAME:
        return new_msg(rest)
    if kind == Nodetype.BASE:
        base = rest[0]
        return "" if base in ("string", "wstring") else _NUMPY[base](0).item()
    inner, length = rest  # ARRAY (fixed length) or SEQUENCE (empty)
    count = length if kind == Nodetype.ARRAY else 0
    if inner[0] == Nodetype.BASE and inner[1][0] in _NUMPY:
        return np.zeros(count, dtype=_NUMPY[inner[1][0]])
    return [_zero(inner) for _ in range(count)]


def qos(*, depth: int = 10, reliable: bool = True, transient_local: bool = False) -> Qos:
    """A rosbag2 offered-QoS entry (what `ros2 bag play` and `clip3d replay` re-offer)."""
    zero = QosTime(0, 0)
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=depth,
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=zero,
        lifespan=zero,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=zero,
        avoid_ros_namespace_conventions=False,
    )


QOS_STREAM = qos(depth=10)
# /tf_static and the vocabulary map: one message per sender, kept for late joiners.
QOS_LATCHED = qos(depth=1, transient_local=True)


# ---------------------------------------------------------------------------------------- writing
class BagWriter:
    """A rosbag2 writer that serialises rosbags messages through the typestore.

    Use as a context manager; leaving it (also by an exception) closes the bag with metadata, so
    whatever was written stays readable.
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3") -> None:
        if storage not in STORAGES:
            raise BagError(f"storage {storage!r}: expected one of {sorted(STORAGES)}")
        self.path = Path(path)
        try:
            self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        except WriterError as exc:
            raise BagError(str(exc)) from exc
        self._connections: dict[str, Connection] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()

    def add_topic(self, topic: str, msgtype: str, qos_profile: Qos = QOS_STREAM) -> None:
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=typestore(), offered_qos_profiles=[qos_profile]
        )

    def add_connection_like(self, conn: Connection) -> None:
        """Copy a topic (type, definition, hash, QoS) from another bag's connection; a definition
        or hash the source bag lacks (older rosbag2) comes from the typestore."""
        ext = conn.ext
        self._connections[conn.topic] = self._writer.add_connection(
            conn.topic,
            conn.msgtype,
            typestore=typestore(),
            msgdef=conn.msgdef.data or None,
            rihs01=conn.digest or None,
            serialization_format=getattr(ext, "serialization_format", "cdr"),
            offered_qos_profiles=getattr(ext, "offered_qos_profiles", []),
        )

    def write(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        conn = self._connections[topic]
        self._writer.write(conn, timestamp_ns, typestore().serialize_cdr(msg, conn.msgtype))

    def write_raw(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        self._writer.write(self._connections[topic], timestamp_ns, data)


# ---------------------------------------------------------------------------------------- reading
def open_reader(path: str | Path) -> Reader:
    """An opened rosbags reader (sqlite3 or MCAP, detected from metadata.yaml)."""
    path = Path(path)
    if not (path / "metadata.yaml").is_file():
        raise BagError(f"{path}: not a rosbag2 folder (no metadata.yaml)")
    reader = Reader(path)
    try:
        reader.open()
    except ReaderError as exc:
        raise BagError(f"{path}: {exc}") from exc
    return reader


def storage_of(path: str | Path) -> str:
    """The storage plugin ("sqlite3" / "mcap") named in a bag's metadata.yaml."""
    try:
        info = yaml.safe_load((Path(path) / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        return str(info["storage_identifier"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise BagError(f"{path}: unreadable metadata.yaml ({exc})") from exc


def deserialize(data: bytes | memoryview, msgtype: str) -> Any:
    return typestore().deserialize_cdr(data, msgtype)


def connections_for(reader: Reader, topics: Iterable[str] | None) -> list[Connection]:
    """The reader's connections on `topics` (all when None); unknown topics -> `BagError`."""
    if topics is None:
        return list(reader.connections)
    wanted = list(topics)
    missing = sorted(set(wanted) - {c.topic for c in reader.connections})
    if missing:
        raise BagError(f"{reader.path}: no topic {missing}; the bag has {sorted(reader.topics)}")
    return [c for c in reader.connections if c.topic in wanted]


def require_topic(reader: Reader, topic: str, msgtypes: Sequence[str]) -> Connection:
    (conn, *_) = connections_for(reader, [topic])
    if conn.msgtype not in msgtypes:
        raise BagError(f"{reader.path}: topic {topic} is {conn.msgtype}, expected one of {list(msgtypes)}")
    return conn


def offered_qos(conn: Connection) -> Qos | None:
    """The first QoS profile the recorder saw on this topic (None when the bag has none)."""
    profiles = getattr(conn.ext, "offered_qos_profiles", None) or []
    return profiles[0] if profiles else None


# ---------------------------------------------------------------------------------------- headers
def stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def peek_stamp_ns(raw: bytes | memoryview) -> int:
    """Header stamp of a serialised message whose first field is std_msgs/Header, read straight
    from the CDR bytes (4-byte encapsulation header, then int32 sec, uint32 nanosec)."""
    if len(raw) < 12:
        raise BagError(f"serialised message of {len(raw)} bytes is too short for a header")
    sec, nanosec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def time_msg(ns: int) -> Any:
    return msg_class("builtin_interfaces/msg/Time")(
        sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000)
    )


def header(ns: int, frame_id: str) -> Any:
    return msg_class("std_msgs/msg/Header")(stamp=time_msg(ns), frame_id=frame_id)


# ---------------------------------------------------------------------------------------- clouds
def cloud_msg(points: np.ndarray, hdr: Any, *, height: int = 1) -> Any:
    """Structured numpy array (one record per point, input order) -> rosbags PointCloud2, built by
    `conversions.cloud_parts` like the node's messages (`height > 1`: organised)."""
    parts = conversions.cloud_parts(points, height=height)
    field_cls = msg_class("sensor_msgs/msg/PointField")
    return msg_class(T_CLOUD)(
        header=hdr,
        height=parts.height,
        width=parts.width,
        fields=[
            field_cls(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in parts.fields
        ],
        is_bigendian=parts.is_bigendian,
        point_step=parts.point_step,
        row_step=parts.row_step,
        data=parts.data,
        is_dense=parts.is_dense,
    )


# ---------------------------------------------------------------------------------------- images
def image_msg(rgb: np.ndarray, hdr: Any) -> Any:
    h, w = rgb.shape[:2]
    return msg_class(T_IMAGE)(
        header=hdr,
        height=h,
        width=w,
        encoding="rgb8",
        is_bigendian=0,
        step=3 * w,
        data=np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1),
    )


def compressed_image_msg(rgb: np.ndarray, hdr: Any, quality: int = 90) -> Any:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return msg_class(T_COMPRESSED)(header=hdr, format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8))


# ---------------------------------------------------------------------------------------- camera
def camera_info_msg(K: np.ndarray, D: np.ndarray | None, width: int, height: int, hdr: Any) -> Any:
    """plumb_bob CameraInfo for an unrectified pinhole camera: R = I, P = [K | 0]."""
    d = np.zeros(5) if D is None else np.asarray(D, np.float64).reshape(-1)
    P = np.zeros((3, 4))
    P[:, :3] = K
    return msg_class(T_CAMERA_INFO)(
        header=hdr,
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=d.astype(np.float64),
        k=np.asarray(K, np.float64).reshape(9),
        r=np.eye(3).reshape(9),
        p=P.reshape(12),
        binning_x=0,
        binning_y=0,
        roi=msg_class("sensor_msgs/msg/RegionOfInterest")(
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        ),
    )


# ---------------------------------------------------------------------------------------- TF
def quaternion_from_matrix(R: np.ndarray) -> np.ndarray:
    """Rotation matrix -> unit quaternion (x, y, z, w), w >= 0 (Shepperd's method, stable near 180 deg)."""
    R = np.asarray(R, np.float64)
    tr = np.trace(R)
    i = int(np.argmax([tr, R[0, 0], R[1, 1], R[2, 2]]))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def tf_message(transforms: Sequence[tuple[str, str, np.ndarray]], ns: int) -> Any:
    """TFMessage from (parent, child, T_parent_child) triples; T_parent_child maps child -> parent
    coordinates (tf2's convention: the child frame's pose in the parent)."""
    geo = "geometry_msgs/msg/"
    out = []
    for parent, child, T in transforms:
        q = quaternion_from_matrix(T[:3, :3])
        out.append(
            msg_class(geo + "TransformStamped")(
                header=header(ns, parent),
                child_frame_id=child,
                transform=msg_class(geo + "Transform")(
                    translation=msg_class(geo + "Vector3")(
                        x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])
                    ),
                    rotation=msg_class(geo + "Quaternion")(x=q[0], y=q[1], z=q[2], w=q[3]),
                ),
            )
        )
    return msg_class(T_TF)(transforms=out)


@dataclass(frozen=True)
class StaticTransforms:
    """A TF tree from /tf_static messages: `lookup(target, source)` -> T_target_source (4x4)."""

    edges: dict[tuple[str, str], np.ndarray]  # (parent, child) -> T_parent_child

    @classmethod
    def from_messages(cls, messages: Iterable[Any]) -> StaticTransforms:
        edges: dict[tuple[str, str], np.ndarray] = {}
        for msg in messages:
            for ts in msg.transforms:
                T = conversions.transform_to_matrix(ts.transform)
                edges[(ts.header.frame_id.lstrip("/"), ts.child_frame_id.lstrip("/"))] = T
        return cls(edges)

    def lookup(self, target: str, source: str) -> np.ndarray:
        """T_target_source through the tree (breadth-first over both edge directions)."""
        target, source = target.lstrip("/"), source.lstrip("/")
        graph: dict[str, list[tuple[str, np.ndarray]]] = {}
        for (parent, child), T in self.edges.items():
            graph.setdefault(child, []).append((parent, T))  # child -> parent: T_parent_child
            graph.setdefault(parent, []).append((child, np.linalg.inv(T)))
        frontier, seen = [(source, np.eye(4))], {source}
        while frontier:
            frame, T_frame_source = frontier.pop(0)
            if frame == target:
                return T_frame_source
            for nxt, T_next_frame in graph.get(frame, []):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append((nxt, T_next_frame @ T_frame_source))
        raise BagError(
            f"no static transform chain from {source!r} to {target!r}; known edges {sorted(self.edges)}"
        )


def read_static_transforms(reader: Reader, topic: str = "/tf_static") -> StaticTransforms:
    conns = [c for c in reader.connections if c.topic == topic and c.msgtype == T_TF]
    if not conns:  # (rosbags reads every topic for an empty connection list)
        return StaticTransforms({})
    return StaticTransforms.from_messages(deserialize(raw, T_TF) for _, _, raw in reader.messages(conns))


def iter_messages(reader: Reader, conns: Sequence[Connection]) -> Iterator[tuple[Connection, int, Any]]:
    """Deserialised messages of `conns` in bag order (none for an empty list, unlike rosbags)."""
    if not conns:
        return
    for conn, ts, raw in reader.messages(conns):
        yield conn, ts, deserialize(raw, conn.msgtype)
