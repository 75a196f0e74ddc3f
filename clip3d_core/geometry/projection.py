"""LiDAR -> image projection for several cameras at once, with a sparse depth-buffer occlusion test."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip3d_core.geometry.camera import CalibrationError, PinholeCamera

# `uv` of points that have no meaningful projection (behind the camera, non-finite): outside every image.
INVALID_UV = -1.0


@dataclasses.dataclass(frozen=True)
class Projection:
    """Per camera m and point n: pixel `uv[m, n]` (u = column, v = row; pixel i spans [i, i+1)),
    camera-frame `depth[m, n]` (z), `in_image` (depth > min_depth and inside the image) and
    `visible` (in_image and not hidden behind a nearer surface). `uv` is the pinhole(+distortion)
    projection for points in front of the camera and `INVALID_UV` elsewhere."""

    uv: torch.Tensor
    depth: torch.Tensor
    in_image: torch.Tensor
    visible: torch.Tensor

    @property
    def num_cameras(self) -> int:
        return int(self.uv.shape[0])

    def first_visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each point the lowest-index camera that sees it (-1 for none) and its pixel there
        (`INVALID_UV` for none)."""
        n = self.visible.shape[1]
        if self.num_cameras == 0:
            return (
                torch.full((n,), -1, dtype=torch.long, device=self.uv.device),
                torch.full((n, 2), INVALID_UV, dtype=self.uv.dtype, device=self.uv.device),
            )
        seen = self.visible.any(dim=0)
        # argmax over a 0/1 tensor returns the first maximal index: the first camera that sees the point.
        cam = torch.argmax(self.visible.to(torch.uint8), dim=0)
        uv = self.uv.gather(0, cam.view(1, n, 1).expand(1, n, 2)).squeeze(0)
        cam = torch.where(seen, cam, torch.full_like(cam, -1))
        uv = torch.where(seen.unsqueeze(-1), uv, torch.full_like(uv, INVALID_UV))
        return cam, uv


def _max_undistorted_radius2(d: np.ndarray | None) -> float:
    """Largest squared normalised radius where the radial plumb_bob map r -> r * (1 + k1 r² + k2 r⁴ +
    k3 r⁶) is still increasing. Beyond it the polynomial folds back and would place points far
    outside the field of view inside the image, so such points are treated as not in the image."""
    if d is None or not np.any(d[[0, 1, 4]]):
        return float("inf")
    k1, k2, k3 = d[0], d[1], d[4]
    # d(r_d)/dr = 1 + 3 k1 s + 5 k2 s² + 7 k3 s³ with s = r²; smallest positive real root.
    roots = np.roots([7 * k3, 5 * k2, 3 * k1, 1.0])
    real = roots[np.isclose(roots.imag, 0.0) & (roots.real > 0)].real
    return float(real.min()) if real.size else float("inf")


