"""Vectorised ray casting against a `Scene` (shared by the LiDAR and the camera renderer).

All rays of one sensor share an origin, so a ray can only hit a primitive whose bounding sphere it
points into (angle to the centre below the sphere's angular radius); that test runs hierarchically
over angular tiles of rays (`_candidate_pairs`). Exact intersections then run on the (ray,
primitive) candidate pairs only, grouped by primitive kind, and the nearest hit per ray wins (the
ground plane z = 0 included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip3d_core.data.synthetic.world import BOX, ELLIPSOID, FRUSTUM, Scene

GROUND = -1  # `Hits.primitive` of ground hits
MISS = -2  # ... and of rays that hit nothing within range
_EPS = 1e-6


@dataclass(frozen=True)
class Hits:
    """Per ray: distance `t` (inf on a miss), world `point`, unit `normal` facing the ray,
    `primitive` index (GROUND / MISS otherwise)."""

    t: np.ndarray  # [N]
    point: np.ndarray  # [N, 3]
    normal: np.ndarray  # [N, 3]
    primitive: np.ndarray  # [N] int64

    @property
    def hit(self) -> np.ndarray:
        return self.primitive != MISS


def _safe(q: np.ndarray) -> np.ndarray:
    return np.where(np.abs(q) < 1e-12, np.where(q < 0, -1e-12, 1e-12), q)


def _hit_boxes(o: np.ndarray, d: np.ndarray, c: np.ndarray, half: np.ndarray, yaw: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in the box frame (yaw about z)."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    p = o - c
    P = np.stack([cy * p[:, 0] + sy * p[:, 1], -sy * p[:, 0] + cy * p[:, 1], p[:, 2]], 1)
    Q = _safe(np.stack([cy * d[:, 0] + sy * d[:, 1], -sy * d[:, 0] + cy * d[:, 1], d[:, 2]], 1))
    t1, t2 = (-half - P) / Q, (half - P) / Q
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = tn.argmax(1)
    tnear = np.take_along_axis(tn, axis[:, None], 1)[:, 0]
    tfar = tf.min(1)
    t = np.where((tnear <= tfar) & (tnear > _EPS), tnear, np.inf)
    nl = np.zeros_like(P)
    rows = np.arange(len(axis))
    nl[rows, axis] = -np.sign(Q[rows, axis])
    n = np.stack([cy * nl[:, 0] - sy * nl[:, 1], sy * nl[:, 0] + cy * nl[:, 1], nl[:, 2]], 1)
    return t, n


def _hit_frusta(o: np.ndarray, d: np.ndarray, c: np.ndarray, size: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Vertical truncated cones: radius r(z) = rm + k z along the local axis z in [-h, h], plus caps."""
    r0, r1, h = size[:, 0], size[:, 1], size[:, 2]
    p = o - c
    rm, k = (r0 + r1) / 2, (r1 - r0) / (2 * h)
    e, f = rm + k * p[:, 2], k * d[:, 2]  # radius along the ray: e + f t
    A = d[:, 0] ** 2 + d[:, 1] ** 2 - f**2
    B = 2 * (p[:, 0] * d[:, 0] + p[:, 1] * d[:, 1] - e * f)
    C = p[:, 0] ** 2 + p[:, 1] ** 2 - e**2
    disc = B**2 - 4 * A * C
    sq = np.sqrt(np.maximum(disc, 0.0))
    A_safe = _safe(A)
    t_side = np.full(len(p), np.inf)
    for root in ((-B - sq) / (2 * A_safe), (-B + sq) / (2 * A_safe)):
        z = p[:, 2] + root * d[:, 2]
        ok = (disc >= 0) & (root > _EPS) & (np.abs(z) <= h) & (e + f * root >= 0)
        t_side = np.where(ok & (root < t_side), root, t_side)
    dz = _safe(d[:, 2])
    t_cap = np.full(len(p), np.inf)
    cap_n = np.zeros(len(p))
    for zc, rc, nz in ((-h, r0, -1.0), (h, r1, 1.0)):
        tc = (zc - p[:, 2]) / dz
        x, y = p[:, 0] + tc * d[:, 0], p[:, 1] + tc * d[:, 1]
        ok = (tc > _EPS) & (x * x + y * y <= rc * rc) & (tc < t_cap)
        t_cap = np.where(ok, tc, t_cap)
        cap_n = np.where(ok, nz, cap_n)
    side = t_side <= t_cap
    t = np.minimum(t_side, t_cap)
    ts = np.where(np.isfinite(t), t, 0.0)
    q = p + ts[:, None] * d
    n_side = np.stack([q[:, 0], q[:, 1], -k * (e + f * ts)], 1)
    n_cap = np.stack([np.zeros_like(cap_n), np.zeros_like(cap_n), cap_n], 1)
    n = np.where(side[:, None], n_side, n_cap)
    return t, n


