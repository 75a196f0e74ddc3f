"""Clip3DNet: points -> voxels -> sparse U-Net -> per-point CLIP-space features (+ optional fusion)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clip3d_core.geometry import Voxelization, voxel_mean, voxelize
from clip3d_core.model.config import ModelConfig
from clip3d_core.model.fusion import GatedFusion
from clip3d_core.model.head import CosineClassifier, ProjectionHead, mlp
from clip3d_core.model.unet import SparseUNet


@dataclass
class PointOutput:
    """One row per input point, input order. ``features`` is L2-normalised, zero where not ``valid``."""

    features: Tensor  # [N, D]
    valid: Tensor  # [N] bool: finite and inside the model's point range


def voxelize_points(points: Tensor, cfg: ModelConfig, batch_index: Tensor | None = None) -> Voxelization:
    """Assign points [N, >=3] to the model's voxel grid. Out-of-range points and points with any
    non-finite input channel (e.g. a NaN intensity) are invalid: one NaN in a voxel mean would
    spread through the convolutions to every neighbour."""
    xyz = points[:, :3]
    finite = torch.isfinite(points[:, : cfg.backbone.in_channels]).all(dim=1, keepdim=True)
    xyz = torch.where(finite, xyz, torch.full_like(xyz, float("nan")))
    return voxelize(xyz, cfg.voxel_size, cfg.point_range, batch_index)


class Clip3DNet(nn.Module):
    """The 3D student: a point's feature is its voxel's U-Net feature concatenated with a small MLP
    of the raw point (and its offset inside the voxel), projected into CLIP's embedding space.

    The stages are public (`voxelize`, `encode`, `fuse`, `logits`) so inference can time them and
    reuse point features across vocabularies; `forward` chains them for training.
    """

    def __init__(self, cfg: ModelConfig, backend: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        b = cfg.backbone
        self.backbone = SparseUNet(b, backend)  # `sparse_backend.resolve` picks when None
        self.point_mlp = mlp(b.in_channels + 3, b.point_channels, b.point_channels, b.bn_eps, b.bn_momentum)
        self.head = ProjectionHead(b.out_channels + b.point_channels, cfg.head_hidden, cfg.embed_dim)
        self.fusion = GatedFusion(cfg.embed_dim, cfg.fusion_hidden) if cfg.fusion else None
        self.classifier = CosineClassifier(
            cfg.init_temperature, cfg.learn_temperature, cfg.min_temperature, cfg.max_temperature
        )

    @property
    def temperature(self) -> Tensor:
        return self.classifier.temperature

    @property
    def dtype(self) -> torch.dtype:
        """The network's compute dtype (fp16/bf16 after `.half()`/`.bfloat16()`): `encode` and `fuse`
        cast their inputs to it and return float32 features, so voxelisation and classification
        stay in float32 whatever the network runs in."""
        return self.head.net[0].weight.dtype

    def voxelize(self, points: Tensor, batch_index: Tensor | None = None) -> Voxelization:
        return voxelize_points(points, self.cfg, batch_index)

    def encode(self, points: Tensor, vox: Voxelization) -> PointOutput:
        """Per-point features from the 3D network alone. points [N, >= in_channels]."""
        c = self.cfg.backbone.in_channels
        if points.ndim != 2 or points.shape[1] < c:
            raise ValueError(f"points must be [N, >={c}] (x, y, z, intensity...), got {tuple(points.shape)}")
        valid = vox.valid
        idx = valid.nonzero().squeeze(1)
        out = points.new_zeros(points.shape[0], self.cfg.embed_dim)
        if idx.numel() == 0:
            return PointOutput(out, valid)
        # Only valid rows enter the network: a NaN point must not reach BatchNorm statistics.
        p = points.index_select(0, idx)[:, :c]
        p2v = vox.point_to_voxel.index_select(0, idx)
        voxel_in = voxel_mean(p, p2v, vox.coords.shape[0])
        dtype = self.dtype  # means and offsets in the input's precision, then cast (fp16 loses cm at 50 m)
        voxel_feat = self.backbone(voxel_in.to(dtype), vox.coords, vox.spatial_shape, vox.batch_size)
        offset = (p[:, :3] - voxel_in.index_select(0, p2v)[:, :3]) / self.cfg.voxel_size
        point_feat = self.point_mlp(torch.cat((p, offset), dim=1).to(dtype))
        f = self.head(torch.cat((voxel_feat.index_select(0, p2v), point_feat), dim=1))
        return PointOutput(out.index_copy(0, idx, f.to(out.dtype)), valid)

    def fuse(self, out: PointOutput, clip_features: Tensor, clip_mask: Tensor | None = None) -> PointOutput:
        """Fuse sampled CLIP features [N, D] into the points where ``clip_mask`` (and valid) holds."""
        if self.fusion is None:
            raise ValueError("this model was built with fusion=False; it takes no CLIP features")
        mask = out.valid if clip_mask is None else clip_mask & out.valid
        dtype = self.dtype
        fused = self.fusion(out.features.to(dtype), clip_features.to(dtype), mask)
        return PointOutput(fused.to(out.features.dtype), out.valid)

    def forward(
        self,
        points: Tensor,
        batch_index: Tensor | None = None,
        clip_features: Tensor | None = None,
        clip_mask: Tensor | None = None,
    ) -> PointOutput:
        """points [N, C], batch_index [N] long (None: one sample) -> `PointOutput`."""
        out = self.encode(points, self.voxelize(points, batch_index))
        if clip_features is not None:
            out = self.fuse(out, clip_features, clip_mask)
        return out

    def logits(self, features: Tensor, text: Tensor, normalized: bool = False) -> Tensor:
        """[N, D] features x [C, D] text embeddings -> [N, C] cosine logits / temperature
        (``normalized``: both are already unit rows, see `CosineClassifier`)."""
        return self.classifier(features, text, normalized)
