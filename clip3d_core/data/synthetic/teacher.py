"""SIMULATED CLIP teacher for synthetic scenes.

No pretrained CLIP weights exist in this environment and a randomly initialised CLIP sees nothing,
so the transfer method (MCFA + pseudo labels + self-training) could not be measured at all; the
simulated teacher builds patch features from the text embeddings of the patches' TRUE classes,
degraded the way dense CLIP is (patch-level blur at class boundaries, confusions between similar
classes, Gaussian noise), with every degradation explicit and tunable. Numbers measured with it
say how well the method transfers a teacher of that quality; they are not CLIP results.

It reads the synthetic frames' per-pixel labels, so it lives with the synthetic world; it returns
the `TeacherOutput` every teacher returns (`clip3d_core.teacher`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clip3d_core.clip.dense import PatchGrid
from clip3d_core.data.synthetic.world import CLUTTER, THING_CLASSES
from clip3d_core.teacher import TeacherError, TeacherOutput

logger = logging.getLogger(__name__)



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
ERROR_MODELS = ("independent", "clip_like")


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
    # "independent": the pairs above, confused at a fixed rate per object/patch (the easy world).
    # "clip_like": see `SimulatedTeacher` (partners from text similarity, rates from visible size,
    # coherent regions for surfaces, clutter looking like any class).
    error_model: str = "independent"
    # clip_like: a partner at text cosine >= similarity_range[1] is confused at the full rate,
    # one at <= similarity_range[0] never.
    similarity_range: tuple[float, float] = (0.8, 0.95)
    # clip_like: objects of at least area_range[1] visible pixels are never confused; the rate
    # rises with log(1 / area) to its full value at area_range[0] pixels.
    area_range: tuple[float, float] = (16.0, 2048.0)
    region_patches: int = 3  # clip_like: surfaces are confused in blobs about this many patches wide

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
        if self.error_model not in ERROR_MODELS:
            raise TeacherError(f"error_model must be one of {ERROR_MODELS}, got {self.error_model!r}")
        lo, hi = self.similarity_range
        a_lo, a_hi = self.area_range
        if not (lo < hi and 0 < a_lo < a_hi and self.region_patches >= 1):
            raise TeacherError("need similarity_range[0] < [1], 0 < area_range[0] < [1], region_patches >= 1")
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

    1. every labelled pixel's class c is replaced by a "shown" class. ``error_model="independent"``:
       drawn from row c of the `confusion_matrix` (one draw per object instance from
       ``pixel_instances`` when ``confusion_unit="instance"``, one per patch and class for stuff /
       ``"patch"``): fixed pairs at a fixed rate, errors that average out over frames.
       ``"clip_like"``: CLIP's kind of mistakes (`_clip_like_shown`): each class has one partner,
       its nearest class by text cosine; small / far / occluded objects show it, near ones do not;
       surfaces show it in coherent blobs; clutter (pixel label `CLUTTER`) shows any class;
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
        sigma = self._sigma(text_n)
        frame_id = getattr(frame, "frame_id", "")
        labels = [torch.from_numpy(np.asarray(lab, dtype=np.int64)).reshape(-1) for lab in pixel_labels]
        grids = [self.grid(tuple(np.shape(lab)[:2])) for lab in pixel_labels]
        clip_like = None
        if cfg.error_model == "clip_like":
            instances = getattr(frame, "pixel_instances", None)
            if instances is None:
                raise TeacherError("error_model 'clip_like' needs per-pixel instance ids (pixel_instances)")
            inst = [torch.from_numpy(np.asarray(i, dtype=np.int64)).reshape(-1) for i in instances]
            clip_like = self._clip_like_shown(labels, inst, grids, class_names, text_n, frame_id)
        else:
            cdf = confusion_matrix(class_names, cfg.confusions, cfg.confusion_prob).cumsum(1).float()
            cdf[:, -1] = 1.0 + 1e-6  # rounding guard: a uniform u < 1 never passes the last class
            instances = getattr(frame, "pixel_instances", None) if cfg.confusion_unit == "instance" else None
            shown_instance = self._instance_draws(instances, pixel_labels, cdf, frame_id)

        features = []
        for m, (lab, (grid, pix_patch)) in enumerate(zip(labels, grids)):
            p = grid.grid_hw[0] * grid.grid_hw[1]
            gen = torch.Generator().manual_seed(_seed(cfg.seed, frame_id, m))
            if clip_like is not None:
                shown = clip_like[m]
            else:
                # One draw per (patch, true class): every pixel of a class in a patch shows the same.
                per_patch = _draw(cdf, torch.arange(c).expand(p, c), torch.rand(p, c, generator=gen))
                valid = (lab >= 0) & (lab < c)
                shown = torch.full_like(lab, -1)
                shown[valid] = per_patch[pix_patch[valid], lab[valid]]
                if shown_instance is not None:
                    inst_m = torch.from_numpy(np.asarray(instances[m], dtype=np.int64)).reshape(-1)
                    things = valid & (inst_m > 0)
                    ids, table = shown_instance
                    shown[things] = table[torch.searchsorted(ids, inst_m[things])]
            seen = shown >= 0
            hist = torch.bincount(pix_patch[seen] * c + shown[seen], minlength=p * c).view(p, c).float()
            if cfg.mixing == "majority":
                weights = F.one_hot(hist.argmax(1), c).float() * (hist.sum(1, keepdim=True) > 0)
            else:
                weights = hist / hist.sum(1, keepdim=True).clamp(min=1.0)
            noisy = weights @ text_n + sigma * torch.randn(p, text_n.shape[1], generator=gen)
            feat = F.normalize(noisy, dim=1).t().reshape(-1, *grid.grid_hw)
            features.append(feat.to(text.device))
        return TeacherOutput(features=features, grids=[g for g, _ in grids], embed_dim=text.shape[1])

    def partners(self, class_names: Sequence[str], text_n: Tensor) -> tuple[Tensor, Tensor]:
        """clip_like: (partner [C], strength [C]) of every class.

        The partner is the class with the most similar text vector among classes of the same kind
        (objects with instances vs surfaces and street furniture: dense CLIP mixes up a car with
        a bus, not with the road it stands on); strength in [0, 1] rises linearly with that
        cosine over ``similarity_range``. An explicit ``confusions`` pair overrides both (strength 1).
        """
        cfg = self.cfg
        thing = torch.tensor([n in THING_CLASSES for n in class_names])
        cos = text_n @ text_n.t()
        same_kind = thing[:, None] == thing[None, :]
        cos = cos.masked_fill(~same_kind | torch.eye(len(class_names), dtype=torch.bool), -math.inf)
        best, partner = cos.max(1)
        lo, hi = cfg.similarity_range
        strength = ((best - lo) / (hi - lo)).clamp(0.0, 1.0).nan_to_num(0.0)
        partner = torch.where(torch.isfinite(best), partner, torch.arange(len(class_names)))
        index = {_norm_name(n): i for i, n in enumerate(class_names)}
        for src, dst in cfg.confusions.items():
            a, b = index.get(_norm_name(src)), index.get(_norm_name(dst))
            if a is not None and b is not None and a != b:
                partner[a], strength[a] = b, 1.0
        return partner, strength

    def _clip_like_shown(self, labels: list[Tensor], instances: list[Tensor],
                         grids: list[tuple[PatchGrid, Tensor]], class_names: Sequence[str], text_n: Tensor,
                         frame_id: str) -> list[Tensor]:
        """Per camera, the class each pixel shows (-1: nothing) under the clip_like error model.

        Objects (instance id > 0, all cameras together): shown as their class's partner with
        probability ``min(1, 2 * confusion_prob * strength * smallness)``, smallness in [0, 1]
        from the object's visible pixel area (distance, size and occlusion all shrink it), so a
        near bus is a bus and a far one is a car, in every frame. Clutter objects (label
        `CLUTTER`) look like one class each, drawn uniformly. Surfaces: the partner shows in
        blobs ``region_patches`` patches wide (a smooth random field per camera below
        ``confusion_prob * strength``), not in scattered patches.
        """
        cfg = self.cfg
        c = len(class_names)
        partner, strength = self.partners(class_names, text_n)
        all_lab, all_inst = torch.cat(labels), torch.cat(instances)
        obj = all_inst > 0
        ids, inverse, area = torch.unique(all_inst[obj], return_inverse=True, return_counts=True)
        obj_cls = torch.zeros(len(ids), dtype=torch.long).scatter_(0, inverse, all_lab[obj])
        a_lo, a_hi = cfg.area_range
        smallness = (math.log(a_hi) - area.double().log()) / (math.log(a_hi) - math.log(a_lo))
        gen = torch.Generator().manual_seed(_seed(cfg.seed, frame_id, "objects"))
        u, look = torch.rand(len(ids), generator=gen), torch.randint(0, c, (len(ids),), generator=gen)
        known = (obj_cls >= 0) & (obj_cls < c)
        cls = obj_cls.clamp(0, c - 1)
        rate = (2.0 * cfg.confusion_prob * strength[cls] * smallness.clamp(0.0, 1.0).float()).clamp(max=1.0)
        shown_obj = torch.where(u < rate, partner[cls], cls)
        shown_obj = torch.where(obj_cls == CLUTTER, look, torch.where(known, shown_obj, -1))
        out = []
        for m, (lab, (grid, pix_patch)) in enumerate(zip(labels, grids)):
            gh, gw = grid.grid_hw
            rp = cfg.region_patches
            g = torch.Generator().manual_seed(_seed(cfg.seed, frame_id, m, "regions"))
            coarse = torch.rand(1, 1, gh // rp + 2, gw // rp + 2, generator=g)
            field = F.interpolate(coarse, size=(gh, gw), mode="bilinear", align_corners=True).reshape(-1)
            shown = torch.full_like(lab, -1)
            stuff = (lab >= 0) & (lab < c) & (instances[m] == 0)
            ls = lab[stuff]
            flip = field[pix_patch[stuff]] < cfg.confusion_prob * strength[ls]
            shown[stuff] = torch.where(flip, partner[ls], ls)
            things = instances[m] > 0
            shown[things] = shown_obj[torch.searchsorted(ids, instances[m][things])]
            out.append(shown)
        return out

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
