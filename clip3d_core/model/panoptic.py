"""Open-vocabulary panoptic network (arXiv 2401.02402): LiDAR-CLIP concat fusion, a P3Former-style query
mask decoder and one cosine classification head for base and novel classes.

    points -> voxels -> sparse U-Net (learned LiDAR features) ──┐
    frozen per-voxel CLIP features (camera-seen voxels) ────────┴ concat -> project -> voxel features F
    thing queries (learned) + one query per base stuff class ─> L x [cross-attn to F (+ voxel position
        embedding), self-attn, FFN] -> per query: mask logits over voxels, class embedding in CLIP space
    class logit = learned scale * max over the class's names of cos(embedding, text) + learned bias

``classifier: fixed`` is the PFC-style baseline of the paper (P3Former + FC-CLIP): a closed-set learned
classifier over the base classes instead of the cosine head, and at inference each query's mask pools
the frozen CLIP features of its camera-seen voxels (`mask_pooled_clip`); novel classes are scored by
that pooled feature alone, base classes by FC-CLIP's geometric ensemble of both (`pooled_clip_probs`).

Voxels no camera sees get a learned "no image" embedding instead of a CLIP feature; during training a
whole sample's CLIP input is dropped with probability ``camera_dropout`` so the model also runs on
LiDAR alone. The distillation targets (`PanopticOutput.clip`) are never dropped.

Position guidance (P3Former): every voxel's normalised (x, y, z) goes through Fourier features and an
MLP; that embedding is added to the keys of the cross-attention and to the features the masks are
read from, and every query has a learned position embedding added to its attention queries, so a
query can bind to a place as well as to an appearance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip3d_core.geometry import Voxelization, voxel_mean
from clip3d_core.model.config import ModelConfig
from clip3d_core.model.network import voxelize_points
from clip3d_core.model.unet import SparseUNet
from clip3d_core.similarity import cosine_logits


@dataclass(frozen=True)
class PanopticHeadConfig:
    """Sizes of the fusion, the decoder and the classifier.

    num_stuff_queries: one fixed query per base stuff class (the split decides how many).
    fusion: False = LiDAR features only (the PFC-style baseline's input).
    classifier: "cosine" = the one open-vocabulary head; "fixed" = the PFC baseline's closed-set
        classifier, one learned output per entry of ``base_classes`` (the vocabulary row, i.e. dataset
        class id, of each), with novel classes scored only by pooled CLIP features at inference.
    pool_alpha: FC-CLIP's geometric-ensemble weight of the pooled CLIP score for the fixed classes
        (its default 0.4); pool_scale: the softmax scale of pooled-CLIP cosines (CLIP's 100).
    """

    hidden: int = 128
    num_thing_queries: int = 32
    num_stuff_queries: int = 8
    num_layers: int = 3
    num_heads: int = 4
    ffn: int = 256
    fourier_bands: int = 8
    fusion: bool = True
    camera_dropout: float = 0.2
    init_logit_scale: float = 10.0
    init_logit_bias: float = -4.0  # sigmoid(-4) ~ 0.02: most (query, class) pairs are negatives
    classifier: Literal["cosine", "fixed"] = "cosine"
    base_classes: tuple[int, ...] = ()
    pool_alpha: float = 0.4
    pool_scale: float = 100.0

    def __post_init__(self) -> None:
        if min(self.hidden, self.num_thing_queries, self.num_layers, self.num_heads, self.ffn) < 1:
            raise ValueError(f"hidden, queries, layers, heads and ffn must be >= 1: {self}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_stuff_queries < 0 or not 0.0 <= self.camera_dropout <= 1.0 or self.init_logit_scale <= 0:
            raise ValueError(
                f"need num_stuff_queries >= 0, camera_dropout in [0, 1], init_logit_scale > 0: {self}")
        if self.classifier == "fixed" and (not self.base_classes or min(self.base_classes) < 0
                                           or len(set(self.base_classes)) != len(self.base_classes)):
            raise ValueError(f"a fixed classifier needs distinct base_classes >= 0: {self.base_classes}")
        if not 0.0 <= self.pool_alpha <= 1.0 or self.pool_scale <= 0:
            raise ValueError(f"need pool_alpha in [0, 1] and pool_scale > 0: {self}")

    @property
    def num_queries(self) -> int:
        return self.num_thing_queries + self.num_stuff_queries

    @property
    def reads_camera(self) -> bool:
        """CLIP features at the points are an input: fused, or pooled by the fixed classifier."""
        return self.fusion or self.classifier == "fixed"


@dataclass(frozen=True)
class PanopticModelConfig:
    """Backbone + voxel grid + CLIP width (`ModelConfig`; its head fields are unused here) and the head."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: PanopticHeadConfig = field(default_factory=PanopticHeadConfig)


@dataclass(frozen=True)
class PanopticInfo:
    """What a panoptic checkpoint adds to a semantic one: the head's sizes, the thing classes (names;
    a live vocabulary's entries named so get instance ids) and the merge's settings: the minimum
    segment size and the spatial split of thing segments (`panoptic_merge`; metres, 0 = off, which
    is also what checkpoints saved before the field existed load with)."""

    head: PanopticHeadConfig
    things: tuple[str, ...]
    min_points: int
    instance_gap: float = 0.0


@dataclass
class PanopticOutput:
    """Per-voxel predictions of a batch; voxel rows are grouped by sample (`voxel_offsets`).

    mask_logits[b]: [Q, V_b] for sample b; class_embed: [B, Q, D] unit rows in CLIP space.
    clip / clip_mask: [V, D] frozen per-voxel CLIP features (unit rows, 0 where unseen) and [V] bool,
    the distillation targets (not affected by camera drop-out).
    """

    vox: Voxelization
    voxel_offsets: Tensor  # [B + 1] long
    mask_logits: list[Tensor]
    class_embed: Tensor
    clip: Tensor | None
    clip_mask: Tensor | None

    def sample_point_to_voxel(self, batch_index: Tensor, b: int) -> Tensor:
        """Sample b's points (in input order) -> rows of its own voxel block (-1 outside the grid)."""
        p2v = self.vox.point_to_voxel[batch_index == b]
        return torch.where(p2v >= 0, p2v - self.voxel_offsets[b], p2v)


def voxel_clip_features(clip: Tensor, clip_mask: Tensor, vox: Voxelization) -> tuple[Tensor, Tensor]:
    """Per-point CLIP features [N, D] (rows valid where ``clip_mask``) -> per-voxel unit mean [V, D]
    over the camera-seen points of each voxel, and [V] bool (the voxel has one)."""
    seen = clip_mask & vox.valid
    p2v = torch.where(seen, vox.point_to_voxel, torch.full_like(vox.point_to_voxel, -1))
    clip = torch.where(seen.unsqueeze(1), clip, torch.zeros_like(clip))  # unseen rows may hold NaN
    feats = F.normalize(voxel_mean(clip, p2v, vox.num_voxels), dim=1)
    has = torch.bincount(p2v[seen], minlength=vox.num_voxels) > 0
    return feats, has


class ConcatFusion(nn.Module):
    """``proj(concat(lidar, clip or no_image))``: the paper's fusion (a learned vector stands in for
    the CLIP feature of voxels no camera sees)."""

    def __init__(self, lidar_channels: int, clip_dim: int, hidden: int, fusion: bool) -> None:
        super().__init__()
        self.fusion = fusion
        in_ch = lidar_channels + (clip_dim if fusion else 0)
        self.no_image = nn.Parameter(torch.randn(clip_dim) * 0.02) if fusion else None
        self.proj = nn.Sequential(nn.Linear(in_ch, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, hidden))

    def forward(self, lidar: Tensor, clip: Tensor | None, clip_mask: Tensor | None) -> Tensor:
        if self.no_image is None:
            return self.proj(lidar)
        if clip is None or clip_mask is None:
            image = self.no_image.expand(lidar.shape[0], -1)
        else:
            image = torch.where(clip_mask.unsqueeze(1), clip.to(lidar.dtype), self.no_image)
        return self.proj(torch.cat((lidar, image), dim=1))


class PositionEmbedding(nn.Module):
    """Normalised voxel (x, y, z) in [0, 1] -> Fourier features -> MLP [V, hidden]."""

    def __init__(self, bands: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(bands)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * bands, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden))

    def forward(self, xyz01: Tensor) -> Tensor:
        angles = (xyz01.unsqueeze(-1) * self.freqs).flatten(1)
        return self.mlp(torch.cat((xyz01, angles.sin(), angles.cos()), dim=1))


class DecoderLayer(nn.Module):
    """Mask2Former order: queries cross-attend to voxels, then to each other, then an FFN (post-norm)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, hidden))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(3))

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor, mem_pos: Tensor) -> Tensor:
        """q, q_pos [1, Q, H]; memory, mem_pos [1, V, H]."""
        q = self.norms[0](q + self.cross(q + q_pos, memory + mem_pos, memory, need_weights=False)[0])
        qp = q + q_pos
        q = self.norms[1](q + self.self_attn(qp, qp, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


def class_cosines(embed: Tensor, text: Tensor, name_class: Tensor | None = None,
                  num_classes: int | None = None) -> Tensor:
    """embed [N, D]; text [T, D] one row per name; name_class [T] long class of each name (None: one
    name per class) -> [N, C] max over each class's names of the cosine."""
    per_name = cosine_logits(embed, text.to(embed.dtype), 1.0)
    if name_class is None:
        return per_name
    c = int(name_class.max()) + 1 if num_classes is None else num_classes
    index = name_class.to(per_name.device).expand_as(per_name)
    return per_name.new_full((embed.shape[0], c), -2.0).scatter_reduce(
        1, index, per_name, reduce="amax", include_self=False)


class OpenVocabClassifier(nn.Module):
    """The one classification head: ``logit(q, c) = s * max_{n in names(c)} cos(e_q, t_n) + b``.

    s (clamped to CLIP's cap of 100) and b are learned scalars shared by every class, so a class never
    trained on (novel) is scored exactly like a base class. The bias exists because the losses are
    sigmoid focal losses: without it a cosine of 0 would mean probability 0.5 for every class.
    """

    def __init__(self, init_scale: float, init_bias: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, embed: Tensor, text: Tensor, name_class: Tensor | None = None,
                num_classes: int | None = None) -> Tensor:
        """embed [..., D]; text, name_class as `class_cosines` -> logits [..., C]."""
        cos = class_cosines(embed.reshape(-1, embed.shape[-1]), text, name_class, num_classes)
        return (self.scale * cos + self.bias).reshape(*embed.shape[:-1], -1)


class FixedClassifier(nn.Module):
    """The PFC baseline's closed-set classifier: a learned linear layer on the class embedding with one
    output per base class, written into the vocabulary columns ``classes``; every other class of a
    vocabulary scores -inf (the classifier cannot name it). The text only fixes the vocabulary size:
    the columns are the training vocabulary's class ids (a benchmark baseline, not a live vocabulary)."""

    def __init__(self, embed_dim: int, classes: tuple[int, ...], init_bias: float) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, len(classes))
        nn.init.constant_(self.linear.bias, init_bias)
        self.register_buffer("classes", torch.tensor(classes, dtype=torch.long), persistent=False)
        self.min_classes = max(classes) + 1  # a host int: the per-call check reads no device tensor

    def forward(self, embed: Tensor, text: Tensor, name_class: Tensor | None = None,
                num_classes: int | None = None) -> Tensor:
        c = num_classes or (text.shape[0] if name_class is None else int(name_class.max()) + 1)
        if c < self.min_classes:
            raise ValueError(f"a vocabulary of {c} classes lacks the fixed classes {self.classes.tolist()}")
        own = self.linear(embed)
        out = own.new_full((*own.shape[:-1], c), float("-inf"))
        return out.index_copy(-1, self.classes, own)


