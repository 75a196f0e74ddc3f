"""2D teachers: per-camera dense features in the text embedding space, and what each point gets of them.

A teacher maps a frame's images to dense features [D, gh, gw] per camera (plus the `PatchGrid`
mapping original pixels to patches), in the same space as the text embeddings, so
``cos(feature, text)`` classifies. Two implementations:

- `ClipTeacher`: the real thing, a frozen `DenseClipEncoder` (MaskCLIP-style dense CLIP).
- `SimulatedTeacher`: a SIMULATION of a CLIP teacher for synthetic scenes. No pretrained CLIP
  weights exist in this environment and a randomly initialised CLIP sees nothing, so the transfer
  method (MCFA + pseudo labels + self-training) could not be measured at all; the simulated teacher
  builds patch features from the text embeddings of the patches' TRUE classes, degraded the way
  dense CLIP is (patch-level blur at class boundaries, confusions between similar classes,
  Gaussian noise), with every degradation explicit and tunable. Numbers measured with it say how
  well the method transfers a teacher of that quality; they are not CLIP results.

`TeacherOutput.point_targets` turns a teacher output and projected points into `PointTargets`
(per-point 2D features, visibility and patch ids) that the MCFA losses and pseudo labels consume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
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
    and sample its features at each point's pixel in the first camera that sees it
    (occlusion-tested projection). The one way the teacher, the trainer and the segmenter get them.

    Args:
        xyz: [N, 3] points (default: ``frame.points``).
        select: [N] bool, the points to project; the others count as seen by no camera (the
            segmenter passes its valid points: a NaN point is never projected).
    """
    out = teacher(frame, text)
    if xyz is None:
        xyz = torch.as_tensor(np.asarray(frame.points)[:, :3], dtype=torch.float32)
    if select is None:
        cam, uv = project_points(xyz, list(frame.cameras), occlusion=occlusion).first_visible()
    else:
        idx = select.nonzero().squeeze(1)
        cam = torch.full((xyz.shape[0],), -1, dtype=torch.long, device=xyz.device)
        uv = xyz.new_zeros(xyz.shape[0], 2)
        if idx.numel():
            proj = project_points(xyz.index_select(0, idx), list(frame.cameras), occlusion=occlusion)
            c, p = proj.first_visible()
            cam[idx], uv[idx] = c.to(cam.device).long(), p.to(uv)
    return out, out.point_targets(cam, uv, sampling=sampling)


# ------------------------------------------------------------------------------------ real CLIP


class ClipTeacher:
    """Dense CLIP features of every camera image (`DenseClipEncoder`, frozen).

    Images are encoded in one batch per distinct image size, resized to a short side of
    ``short_side`` pixels (default: the model's native input size).
    """

    def __init__(self, encoder: DenseClipEncoder, *, short_side: int | None = None) -> None:
        self.encoder = encoder
        self.short_side = short_side

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
        for idx in by_size.values():
            dense = self.encoder.encode([images[i] for i in idx], self.short_side)
            for k, i in enumerate(idx):
                features[i], grids[i] = dense.features[k], dense.grid
        return TeacherOutput(features=features, grids=grids, embed_dim=dim)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ simulation


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


# Confusions dense CLIP makes on driving scenes: similar vehicles, riders, thin vertical
# structures, neighbouring ground surfaces. Names from the synthetic world, SemanticKITTI and
# nuScenes; pairs whose names are not both in the vocabulary are skipped.
DEFAULT_CONFUSIONS: dict[str, str] = {
    "truck": "car",
    "bus": "truck",
    "other vehicle": "truck",
    "trailer": "truck",
    "construction vehicle": "truck",
    "motorcyclist": "bicyclist",
    "motorcycle": "bicycle",
    "traffic sign": "pole",
    "traffic light": "pole",
    "traffic cone": "barrier",
    "barrier": "fence",
    "sidewalk": "road",
    "parking": "road",
    "terrain": "vegetation",
    "trunk": "vegetation",
}

