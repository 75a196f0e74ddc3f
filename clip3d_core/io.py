"""Point-cloud, label and image files: KITTI/nuScenes .bin, PCD (ascii/binary), .npy; .label labels.

Readers return float32 [N, C] arrays with x, y, z first; anything malformed raises
`CloudFormatError` (or `ImageFormatError`) naming the file and the problem."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CloudFormatError",
    "ImageFormatError",
    "read_cloud",
    "read_image",
    "read_labels",
    "read_pcd",
    "write_cloud",
    "write_labels",
    "write_pcd",
]

INTENSITY_FIELDS = ("intensity", "i", "remission", "reflectance")
_PCD_TYPES = {
    ("F", 4): "<f4",
    ("F", 8): "<f8",
    ("I", 1): "i1",
    ("I", 2): "<i2",
    ("I", 4): "<i4",
    ("I", 8): "<i8",
    ("U", 1): "u1",
    ("U", 2): "<u2",
    ("U", 4): "<u4",
    ("U", 8): "<u8",
}


class CloudFormatError(ValueError):
    """A point-cloud or label file is missing, truncated or not in the expected layout."""


class ImageFormatError(ValueError):
    """An image file is missing or cannot be decoded."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CloudFormatError(f"{path}: cannot read ({exc})") from exc


def _check_points(points: np.ndarray, path: Path | str) -> np.ndarray:
    if points.ndim != 2 or points.shape[1] < 3:
        raise CloudFormatError(f"{path}: expected an [N, >=3] array, got shape {points.shape}")
    return points