def mask_pooled_clip(mask_logits: Tensor, clip: Tensor, clip_mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask_logits [Q, V]; clip [V, D] frozen voxel CLIP features valid where clip_mask [V] -> per query
    the unit mean of the CLIP features of the camera-seen voxels in its predicted mask (p > 0.5) [Q, D]
    (zero rows where none) and [Q] bool (it has one). What L_O distils and what the PFC baseline scores."""
    inside = (mask_logits > 0) & clip_mask.unsqueeze(0)
    pooled = F.normalize(inside.to(clip.dtype) @ torch.where(clip_mask.unsqueeze(1), clip, 0.0), dim=1)
    return pooled, inside.any(dim=1)


def pooled_clip_probs(class_logits: Tensor, pooled: Tensor, has: Tensor, text: Tensor,
                      name_class: Tensor | None = None, *, alpha: float, scale: float) -> Tensor:
    """The PFC baseline's class probabilities of one sample's queries [Q, C] (FC-CLIP's ensemble).

    class_logits [Q, C]: the fixed classifier's logits (-inf for the classes it cannot name);
    pooled [Q, D], has [Q]: `mask_pooled_clip`. p_in = sigmoid(logit), p_clip = softmax over the
    vocabulary of ``scale * cos(pooled, text)``. A class the classifier names gets
    ``p_in^(1 - alpha) * p_clip^alpha``, any other (novel) class p_clip alone; a query whose mask holds no
    camera-seen voxel keeps p_in (novel classes 0), as FC-CLIP's ensemble on valid masks."""
    p_in = class_logits.sigmoid()
    p_clip = (scale * class_cosines(pooled, text, name_class, class_logits.shape[1])).softmax(dim=1)
    named = torch.isfinite(class_logits)
    mixed = torch.where(named, p_in.pow(1 - alpha) * p_clip.pow(alpha), p_clip)
    return torch.where(has.unsqueeze(1), mixed, p_in)


class PanopticNet(nn.Module):
    """Voxel features -> query masks and CLIP-space class embeddings (module doc)."""

    def __init__(self, cfg: PanopticModelConfig, backend: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        m, h = cfg.model, cfg.head
        self.backbone = SparseUNet(m.backbone, backend)  # `sparse_backend.resolve` picks when None
        self.fusion = ConcatFusion(m.backbone.out_channels, m.embed_dim, h.hidden, h.fusion)
        self.position = PositionEmbedding(h.fourier_bands, h.hidden)
        # N(0, 1) as nn.Embedding (Mask2Former): near-identical queries would all attend alike and
        # predict the same mask, which the Hungarian matching cannot break
        self.query_feat = nn.Parameter(torch.randn(h.num_queries, h.hidden))
        self.query_pos = nn.Parameter(torch.randn(h.num_queries, h.hidden))
        self.layers = nn.ModuleList(DecoderLayer(h.hidden, h.num_heads, h.ffn) for _ in range(h.num_layers))
        self.mask_norm = nn.LayerNorm(h.hidden)  # mask features on one scale whatever the fusion outputs
        self.mask_embed = nn.Sequential(nn.Linear(h.hidden, h.hidden), nn.ReLU(inplace=True),
                                        nn.Linear(h.hidden, h.hidden))
        self.class_embed = nn.Sequential(nn.Linear(h.hidden, h.hidden), nn.ReLU(inplace=True),
                                         nn.Linear(h.hidden, m.embed_dim))
        self.classifier: OpenVocabClassifier | FixedClassifier = (
            FixedClassifier(m.embed_dim, h.base_classes, h.init_logit_bias) if h.classifier == "fixed"
            else OpenVocabClassifier(h.init_logit_scale, h.init_logit_bias))

    def voxelize(self, points: Tensor, batch_index: Tensor | None = None) -> Voxelization:
        return voxelize_points(points, self.cfg.model, batch_index)

    def _positions(self, vox: Voxelization) -> Tensor:
        zyx = vox.coords[:, 1:].to(torch.float32) + 0.5
        shape = torch.tensor(vox.spatial_shape, dtype=torch.float32, device=zyx.device)
        return self.position((zyx / shape).flip(1))  # (x, y, z) in [0, 1]

    def forward(self, points: Tensor, batch_index: Tensor | None = None, clip: Tensor | None = None,
                clip_mask: Tensor | None = None, *, vox: Voxelization | None = None,
                lap: Callable[[str], None] | None = None, generator: torch.Generator | None = None
                ) -> PanopticOutput:
        """points [N, C]; batch_index [N] long; clip [N, D] per-point CLIP features valid where
        clip_mask [N] bool (None: no camera, LiDAR only). ``vox``: the points' voxelisation when the
        caller already made it. ``lap(stage)`` is called after "voxelise" (when voxelised here) and
        "backbone" (U-Net + fusion + position embedding); the decoder runs after it (stage timings).
        ``generator`` (CPU) draws the training camera drop-out (the trainer's per-iteration
        generator, so resumed runs drop the same frames); None = the global RNG."""
        mark = lap or (lambda _stage: None)
        c = self.cfg.model.backbone.in_channels
        if vox is None:
            vox = self.voxelize(points, batch_index)
            mark("voxelise")
        p = points[vox.valid][:, :c]
        p2v = vox.point_to_voxel[vox.valid]
        if vox.num_voxels:
            voxel_in = voxel_mean(p, p2v, vox.num_voxels)
            lidar = self.backbone(voxel_in, vox.coords, vox.spatial_shape, vox.batch_size)
        else:  # nothing in range (or every point non-finite): sparse convolutions refuse empty input
            lidar = points.new_zeros(0, self.cfg.model.backbone.out_channels)
        vclip = vmask = None
        if clip is not None:
            if clip_mask is None:
                clip_mask = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
            vclip, vmask = voxel_clip_features(clip, clip_mask, vox)
        batch = vox.coords[:, 0].long()
        fused_mask = vmask
        if vmask is not None and self.training and self.cfg.head.camera_dropout > 0:
            draw = torch.rand(vox.batch_size, generator=generator) if generator is not None else \
                torch.rand(vox.batch_size, device=batch.device)
            dropped = draw.to(batch.device) < self.cfg.head.camera_dropout
            fused_mask = vmask & ~dropped[batch]
        feats = self.fusion(lidar, vclip, fused_mask)
        pos = self._positions(vox)
        offsets = torch.zeros(vox.batch_size + 1, dtype=torch.long, device=batch.device)
        offsets[1:] = torch.bincount(batch, minlength=vox.batch_size).cumsum(0)
        mark("backbone")
        masks, embeds = [], []
        for b in range(vox.batch_size):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            mem, mem_pos = feats[lo:hi].unsqueeze(0), pos[lo:hi].unsqueeze(0)
            q, q_pos = self.query_feat.unsqueeze(0), self.query_pos.unsqueeze(0)
            for layer in self.layers:
                q = layer(q, q_pos, mem, mem_pos)
            q = q.squeeze(0)
            masks.append(self.mask_embed(q) @ self.mask_norm((mem + mem_pos).squeeze(0)).t())
            embeds.append(F.normalize(self.class_embed(q), dim=-1))
        return PanopticOutput(vox, offsets, masks, torch.stack(embeds), vclip, vmask)

    def class_logits(self, out: PanopticOutput, text: Tensor, name_class: Tensor | None = None,
                     num_classes: int | None = None) -> Tensor:
        """[B, Q, C] logits of every query for a vocabulary (`OpenVocabClassifier`, `FixedClassifier`)."""
        return self.classifier(out.class_embed, text, name_class, num_classes)


def point_embeddings(out: PanopticOutput) -> Tensor:
    """[N, D] unit per-point embedding rebuilt from the queries (mask probability x class embedding,
    what L_V distils), zero outside the grid: the panoptic model's semantic point features."""
    rebuilt = [m.sigmoid().t() @ e for m, e in zip(out.mask_logits, out.class_embed)]
    voxel = F.normalize(torch.cat(rebuilt), dim=1)
    valid = out.vox.valid
    feats = voxel.new_zeros(valid.shape[0], voxel.shape[1])
    return feats.index_put((valid,), voxel[out.vox.point_to_voxel[valid]])
