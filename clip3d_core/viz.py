"""Pictures of labelled clouds: a bird's-eye view with a class legend and a camera-image overlay.

Pure numpy rasterisation (no matplotlib figure per frame), so it is cheap enough for a live demo.
Colours come from the `Vocabulary` (stable per class name); unlabelled points are drawn grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clip3d_core.clip import Vocabulary
from clip3d_core.geometry.boxes import InstanceBox, instance_boxes
from clip3d_core.labels import UNLABELLED, UNLABELLED_COLOUR

BACKGROUND = (0, 0, 0)
DEFAULT_EXTENT = (-51.2, -51.2, 51.2, 51.2)  # x_min, y_min, x_max, y_max in metres (LiDAR frame)


def label_colours(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint16 labels [N] -> uint8 RGB [N, 3]; `UNLABELLED` and out-of-palette ids are grey."""
    labels = np.asarray(labels).astype(np.int64)
    palette = np.vstack(
        [np.asarray(colours, dtype=np.uint8).reshape(-1, 3), np.array([UNLABELLED_COLOUR], dtype=np.uint8)]
    )
    idx = np.where((labels >= 0) & (labels < len(palette) - 1), labels, len(palette) - 1)
    return palette[idx]


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    keep = dy**2 + dx**2 <= radius**2
    return np.stack((dy[keep], dx[keep]), axis=1)


def splat(
    image: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    rgb: np.ndarray,
    priority: np.ndarray,
    radius: int = 0,
) -> np.ndarray:
    """Draw points as discs of `radius` px onto a copy of `image` [H, W, 3]; where discs overlap the
    point with the highest `priority` wins (e.g. -depth: nearest on top). Deterministic."""
    h, w = image.shape[:2]
    offsets = _disk(max(int(radius), 0))
    rr = (rows[:, None] + offsets[None, :, 0]).ravel()
    cc = (cols[:, None] + offsets[None, :, 1]).ravel()
    owner = np.repeat(np.arange(len(rows)), len(offsets))
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    flat, owner = rr[inside] * w + cc[inside], owner[inside]
    order = np.argsort(-np.asarray(priority)[owner], kind="stable")  # best first
    pixels, first = np.unique(flat[order], return_index=True)
    out = image.copy()
    out.reshape(-1, 3)[pixels] = np.asarray(rgb, dtype=np.uint8)[owner[order[first]]]
    return out


def render_bev(
    xyz: np.ndarray,
    rgb: np.ndarray,
    extent: Sequence[float] = DEFAULT_EXTENT,
    pixel_size: float = 0.1,
    radius: int = 0,
) -> np.ndarray:
    """Top view [H, W, 3]: x (forward) points up, y (left) points left; the highest point of a pixel
    shows. Non-finite and out-of-extent points are skipped; the sensor origin is marked white."""
    x0, y0, x1, y1 = extent
    h, w = int(np.ceil((x1 - x0) / pixel_size)), int(np.ceil((y1 - y0) / pixel_size))
    image = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    xyz = np.asarray(xyz, dtype=np.float64)
    ok = np.isfinite(xyz).all(axis=1)
    rows = np.floor((x1 - xyz[ok, 0]) / pixel_size).astype(np.int64)
    cols = np.floor((y1 - xyz[ok, 1]) / pixel_size).astype(np.int64)
    image = splat(image, rows, cols, np.asarray(rgb)[ok], xyz[ok, 2], radius)
    r0, c0 = int((x1 - 0.0) / pixel_size), int((y1 - 0.0) / pixel_size)
    if 0 <= r0 < h and 0 <= c0 < w:  # ego marker: a small white cross
        image[max(r0 - 4, 0) : r0 + 5, c0] = 255
        image[r0, max(c0 - 4, 0) : c0 + 5] = 255
    return image


