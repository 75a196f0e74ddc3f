"""sensor_msgs <-> numpy: PointCloud2 of any field layout, Image / CompressedImage -> RGB, CameraInfo.

The functions read messages by attribute only (`fields`, `data`, `point_step`, ...), so they work on
rclpy messages and on rosbags' dataclasses alike; rclpy's message classes are imported only where a
message is built. Anything malformed raises `CloudFormatError` / `ImageFormatError` /
`CalibrationError` naming the problem; no input makes them crash or return wrong-sized data.
"""

from __future__ import annotations

import array
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip3d_core.geometry import CalibrationError, PinholeCamera, camera_from_camera_info
from clip3d_core.io import INTENSITY_FIELDS, CloudFormatError, ImageFormatError
from clip3d_core.labels import UNLABELLED_COLOUR

__all__ = [
    "DATATYPES",
    "UNLABELLED_RGB",
    "CalibrationError",
    "CloudFormatError",
    "CloudLayout",
    "CloudParts",
    "Field",
    "ImageFormatError",
    "array_to_cloud",
    "camera_from_info_msg",
    "check_cloud",
    "check_layout",
    "cloud_parts",
    "cloud_to_array",
    "compressed_to_rgb",
    "dtype_from_fields",
    "find_intensity_field",
    "image_to_rgb",
    "labelled_points",
    "layout_from_dtype",
    "msg_to_rgb",
    "pack_rgb",
    "points_for_model",
    "rgb_for_labels",
    "rgb_from_buffer",
    "structured_from_buffer",
    "transform_to_matrix",
    "unpack_rgb",
    "xyz_of",
]

# sensor_msgs/PointField datatypes -> numpy type (byte order added per message).
DATATYPES: dict[int, str] = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
_DATATYPE_OF = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in DATATYPES.items()}
MAX_IMAGE_PIXELS = 64_000_000  # refuse absurd sizes before allocating (decompression bombs, bad headers)
UNLABELLED_RGB = UNLABELLED_COLOUR  # unlabelled points in the `rgb` field: the pictures' grey


@dataclass(frozen=True)
class Field:
    """One PointField: `count` consecutive values of `datatype` at byte `offset`."""

    name: str
    offset: int
    datatype: int
    count: int = 1


@dataclass(frozen=True)
class CloudLayout:
    fields: tuple[Field, ...]
    point_step: int