# ---------------------------------------------------------------------- PCD
def _parse_pcd_header(data: bytes, path: Path) -> tuple[dict[str, list[str]], int]:
    """Header lines up to and including DATA -> ({KEY: values}, byte offset of the payload)."""
    header: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = data.find(b"\n", offset)
        if end < 0:
            raise CloudFormatError(f"{path}: PCD header has no DATA line")
        line = data[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            return header, offset
        if len(header) > 16:
            raise CloudFormatError(f"{path}: not a PCD file (no DATA line in the header)")


def _pcd_dtype(header: dict[str, list[str]], path: Path) -> np.dtype:
    try:
        fields = header["FIELDS"]
        sizes = [int(s) for s in header["SIZE"]]
        types = [t.upper() for t in header["TYPE"]]
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    except (KeyError, ValueError) as exc:
        raise CloudFormatError(
            f"{path}: PCD header lacks or misstates FIELDS/SIZE/TYPE/COUNT ({exc})"
        ) from exc
    if not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise CloudFormatError(f"{path}: PCD FIELDS/SIZE/TYPE/COUNT lengths differ")
    items = []
    for i, (name, size, typ, count) in enumerate(zip(fields, sizes, types, counts)):
        if (typ, size) not in _PCD_TYPES or count < 1:
            raise CloudFormatError(
                f"{path}: unsupported PCD field {name} TYPE {typ} SIZE {size} COUNT {count}"
            )
        # Padding fields are all called "_": give them unique names so numpy accepts the dtype.
        key = name if name != "_" else f"_pad{i}"
        items.append(
            (key, _PCD_TYPES[(typ, size)], (count,)) if count > 1 else (key, _PCD_TYPES[(typ, size)])
        )
    try:
        return np.dtype(items)
    except (TypeError, ValueError) as exc:
        raise CloudFormatError(f"{path}: bad PCD fields ({exc})") from exc


def read_pcd(path: str | Path) -> np.ndarray:
    """PCD v0.7 with DATA ascii or binary -> float32 [N, 3] (x, y, z) or [N, 4] (+ intensity when a
    field named intensity / i / remission / reflectance exists). binary_compressed is rejected."""
    path = Path(path)
    data = _read_bytes(path)
    header, offset = _parse_pcd_header(data, path)
    dtype = _pcd_dtype(header, path)
    names = dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise CloudFormatError(f"{path}: PCD needs fields x, y, z; has {list(names)}")
    try:
        n = (
            int(header["POINTS"][0])
            if "POINTS" in header
            else int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise CloudFormatError(f"{path}: PCD header lacks a valid POINTS or WIDTH/HEIGHT") from exc
    if n < 0:
        raise CloudFormatError(f"{path}: negative point count {n}")
    mode = header["DATA"][0].lower() if header["DATA"] else ""
    if mode == "binary":
        need = n * dtype.itemsize
        if len(data) - offset < need:
            raise CloudFormatError(
                f"{path}: truncated binary PCD ({len(data) - offset} of {need} payload bytes)"
            )
        rec = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
    elif mode == "ascii":
        lines = [ln for ln in data[offset:].decode("ascii", errors="replace").splitlines() if ln.strip()]
        if len(lines) != n:
            raise CloudFormatError(f"{path}: ascii PCD declares {n} points, has {len(lines)} lines")
        width = sum(int(np.prod(dtype[k].shape or (1,))) for k in names)
        try:
            flat = np.array(" ".join(lines).split(), dtype=np.float64)
        except ValueError as exc:
            raise CloudFormatError(f"{path}: non-numeric value in ascii PCD ({exc})") from exc
        if flat.size != n * width:
            raise CloudFormatError(f"{path}: ascii PCD rows must have {width} values each")
        table = flat.reshape(n, width)
        rec = np.zeros(n, dtype=dtype)
        col = 0
        for k in names:
            w = int(np.prod(dtype[k].shape or (1,)))
            rec[k] = table[:, col] if w == 1 else table[:, col : col + w]
            col += w
    elif mode == "binary_compressed":
        raise CloudFormatError(f"{path}: PCD DATA binary_compressed is not supported; save as binary")
    else:
        raise CloudFormatError(f"{path}: unknown PCD DATA mode {header['DATA']!r}")
    cols = [rec["x"], rec["y"], rec["z"]]
    intensity = next((f for f in INTENSITY_FIELDS if f in names), None)
    if intensity is not None:
        cols.append(rec[intensity])
    return np.stack(cols, axis=1).astype(np.float32)


def write_pcd(path: str | Path, points: np.ndarray, *, binary: bool = True) -> None:
    """[N, 3] or [N, 4] (x, y, z[, intensity]) -> PCD v0.7, float32 fields."""
    points = _check_points(np.asarray(points, dtype=np.float32), path)
    if points.shape[1] > 4:
        points = points[:, :4]
    fields = ["x", "y", "z", "intensity"][: points.shape[1]]
    c = len(fields)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(fields)}\nSIZE {' '.join(['4'] * c)}\nTYPE {' '.join(['F'] * c)}\n"
        f"COUNT {' '.join(['1'] * c)}\nWIDTH {len(points)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {len(points)}\nDATA {'binary' if binary else 'ascii'}\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            f.write(np.ascontiguousarray(points, dtype="<f4").tobytes())
        else:
            np.savetxt(f, points, fmt="%.9g")


# ---------------------------------------------------------------------- dispatch
def read_cloud(path: str | Path, columns: int | None = None) -> np.ndarray:
    """Read a point cloud -> float32 [N, C], x, y, z first.

    `.bin`: raw little-endian float32 rows of `columns` values (default 4: KITTI x, y, z, intensity;
    5 for nuScenes `*.pcd.bin`: + ring). `.pcd`: ascii/binary PCD. `.npy`: a 2-D array, C >= 3."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".bin"):
        if columns is None:
            columns = 5 if name.endswith(".pcd.bin") else 4
        if columns < 3:
            raise CloudFormatError(f"{path}: columns must be >= 3, got {columns}")
        data = _read_bytes(path)
        if len(data) % (4 * columns):
            raise CloudFormatError(
                f"{path}: {len(data)} bytes is not a whole number of {columns}-float32 rows "
                f"(wrong `columns`? nuScenes .pcd.bin has 5, KITTI .bin 4)"
            )
        return np.frombuffer(data, dtype="<f4").reshape(-1, columns).astype(np.float32)
    if name.endswith(".pcd"):
        return read_pcd(path)
    if name.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CloudFormatError(f"{path}: not a readable .npy array ({exc})") from exc
        if not np.issubdtype(arr.dtype, np.number):
            raise CloudFormatError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
        arr = _check_points(arr, path)
        if columns is not None and arr.shape[1] != columns:
            raise CloudFormatError(f"{path}: expected {columns} columns, got {arr.shape[1]}")
        return arr.astype(np.float32, copy=False)
    raise CloudFormatError(f"{path}: unknown point-cloud extension (want .bin, .pcd.bin, .pcd or .npy)")


def write_cloud(path: str | Path, points: np.ndarray, *, pcd_binary: bool = True) -> None:
    """Inverse of `read_cloud` for .bin (raw float32, all columns), .npy and .pcd."""
    path = Path(path)
    points = _check_points(np.asarray(points, dtype=np.float32), path)
    name = path.name.lower()
    if name.endswith(".bin"):
        np.ascontiguousarray(points, dtype="<f4").tofile(path)
    elif name.endswith(".pcd"):
        write_pcd(path, points, binary=pcd_binary)
    elif name.endswith(".npy"):
        np.save(path, points)
    else:
        raise CloudFormatError(f"{path}: unknown point-cloud extension (want .bin, .pcd or .npy)")


# ---------------------------------------------------------------------- labels
def write_labels(path: str | Path, labels: np.ndarray, instances: np.ndarray | None = None) -> None:
    """Per-point labels. `.label`: SemanticKITTI uint32 (semantic in the low 16 bits, instance in the
    high 16); `.npy`: the array as uint16 (65535 = unlabelled); `.txt`: one integer per line."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CloudFormatError(
            f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 0xFFFF):
        raise CloudFormatError(f"{path}: labels must be in [0, 65535]")
    name = path.name.lower()
    if name.endswith(".label"):
        packed = labels.astype(np.uint32)
        if instances is not None:
            instances = np.asarray(instances)
            if instances.shape != labels.shape or (
                instances.size and (instances.min() < 0 or instances.max() > 0xFFFF)
            ):
                raise CloudFormatError(f"{path}: instances must match labels and lie in [0, 65535]")
            packed |= instances.astype(np.uint32) << 16
        packed.astype("<u4").tofile(path)
    elif instances is not None:
        raise CloudFormatError(f"{path}: instances can only be written to .label files")
    elif name.endswith(".npy"):
        np.save(path, labels.astype(np.uint16))
    elif name.endswith(".txt"):
        np.savetxt(path, labels, fmt="%d")
    else:
        raise CloudFormatError(f"{path}: unknown label extension (want .label, .npy or .txt)")


