"""Labelling one frame: the single route from a PointCloud2 (+ images) to the labelled cloud's
records, shared by the node, `clip3d label-bag` and the demo, so they cannot drift apart.

    decode_cloud     PointCloud2 -> model points (+ the non-fatal issues to report)
    CameraResolver   CameraInfo / calibration model + extrinsics -> the camera of the decoded image,
                     scaled to its size and validated again (a scaled K can overflow), with the
                     encoder-input bounds checked (`ImageLimits`)
    label_frame      segmenter -> records x, y, z, [intensity], label, score, rgb, [instance]
                     (+ output height)

Messages are read by attribute, so rclpy and rosbags messages both work; the caller builds the
output message from `LabelledFrame.records` / `.height` with `conversions.cloud_parts` (through
`conversions.array_to_cloud` or `bag.cloud_msg`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip3d_core.geometry import CalibrationError, PinholeCamera
from clip3d_core.io import ImageFormatError
from clip3d_ros import conversions

__all__ = [
    "CAMERA_ERRORS",
    "CameraResolver",
    "DecodedCloud",
    "ImageLimits",
    "LabelledFrame",
    "decode_cloud",
    "label_frame",
]


@dataclass(frozen=True)
class DecodedCloud:
    """A cloud ready for the model; `issues` are (kind, reason) pairs worth reporting that did not
    stop it from being labelled (missing or malformed intensity, no points)."""

    points: np.ndarray  # float32 [N, 3] or [N, 4] (x, y, z, intensity)
    with_intensity: bool
    height: int  # rows of the output cloud: the input's for organised clouds
    issues: tuple[tuple[str, str], ...] = ()


def decode_cloud(msg: Any, intensity_field: str = "", max_points: int | None = None) -> DecodedCloud:
    """PointCloud2 -> `DecodedCloud`; `CloudFormatError` when x, y, z cannot be read. A bad intensity
    field costs the intensity channel, never the cloud."""
    conversions.check_cloud(msg, max_points)
    records = conversions.cloud_to_array(msg)
    issues = []
    name = conversions.find_intensity_field(records, intensity_field)
    if name is None and intensity_field:
        issues.append(("missing_intensity", f"cloud has no field {intensity_field!r} (intensity_field)"))
    if name is not None and records.dtype.fields[name][0].shape:
        count = int(np.prod(records.dtype.fields[name][0].shape))
        issues.append(("bad_intensity", f"intensity field {name!r} has count {count}, expected 1"))
        name = None
    points = conversions.points_for_model(records, name)
    if len(points) == 0:
        issues.append(("empty_cloud", "cloud has no points"))
    height = max(int(msg.height), 1) if len(points) else 1
    return DecodedCloud(points, name is not None, height, tuple(issues))


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on a camera image fed to the dense (CLIP) encoder, which keeps the aspect ratio: an
    elongated image (2 x 1600) becomes a huge encoder input (gigabytes)."""

    max_pixels: int = 16_000_000
    max_aspect: float = 4.0

    def check(self, hw: tuple[int, int]) -> None:
        h, w = int(hw[0]), int(hw[1])
        if h <= 0 or w <= 0:
            raise ImageFormatError(f"empty image {w}x{h}")
        if h * w > self.max_pixels:
            raise ImageFormatError(f"image {w}x{h} exceeds max_image_pixels {self.max_pixels}")
        if max(h, w) / min(h, w) > self.max_aspect:
            raise ImageFormatError(f"image {w}x{h} is more elongated than max_image_aspect {self.max_aspect}")


class CameraResolver:
    """One camera's model for a frame. The CameraInfo model is cached by content (drivers send an
    identical CameraInfo with every image); `fit` scales a model to the decoded image size and
    validates the result, so a camera that passed validation at its own size but not at the
    image's (K overflowing) is refused here, as a camera error, instead of failing the frame."""

    def __init__(self, name: str, *, rectified: bool = False, limits: ImageLimits | None = None) -> None:
        self.name = name
        self.rectified = rectified
        self.limits = limits or ImageLimits()
        self._cached: tuple[Any, PinholeCamera] | None = None

    def from_info(self, info: Any, T_cam_lidar: np.ndarray, image_hw: tuple[int, int]) -> PinholeCamera:
        key = (
            tuple(info.k),
            tuple(info.d),
            tuple(info.p),
            tuple(info.r),
            int(info.width),
            int(info.height),
            str(info.distortion_model),
            np.asarray(T_cam_lidar, np.float64).tobytes(),
        )
        if self._cached is None or self._cached[0] != key:
            model = conversions.camera_from_info_msg(info, T_cam_lidar, self.name, rectified=self.rectified)
            self._cached = (key, model)
        return self.fit(self._cached[1], image_hw)

    def fit(self, model: PinholeCamera, image_hw: tuple[int, int]) -> PinholeCamera:
        """`model` for an image of `image_hw` (h, w): bounds checked, scaled, validated."""
        hw = (int(image_hw[0]), int(image_hw[1]))
        self.limits.check(hw)
        if model.image_hw != hw:
            with np.errstate(over="ignore"):  # an overflow is what validate() is there to catch
                model = model.scaled(hw[1] / model.width, hw[0] / model.height)
            model.validate()
        return model


CAMERA_ERRORS = (CalibrationError, ImageFormatError)


@dataclass(frozen=True)
class LabelledFrame:
    records: np.ndarray  # x, y, z, [intensity], label, score, rgb, [instance] (conversions.labelled_points)
    height: int
    vocabulary: Any
    result: Any  # the SegmentationResult (None for an empty cloud)


def label_frame(
    segment: Callable[..., Any],
    cloud: DecodedCloud,
    images: Sequence[np.ndarray],
    cameras: Sequence[PinholeCamera],
    *,
    vocabulary: Any,
    score_threshold: float | None = None,
    panoptic: bool = False,
) -> LabelledFrame:
    """Label `cloud` with `segment` (a Segmenter's bound `segment`). `vocabulary`: the one an empty
    cloud is answered with (no model call); otherwise the result's own is used. `panoptic` (the
    segmenter serves a panoptic model): the records carry `instance`, also for an empty cloud, so
    every message of a topic has one layout."""
    points = cloud.points
    result = None
    instances = np.zeros(0, np.uint32) if panoptic else None
    if len(points):
        result = segment(points, list(images) or None, list(cameras) or None, score_threshold=score_threshold)
        labels, scores, vocabulary = result.labels, result.scores, result.vocabulary
        if len(labels) != len(points) or len(scores) != len(points):
            raise RuntimeError(f"segmenter returned {len(labels)} labels for {len(points)} points")
        if panoptic:
            if result.instances is None or len(result.instances) != len(points):
                raise RuntimeError("a panoptic segmenter returned no instance id per point")
            instances = result.instances
    else:
        labels, scores = np.zeros(0, np.uint16), np.zeros(0, np.float32)
    rgb = conversions.rgb_for_labels(labels, vocabulary.colours)  # UNLABELLED / junk labels -> grey
    intensity = points[:, 3] if cloud.with_intensity else None
    records = conversions.labelled_points(points[:, :3], intensity, labels, scores, rgb, instances)
    return LabelledFrame(records, cloud.height, vocabulary, result)