# ---------------------------------------------------------------------------------------- layout
def dtype_from_fields(fields: Sequence[Any], point_step: int, is_bigendian: bool = False) -> np.dtype:
    """PointFields (anything with name/offset/datatype/count) -> structured dtype of `point_step`
    bytes. Padding between fields is kept (offsets), so the dtype views the raw buffer directly."""
    order = ">" if is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in fields:
        name, offset, datatype = str(f.name), int(f.offset), int(f.datatype)
        count = max(int(getattr(f, "count", 1)), 1)  # count 0 is common in the wild and means 1
        if not name:
            raise CloudFormatError(f"PointField at offset {offset} has an empty name")
        if name in names:
            raise CloudFormatError(f"duplicate PointField {name!r}")
        if datatype not in DATATYPES:
            raise CloudFormatError(f"PointField {name!r}: unknown datatype {datatype}")
        base = np.dtype(order + DATATYPES[datatype])
        if offset < 0 or offset + base.itemsize * count > point_step:
            raise CloudFormatError(
                f"PointField {name!r} ({count} x {base.itemsize} B at offset {offset}) "
                f"exceeds point_step {point_step}"
            )
        names.append(name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(offset)
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": point_step})
    except (TypeError, ValueError) as exc:
        raise CloudFormatError(f"cannot describe point layout: {exc}") from exc


def layout_from_dtype(dtype: np.dtype) -> CloudLayout:
    """Structured dtype -> PointField layout (the inverse of `dtype_from_fields`)."""
    if dtype.names is None:
        raise CloudFormatError(f"expected a structured dtype, got {dtype}")
    fields = []
    for name in dtype.names:
        sub, offset = dtype.fields[name][:2]
        base, count = (sub.base, int(np.prod(sub.shape))) if sub.shape else (sub, 1)
        key = base.newbyteorder("=").str[1:]
        if key not in _DATATYPE_OF:
            raise CloudFormatError(f"field {name!r}: {base} has no PointField datatype")
        fields.append(Field(name, int(offset), _DATATYPE_OF[key], count))
    return CloudLayout(tuple(fields), dtype.itemsize)


def check_layout(
    data_bytes: int,
    *,
    fields: Sequence[Any],
    point_step: int,
    width: int,
    height: int,
    row_step: int,
    is_bigendian: bool,
) -> np.dtype:
    """The point dtype of a PointCloud2 described by its header and field table, after checking
    that `data_bytes` bytes hold exactly `height` rows of `row_step` bytes (`CloudFormatError`
    otherwise). Reads no point data: cheap enough for a subscription callback."""
    width, height, point_step, row_step = int(width), int(height), int(point_step), int(row_step)
    if width < 0 or height < 0:
        raise CloudFormatError(f"negative cloud size {height}x{width}")
    if width * height == 0:
        if data_bytes:  # a header that lost its size is not an empty scan
            raise CloudFormatError(f"cloud of {height}x{width} points carries {data_bytes} bytes of data")
        return dtype_from_fields(fields, max(point_step, 1), bool(is_bigendian))
    if point_step <= 0:
        raise CloudFormatError(f"point_step must be positive, got {point_step}")
    dtype = dtype_from_fields(fields, point_step, bool(is_bigendian))
    if row_step < width * point_step:
        raise CloudFormatError(f"row_step {row_step} < width {width} x point_step {point_step}")
    if data_bytes != row_step * height:
        raise CloudFormatError(
            f"data has {data_bytes} bytes, expected row_step {row_step} x height {height}"
            f" = {row_step * height}"
        )
    return dtype


def _layout_of(msg: Any) -> dict[str, Any]:
    """A PointCloud2's header and field table as `check_layout` / `structured_from_buffer` take them."""
    return {
        "fields": msg.fields,
        "point_step": msg.point_step,
        "width": msg.width,
        "height": msg.height,
        "row_step": msg.row_step,
        "is_bigendian": bool(msg.is_bigendian),
    }


def check_cloud(msg: Any, max_points: int | None = None) -> np.dtype:
    """`check_layout` of a PointCloud2 message, plus: x, y, z present as scalar fields and at most
    `max_points` points. The node runs it on the callback thread, so a malformed cloud never takes
    a valid one's place in the queue."""
    dtype = check_layout(len(msg.data), **_layout_of(msg))
    n = int(msg.width) * int(msg.height)
    if max_points is not None and n > max_points:
        raise CloudFormatError(f"{n} points exceed max_points {max_points}")
    for c in ("x", "y", "z"):
        if c not in (dtype.names or ()):
            raise CloudFormatError(f"cloud has no {c} field; fields: {list(dtype.names or ())}")
        if dtype.fields[c][0].shape:
            raise CloudFormatError(f"field {c!r} has count {dtype.fields[c][0].shape}, expected 1")
    return dtype


def structured_from_buffer(
    data: Any,
    *,
    fields: Sequence[Any],
    point_step: int,
    width: int,
    height: int,
    row_step: int,
    is_bigendian: bool,
) -> np.ndarray:
    """Raw PointCloud2 bytes -> 1-D structured array, one record per point in row-major order.

    Zero-copy when rows are unpadded. Organised clouds (height > 1) are flattened; row padding
    (row_step > width * point_step) is skipped."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = buf.reshape(-1)
    dtype = check_layout(
        buf.size,
        fields=fields,
        point_step=point_step,
        width=width,
        height=height,
        row_step=row_step,
        is_bigendian=is_bigendian,
    )
    width, height, row_step = int(width), int(height), int(row_step)
    if width * height == 0:
        return np.zeros(0, dtype=dtype)
    if row_step == width * dtype.itemsize:
        return buf.view(dtype)
    rows = np.lib.stride_tricks.as_strided(
        buf, shape=(height, width * dtype.itemsize), strides=(row_step, 1)
    )
    return np.ascontiguousarray(rows).reshape(-1).view(dtype)


def cloud_to_array(msg: Any) -> np.ndarray:
    """PointCloud2 (rclpy or rosbags) -> 1-D structured array in the message's point order."""
    return structured_from_buffer(msg.data, **_layout_of(msg))


def _byte_array(values: np.ndarray) -> array.array:
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(values).view(np.uint8).reshape(-1).data)
    return out