def read_labels(path: str | Path, expected: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of `write_labels` -> (semantic uint16 [N], instance uint16 [N] for .label else None)."""
    path = Path(path)
    name = path.name.lower()
    instances = None
    if name.endswith(".label"):
        data = _read_bytes(path)
        if len(data) % 4:
            raise CloudFormatError(f"{path}: {len(data)} bytes is not a whole number of uint32 labels")
        raw = np.frombuffer(data, dtype="<u4")
        labels, instances = (raw & 0xFFFF).astype(np.uint16), (raw >> 16).astype(np.uint16)
    elif name.endswith(".npy"):
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CloudFormatError(f"{path}: not a readable .npy array ({exc})") from exc
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CloudFormatError(f"{path}: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.uint16)
    elif name.endswith(".txt"):
        try:
            labels = np.loadtxt(path, dtype=np.int64, ndmin=1).astype(np.uint16)
        except (OSError, ValueError) as exc:
            raise CloudFormatError(f"{path}: not one integer per line ({exc})") from exc
    else:
        raise CloudFormatError(f"{path}: unknown label extension (want .label, .npy or .txt)")
    if expected is not None and labels.shape[0] != expected:
        raise CloudFormatError(f"{path}: {labels.shape[0]} labels for {expected} points")
    return labels, instances


# ---------------------------------------------------------------------- images
def read_image(path: str | Path) -> np.ndarray:
    """Any PIL-readable image -> uint8 RGB [H, W, 3] (grey, palette, RGBA and 16-bit converted)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey: scale to 8 bits rather than PIL's clipping convert.
                arr = np.asarray(img, dtype=np.float64)
                scale = 255.0 / max(float(arr.max()), 1.0)
                grey = np.clip(arr * scale, 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageFormatError(f"{path}: cannot read image ({exc})") from exc