CONFUSION_UNITS = ("instance", "patch")
MIXING_MODES = ("area", "majority")


@dataclasses.dataclass
class SimulatedTeacherConfig:
    """Degradations of the simulated teacher (see `SimulatedTeacher`)."""

    patch_size: int = 16  # original-image pixels per feature patch
    noise: float = 0.3  # Gaussian noise, as the error rate it alone causes on single-class patches
    confusion_prob: float = 0.3  # probability an instance/patch of a confusable class shows as its partner
    confusions: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CONFUSIONS))
    confusion_unit: str = "instance"  # "instance": one draw per object (pixel_instances), per patch for stuff
    mixing: str = "area"  # "area": class mix weighted by pixel area in the patch; "majority": one class
    seed: int = 0

    def validate(self) -> SimulatedTeacherConfig:
        if self.patch_size < 1:
            raise TeacherError(f"patch_size must be >= 1, got {self.patch_size}")
        if not 0.0 <= self.noise < 1.0:
            raise TeacherError(f"noise (an error rate) must be in [0, 1), got {self.noise}")
        if not 0.0 <= self.confusion_prob <= 1.0:
            raise TeacherError(f"confusion_prob must be in [0, 1], got {self.confusion_prob}")
        if self.confusion_unit not in CONFUSION_UNITS:
            raise TeacherError(f"confusion_unit must be in {CONFUSION_UNITS}, got {self.confusion_unit!r}")
        if self.mixing not in MIXING_MODES:
            raise TeacherError(f"mixing must be one of {MIXING_MODES}, got {self.mixing!r}")
        return self


def confusion_matrix(class_names: Sequence[str], confusions: dict[str, str], prob: float) -> Tensor:
    """Row-stochastic [C, C]: ``M[c, c']`` = probability class c is shown as class c'.

    ``M[c, partner(c)] = prob`` and ``M[c, c] = 1 - prob`` for each pair of ``confusions`` whose
    two names are in ``class_names`` (matched ignoring case, '-', '_' and spaces); identity rows
    otherwise.
    """
    index = {_norm_name(n): i for i, n in enumerate(class_names)}
    m = torch.eye(len(class_names), dtype=torch.float64)
    for src, dst in confusions.items():
        s, d = index.get(_norm_name(src)), index.get(_norm_name(dst))
        if s is None or d is None or s == d:
            continue
        m[s, s], m[s, d] = 1.0 - prob, prob
    return m


def _seed(*parts: object) -> int:
    # Stable across processes (unlike hash()): the same frame always gets the same features.
    return zlib.crc32("/".join(map(str, parts)).encode())


def _draw(cdf: Tensor, classes: Tensor, u: Tensor) -> Tensor:
    """Sample a shown class for each true class in ``classes`` with uniforms ``u`` (same shape)."""
    return (u.unsqueeze(-1) >= cdf[classes]).sum(-1).clamp(max=cdf.shape[0] - 1)