@dataclass(frozen=True)
class CloudParts:
    """The fields of a sensor_msgs/PointCloud2 (all but the header), message-class agnostic: the
    one cloud builder behind the node's rclpy messages and the bag tools' rosbags messages."""

    height: int
    width: int
    fields: tuple[Field, ...]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: np.ndarray  # uint8, row_step * height bytes
    is_dense: bool


def cloud_parts(points: np.ndarray, *, height: int = 1, is_dense: bool | None = None) -> CloudParts:
    """Structured array -> PointCloud2 parts in the layout and byte order of its dtype.

    `height > 1` makes an organised cloud of `len(points) // height` columns. `is_dense` (PCL
    meaning: no non-finite x, y, z) is computed when not given."""
    points = np.ascontiguousarray(points).reshape(-1)
    layout = layout_from_dtype(points.dtype)
    if height < 1 or len(points) % height:
        raise CloudFormatError(f"{len(points)} points do not split into {height} rows")
    orders = {points.dtype.fields[f.name][0].base.byteorder for f in layout.fields} - {"|", "="}
    if len(orders) > 1:
        raise CloudFormatError("mixed byte orders in one cloud")
    width = len(points) // height
    if is_dense is None:
        is_dense = not {"x", "y", "z"} <= set(points.dtype.names) or bool(np.isfinite(xyz_of(points)).all())
    return CloudParts(
        height=int(height),
        width=width,
        fields=layout.fields,
        is_bigendian=orders == {">"},
        point_step=layout.point_step,
        row_step=layout.point_step * width,
        data=points.view(np.uint8).reshape(-1),
        is_dense=bool(is_dense),
    )


def array_to_cloud(
    points: np.ndarray, header: Any = None, *, height: int = 1, is_dense: bool | None = None
) -> Any:
    """Structured array -> rclpy sensor_msgs/PointCloud2 (`cloud_parts`)."""
    from sensor_msgs.msg import PointCloud2, PointField

    parts = cloud_parts(points, height=height, is_dense=is_dense)
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = parts.height, parts.width
    msg.fields = [
        PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in parts.fields
    ]
    msg.is_bigendian = parts.is_bigendian
    msg.point_step = parts.point_step
    msg.row_step = parts.row_step
    msg.data = _byte_array(parts.data)
    msg.is_dense = parts.is_dense
    return msg


# ---------------------------------------------------------------------------------------- points
def _columns(points: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """float32 [N, len(names)] native-endian copy of scalar fields (any numeric type)."""
    have = points.dtype.names or ()
    missing = [c for c in names if c not in have]
    if missing:
        raise CloudFormatError(f"cloud has no {'/'.join(missing)} field(s); fields: {list(have)}")
    out = np.empty((len(points), len(names)), dtype=np.float32)
    for i, c in enumerate(names):
        col = points[c]
        if col.ndim != 1:
            raise CloudFormatError(f"field {c!r} has count {col.shape[1:]}, expected 1")
        out[:, i] = col
    return out


def xyz_of(points: np.ndarray) -> np.ndarray:
    """float32 [N, 3] native-endian x, y, z of a structured cloud (any numeric field types)."""
    return _columns(points, ("x", "y", "z"))


def find_intensity_field(points: np.ndarray, name: str = "") -> str | None:
    """The intensity field: `name` when given (None if absent), else the first common alias."""
    names = points.dtype.names or ()
    if name:
        return name if name in names else None
    return next((n for n in INTENSITY_FIELDS if n in names), None)


def points_for_model(points: np.ndarray, intensity_field: str | None) -> np.ndarray:
    """float32 [N, 4] (x, y, z, intensity) when an intensity field is given, else [N, 3]."""
    return _columns(points, ("x", "y", "z") if intensity_field is None else ("x", "y", "z", intensity_field))


def pack_rgb(colours: np.ndarray) -> np.ndarray:
    """uint8 [N, 3] -> float32 [N] with the bits of 0x00RRGGBB (PCL / RViz `rgb` convention)."""
    c = np.asarray(colours, dtype=np.uint32)
    return ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).astype(np.uint32).view(np.float32)


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(rgb, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=-1).astype(np.uint8)