def draw_boxes(
    image: np.ndarray,
    boxes: Sequence[InstanceBox],
    extent: Sequence[float] = DEFAULT_EXTENT,
    pixel_size: float = 0.1,
) -> np.ndarray:
    """A `render_bev` image with each box's footprint outlined in white (the points inside already
    carry the class colour; the outline separates instances of one class). Returns a new image."""
    x1, y1 = extent[2], extent[3]  # the image's top-left corner (render_bev's layout)
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for box in boxes:
        corners = box.corners_xy()
        draw.polygon([((y1 - y) / pixel_size, (x1 - x) / pixel_size) for x, y in corners],
                     outline=(255, 255, 255))
    return np.asarray(pil)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def add_legend(
    image: np.ndarray,
    names: Sequence[str],
    colours: np.ndarray,
    counts: Sequence[int] | None = None,
    title: str | None = None,
    font_size: int = 14,
) -> np.ndarray:
    """`image` with a legend panel on its right: a swatch and name (and point count) per class."""
    font = _font(font_size)
    line = font_size + 6
    labels = [
        f"{n} ({c})" if counts is not None else n
        for n, c in zip(names, counts if counts is not None else names)
    ]
    lines = ([title] if title else []) + labels
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(s, font=font) for s in lines), default=0)
    panel_w = int(text_w) + line + 24
    h = max(image.shape[0], line * (len(lines) + 1))
    canvas = Image.new("RGB", (image.shape[1] + panel_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = image.shape[1] + 10, 8
    if title:
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
        y += line
    for text, colour in zip(labels, np.asarray(colours, dtype=np.uint8).reshape(-1, 3)):
        draw.rectangle(
            (x, y + 2, x + font_size, y + 2 + font_size),
            fill=tuple(int(c) for c in colour),
            outline=(0, 0, 0),
        )
        draw.text((x + font_size + 8, y), text, fill=(0, 0, 0), font=font)
        y += line
    return np.asarray(canvas)


def _legend_rows(
    labels: np.ndarray, vocabulary: Vocabulary, max_rows: int
) -> tuple[list[str], np.ndarray, list[int]]:
    """Classes present in `labels`, most frequent first (capped), plus "unlabelled" if any."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels != UNLABELLED].astype(np.int64), minlength=len(vocabulary))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0][:max_rows]
    names = [vocabulary.names[i] for i in present]
    colours = vocabulary.colours[present] if present else np.zeros((0, 3), np.uint8)
    n_unl = int((labels == UNLABELLED).sum())
    if n_unl:
        names.append("unlabelled")
        colours = np.vstack([colours, np.array([UNLABELLED_COLOUR], np.uint8)])
    return names, colours, [int(counts[i]) for i in present] + ([n_unl] if n_unl else [])


def bev_png(
    path: str | Path,
    xyz: np.ndarray,
    labels: np.ndarray,
    vocabulary: Vocabulary,
    *,
    extent: Sequence[float] = DEFAULT_EXTENT,
    pixel_size: float = 0.1,
    radius: int = 1,
    title: str | None = None,
    max_legend: int = 40,
    instances: np.ndarray | None = None,
) -> Path:
    """Write a bird's-eye PNG of a labelled cloud coloured by class, with a legend of the classes
    present (point counts); with ``instances`` (panoptic ids, 0 = none) each instance's oriented box
    (`instance_boxes`) is outlined. Returns the path."""
    image = render_bev(xyz, label_colours(labels, vocabulary.colours), extent, pixel_size, radius)
    if instances is not None:
        image = draw_boxes(image, instance_boxes(xyz, labels, instances), extent, pixel_size)
    names, colours, counts = _legend_rows(labels, vocabulary, max_legend)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(add_legend(image, names, colours, counts, title)).save(path)
    return path


def overlay_points(
    image: np.ndarray, uv: np.ndarray, rgb: np.ndarray, depth: np.ndarray | None = None, radius: int = 2
) -> np.ndarray:
    """Camera image [H, W, 3] with points drawn at pixels `uv` [N, 2] (u = column, v = row), nearest on
    top when `depth` is given. Non-finite / outside pixels are skipped. Returns a new image."""
    uv = np.asarray(uv, dtype=np.float64)
    ok = np.isfinite(uv).all(axis=1)
    depth = np.zeros(len(uv)) if depth is None else np.asarray(depth, dtype=np.float64)
    ok &= np.isfinite(depth)
    return splat(
        np.asarray(image, dtype=np.uint8),
        np.floor(uv[ok, 1]).astype(np.int64),
        np.floor(uv[ok, 0]).astype(np.int64),
        np.asarray(rgb)[ok],
        -depth[ok],
        radius,
    )


def draw_image_boxes(image: np.ndarray, uv: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """A camera image with a white rectangle around the pixels `uv` [N, 2] of each instance id > 0
    (`instances` [N]: the image-plane extent of the instance's visible points). Returns a new image."""
    uv = np.asarray(uv, dtype=np.float64)
    instances = np.asarray(instances)
    ok = np.isfinite(uv).all(axis=1) & (instances > 0)
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(pil)
    for inst in np.unique(instances[ok]):
        pts = uv[ok & (instances == inst)]
        (u0, v0), (u1, v1) = np.floor(pts.min(0)), np.floor(pts.max(0))
        draw.rectangle([u0, v0, u1, v1], outline=(255, 255, 255))
    return np.asarray(pil)


def overlay_png(
    path: str | Path,
    image: np.ndarray,
    uv: np.ndarray,
    labels: np.ndarray,
    vocabulary: Vocabulary,
    depth: np.ndarray | None = None,
    radius: int = 2,
    title: str | None = None,
    instances: np.ndarray | None = None,
) -> Path:
    """Write `overlay_points` of labelled points (coloured by class) with a legend. `uv`, `labels`,
    `depth` (and ``instances``, panoptic ids: a box around each, `draw_image_boxes`): the points
    visible in this camera (see `geometry.project_points`)."""
    drawn = overlay_points(image, uv, label_colours(labels, vocabulary.colours), depth, radius)
    if instances is not None:
        drawn = draw_image_boxes(drawn, uv, instances)
    names, colours, counts = _legend_rows(labels, vocabulary, 40)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(add_legend(drawn, names, colours, counts, title)).save(path)
    return path


def confusion_png(
    path: str | Path,
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    annotate: bool | None = None,
) -> Path:
    """Write the row-normalised confusion matrix (rows = ground truth, e.g.
    `evaluation.ConfusionMatrix.matrix` or `EvaluationReport.confusion`) as a PNG with class names.

    Rows without ground truth stay blank; cell percentages are written when `annotate` (default:
    at most 25 classes). A one-off figure, so matplotlib (its object API: no pyplot global state,
    safe off the main thread)."""
    from matplotlib.figure import Figure

    from clip3d_core.evaluation import EvaluationError

    counts = np.asarray(confusion, dtype=np.float64)
    c = len(class_names)
    if counts.ndim != 2 or counts.shape[0] != c or counts.shape[1] < c:
        raise EvaluationError(f"{c} class names for a confusion matrix of shape {counts.shape}")
    counts = counts[:, :c]  # drop a "no prediction" column if present
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    size = max(4.0, 0.45 * c + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    shown = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of ground-truth row")
    ax.set_xticks(range(c), labels=list(class_names), rotation=90)
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    if annotate if annotate is not None else c <= 25:
        for i, j in zip(*np.nonzero(np.nan_to_num(norm) >= 0.005)):
            ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
