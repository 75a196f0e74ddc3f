"""2D teachers: per-camera dense features in the text embedding space, and what each point gets of them.

A teacher maps a frame's images to dense features [D, gh, gw] per camera (plus the `PatchGrid`
mapping original pixels to patches), in the same space as the text embeddings, so
``cos(feature, text)`` classifies. `ClipTeacher` is the real thing,
a frozen `DenseClipEncoder` (MaskCLIP-style dense CLIP). The SIMULATION of a CLIP teacher for
synthetic scenes lives with the synthetic world it needs (`clip3d_core.data.synthetic.teacher`).

`TeacherOutput.point_targets` turns a teacher output and projected points into `PointTargets`
(per-point 2D features, visibility and patch ids) that the MCFA losses and pseudo labels consume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from clip3d_core.clip.dense import DenseClipEncoder, PatchGrid
from clip3d_core.geometry import PinholeCamera, project_points

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("bilinear", "nearest")


class TeacherError(ValueError):
    """A teacher cannot handle this frame or text (missing inputs, mismatched sizes)."""


class FrameLike(Protocol):
    """What teachers read from a frame (`clip3d_core.data.Frame` and `CameraView` satisfy it)."""

    images: Sequence[np.ndarray]
    cameras: Sequence[PinholeCamera]


@dataclasses.dataclass
class CameraView:
    """The calibrated camera images of one sweep, without a dataset frame around them (what the
    segmenter receives): ``images[i]`` uint8 HxWx3 seen through ``cameras[i]``."""

    images: Sequence[np.ndarray]
    cameras: Sequence[PinholeCamera]


@dataclasses.dataclass
class PointTargets:
    """What the points of one frame (or a batch, see `cat`) get from the teacher.

    features: [N, D] unit-length 2D features at the points' pixels (zero rows where not visible).
    visible: [N] bool, seen by some camera.
    patch_index: [N] long row of `patch_features` the point falls into, -1 where not visible.
    patch_features: [P, D] every patch of every camera (global patch ids for the spatial loss).
    """

    features: Tensor
    visible: Tensor
    patch_index: Tensor
    patch_features: Tensor

    @staticmethod
    def cat(parts: Sequence[PointTargets]) -> PointTargets:
        """Concatenate frames in batch order, offsetting patch ids so they stay distinct."""
        if not parts:
            raise TeacherError("nothing to concatenate")
        offsets = np.cumsum([0] + [p.patch_features.shape[0] for p in parts[:-1]])
        index = [torch.where(p.patch_index >= 0, p.patch_index + int(o), p.patch_index)
                 for p, o in zip(parts, offsets)]
        return PointTargets(
            features=torch.cat([p.features for p in parts]),
            visible=torch.cat([p.visible for p in parts]),
            patch_index=torch.cat(index),
            patch_features=torch.cat([p.patch_features for p in parts]),
        )


@dataclasses.dataclass
class TeacherOutput:
    """Per camera: dense features [D, gh, gw] (unit length, text space) and their `PatchGrid`."""

    features: list[Tensor]
    grids: list[PatchGrid]
    embed_dim: int

    def __post_init__(self) -> None:
        if len(self.features) != len(self.grids):
            raise TeacherError(f"{len(self.features)} feature maps for {len(self.grids)} grids")
        for f, g in zip(self.features, self.grids):
            if f.ndim != 3 or f.shape[0] != self.embed_dim or tuple(f.shape[1:]) != tuple(g.grid_hw):
                raise TeacherError(
                    f"feature map {tuple(f.shape)} does not match grid {g.grid_hw} / D={self.embed_dim}"
                )

    def patch_features(self) -> Tensor:
        """[P, D] all patches, camera after camera, each in `PatchGrid.pixel_to_patch` order."""
        if not self.features:
            return torch.zeros(0, self.embed_dim)
        return torch.cat([f.flatten(1).t() for f in self.features])

    def point_targets(self, cam_index: Tensor, uv: Tensor, *, sampling: str = "bilinear") -> PointTargets:
        """Features and patch ids for points seen by camera ``cam_index`` at pixel ``uv``.

        Args:
            cam_index: [N] long camera of each point, -1 for none (`Projection.first_visible`).
            uv: [N, 2] original-image pixel (u = column, v = row) in that camera.
            sampling: "bilinear" (features interpolated between patch centres, renormalised) or
                "nearest" (the feature of the patch the pixel lies in).
        """
        if sampling not in SAMPLING_MODES:
            raise TeacherError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        n = cam_index.shape[0]
        patches = self.patch_features()
        device = patches.device
        cam_index = cam_index.to(device).long()
        uv = uv.to(device)
        if n and int(cam_index.max()) >= len(self.grids):
            raise TeacherError(f"camera index {int(cam_index.max())} but only {len(self.grids)} cameras")
        features = patches.new_zeros(n, self.embed_dim)
        patch_index = torch.full((n,), -1, dtype=torch.long, device=device)
        offset = 0
        for m, (fmap, grid) in enumerate(zip(self.features, self.grids)):
            sel = cam_index == m
            if bool(sel.any()):
                local = grid.pixel_to_patch(uv[sel])
                patch_index[sel] = local + offset
                if sampling == "bilinear":
                    features[sel] = grid.sample(fmap, uv[sel])
                else:
                    features[sel] = fmap.flatten(1).t()[local]
            offset += grid.grid_hw[0] * grid.grid_hw[1]
        return PointTargets(features=features, visible=cam_index >= 0, patch_index=patch_index,
                            patch_features=patches)


@runtime_checkable
class Teacher(Protocol):
    """``teacher(frame, text) -> TeacherOutput`` with features comparable to ``text`` [C, D]."""

    def __call__(self, frame: Any, text: Tensor) -> TeacherOutput: ...


def frame_point_targets(
    teacher: Teacher,
    frame: FrameLike,
    text: Tensor,
    *,
    xyz: Tensor | None = None,
    select: Tensor | None = None,
    sampling: str = "bilinear",
    occlusion: bool = True,
) -> tuple[TeacherOutput, PointTargets]:
    """CLIP features at points: run ``teacher`` on the frame's images (one batch per image size)
    and sample its features at the points (`attach_points`). The one way the teacher, the trainer
    and the segmenter get them (the segmenter runs the two steps apart, to overlap the image tower
    with the 3D network).

    Args:
        xyz: [N, 3] points (default: ``frame.points``).
        select: [N] bool, the points to project; the others count as seen by no camera.
    """
    out = teacher(frame, text)
    if xyz is None:
        xyz = torch.as_tensor(np.asarray(frame.points)[:, :3], dtype=torch.float32)
    return out, attach_points(out, xyz, frame.cameras, select=select, sampling=sampling, occlusion=occlusion)


def attach_points(
    out: TeacherOutput,
    xyz: Tensor,
    cameras: Sequence[PinholeCamera],
    *,
    select: Tensor | None = None,
    sampling: str = "bilinear",
    occlusion: bool = True,
) -> PointTargets:
    """Each point's feature at its pixel in the first camera that sees it (occlusion-tested
    projection). ``select``: [N] bool, the points to project (the segmenter passes its valid
    points: a NaN point is never projected); the others count as seen by no camera."""
    if select is None:
        cam, uv = project_points(xyz, list(cameras), occlusion=occlusion).first_visible()
    else:
        idx = select.nonzero().squeeze(1)
        cam = torch.full((xyz.shape[0],), -1, dtype=torch.long, device=xyz.device)
        uv = xyz.new_zeros(xyz.shape[0], 2)
        if idx.numel():
            proj = project_points(xyz.index_select(0, idx), list(cameras), occlusion=occlusion)
            c, p = proj.first_visible()
            cam[idx], uv[idx] = c.to(cam.device).long(), p.to(uv)
    return out.point_targets(cam, uv, sampling=sampling)


# ------------------------------------------------------------------------------------ real CLIP


class ClipTeacher:
    """Dense CLIP features of every camera image (`DenseClipEncoder`, frozen).

    Images are encoded in one batch per distinct image size, resized to a short side of
    ``short_side`` pixels (default: the model's native input size). ``upload(key, images)``, when
    given, moves each size group's batch to the device (the segmenter's pinned staging buffers).
    """

    def __init__(self, encoder: DenseClipEncoder, *, short_side: int | None = None,
                 upload: Callable[[str, Sequence[np.ndarray]], Tensor] | None = None) -> None:
        self.encoder = encoder
        self.short_side = short_side
        self.upload = upload

    def __call__(self, frame: FrameLike, text: Tensor) -> TeacherOutput:
        images = list(frame.images)
        dim = int(self.encoder.visual.output_dim)
        if text.shape[-1] != dim:
            raise TeacherError(f"text embeddings have D={text.shape[-1]}, this CLIP's image space D={dim}")
        features: list[Tensor | None] = [None] * len(images)
        grids: list[PatchGrid | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(np.shape(img)[:2]), []).append(i)
        for group, idx in enumerate(by_size.values()):
            upload = None if self.upload is None else functools.partial(self.upload, f"images{group}")
            dense = self.encoder.encode([images[i] for i in idx], self.short_side, upload)
            for k, i in enumerate(idx):
                features[i], grids[i] = dense.features[k], dense.grid
        return TeacherOutput(features=features, grids=grids, embed_dim=dim)  # type: ignore[arg-type]
