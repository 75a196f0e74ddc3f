"""Point-cloud / label / image file I/O: round trips, foreign PCD layouts, malformed files, real samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip3d_core.io import (
    CloudFormatError,
    ImageFormatError,
    read_cloud,
    read_image,
    read_labels,
    write_cloud,
    write_labels,
)


@pytest.fixture
def cloud() -> np.ndarray:
    rng = np.random.default_rng(0)
    pts = rng.normal(scale=20.0, size=(257, 4)).astype(np.float32)
    pts[:, 3] = rng.uniform(0, 1, 257)
    pts[0] = (1e-8, -3.4e38, 123456.789, 0.0)  # extremes survive the text format too
    return pts


@pytest.mark.parametrize("name", ["c.bin", "c.npy", "c_bin.pcd", "c_ascii.pcd"])
@pytest.mark.parametrize("columns", [3, 4])
def test_round_trip_is_exact(tmp_path: Path, cloud: np.ndarray, name: str, columns: int):
    pts = cloud[:, :columns]
    path = tmp_path / name
    write_cloud(path, pts, pcd_binary="ascii" not in name)
    back = read_cloud(path, columns=columns if name.endswith(".bin") else None)
    assert back.dtype == np.float32 and back.shape == pts.shape
    np.testing.assert_array_equal(back, pts)
    if "ascii" in name:
        assert b"DATA ascii" in path.read_bytes()[:400]


def test_bin_column_inference_kitti_vs_nuscenes(tmp_path: Path):
    five = np.arange(50, dtype=np.float32).reshape(10, 5)
    five.tofile(tmp_path / "x__LIDAR_TOP__1.pcd.bin")
    assert read_cloud(tmp_path / "x__LIDAR_TOP__1.pcd.bin").shape == (10, 5)  # nuScenes: 5 columns
    five.tofile(tmp_path / "000000.bin")
    with pytest.raises(CloudFormatError, match="columns"):  # 200 bytes is not whole 4-float rows
        read_cloud(tmp_path / "000000.bin")
    np.testing.assert_array_equal(read_cloud(tmp_path / "000000.bin", columns=5), five)


def _pcd(header_fields: str, n: int, data: str) -> bytes:
    return (
        f"# .PCD v0.7\nVERSION 0.7\n{header_fields}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n}\nDATA {data}\n"
    ).encode()


def test_foreign_binary_pcd_with_padding_and_extra_fields(tmp_path: Path):
    # Layout as written by e.g. PCL for PointXYZI plus ring/rgb: x y z _ intensity ring(uint16) rgb.
    n = 6
    dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("_pad", "u1", (4,)),
                   ("intensity", "<f4"), ("ring", "<u2"), ("rgb", "<u4")])  # fmt: skip
    rec = np.zeros(n, dtype=dt)
    rec["x"], rec["y"], rec["z"] = np.arange(n), np.arange(n) * 2, -np.arange(n)
    rec["intensity"] = np.linspace(0, 1, n)
    rec["ring"] = 7
    header = "FIELDS x y z _ intensity ring rgb\nSIZE 4 4 4 1 4 2 4\nTYPE F F F U F U U\nCOUNT 1 1 1 4 1 1 1"
    path = tmp_path / "foreign.pcd"
    path.write_bytes(_pcd(header, n, "binary") + rec.tobytes())
    pts = read_cloud(path)
    assert pts.shape == (n, 4)
    np.testing.assert_array_equal(pts[:, 0], np.arange(n))
    np.testing.assert_array_equal(pts[:, 1], np.arange(n) * 2)
    np.testing.assert_allclose(pts[:, 3], np.linspace(0, 1, n))


def test_ascii_pcd_without_intensity_and_with_alias(tmp_path: Path):
    path = tmp_path / "a.pcd"
    header = "FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1"
    path.write_bytes(_pcd(header, 2, "ascii") + b"1 2 3\n4.5 5 -6\n")
    np.testing.assert_array_equal(read_cloud(path), [[1, 2, 3], [4.5, 5, -6]])
    header = "FIELDS x y z i\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1"
    path.write_bytes(_pcd(header, 1, "ascii") + b"1 2 3 0.25\n")
    np.testing.assert_array_equal(read_cloud(path), [[1, 2, 3, 0.25]])


MALFORMED_PCD = {
    "no DATA": b"VERSION 0.7\nFIELDS x y z\n",
    "no z": _pcd("FIELDS x y\nSIZE 4 4\nTYPE F F\nCOUNT 1 1", 1, "ascii") + b"1 2\n",
    "rows": _pcd("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1", 3, "ascii") + b"1 2 3\n",
    "values": _pcd("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1", 1, "ascii") + b"1 2 nan3x\n",
    "truncated": _pcd("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1", 10, "binary") + b"\0" * 50,
    "compressed": _pcd("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1", 1, "binary_compressed")
    + b"\0" * 20,
    "type": _pcd("FIELDS x y z\nSIZE 4 4 3\nTYPE F F F\nCOUNT 1 1 1", 1, "binary") + b"\0" * 12,
    "lengths": _pcd("FIELDS x y z\nSIZE 4 4\nTYPE F F F\nCOUNT 1 1 1", 1, "binary") + b"\0" * 12,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_PCD))
def test_malformed_pcd_raises_cloud_format_error(tmp_path: Path, case: str):
    path = tmp_path / "bad.pcd"
    path.write_bytes(MALFORMED_PCD[case])
    with pytest.raises(CloudFormatError, match=r"bad\.pcd"):
        read_cloud(path)


def test_other_malformed_inputs(tmp_path: Path):
    with pytest.raises(CloudFormatError, match="cannot read"):
        read_cloud(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(b"\0" * 15)
    with pytest.raises(CloudFormatError, match="whole number"):
        read_cloud(tmp_path / "odd.bin")
    np.save(tmp_path / "flat.npy", np.zeros(12, dtype=np.float32))
    with pytest.raises(CloudFormatError, match="N, >=3"):
        read_cloud(tmp_path / "flat.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CloudFormatError):
        read_cloud(tmp_path / "obj.npy")  # never unpickles
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(CloudFormatError):
        read_cloud(tmp_path / "junk.npy")
    with pytest.raises(CloudFormatError, match="extension"):
        read_cloud(tmp_path / "cloud.ply")
    assert issubclass(CloudFormatError, ValueError)


def test_labels_round_trip(tmp_path: Path):
    labels = np.array([0, 10, 65535, 252, 40], dtype=np.uint16)
    instances = np.array([0, 3, 0, 65535, 1])
    write_labels(tmp_path / "a.label", labels, instances)
    raw = np.fromfile(tmp_path / "a.label", dtype="<u4")
    assert raw[1] == (3 << 16) | 10  # SemanticKITTI packing
    sem, inst = read_labels(tmp_path / "a.label", expected=5)
    np.testing.assert_array_equal(sem, labels)
    np.testing.assert_array_equal(inst, instances)
    for name in ("a.npy", "a.txt"):
        write_labels(tmp_path / name, labels.astype(np.int64))
        sem, inst = read_labels(tmp_path / name)
        assert sem.dtype == np.uint16 and inst is None
        np.testing.assert_array_equal(sem, labels)
    with pytest.raises(CloudFormatError, match="65535"):
        write_labels(tmp_path / "b.label", np.array([-1, 2]))
    with pytest.raises(CloudFormatError, match="integer"):
        write_labels(tmp_path / "b.label", np.array([0.5]))
    with pytest.raises(CloudFormatError, match="5 labels for 4 points"):
        read_labels(tmp_path / "a.label", expected=4)
    (tmp_path / "c.label").write_bytes(b"\0" * 7)
    with pytest.raises(CloudFormatError):
        read_labels(tmp_path / "c.label")


def test_read_image_modes_and_errors(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 255, size=(7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (7, 9, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 2], rgb[..., 0])
    Image.fromarray(np.dstack([rgb, np.full((7, 9), 128, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray((np.arange(63).reshape(7, 9) * 1000).astype(np.uint16)).save(tmp_path / "d16.png")
    d16 = read_image(tmp_path / "d16.png")
    assert d16.shape == (7, 9, 3) and d16.max() == 255 and d16.min() == 0  # rescaled, not clipped
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageFormatError, match=r"broken\.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ImageFormatError):
        read_image(tmp_path / "missing.jpg")


def test_real_samples(shared_data: Path):
    nus = next((shared_data / "nuscenes_keyframe").glob("*LIDAR_TOP*.pcd.bin"), None)
    if nus is None:
        pytest.skip("nuscenes_keyframe sample absent")
    pts = read_cloud(nus)
    assert pts.shape == (34688, 5)
    assert np.isfinite(pts).all() and 0 < pts[:, 4].max() <= 31  # ring index of a 32-beam LiDAR
    scan = shared_data / "semantickitti_scan" / "000000.bin"
    kitti = read_cloud(scan)
    assert kitti.shape == (123389, 4) and kitti[:, 3].min() >= 0 and kitti[:, 3].max() <= 1
    sem, inst = read_labels(scan.with_suffix(".label"), expected=len(kitti))
    assert inst is not None and 40 in set(sem.tolist())  # SemanticKITTI raw id 40 = road
    img = read_image(next((shared_data / "nuscenes_keyframe").glob("*CAM_FRONT__*.jpg")))
    assert img.shape == (900, 1600, 3) and img.dtype == np.uint8
