"""PointCloud2 / Image / CameraInfo conversions (no DDS): layouts, byte orders, organised clouds,
encodings, and every malformed input raising its own error instead of crashing or mis-sizing."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 Python wheels (rclpy, sensor_msgs) not installed")

from geometry_msgs.msg import Transform
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField

from clip3d_ros import conversions as cv

pytestmark = pytest.mark.ros

RNG = np.random.default_rng(0)


def _record_array(dtype: np.dtype, n: int) -> np.ndarray:
    arr = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        col = arr[name]
        kind = col.dtype.kind
        if kind == "f":
            arr[name] = RNG.normal(0, 50, col.shape).astype(col.dtype)
        else:
            info = np.iinfo(col.dtype)
            arr[name] = RNG.integers(info.min, info.max, col.shape, endpoint=True).astype(col.dtype)
    return arr


LAYOUTS = {
    "xyzi_f32": np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")]),
    "xyz_f64": np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8")]),
    "big_endian": np.dtype([("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("intensity", ">u2"), ("ring", ">u2")]),
    "int16_xyz": np.dtype([("x", "<i2"), ("y", "<i2"), ("z", "<i2")]),
    "padded_ouster": np.dtype(
        {
            "names": ["x", "y", "z", "intensity", "t", "reflectivity", "ring", "ambient", "range"],
            "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2", "<u1", "<u2", "<u4"],
            "offsets": [0, 4, 8, 16, 20, 24, 26, 28, 32],
            "itemsize": 48,
        }
    ),
    "all_types": np.dtype(
        [
            ("z", "<f4"),
            ("a", "i1"),
            ("b", "u1"),
            ("c", "<i2"),
            ("d", "<u2"),
            ("x", "<i4"),
            ("y", "<u4"),
            ("e", "<f8"),
        ]
    ),
    "array_field": np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("normal", "<f4", (3,))]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("height", [1, 4])
def test_cloud_round_trip_any_layout(name: str, height: int) -> None:
    dtype = LAYOUTS[name]
    pts = _record_array(dtype, 40)
    msg = cv.array_to_cloud(pts, height=height)
    assert (msg.height, msg.width) == (height, 40 // height)
    assert msg.is_bigendian == (name == "big_endian")
    assert msg.point_step == dtype.itemsize and msg.row_step == dtype.itemsize * msg.width
    back = cv.cloud_to_array(msg)
    assert back.dtype.names == dtype.names
    for f in dtype.names:
        np.testing.assert_array_equal(back[f], pts[f])
    xyz = cv.xyz_of(back)
    assert xyz.dtype == np.float32 and xyz.shape == (40, 3)
    np.testing.assert_allclose(xyz[:, 0], pts["x"].astype(np.float32))


def test_big_endian_values_are_decoded_not_byte_swapped_garbage() -> None:
    pts = np.zeros(3, dtype=[("x", ">f4"), ("y", ">f4"), ("z", ">f4")])
    pts["x"] = [1.5, -2.0, 1e3]
    raw = pts.tobytes()
    msg = PointCloud2(height=1, width=3, point_step=12, row_step=36, is_bigendian=True)
    msg.fields = [
        PointField(name=c, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, c in enumerate("xyz")
    ]
    msg.data = list(raw)
    np.testing.assert_array_equal(cv.xyz_of(cv.cloud_to_array(msg))[:, 0], [1.5, -2.0, 1e3])


def test_organised_cloud_with_row_padding_is_flattened_row_major() -> None:
    h, w, step = 3, 5, 16
    pts = _record_array(LAYOUTS["xyzi_f32"], h * w)
    rows = pts.view(np.uint8).reshape(h, w * step)
    padded = np.concatenate([rows, np.full((h, 7), 0xAB, np.uint8)], axis=1)  # 7 junk bytes per row
    msg = PointCloud2(height=h, width=w, point_step=step, row_step=w * step + 7, is_bigendian=False)
    msg.fields = cv.array_to_cloud(pts).fields
    msg.data = padded.tobytes()
    back = cv.cloud_to_array(msg)
    assert len(back) == h * w
    np.testing.assert_array_equal(back["x"], pts["x"])  # row-major order kept, padding skipped


def test_layout_from_dtype_matches_pointfields() -> None:
    layout = cv.layout_from_dtype(LAYOUTS["array_field"])
    assert layout.point_step == 24
    assert [(f.name, f.offset, f.datatype, f.count) for f in layout.fields] == [
        ("x", 0, 7, 1),
        ("y", 4, 7, 1),
        ("z", 8, 7, 1),
        ("normal", 12, 7, 3),
    ]


def test_empty_cloud_round_trips() -> None:
    msg = cv.array_to_cloud(np.zeros(0, LAYOUTS["xyzi_f32"]))
    assert msg.width == 0 and len(msg.data) == 0
    assert len(cv.cloud_to_array(msg)) == 0
    assert cv.points_for_model(cv.cloud_to_array(msg), "intensity").shape == (0, 4)


def _cloud(**overrides: object) -> PointCloud2:
    msg = cv.array_to_cloud(_record_array(LAYOUTS["xyzi_f32"], 10))
    for k, v in overrides.items():
        setattr(msg, k, v)
    return msg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"data": list(range(100))}, "data has 100 bytes"),
        ({"row_step": 8}, "row_step"),
        ({"point_step": 0}, "point_step"),
        ({"fields": [PointField(name="x", offset=14, datatype=7, count=1)]}, "exceeds point_step"),
        ({"fields": [PointField(name="x", offset=0, datatype=42, count=1)]}, "unknown datatype"),
        ({"fields": [PointField(name="x", offset=0, datatype=7, count=1)] * 2}, "duplicate"),
        ({"fields": [PointField(name="", offset=0, datatype=7, count=1)]}, "empty name"),
    ],
)
def test_malformed_clouds_raise_cloud_format_error(overrides: dict, match: str) -> None:
    with pytest.raises(cv.CloudFormatError, match=match):
        cv.cloud_to_array(_cloud(**overrides))


def test_cloud_without_xyz_is_rejected_by_name() -> None:
    pts = _record_array(np.dtype([("intensity", "<f4"), ("ring", "<u2")]), 5)
    with pytest.raises(cv.CloudFormatError, match="x/y/z"):
        cv.xyz_of(cv.cloud_to_array(cv.array_to_cloud(pts)))


def test_points_for_model_intensity_detection() -> None:
    pts = _record_array(np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("remission", "<f4")]), 8)
    assert cv.find_intensity_field(pts) == "remission"  # common alias found automatically
    assert cv.find_intensity_field(pts, "intensity") is None  # an explicit name is not second-guessed
    out = cv.points_for_model(pts, "remission")
    assert out.shape == (8, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 3], pts["remission"])
    assert cv.points_for_model(pts, None).shape == (8, 3)


def test_nan_points_survive_conversion_and_mark_cloud_not_dense() -> None:
    pts = _record_array(LAYOUTS["xyzi_f32"], 6)
    pts["y"][2] = np.nan
    msg = cv.array_to_cloud(pts)
    assert not msg.is_dense
    assert np.isnan(cv.xyz_of(cv.cloud_to_array(msg))[2, 1])


def test_labelled_points_layout_and_rgb_packing() -> None:
    xyz = RNG.normal(size=(5, 3)).astype(np.float32)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [128, 128, 128]], np.uint8)
    out = cv.labelled_points(
        xyz,
        np.arange(5, dtype=np.float32),
        np.array([0, 1, 2, 3, 65535], np.uint16),
        np.linspace(0, 1, 5),
        colours,
    )
    assert out.dtype.names == ("x", "y", "z", "intensity", "label", "score", "rgb")
    assert out.dtype.itemsize % 4 == 0
    offsets = {n: out.dtype.fields[n][1] for n in out.dtype.names}
    assert all(offsets[n] % 4 == 0 for n in offsets)
    msg = cv.array_to_cloud(out)
    types = {f.name: f.datatype for f in msg.fields}
    assert types["label"] == PointField.UINT16 and types["score"] == types["rgb"] == PointField.FLOAT32
    back = cv.cloud_to_array(msg)
    np.testing.assert_array_equal(cv.unpack_rgb(back["rgb"]), colours)
    assert cv.pack_rgb(colours[:1]).view(np.uint32)[0] == 0xFF0000  # PCL 0x00RRGGBB
    assert back["label"][-1] == 65535
    no_i = cv.labelled_points(xyz, None, np.zeros(5, np.uint16), np.zeros(5), colours)
    assert "intensity" not in no_i.dtype.names
    with pytest.raises(cv.CloudFormatError, match="labels has 4"):
        cv.labelled_points(xyz, None, np.zeros(4, np.uint16), np.zeros(5), colours)


def test_labelled_points_instance_field_for_panoptic_models() -> None:
    """`instance` uint32 is appended after rgb: the semantic layout before it is unchanged."""
    xyz = RNG.normal(size=(4, 3)).astype(np.float32)
    labels, scores = np.array([0, 1, 1, 65535], np.uint16), np.linspace(0, 1, 4)
    colours = np.zeros((4, 3), np.uint8)
    instances = np.array([0, 1, 2, 70000], np.uint32)  # ids above uint16 survive
    plain = cv.labelled_points(xyz, np.ones(4, np.float32), labels, scores, colours)
    out = cv.labelled_points(xyz, np.ones(4, np.float32), labels, scores, colours, instances)
    assert out.dtype.names == (*plain.dtype.names, "instance")
    assert out.dtype.itemsize == plain.dtype.itemsize + 4
    assert all(out.dtype.fields[n][1] == plain.dtype.fields[n][1] for n in plain.dtype.names)
    msg = cv.array_to_cloud(out)
    assert {f.name: f.datatype for f in msg.fields}["instance"] == PointField.UINT32
    back = cv.cloud_to_array(msg)
    np.testing.assert_array_equal(back["instance"], instances)
    for name in plain.dtype.names:
        np.testing.assert_array_equal(back[name], plain[name])
    with pytest.raises(cv.CloudFormatError, match="instances has 3"):
        cv.labelled_points(xyz, None, labels, scores, colours, instances[:3])


def test_rgb_for_labels_greys_unlabelled_and_out_of_range() -> None:
    colours = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
    rgb = cv.rgb_for_labels(np.array([1, 0, 65535, 7], np.uint16), colours)
    assert rgb.dtype == np.float32
    np.testing.assert_array_equal(
        cv.unpack_rgb(rgb), [[200, 100, 0], [10, 20, 30], cv.UNLABELLED_RGB, cv.UNLABELLED_RGB]
    )
    out = cv.labelled_points(np.zeros((4, 3), np.float32), None, np.zeros(4, np.uint16), np.zeros(4), rgb)
    np.testing.assert_array_equal(out["rgb"].view(np.uint32), rgb.view(np.uint32))  # packed input kept


# ---------------------------------------------------------------------------------------- images
def _image(rgb: np.ndarray, encoding: str, pad: int = 0, big: bool = False) -> Image:
    h, w = rgb.shape[:2]
    if encoding in ("rgb8", "8UC3"):
        px = rgb if encoding == "rgb8" else rgb[..., ::-1]
    elif encoding == "bgr8":
        px = rgb[..., ::-1]
    elif encoding == "rgba8":
        px = np.concatenate([rgb, np.full((h, w, 1), 7, np.uint8)], axis=2)
    elif encoding == "bgra8":
        px = np.concatenate([rgb[..., ::-1], np.full((h, w, 1), 7, np.uint8)], axis=2)
    elif encoding == "mono8":
        px = rgb[..., :1]
    elif encoding in ("mono16", "rgb16"):
        src = rgb[..., :1] if encoding == "mono16" else rgb
        px = (src.astype(np.uint16) * 257).astype(">u2" if big else "<u2").view(np.uint8).reshape(h, w, -1)
    else:
        raise AssertionError(encoding)
    rows = px.reshape(h, -1)
    rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    return Image(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(big),
        step=rows.shape[1],
        data=rows.tobytes(),
    )


@pytest.mark.parametrize(
    ("encoding", "big"),
    [
        ("rgb8", False),
        ("bgr8", False),
        ("rgba8", False),
        ("bgra8", False),
        ("8UC3", False),
        ("rgb16", False),
        ("rgb16", True),
    ],
)
@pytest.mark.parametrize("pad", [0, 5])
def test_colour_encodings_decode_to_rgb(encoding: str, big: bool, pad: int) -> None:
    rgb = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    out = cv.image_to_rgb(_image(rgb, encoding, pad, big))
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize(("encoding", "big"), [("mono8", False), ("mono16", False), ("mono16", True)])
def test_grey_encodings_replicate_to_three_channels(encoding: str, big: bool) -> None:
    rgb = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = cv.image_to_rgb(_image(rgb, encoding, 3, big))
    np.testing.assert_array_equal(out, np.repeat(rgb[..., :1], 3, axis=2))


def test_bayer_and_yuv422_decode_to_expected_colours() -> None:
    # A uniform colour survives demosaicing and YUV 4:2:2 exactly (up to YUV rounding).
    r, g, b = 200, 100, 50
    raw = np.zeros((4, 6), np.uint8)
    raw[0::2, 0::2], raw[0::2, 1::2], raw[1::2, 0::2], raw[1::2, 1::2] = r, g, g, b  # RGGB
    out = cv.rgb_from_buffer(raw.tobytes(), height=4, width=6, step=6, encoding="bayer_rggb8")
    assert (out == [r, g, b]).all()
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u, v = 0.564 * (b - y) + 128, 0.713 * (r - y) + 128
    uyvy = np.tile(np.array([u, y, v, y]).round().astype(np.uint8), (2, 2))  # 2 rows x 4 px
    out = cv.rgb_from_buffer(uyvy.tobytes(), height=2, width=4, step=8, encoding="yuv422")
    assert np.abs(out.astype(int) - [r, g, b]).max() <= 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoding": "32FC1"}, "unsupported image encoding"),
        ({"encoding": "nonsense"}, "unsupported image encoding"),
        ({"step": 10}, "step 10 <"),
        ({"data": b"\x00" * 11}, "data has 11 bytes"),
        ({"height": 0}, "empty image"),
        ({"height": 100_000, "width": 100_000}, "exceeds"),
    ],
)
def test_bad_images_raise_image_format_error(kwargs: dict, match: str) -> None:
    args = {"data": b"\x00" * 36, "height": 2, "width": 6, "step": 18, "encoding": "rgb8"} | kwargs
    with pytest.raises(cv.ImageFormatError, match=match):
        cv.rgb_from_buffer(args.pop("data"), **args)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_images_decode_with_pil(fmt: str) -> None:
    from PIL import Image as PILImage

    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (220, 30, 30)
    rgb[:, 12:] = (20, 40, 230)
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt.upper(), quality=95)
    msg = CompressedImage(format=fmt if fmt == "png" else "rgb8; jpeg compressed bgr8", data=buf.getvalue())
    out = cv.msg_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    if fmt == "png":
        np.testing.assert_array_equal(out, rgb)
    else:  # lossy: compare away from the colour edge (chroma subsampling blurs it)
        assert np.abs(out[:, :6].astype(int) - (220, 30, 30)).max() <= 8
        assert np.abs(out[:, 18:].astype(int) - (20, 40, 230)).max() <= 8


@pytest.mark.parametrize(
    ("data", "fmt", "match"),
    [
        (b"", "jpeg", "no data"),
        (b"\xff\xd8\xff\xe0 this is not a jpeg", "jpeg", "cannot decode"),
        (b"\x89PNG\r\n", "16UC1; compressedDepth", "depth"),
    ],
)
def test_bad_compressed_images_raise(data: bytes, fmt: str, match: str) -> None:
    with pytest.raises(cv.ImageFormatError, match=match):
        cv.compressed_to_rgb(CompressedImage(format=fmt, data=data))


# ---------------------------------------------------------------------------------------- cameras
def _info(fx: float = 500.0, w: int = 640, h: int = 480) -> CameraInfo:
    info = CameraInfo(width=w, height=h, distortion_model="plumb_bob")
    info.k = [fx, 0.0, 320.0, 0.0, fx, 240.0, 0.0, 0.0, 1.0]
    info.d = [0.1, -0.05, 0.0, 0.0, 0.0]
    info.r = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    info.p = [fx, 0.0, 320.0, 0.0, 0.0, fx, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def test_camera_info_to_pinhole_camera() -> None:
    T = np.eye(4)
    T[:3, 3] = (0.1, -0.2, 0.3)
    cam = cv.camera_from_info_msg(_info(), T, "front")
    assert cam.name == "front" and (cam.width, cam.height) == (640, 480)
    assert cam.fx == 500.0 and cam.cx == 320.0
    np.testing.assert_array_equal(cam.T_cam_lidar, T)
    np.testing.assert_allclose(cam.D, [0.1, -0.05, 0, 0, 0])


@pytest.mark.parametrize(
    ("info", "match"),
    [
        (_info(fx=0.0), "focal"),
        (_info(w=0), "size"),
        (_info(fx=float("nan")), "non-finite"),
    ],
)
def test_bad_camera_info_raises_calibration_error(info: CameraInfo, match: str) -> None:
    with pytest.raises(cv.CalibrationError, match=match):
        cv.camera_from_info_msg(info, np.eye(4), "front")


def test_unsupported_distortion_model_is_rejected() -> None:
    info = _info()
    info.distortion_model = "equidistant"
    with pytest.raises(cv.CalibrationError, match="equidistant"):
        cv.camera_from_info_msg(info, np.eye(4), "front")


def test_transform_to_matrix() -> None:
    t = Transform()
    t.translation.x, t.translation.y, t.translation.z = 1.0, 2.0, 3.0
    s = np.sqrt(0.5)
    t.rotation.z, t.rotation.w = s, s  # +90 deg about z
    m = cv.transform_to_matrix(t)
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)
    t.rotation.z = t.rotation.w = 0.0
    with pytest.raises(cv.CalibrationError, match="quaternion"):
        cv.transform_to_matrix(t)