def _stack_cameras(
    cameras: Sequence[PinholeCamera], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    T = np.stack([c.T_cam_lidar for c in cameras])
    K = np.stack([c.K for c in cameras])
    D = np.stack([c.D if c.D is not None else np.zeros(5) for c in cameras])
    r2_max = np.array([_max_undistorted_radius2(c.D) for c in cameras])
    size = np.array([[c.width, c.height] for c in cameras], dtype=np.float64)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    return {
        "R": t(T[:, :3, :3]),
        "t": t(T[:, :3, 3]),
        "K": t(K),
        "D": t(D),
        "r2_max": t(r2_max),
        "size": t(size),
    }


def _distort(xn: torch.Tensor, yn: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV plumb_bob on normalised coordinates; xn, yn: [M, N], D: [M, 5]."""
    k1, k2, p1, p2, k3 = (D[:, i : i + 1] for i in range(5))
    r2 = xn * xn + yn * yn
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xy = xn * yn
    xd = xn * radial + 2 * p1 * xy + p2 * (r2 + 2 * xn * xn)
    yd = yn * radial + p1 * (r2 + 2 * yn * yn) + 2 * p2 * xy
    return xd, yd


def _local_min_depth(
    uv: torch.Tensor,
    depth: torch.Tensor,
    in_image: torch.Tensor,
    size: torch.Tensor,
    cell: tuple[int, int],
    window: int,
) -> torch.Tensor:
    """[M, N]: minimum depth of in-image points in each point's `cell`-pixel bin (du, dv), min-pooled
    over `window` x `window` bins (inf for points outside the image). Without pooling only occupied
    bins are materialised (unique keys); with pooling a per-camera bin grid (image / cell, 2D)."""
    m, n = depth.shape
    gw = int(torch.ceil(size[:, 0].max() / cell[0]).item())
    gh = int(torch.ceil(size[:, 1].max() / cell[1]).item())
    idx = (uv / uv.new_tensor(cell)).floor().long()
    cam = torch.arange(m, device=depth.device).view(m, 1).expand(m, n)
    flat = ((cam * gh + idx[..., 1].clamp(0, gh - 1)) * gw + idx[..., 0].clamp(0, gw - 1))[in_image]
    d = depth[in_image]
    if window == 1:
        bins, inverse = torch.unique(flat, return_inverse=True)
        zbuf = torch.full((bins.numel(),), float("inf"), dtype=d.dtype, device=d.device)
        local = zbuf.scatter_reduce_(0, inverse, d, reduce="amin")[inverse]
    else:
        zbuf = torch.full((m * gh * gw,), float("inf"), dtype=d.dtype, device=d.device)
        zbuf.scatter_reduce_(0, flat, d, reduce="amin")
        zbuf = -F.max_pool2d(-zbuf.view(m, 1, gh, gw), kernel_size=window, stride=1, padding=window // 2)
        local = zbuf.reshape(-1)[flat]
    out = torch.full_like(depth, float("inf"))
    out[in_image] = local
    return out


def project_points(
    xyz: torch.Tensor,
    cameras: Sequence[PinholeCamera],
    *,
    occlusion: bool = True,
    min_depth: float = 0.1,
    occlusion_tolerance: float = 0.5,
    occlusion_relative: float = 0.05,
    occlusion_patch: int | tuple[int, int] = (4, 16),
    occlusion_window: int = 3,
    occlusion_ratio: float | None = 1.0,
) -> Projection:
    """Project LiDAR-frame points `xyz` [N, 3] into every camera at once -> `Projection` of [M, N].

    Occlusion uses the LiDAR points themselves as a sparse z-buffer, at two scales:
    - same pixel: a point is hidden when a point in its pixel is nearer by more than
      max(occlusion_tolerance m, occlusion_relative * depth) (range noise grows with distance);
    - neighbourhood: `occlusion_patch` (du, dv) pixel bins min-pooled over `occlusion_window` bins;
      a point is hidden when it is farther than (1 + occlusion_ratio) * that minimum +
      occlusion_tolerance. LiDAR returns are sparse in the image (nuScenes rings ~30 px apart), and
      the LiDAR/camera offset shifts background points by f * b * (1/d_near - 1/d_far) pixels onto
      foreground objects; that shift is large only for large depth ratios, so a ratio test over a
      tall neighbourhood removes those leaks without eating sloped ground, whose neighbouring rings
      differ in depth by far less than 2x. `occlusion_ratio=None` disables this scale."""
    if xyz.ndim != 2 or xyz.shape[1] < 3:
        raise ValueError(f"xyz must be [N, 3], got {tuple(xyz.shape)}")
    patch = (occlusion_patch, occlusion_patch) if isinstance(occlusion_patch, int) else tuple(occlusion_patch)
    if len(patch) != 2 or min(patch) < 1 or occlusion_window < 1 or occlusion_window % 2 == 0:
        raise ValueError(
            f"occlusion_patch must be >= 1 and occlusion_window odd >= 1, got "
            f"{occlusion_patch}, {occlusion_window}"
        )
    for cam in cameras:
        if not isinstance(cam, PinholeCamera):
            raise CalibrationError(f"expected PinholeCamera, got {type(cam).__name__}")
    xyz = xyz[:, :3]
    if not xyz.is_floating_point():
        xyz = xyz.float()
    n, m = xyz.shape[0], len(cameras)
    dtype, device = xyz.dtype, xyz.device
    if m == 0:
        empty_b = torch.zeros((0, n), dtype=torch.bool, device=device)
        return Projection(
            torch.zeros((0, n, 2), dtype=dtype, device=device),
            torch.zeros((0, n), dtype=dtype, device=device),
            empty_b,
            empty_b,
        )

    cam = _stack_cameras(cameras, dtype, device)
    pts = torch.einsum("mij,nj->mni", cam["R"], xyz) + cam["t"].unsqueeze(1)  # [M, N, 3]
    depth = pts[..., 2]
    front = (depth > min_depth) & torch.isfinite(pts).all(dim=-1)
    z = torch.where(front, depth, torch.ones_like(depth))
    xn, yn = pts[..., 0] / z, pts[..., 1] / z
    within_model = torch.ones_like(front)
    if any(c.has_distortion for c in cameras):
        within_model = (xn * xn + yn * yn) < cam["r2_max"].unsqueeze(1)
        xn, yn = _distort(xn, yn, cam["D"])
    K = cam["K"]
    u = K[:, 0, 0:1] * xn + K[:, 0, 1:2] * yn + K[:, 0, 2:3]
    v = K[:, 1, 1:2] * yn + K[:, 1, 2:3]
    uv = torch.stack((u, v), dim=-1)
    uv = torch.where(front.unsqueeze(-1), uv, torch.full_like(uv, INVALID_UV))

    w, h = cam["size"][:, 0:1], cam["size"][:, 1:2]
    in_image = front & within_model & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    visible = in_image
    if occlusion and n > 0:
        size = cam["size"]
        zmin = _local_min_depth(uv, depth, in_image, size, (1, 1), 1)
        hidden = depth > zmin + torch.clamp(depth * occlusion_relative, min=occlusion_tolerance)
        if occlusion_ratio is not None:
            zmin = _local_min_depth(uv, depth, in_image, size, patch, occlusion_window)
            hidden |= depth > zmin * (1.0 + occlusion_ratio) + occlusion_tolerance
        visible = in_image & ~hidden
    return Projection(uv=uv, depth=depth, in_image=in_image, visible=visible)