def calibrate_noise_sigma(text: Tensor, error_rate: float, *, samples: int = 8192, seed: int = 0) -> float:
    """Per-dimension Gaussian sigma at which noise alone makes a pure single-class patch
    (feature = its class's text embedding) classify wrong with probability ``error_rate``.

    Calibrating on the embedding matrix itself makes ``error_rate`` mean the same for any text
    encoder: real CLIP embeddings (cosines of 0.7-0.9 between classes), a random tiny text tower,
    any D. Exact for ~``samples`` fixed noise draws averaged over the classes: with unit t_y,
    projections z_c = <n, t_c> and gaps g_c = 1 - <t_y, t_c>, draw n is misclassified iff
    sigma > min_{c : z_c > z_y} g_c / (z_c - z_y), so sigma is a quantile of that critical value.
    """
    t = F.normalize(text.detach().double().cpu(), dim=1)
    c, d = t.shape
    if error_rate <= 0.0 or c < 2:
        return 0.0
    if error_rate >= (c - 1) / c:  # infinite noise: a uniform guess is right 1/C of the time
        raise TeacherError(f"noise error rate {error_rate} not below the chance error {(c - 1) / c:.3f}")
    gen = torch.Generator().manual_seed(seed)
    per_class = max(64, samples // c)
    proj = (torch.randn(c, per_class, d, generator=gen) @ t.float().t()).double()  # [C, S, C]
    own = proj.gather(2, torch.arange(c).view(c, 1, 1).expand(c, per_class, 1))
    rise = proj - own
    gap = (1.0 - t @ t.t()).clamp(min=0.0).unsqueeze(1)  # [C, 1, C]
    critical = torch.where(rise > 0, gap / rise.clamp(min=1e-300), torch.full_like(rise, math.inf)).amin(-1)
    return float(torch.quantile(critical.flatten(), error_rate))


class SimulatedTeacher:
    """SIMULATED CLIP teacher for synthetic frames (this environment has no pretrained CLIP).

    For each camera and patch of ``patch_size`` pixels:

    1. every labelled pixel's class c is replaced by a "shown" class drawn from row c of the
       `confusion_matrix` (one draw per object instance from ``pixel_instances`` when
       ``confusion_unit="instance"``, one per patch and class for stuff / ``"patch"``);
    2. the patch signal is the mix of the shown classes' text embeddings, weighted by their pixel
       area in the patch (``mixing="area"``: blur at class boundaries, thin objects fade into their
       background) or the majority class only;
    3. Gaussian noise is added whose per-dimension sigma is calibrated on the text embeddings
       (`calibrate_noise_sigma`) so that it alone turns a fraction ``noise`` of single-class
       patches into another class, whatever the embedding matrix; the errors it causes fall on
       the classes whose embeddings are close, as they do for CLIP;
    4. the result is normalised. Patches without a labelled pixel (sky) are pure noise (zero
       vectors when ``noise`` is 0).

    Works with any text embedding matrix [C, D] whose row c embeds ``frame.class_names[c]`` (real
    CLIP text embeddings or a random tiny text tower). Deterministic per (seed, frame_id, camera).
    """

    def __init__(self, cfg: SimulatedTeacherConfig | None = None) -> None:
        self.cfg = (cfg or SimulatedTeacherConfig()).validate()
        self._grids: dict[tuple[int, int], tuple[PatchGrid, Tensor]] = {}
        self._sigmas: dict[tuple[int, tuple[int, ...]], float] = {}

    def _sigma(self, text_n: Tensor) -> float:
        key = (zlib.crc32(text_n.numpy().tobytes()), tuple(text_n.shape))
        if key not in self._sigmas:
            self._sigmas[key] = calibrate_noise_sigma(text_n, self.cfg.noise, seed=self.cfg.seed)
            logger.debug("simulated teacher: noise %.3f -> sigma %.4f", self.cfg.noise, self._sigmas[key])
        return self._sigmas[key]

    def grid(self, image_hw: tuple[int, int]) -> tuple[PatchGrid, Tensor]:
        """The patch grid of an image size and the flat patch index of every pixel [H * W]."""
        if image_hw not in self._grids:
            h, w = image_hw
            ps = self.cfg.patch_size
            gh, gw = max(1, round(h / ps)), max(1, round(w / ps))
            grid = PatchGrid(input_hw=(gh * ps, gw * ps), grid_hw=(gh, gw), patch_size=ps, image_hw=(h, w))
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            uv = torch.stack([cols, rows], -1).reshape(-1, 2).float()
            self._grids[image_hw] = (grid, grid.pixel_to_patch(uv))
        return self._grids[image_hw]

    def __call__(self, frame: Any, text: Tensor) -> TeacherOutput:
        pixel_labels = getattr(frame, "pixel_labels", None)
        if pixel_labels is None:
            raise TeacherError("SimulatedTeacher needs per-pixel class ids (synthetic frames' pixel_labels)")
        class_names = tuple(frame.class_names)
        if text.ndim != 2 or text.shape[0] != len(class_names):
            raise TeacherError(
                f"text must be [C, D] with one row per class of the frame ({len(class_names)}), "
                f"got {tuple(text.shape)}"
            )
        cfg = self.cfg
        c = len(class_names)
        text_n = F.normalize(text.detach().float().cpu(), dim=1)
        cdf = confusion_matrix(class_names, cfg.confusions, cfg.confusion_prob).cumsum(1).float()
        cdf[:, -1] = 1.0 + 1e-6  # rounding guard: a uniform u < 1 never passes the last class
        sigma = self._sigma(text_n)
        frame_id = getattr(frame, "frame_id", "")
        instances = getattr(frame, "pixel_instances", None) if cfg.confusion_unit == "instance" else None
        shown_instance = self._instance_draws(instances, pixel_labels, cdf, frame_id)

        features, grids = [], []
        for m, labels_np in enumerate(pixel_labels):
            labels = torch.from_numpy(np.asarray(labels_np, dtype=np.int64)).reshape(-1)
            grid, pix_patch = self.grid(tuple(labels_np.shape[:2]))
            p = grid.grid_hw[0] * grid.grid_hw[1]
            gen = torch.Generator().manual_seed(_seed(cfg.seed, frame_id, m))
            # One draw per (patch, true class): every pixel of a class in a patch shows the same.
            per_patch = _draw(cdf, torch.arange(c).expand(p, c), torch.rand(p, c, generator=gen))
            valid = (labels >= 0) & (labels < c)
            shown = torch.full_like(labels, -1)
            shown[valid] = per_patch[pix_patch[valid], labels[valid]]
            if shown_instance is not None:
                inst = torch.from_numpy(np.asarray(instances[m], dtype=np.int64)).reshape(-1)
                things = valid & (inst > 0)
                ids, table = shown_instance
                shown[things] = table[torch.searchsorted(ids, inst[things])]
            hist = torch.bincount(pix_patch[valid] * c + shown[valid], minlength=p * c).view(p, c).float()
            if cfg.mixing == "majority":
                weights = F.one_hot(hist.argmax(1), c).float() * (hist.sum(1, keepdim=True) > 0)
            else:
                weights = hist / hist.sum(1, keepdim=True).clamp(min=1.0)
            noisy = weights @ text_n + sigma * torch.randn(p, text_n.shape[1], generator=gen)
            feat = F.normalize(noisy, dim=1).t().reshape(-1, *grid.grid_hw)
            features.append(feat.to(text.device))
            grids.append(grid)
        return TeacherOutput(features=features, grids=grids, embed_dim=text.shape[1])

    def _instance_draws(
        self, instances: list[np.ndarray] | None, pixel_labels: list[np.ndarray], cdf: Tensor, frame_id: str
    ) -> tuple[Tensor, Tensor] | None:
        """(sorted instance ids, shown class per id): one draw per object of the frame, so an
        object seen by two cameras is confused consistently in both."""
        if instances is None:
            return None
        pairs = [np.zeros((0, 2), np.int64)]
        for inst, lab in zip(instances, pixel_labels):
            ids, cls = np.asarray(inst, np.int64).reshape(-1), np.asarray(lab, np.int64).reshape(-1)
            keep = (ids > 0) & (cls >= 0) & (cls < cdf.shape[0])
            pairs.append(np.unique(np.stack([ids[keep], cls[keep]], 1), axis=0))
        pairs_np = np.concatenate(pairs)
        ids, first = np.unique(pairs_np[:, 0], return_index=True)  # one class per instance id
        classes = torch.from_numpy(pairs_np[first, 1])
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, frame_id, "instances"))
        shown = _draw(cdf, classes, torch.rand(len(ids), generator=gen))
        return torch.from_numpy(ids), shown