def rgb_for_labels(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Packed `rgb` per point: `colours[label]` for the vocabulary's uint8 [C, 3] colours; UNLABELLED
    (and any label >= C) -> `UNLABELLED_RGB`. A gather from a packed table: ~20x faster than
    gathering [N, 3] bytes and packing them."""
    table = pack_rgb(np.vstack([np.asarray(colours, np.uint8).reshape(-1, 3), UNLABELLED_RGB]))
    return table[np.minimum(labels, len(table) - 1)]


@functools.cache  # four layouts in all; built per frame otherwise
def _output_dtype(with_intensity: bool, with_instance: bool = False) -> np.dtype:
    # 4-byte aligned fields, label padded to 4 bytes: x y z [intensity] label score rgb [instance]
    # (instance last, so clouds of semantic models keep their layout byte for byte).
    names = ["x", "y", "z"] + (["intensity"] if with_intensity else []) + ["label", "score", "rgb"]
    formats = ["<f4"] * (len(names) - 3) + ["<u2", "<f4", "<f4"]
    offsets = [4 * i for i in range(len(names) - 3)]
    base = offsets[-1] + 4
    offsets += [base, base + 4, base + 8]
    if with_instance:
        names, formats, offsets = [*names, "instance"], [*formats, "<u4"], [*offsets, base + 12]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": base + (16 if with_instance else 12)})


def labelled_points(
    xyz: np.ndarray,
    intensity: np.ndarray | None,
    labels: np.ndarray,
    scores: np.ndarray,
    colours: np.ndarray,
    instances: np.ndarray | None = None,
) -> np.ndarray:
    """The output cloud's records: x, y, z, intensity (when given), label uint16, score, rgb, and
    instance uint32 (0 = none / stuff) when given (panoptic models).

    `colours`: per point uint8 [N, 3], or already packed float32 [N] (`rgb_for_labels`)."""
    n = len(xyz)
    named = (("labels", labels), ("scores", scores), ("colours", colours), ("instances", instances))
    for what, arr in named:
        if arr is not None and len(arr) != n:
            raise CloudFormatError(f"{what} has {len(arr)} entries for {n} points")
    # zeros: no stray bytes in the padding
    out = np.zeros(n, dtype=_output_dtype(intensity is not None, instances is not None))
    out["x"], out["y"], out["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if intensity is not None:
        out["intensity"] = intensity
    out["label"] = labels
    out["score"] = scores
    out["rgb"] = colours if colours.ndim == 1 else pack_rgb(colours)
    if instances is not None:
        out["instance"] = instances
    return out


# ---------------------------------------------------------------------------------------- images
# encoding -> (channels, bytes per channel, channel order to RGB); None order = grey.
_ENCODINGS: dict[str, tuple[int, int, tuple[int, ...] | None]] = {
    "rgb8": (3, 1, (0, 1, 2)),
    "bgr8": (3, 1, (2, 1, 0)),
    "rgba8": (4, 1, (0, 1, 2)),
    "bgra8": (4, 1, (2, 1, 0)),
    "mono8": (1, 1, None),
    "8uc1": (1, 1, None),
    "8uc3": (3, 1, (2, 1, 0)),  # OpenCV convention: BGR
    "8uc4": (4, 1, (2, 1, 0)),
    "rgb16": (3, 2, (0, 1, 2)),
    "bgr16": (3, 2, (2, 1, 0)),
    "rgba16": (4, 2, (0, 1, 2)),
    "bgra16": (4, 2, (2, 1, 0)),
    "mono16": (1, 2, None),
    "16uc1": (1, 2, None),
    "16uc3": (3, 2, (2, 1, 0)),
}
# Bayer pattern -> position of (R, B) in the 2x2 cell as (row, col); G is the other two.
_BAYER = {
    "bayer_rggb8": ((0, 0), (1, 1)),
    "bayer_bggr8": ((1, 1), (0, 0)),
    "bayer_gbrg8": ((1, 0), (0, 1)),
    "bayer_grbg8": ((0, 1), (1, 0)),
}
_YUV422 = {"yuv422": (1, 0, 3), "uyvy": (1, 0, 3), "yuv422_yuy2": (0, 1, 2), "yuyv": (0, 1, 2)}


def _rows(buf: np.ndarray, height: int, width: int, step: int, row_bytes: int) -> np.ndarray:
    if step < row_bytes:
        raise ImageFormatError(f"step {step} < width {width} x {row_bytes // max(width, 1)} bytes per pixel")
    if buf.size != step * height:
        raise ImageFormatError(
            f"data has {buf.size} bytes, expected step {step} x height {height} = {step * height}"
        )
    return buf.reshape(height, step)[:, :row_bytes]


def _demosaic(raw: np.ndarray, encoding: str) -> np.ndarray:
    """2x2-cell demosaic (one RGB per cell, repeated): cheap, size-preserving, good enough for CLIP."""
    h, w = raw.shape
    if h % 2 or w % 2:
        raise ImageFormatError(f"{encoding} needs even width and height, got {w}x{h}")
    (rr, rc), (br, bc) = _BAYER[encoding]
    cells = raw.reshape(h // 2, 2, w // 2, 2).astype(np.uint16)
    r = cells[:, rr, :, rc]
    b = cells[:, br, :, bc]
    g = (cells[:, rr, :, 1 - rc] + cells[:, br, :, 1 - bc]) // 2
    rgb = np.stack([r, g, b], axis=-1).astype(np.uint8)
    return rgb.repeat(2, axis=0).repeat(2, axis=1)


def _yuv422_to_rgb(raw: np.ndarray, layout: tuple[int, int, int]) -> np.ndarray:
    """Packed 4:2:2 -> RGB (BT.601 full range). `layout`: byte offsets (Y0, U, Y1) in each quad; V
    is the remaining one."""
    h, row_bytes = raw.shape
    quads = raw.reshape(h, row_bytes // 4, 4).astype(np.float32)
    y0_i, u_i, y1_i = layout
    v_i = ({0, 1, 2, 3} - {y0_i, u_i, y1_i}).pop()
    y = np.stack([quads[..., y0_i], quads[..., y1_i]], axis=-1).reshape(h, -1)
    u = np.repeat(quads[..., u_i] - 128.0, 2, axis=1)
    v = np.repeat(quads[..., v_i] - 128.0, 2, axis=1)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def rgb_from_buffer(
    data: Any, *, height: int, width: int, step: int, encoding: str, is_bigendian: bool = False
) -> np.ndarray:
    """Raw sensor_msgs/Image bytes -> uint8 [H, W, 3] RGB (always a fresh, contiguous array).

    16-bit data keeps its 8 most significant bits; grey is replicated to three channels; alpha is
    dropped; Bayer and packed YUV 4:2:2 are converted."""
    height, width, step = int(height), int(width), int(step)
    enc = str(encoding).strip().lower()
    if height <= 0 or width <= 0:
        raise ImageFormatError(f"empty image {width}x{height}")
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageFormatError(f"image {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = buf.reshape(-1)
    if enc in _BAYER:
        return _demosaic(_rows(buf, height, width, step, width), enc)
    if enc in _YUV422:
        if width % 2:
            raise ImageFormatError(f"{enc} needs an even width, got {width}")
        return _yuv422_to_rgb(_rows(buf, height, width, step, width * 2), _YUV422[enc])
    if enc not in _ENCODINGS:
        known = sorted([*_ENCODINGS, *_BAYER, *_YUV422])
        raise ImageFormatError(f"unsupported image encoding {encoding!r}; supported: {known}")
    channels, nbytes, order = _ENCODINGS[enc]
    rows = _rows(buf, height, width, step, width * channels * nbytes)
    if nbytes == 2:
        dt = np.dtype(">u2" if is_bigendian else "<u2")
        pixels = (np.ascontiguousarray(rows).view(dt) >> 8).astype(np.uint8).reshape(height, width, channels)
    else:
        pixels = rows.reshape(height, width, channels)
    if order is None:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., list(order)])


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> uint8 [H, W, 3] RGB."""
    return rgb_from_buffer(
        msg.data,
        height=msg.height,
        width=msg.width,
        step=msg.step,
        encoding=msg.encoding,
        is_bigendian=bool(msg.is_bigendian),
    )


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG / PNG; image_transport's "compressed") -> uint8 RGB.

    compressedDepth (depth PNGs behind a custom header) is rejected: it is not a camera image."""
    from PIL import Image, UnidentifiedImageError

    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower():
        raise ImageFormatError(f"compressed depth images are not supported (format {fmt!r})")
    raw = np.asarray(msg.data, dtype=np.uint8).tobytes() if not isinstance(msg.data, bytes) else msg.data
    if not raw:
        raise ImageFormatError("compressed image has no data")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageFormatError(f"image {img.width}x{img.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = (np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except ImageFormatError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageFormatError(f"cannot decode compressed image (format {fmt!r}): {exc}") from exc


def msg_to_rgb(msg: Any) -> np.ndarray:
    """Image or CompressedImage (told apart by the `format` attribute) -> uint8 RGB."""
    return (
        compressed_to_rgb(msg)
        if hasattr(msg, "format") and not hasattr(msg, "encoding")
        else image_to_rgb(msg)
    )


# ---------------------------------------------------------------------------------------- cameras
def camera_from_info_msg(
    info: Any, T_cam_lidar: np.ndarray, name: str, *, rectified: bool = False
) -> PinholeCamera:
    """sensor_msgs/CameraInfo + extrinsics -> validated `PinholeCamera` (`CalibrationError` when
    intrinsics are zero/non-finite, sizes are zero or the distortion model is unsupported)."""
    model = str(getattr(info, "distortion_model", "") or "plumb_bob")
    d = np.asarray(info.d, dtype=np.float64).reshape(-1)
    if model not in ("plumb_bob", "rational_polynomial") and d.size and np.any(d):
        raise CalibrationError(f"camera {name!r}: distortion model {model!r} is not supported")
    return camera_from_camera_info(
        np.asarray(info.k, dtype=np.float64),
        d,
        np.asarray(info.p, dtype=np.float64),
        int(info.width),
        int(info.height),
        T_cam_lidar,
        name,
        r=np.asarray(info.r, dtype=np.float64),
        rectified=rectified,
    )


def transform_to_matrix(transform: Any) -> np.ndarray:
    """geometry_msgs/Transform (translation + unit quaternion) -> 4x4 float64."""
    t, q = transform.translation, transform.rotation
    x, y, z, w = float(q.x), float(q.y), float(q.z), float(q.w)
    norm = np.sqrt(x * x + y * y + z * z + w * w)
    if not np.isfinite(norm) or norm < 1e-9:
        raise CalibrationError(f"transform has a degenerate quaternion ({x}, {y}, {z}, {w})")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    out = np.eye(4)
    out[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    out[:3, 3] = (float(t.x), float(t.y), float(t.z))
    return out
