"""Sparse voxelisation: points -> unique voxel coordinates (spconv order) and a point->voxel map.

Voxels are found with `torch.unique` over packed int64 keys, so memory is O(N) whatever the grid size
(a 0.05 m grid over a 100 m x 100 m x 8 m range has 6.4e8 cells; a dense table would need GBs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Voxelization:
    """coords: [V, 4] int32 (batch, z, y, x), sorted lexicographically; point_to_voxel: [N] long
    row into coords, -1 for points outside the range or non-finite; spatial_shape: (z, y, x)."""

    coords: torch.Tensor
    point_to_voxel: torch.Tensor
    spatial_shape: tuple[int, int, int]
    batch_size: int

    @property
    def valid(self) -> torch.Tensor:
        return self.point_to_voxel >= 0

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    def points_per_voxel(self) -> torch.Tensor:
        """[V] long: number of points in each voxel."""
        return torch.bincount(self.point_to_voxel[self.valid], minlength=self.num_voxels)


def _xyz_triplet(value: float | Sequence[float], what: str) -> tuple[float, float, float]:
    vals = (float(value),) * 3 if isinstance(value, int | float) else tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ValueError(f"{what} must be a float or 3 floats (x, y, z), got {value!r}")
    return vals  # type: ignore[return-value]


def grid_shape(voxel_size: float | Sequence[float], point_range: Sequence[float]) -> tuple[int, int, int]:
    """(z, y, x) cells of the grid; a range that is a whole number of voxels up to float error
    (51.2 / 0.1 = 511.99999...) is not rounded up to an extra sliver voxel."""
    size = _xyz_triplet(voxel_size, "voxel_size")
    if len(point_range) != 6:
        raise ValueError(
            f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {point_range!r}"
        )
    lo, hi = point_range[:3], point_range[3:]
    if any(not (s > 0 and math.isfinite(s)) for s in size):
        raise ValueError(f"voxel_size must be positive and finite, got {size}")
    if any(not (h > l) for l, h in zip(lo, hi)) or not all(map(math.isfinite, point_range)):
        raise ValueError(f"point_range must have finite min < max per axis, got {tuple(point_range)}")
    cells = []
    for l, h, s in zip(lo, hi, size):
        c = (h - l) / s
        cells.append(round(c) if abs(c - round(c)) < 1e-6 * max(1.0, c) else math.ceil(c))
    return cells[2], cells[1], cells[0]


def voxelize(
    xyz: torch.Tensor,
    voxel_size: float | Sequence[float],
    point_range: Sequence[float],
    batch_index: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
) -> Voxelization:
    """Assign points [N, >=3] (x, y, z first) to voxels of `voxel_size` inside the half-open box
    `point_range` = (x_min, y_min, z_min, x_max, y_max, z_max). `batch_index` [N] long (>= 0) keeps
    samples apart; `batch_size` defaults to max(batch_index) + 1 (1 without batch_index)."""
    if xyz.ndim != 2 or xyz.shape[1] < 3:
        raise ValueError(f"xyz must be [N, >=3], got {tuple(xyz.shape)}")
    nz, ny, nx = grid_shape(voxel_size, point_range)
    size = _xyz_triplet(voxel_size, "voxel_size")
    n, device = xyz.shape[0], xyz.device
    if batch_index is None:
        batch_index = torch.zeros(n, dtype=torch.long, device=device)
    else:
        if batch_index.shape != (n,):
            raise ValueError(f"batch_index must be [N={n}], got {tuple(batch_index.shape)}")
        batch_index = batch_index.to(device=device, dtype=torch.long)
        if n and int(batch_index.min()) < 0:
            raise ValueError("batch_index must be >= 0")
    inferred = int(batch_index.max()) + 1 if n else 1
    batch_size = inferred if batch_size is None else int(batch_size)
    if batch_size < inferred:
        raise ValueError(f"batch_size={batch_size} but batch_index reaches {inferred - 1}")
    if batch_size * nz * ny * nx >= 2**62:
        raise ValueError(f"grid {batch_size}x{nz}x{ny}x{nx} too large for int64 keys")

    # float64 so that coordinates far from the origin still floor to the right cell.
    p = xyz[:, :3].to(torch.float64)
    lo = torch.tensor(point_range[:3], dtype=torch.float64, device=device)
    cell = torch.floor((p - lo) / torch.tensor(size, dtype=torch.float64, device=device))
    shape_xyz = torch.tensor((nx, ny, nz), dtype=torch.float64, device=device)
    hi = torch.tensor(point_range[3:], dtype=torch.float64, device=device)
    # p < hi as well: when the range is not a whole number of voxels the last cell sticks out past it.
    inside = (cell >= 0).all(dim=1) & (cell < shape_xyz).all(dim=1) & (p < hi).all(dim=1)
    valid = torch.isfinite(p).all(dim=1) & inside
    cell = torch.where(valid.unsqueeze(1), cell, torch.zeros_like(cell)).long()

    key = ((batch_index * nz + cell[:, 2]) * ny + cell[:, 1]) * nx + cell[:, 0]
    uniq, inverse = torch.unique(key[valid], sorted=True, return_inverse=True)
    point_to_voxel = torch.full((n,), -1, dtype=torch.long, device=device)
    point_to_voxel[valid] = inverse

    x = uniq % nx
    y = (uniq // nx) % ny
    z = (uniq // (nx * ny)) % nz
    b = uniq // (nx * ny * nz)
    coords = torch.stack((b, z, y, x), dim=1).to(torch.int32)
    return Voxelization(
        coords=coords, point_to_voxel=point_to_voxel, spatial_shape=(nz, ny, nx), batch_size=batch_size
    )


def voxel_mean(features: torch.Tensor, point_to_voxel: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Mean of per-point `features` [N, C] over each voxel -> [V, C]; points with index -1 are ignored
    and empty voxels get zeros. Differentiable w.r.t. features (index_add_)."""
    if features.shape[0] != point_to_voxel.shape[0]:
        raise ValueError(
            f"features ({features.shape[0]}) and point_to_voxel ({point_to_voxel.shape[0]}) "
            "must have the same length"
        )
    valid = point_to_voxel >= 0
    idx = point_to_voxel[valid]
    feats = features[valid]
    out = features.new_zeros((num_voxels, *features.shape[1:]))
    out = out.index_add(0, idx, feats)
    count = torch.bincount(idx, minlength=num_voxels).clamp_(min=1).to(features.dtype)
    return out / count.view(-1, *([1] * (features.ndim - 1)))