def _hit_ellipsoids(o: np.ndarray, d: np.ndarray, c: np.ndarray, radii: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    p, q = (o - c) / radii, d / radii
    A, B, C = (q * q).sum(1), 2 * (p * q).sum(1), (p * p).sum(1) - 1
    disc = B**2 - 4 * A * C
    t = (-B - np.sqrt(np.maximum(disc, 0.0))) / (2 * A)
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    ts = np.where(np.isfinite(t), t, 0.0)
    n = (p + ts[:, None] * q) / radii
    return t, n


def _candidate_pairs(dirs: np.ndarray, axis: np.ndarray, radius: np.ndarray, dist: np.ndarray,
                     tile_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(ray, primitive) pairs whose ray points into the primitive's bounding sphere.

    Two levels: rays are binned into `tile_deg` azimuth/elevation tiles, each tile's bounding cone
    is tested against every sphere's angular extent, and only rays of candidate tiles are tested
    one by one. Spheres containing the origin match every ray.
    """
    inside = dist <= radius
    sin_r = np.clip(radius / np.maximum(dist, 1e-9), 0.0, 1.0)  # sphere's angular radius as sin / cos
    cos_r = np.sqrt(1.0 - sin_r**2)
    b = np.radians(tile_deg)
    az = np.floor(np.arctan2(dirs[:, 1], dirs[:, 0]) / b).astype(np.int64)
    el = np.floor(np.arcsin(np.clip(dirs[:, 2], -1.0, 1.0)) / b).astype(np.int64)
    tiles, inv = np.unique(az * 4096 + el, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=len(tiles))
    starts = np.cumsum(counts) - counts
    centre = np.stack([np.bincount(inv, dirs[:, k], len(tiles)) for k in range(3)], 1)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    cos_in = np.einsum("ij,ij->i", dirs[order], centre[inv[order]])
    cos_t = np.clip(np.minimum.reduceat(cos_in, starts), -1.0, 1.0)
    sin_t = np.sqrt(1.0 - cos_t**2)
    # angle(tile centre, sphere centre) <= tile radius + sphere radius, as cosines: cos(a) >= cos(t + r)
    # (both radii are < pi / 2 for outside spheres, so the sum stays below pi)
    thr = np.multiply.outer(cos_t, cos_r) - np.multiply.outer(sin_t, sin_r) - 1e-5
    thr[:, inside] = -2.0
    t_idx, p_idx = np.nonzero(centre.astype(np.float32) @ axis.T.astype(np.float32) >= thr)
    # expand candidate (tile, primitive) pairs to the tile's rays
    n_per = counts[t_idx]
    total = int(n_per.sum())
    first = np.repeat(starts[t_idx] - (np.cumsum(n_per) - n_per), n_per)
    ray = order[first + np.arange(total)]
    prim = np.repeat(p_idx, n_per)
    cos_lim = np.where(inside, -2.0, cos_r - 1e-5).astype(np.float32)
    keep = np.einsum("ij,ij->i", dirs.astype(np.float32)[ray], axis.astype(np.float32)[prim]) >= cos_lim[prim]
    return ray[keep], prim[keep]


def cast_rays(scene: Scene, origin: np.ndarray, dirs: np.ndarray, time: float, max_t: float,
              tile_deg: float = 2.0) -> Hits:
    """Nearest hit of rays `origin + t * dirs` (dirs [N, 3] unit, world frame) with the scene at `time`."""
    origin = np.asarray(origin, dtype=np.float64)
    dirs = np.asarray(dirs, dtype=np.float64)
    n = len(dirs)
    best_t = np.full(n, np.inf)
    best_p = np.full(n, MISS, dtype=np.int64)

    # ground plane z = 0 (the sensor is above it)
    down = dirs[:, 2] < -1e-9
    tg = np.where(down, -origin[2] / np.where(down, dirs[:, 2], -1.0), np.inf)
    ground = (tg > _EPS) & (tg <= max_t)
    best_t[ground] = tg[ground]
    best_p[ground] = GROUND

    centers = scene.centers_at(time)
    radius = scene.bounding_radius() * 1.01 + 0.05
    rel = centers - origin
    dist = np.linalg.norm(rel, axis=1)
    near = np.flatnonzero(dist - radius < max_t)
    if near.size:
        ray, prim = _candidate_pairs(dirs, rel[near] / np.maximum(dist[near], 1e-9)[:, None],
                                     radius[near], dist[near], tile_deg)
        prim = near[prim]
        # a primitive whose bounding sphere starts beyond the ray's ground hit cannot be nearer
        ahead = dist[prim] - radius[prim] < best_t[ray]
        ray, prim = ray[ahead], prim[ahead]
        t = np.full(len(ray), np.inf)
        normals = np.zeros((len(ray), 3))
        kinds = scene.kind[prim]
        for kind in (BOX, FRUSTUM, ELLIPSOID):
            sel = np.flatnonzero(kinds == kind)
            if not sel.size:
                continue
            o, d, c, sz = origin, dirs[ray[sel]], centers[prim[sel]], scene.size[prim[sel]]
            if kind == BOX:
                t[sel], normals[sel] = _hit_boxes(o, d, c, sz, scene.yaw[prim[sel]])
            elif kind == FRUSTUM:
                t[sel], normals[sel] = _hit_frusta(o, d, c, sz)
            else:
                t[sel], normals[sel] = _hit_ellipsoids(o, d, c, sz)
        keep = np.isfinite(t) & (t <= max_t)
        ray, prim, t, normals = ray[keep], prim[keep], t[keep], normals[keep]
        # nearest primitive per ray (scatter-min; exact ties go to the lower primitive index)
        t_min = np.full(n, np.inf)
        np.minimum.at(t_min, ray, t)
        tied = t == t_min[ray]
        p_min = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(p_min, ray[tied], prim[tied])
        win = tied & (prim == p_min[ray]) & (t < best_t[ray])
        ray, prim, t, normals = ray[win], prim[win], t[win], normals[win]
        best_t[ray] = t
        best_p[ray] = prim
        prim_normals = np.zeros((n, 3))
        prim_normals[ray] = normals
    else:
        prim_normals = np.zeros((n, 3))

    normal = np.where((best_p == GROUND)[:, None], np.array([0.0, 0.0, 1.0]), prim_normals)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    # face the ray (both sides of thin plates are visible)
    normal *= np.where((normal * dirs).sum(1) > 0, -1.0, 1.0)[:, None]
    point = origin + np.where(np.isfinite(best_t), best_t, 0.0)[:, None] * dirs
    return Hits(t=best_t, point=point, normal=normal, primitive=best_p)
