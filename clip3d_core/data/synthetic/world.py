"""Procedural street scenes as analytic primitives with exact semantic and instance ids.

World frame: x along the street, y to the left of a car driving +x, z up, road surface at z = 0.
Lanes (road half width W = 7 m by default): y in [-W, -W/2] right lane (+x: slower traffic,
bicyclists, motorcyclists, cones and barriers at the kerb), [-W/2, 0] the ego lane (+x at ego speed),
[0, W/2] oncoming traffic (-x), [W/2, W] parked vehicles. Sidewalks are raised kerb boxes, grass
lies between sidewalk and buildings, cross streets cut through at random spacing.

Primitives: yaw-rotated boxes, vertical frusta (cylinders when both radii agree, cones for
traffic cones) and axis-aligned ellipsoids (tree crowns, heads). Every primitive moves with a
constant velocity so one scene serves a whole drive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clip3d_core.data.synthetic.config import SceneConfig

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "grass",
    "building",
    "tree",
    "fence",
    "pole",
    "traffic sign",
    "traffic light",
    "car",
    "truck",
    "bus",
    "pedestrian",
    "bicyclist",
    "motorcyclist",
    "traffic cone",
    "barrier",
)
CLASS_ID = {name: i for i, name in enumerate(CLASS_NAMES)}
# Semantic id of clutter: objects and surfaces that belong to no class (bins, benches, kiosks,
# planters, ramps...). Pixel labels keep it (the simulated teacher sees clutter, unlike sky = -1);
# LiDAR point labels turn it into -1, ignore, as SemanticKITTI's "unlabeled" / "other-object".
CLUTTER = -2
# Countable objects get instance ids (> 0); surfaces and background stay 0 (panoptic convention).
THING_CLASSES: frozenset[str] = frozenset(
    {"car", "truck", "bus", "pedestrian", "bicyclist", "motorcyclist", "traffic cone", "barrier"}
)

BOX, FRUSTUM, ELLIPSOID = 0, 1, 2

# LiDAR reflectivity in [0, 1] per class (asphalt dark, retro-reflective signs bright).
REFLECTIVITY = np.array(
    [0.12, 0.28, 0.4, 0.3, 0.45, 0.3, 0.35, 0.9, 0.3, 0.45, 0.45, 0.45, 0.25, 0.3, 0.35, 0.75, 0.4]
)
_ROAD_RGB = (0.33, 0.33, 0.35)
_MARKING_RGB = (0.92, 0.92, 0.86)
_GRASS_RGB = (0.3, 0.52, 0.2)
_PALETTES: dict[str, list[tuple[float, float, float]]] = {
    "sidewalk": [(0.62, 0.6, 0.56)],
    "building": [(0.72, 0.62, 0.5), (0.56, 0.52, 0.5), (0.82, 0.78, 0.68), (0.62, 0.36, 0.3),
                 (0.76, 0.77, 0.8)],
    "tree": [(0.17, 0.42, 0.14), (0.22, 0.48, 0.18), (0.28, 0.44, 0.12)],
    "trunk": [(0.4, 0.28, 0.18)],
    "fence": [(0.52, 0.44, 0.33), (0.55, 0.57, 0.6)],
    "pole": [(0.46, 0.46, 0.48)],
    "traffic sign": [(0.1, 0.3, 0.8), (0.85, 0.1, 0.1), (0.95, 0.8, 0.1)],
    "traffic light": [(0.16, 0.16, 0.13)],
    "car": [(0.8, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.12, 0.12, 0.12), (0.5, 0.52, 0.55),
            (0.2, 0.45, 0.25)],
    "truck": [(0.9, 0.9, 0.88), (0.2, 0.35, 0.6), (0.75, 0.3, 0.1)],
    "bus": [(0.92, 0.75, 0.1), (0.2, 0.4, 0.8), (0.85, 0.2, 0.15)],
    "clothes": [(0.2, 0.25, 0.5), (0.55, 0.1, 0.12), (0.15, 0.15, 0.15), (0.8, 0.75, 0.6), (0.3, 0.5, 0.3)],
    "skin": [(0.85, 0.66, 0.52), (0.55, 0.38, 0.26), (0.72, 0.52, 0.4)],
    "bike": [(0.15, 0.15, 0.16), (0.7, 0.1, 0.1), (0.2, 0.3, 0.7)],
    "traffic cone": [(1.0, 0.45, 0.05)],
    "barrier": [(0.78, 0.78, 0.74), (0.85, 0.15, 0.1)],
    "tyre": [(0.06, 0.06, 0.06)],
    "clutter": [(0.35, 0.38, 0.3), (0.6, 0.55, 0.45), (0.2, 0.3, 0.45), (0.7, 0.7, 0.72), (0.45, 0.3, 0.2)],
}


@dataclass(frozen=True)
class StreetLayout:
    """The ground z = 0: road where |y| < W or within a cross street, grass elsewhere."""

    road_half_width: float
    cross_x: np.ndarray  # [S] cross-street centre lines x
    cross_half_width: float

    def in_cross(self, x: np.ndarray, margin: float = 0.0) -> np.ndarray:
        if self.cross_x.size == 0:
            return np.zeros(np.shape(x), dtype=bool)
        d = np.abs(np.asarray(x)[..., None] - self.cross_x).min(-1)
        return d < self.cross_half_width + margin

    def semantic(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        road = (np.abs(y) < self.road_half_width) | self.in_cross(x)
        return np.where(road, CLASS_ID["road"], CLASS_ID["grass"]).astype(np.int64)

    def marking(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Painted lines: double centre line, dashed lane dividers, solid edge lines."""
        W = self.road_half_width
        ay = np.abs(y)
        centre = (ay > 0.06) & (ay < 0.18)
        dashed = (np.abs(ay - W / 2) < 0.08) & (np.mod(x, 9.0) < 3.0)
        edge = (ay > W - 0.4) & (ay < W - 0.25)
        return (centre | dashed | edge) & (ay < W) & ~self.in_cross(x)

    def material(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(semantic [N], albedo [N, 3], reflectivity [N]) of ground points."""
        sem = self.semantic(x, y)
        mark = self.marking(x, y)
        albedo = np.where((sem == CLASS_ID["road"])[:, None], _ROAD_RGB, _GRASS_RGB)
        albedo = np.where(mark[:, None], _MARKING_RGB, albedo)
        refl = np.where(mark, 0.6, REFLECTIVITY[sem])
        return sem, albedo, refl


@dataclass(frozen=True)
class Scene:
    """Struct-of-arrays primitive table (P primitives) plus the ground layout.

    size: box half extents (x, y, z) in the box frame; frustum (r_bottom, r_top, half height);
    ellipsoid radii. center is at t = 0; at time t it is center + velocity * t.
    """

    kind: np.ndarray  # [P] int8
    center: np.ndarray  # [P, 3]
    size: np.ndarray  # [P, 3]
    yaw: np.ndarray  # [P]
    velocity: np.ndarray  # [P, 3]
    semantic: np.ndarray  # [P] int64
    instance: np.ndarray  # [P] int64
    albedo: np.ndarray  # [P, 3]
    reflectivity: np.ndarray  # [P]
    layout: StreetLayout

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def centers_at(self, t: float) -> np.ndarray:
        return self.center + self.velocity * t

    def bounding_radius(self) -> np.ndarray:
        r = np.linalg.norm(self.size, axis=1)
        fr = self.kind == FRUSTUM
        r[fr] = np.hypot(self.size[fr, :2].max(1), self.size[fr, 2])
        el = self.kind == ELLIPSOID
        r[el] = self.size[el].max(1)
        return r

    def contains(self, points: np.ndarray, t: float = 0.0, tol: float = 0.0) -> np.ndarray:
        """[N, P] whether world point n lies inside (or within `tol` of) primitive p at time t."""
        rel = points[:, None, :] - self.centers_at(t)[None]
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        lx = c * rel[..., 0] + s * rel[..., 1]
        ly = -s * rel[..., 0] + c * rel[..., 1]
        lz = rel[..., 2]
        sx, sy, sz = self.size[:, 0], self.size[:, 1], self.size[:, 2]
        box = (np.abs(lx) <= sx + tol) & (np.abs(ly) <= sy + tol) & (np.abs(lz) <= sz + tol)
        radius = sx + (sy - sx) * (lz + sz) / (2 * sz)
        frustum = (np.hypot(rel[..., 0], rel[..., 1]) <= radius + tol) & (np.abs(lz) <= sz + tol)
        q = rel / (self.size + tol)
        ellipsoid = (q**2).sum(-1) <= 1.0
        return np.where(self.kind == BOX, box, np.where(self.kind == FRUSTUM, frustum, ellipsoid))


class _Builder:
    """Accumulates primitives; `obj()` opens a new object (one instance id for thing classes)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.rows: list[tuple] = []
        self._next_instance = 1
        self._instance = 0
        self._velocity = (0.0, 0.0, 0.0)

    def obj(self, cls: str, velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        # Clutter objects get instance ids too: the simulated teacher shows each one consistently.
        if cls in THING_CLASSES or cls == "clutter":
            self._instance, self._next_instance = self._next_instance, self._next_instance + 1
        else:
            self._instance = 0
        self._velocity = velocity

    def colour(self, palette: str) -> tuple[float, float, float]:
        options = _PALETTES[palette]
        base = np.asarray(options[self.rng.integers(len(options))])
        return tuple(np.clip(base * self.rng.uniform(0.88, 1.12), 0, 1))

    def add(self, kind: int, cls: str, center, size, yaw: float, albedo) -> None:
        semantic = CLUTTER if cls == "clutter" else CLASS_ID[cls]
        base = self.rng.uniform(0.1, 0.6) if cls == "clutter" else REFLECTIVITY[semantic]
        refl = base * self.rng.uniform(0.85, 1.15)
        self.rows.append((kind, tuple(center), tuple(size), yaw, self._velocity, semantic,
                          self._instance, tuple(albedo), refl))

    def box(self, cls: str, center, half, yaw: float = 0.0, albedo=None) -> None:
        self.add(BOX, cls, center, half, yaw, albedo if albedo is not None else self.colour(cls))

    def frustum(self, cls: str, x: float, y: float, z0: float, z1: float, r0: float, r1: float,
                albedo=None) -> None:
        self.add(FRUSTUM, cls, (x, y, (z0 + z1) / 2), (r0, r1, (z1 - z0) / 2), 0.0,
                 albedo if albedo is not None else self.colour(cls))

    def ellipsoid(self, cls: str, center, radii, albedo=None) -> None:
        self.add(ELLIPSOID, cls, center, radii, 0.0, albedo if albedo is not None else self.colour(cls))

    def build(self, layout: StreetLayout) -> Scene:
        if not self.rows:
            raise ValueError("empty scene")
        cols = list(zip(*self.rows))
        return Scene(
            kind=np.asarray(cols[0], dtype=np.int8),
            center=np.asarray(cols[1], dtype=np.float64),
            size=np.asarray(cols[2], dtype=np.float64),
            yaw=np.asarray(cols[3], dtype=np.float64),
            velocity=np.asarray(cols[4], dtype=np.float64),
            semantic=np.asarray(cols[5], dtype=np.int64),
            instance=np.asarray(cols[6], dtype=np.int64),
            albedo=np.asarray(cols[7], dtype=np.float64),
            reflectivity=np.asarray(cols[8], dtype=np.float64),
            layout=layout,
        )


# ---------------------------------------------------------------------------------------- objects
def _vehicle(b: _Builder, cls: str, x: float, y: float, heading: float, speed: float) -> float:
    """A car / truck / bus centred at (x, y) facing `heading` (+1: +x, -1: -x); returns its length."""
    rng = b.rng
    b.obj(cls, (heading * speed, 0.0, 0.0))
    yaw = 0.0 if heading > 0 else math.pi
    if cls == "car":
        length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
        paint = b.colour("car")
        body_h = rng.uniform(0.65, 0.8)
        b.box(cls, (x, y, 0.3 + body_h / 2), (length / 2, width / 2, body_h / 2), yaw, paint)
        cab_h, cab_l = rng.uniform(0.5, 0.6), 0.55 * length
        b.box(cls, (x - heading * 0.08 * length, y, 0.3 + body_h + cab_h / 2),
              (cab_l / 2, width / 2 - 0.08, cab_h / 2), yaw, tuple(0.6 * np.asarray(paint)))
        wheel_z, wheel_r = 0.0, 0.32
    elif cls == "truck":
        cab_l, cargo_l, width = 2.3, rng.uniform(5.5, 8.0), 2.5
        length = cab_l + cargo_l + 0.3
        front = x + heading * length / 2
        b.box(cls, (front - heading * cab_l / 2, y, 1.75), (cab_l / 2, width / 2 - 0.05, 1.25), yaw)
        cargo_h = rng.uniform(3.2, 3.8)
        b.box(cls, (front - heading * (cab_l + 0.3 + cargo_l / 2), y, 0.9 + cargo_h / 2),
              (cargo_l / 2, width / 2, cargo_h / 2), yaw)
        wheel_z, wheel_r = 0.0, 0.5
    elif cls == "bus":
        length, width = rng.uniform(10.0, 12.5), 2.5
        b.box(cls, (x, y, 0.35 + 1.45), (length / 2, width / 2, 1.45), yaw)
        wheel_z, wheel_r = 0.0, 0.5
    else:
        raise ValueError(f"not a vehicle class: {cls}")
    tyre = _PALETTES["tyre"][0]
    for fx in (-0.32, 0.32):
        for sy in (-1.0, 1.0):
            b.box(cls, (x + fx * length, y + sy * (width / 2 - 0.15), wheel_z + wheel_r),
                  (wheel_r, 0.14, wheel_r), yaw, tyre)
    return length


def _rider(b: _Builder, cls: str, x: float, y: float, heading: float, speed: float) -> float:
    """A bicyclist or motorcyclist (rider and vehicle share the label, as in SemanticKITTI)."""
    rng = b.rng
    b.obj(cls, (heading * speed, 0.0, 0.0))
    yaw = 0.0 if heading > 0 else math.pi
    moto = cls == "motorcyclist"
    length = 2.0 if moto else 1.7
    bike_half = (length / 2, 0.3 if moto else 0.05, 0.45 if moto else 0.36)
    b.box(cls, (x, y, 0.05 + bike_half[2]), bike_half, yaw, b.colour("bike"))
    seat = 1.0 if moto else 0.95
    clothes = b.colour("clothes")
    b.box(cls, (x - heading * 0.1, y, seat - 0.15), (0.18, 0.16, 0.2), yaw, clothes)
    b.frustum(cls, x - heading * 0.15, y, seat, seat + 0.55, 0.18, 0.21, clothes)
    head_r = 0.15 if moto else rng.uniform(0.1, 0.12)
    b.ellipsoid(cls, (x - heading * 0.05, y, seat + 0.55 + head_r + 0.05), (head_r, head_r, head_r * 1.1),
                _PALETTES["tyre"][0] if moto else b.colour("skin"))
    return length


def _pedestrian(b: _Builder, x: float, y: float, vx: float) -> None:
    rng = b.rng
    b.obj("pedestrian", (vx, 0.0, 0.0))
    s = rng.uniform(0.88, 1.1)
    b.frustum("pedestrian", x, y, 0.0, 0.85 * s, 0.11, 0.17, b.colour("clothes"))
    b.frustum("pedestrian", x, y, 0.85 * s, 1.45 * s, 0.19, 0.22, b.colour("clothes"))
    b.ellipsoid("pedestrian", (x, y, 1.45 * s + 0.15), (0.1, 0.1, 0.13), b.colour("skin"))


def _tree(b: _Builder, x: float, y: float) -> None:
    rng = b.rng
    b.obj("tree")
    trunk_h, trunk_r = rng.uniform(1.8, 3.2), rng.uniform(0.12, 0.22)
    b.frustum("tree", x, y, 0.0, trunk_h + 0.5, trunk_r * 1.2, trunk_r, b.colour("trunk"))
    rx, rz = rng.uniform(1.2, 2.6), rng.uniform(1.5, 3.0)
    b.ellipsoid("tree", (x, y, trunk_h + rz * 0.85), (rx, rx * rng.uniform(0.85, 1.15), rz))


def _street_lamp(b: _Builder, x: float, y: float, side: float, curb: float) -> None:
    b.obj("pole")
    h = b.rng.uniform(6.0, 8.0)
    b.frustum("pole", x, y, curb, h, 0.12, 0.08)
    b.box("pole", (x, y - side * 0.9, h - 0.1), (0.15, 0.9, 0.08))


def _traffic_sign(b: _Builder, x: float, y: float, curb: float, facing: float) -> None:
    rng = b.rng
    b.obj("pole")
    h = rng.uniform(2.1, 2.6)
    b.frustum("pole", x, y, curb, h + 0.05, 0.04, 0.04)
    b.obj("traffic sign")
    s = rng.uniform(0.3, 0.45)
    # the plate faces traffic approaching along -facing * x, mounted just in front of the post
    b.box("traffic sign", (x + facing * 0.06, y, h + s), (0.02, s, s))


def _traffic_light(b: _Builder, x: float, y: float, side: float, curb: float) -> None:
    b.obj("pole")
    h = b.rng.uniform(4.5, 5.5)
    b.frustum("pole", x, y, curb, h, 0.1, 0.09)
    arm = b.rng.uniform(3.0, 4.5)
    b.box("pole", (x, y - side * arm / 2, h - 0.1), (0.06, arm / 2, 0.06))
    b.obj("traffic light")
    b.box("traffic light", (x, y - side * (arm - 0.3), h - 0.6), (0.15, 0.17, 0.45))


def _clutter(b: _Builder, x: float, y: float, curb: float) -> None:
    """One object of no class: a street-furniture-sized box or cylinder, sometimes a large kiosk /
    container, on the kerb side of the street."""
    rng = b.rng
    b.obj("clutter")
    kind = rng.random()
    if kind < 0.45:  # bins, crates, benches, cabinets
        half = (rng.uniform(0.25, 1.0), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.7))
        b.box("clutter", (x, y, curb + half[2]), half, rng.uniform(0, math.pi))
    elif kind < 0.8:  # bollards, barrels, hydrants, posts
        r, h = rng.uniform(0.1, 0.4), rng.uniform(0.5, 1.3)
        b.frustum("clutter", x, y, curb, curb + h, r, r * rng.uniform(0.7, 1.0))
    else:  # kiosks, skips, site containers
        half = (rng.uniform(1.0, 3.0), rng.uniform(0.8, 1.5), rng.uniform(0.8, 1.4))
        b.box("clutter", (x, y, curb + half[2]), half, rng.uniform(-0.2, 0.2))


def _clutter_surface(b: _Builder, x: float, y: float) -> None:
    """A flat patch of no class on the grass strip: gravel, a driveway ramp, a raised planter bed."""
    rng = b.rng
    b.obj("clutter")
    half = (rng.uniform(1.5, 5.0), rng.uniform(0.8, 1.5), rng.uniform(0.03, 0.25))
    b.box("clutter", (x, y, half[2]), half)


# ---------------------------------------------------------------------------------------- layout
def _poisson_positions(rng: np.random.Generator, x0: float, x1: float, per_100m: float) -> np.ndarray:
    n = rng.poisson(max(per_100m, 0.0) * max(x1 - x0, 0.0) / 100.0)
    return np.sort(rng.uniform(x0, x1, size=n))


def _fill_lane(rng: np.random.Generator, x0: float, x1: float, per_100m: float, keep_out: tuple[float, float]
               ) -> list[float]:
    """Start positions along a lane with exponential gaps (mean from the density), avoiding `keep_out`."""
    if per_100m <= 0:
        return []
    xs, x = [], x0 + rng.exponential(100.0 / per_100m)
    while x < x1:
        if not keep_out[0] <= x <= keep_out[1]:
            xs.append(x)
        x += 14.0 + rng.exponential(100.0 / per_100m)
    return xs


def generate_scene(cfg: SceneConfig, rng: np.random.Generator, *, ego_start_x: float, ego_speed: float,
                   duration: float) -> Scene:
    """A street scene; moving traffic is spread so the street stays populated for `duration` seconds."""
    W, sw, curb, L = cfg.road_half_width, cfg.sidewalk_width, cfg.curb_height, cfg.length
    Wc = cfg.cross_street_half_width
    cross: list[float] = []
    if cfg.cross_street_spacing > 0:
        x = rng.uniform(0.3, 1.0) * cfg.cross_street_spacing
        while x < L - Wc:
            cross.append(x)
            x += cfg.cross_street_spacing * rng.uniform(0.7, 1.3)
    layout = StreetLayout(W, np.asarray(cross, dtype=np.float64), Wc)
    b = _Builder(rng)
    far = W + sw + 45.0  # how far the cross streets' sidewalks reach sideways

    # Blocks: x intervals between cross streets (sidewalk corners included).
    edges = [0.0, *[v for c in cross for v in (c - Wc, c + Wc)], L]
    blocks = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
    for side in (-1.0, 1.0):
        b.obj("sidewalk")
        for x0, x1 in blocks:
            # split long kerbs so their bounding spheres stay tight for ray culling
            n = max(1, math.ceil((x1 - x0) / 20.0))
            for k in range(n):
                a, e = x0 + (x1 - x0) * k / n, x0 + (x1 - x0) * (k + 1) / n
                b.box("sidewalk", ((a + e) / 2, side * (W + sw / 2), curb / 2),
                      ((e - a) / 2, sw / 2, curb / 2))
        for c in cross:  # sidewalks along the cross streets
            for sx in (-1.0, 1.0):
                n = math.ceil((far - W) / 20.0)
                for k in range(n):
                    a = W + (far - W) * k / n
                    e = W + (far - W) * (k + 1) / n
                    b.box("sidewalk", (c + sx * (Wc + sw / 2), side * (a + e) / 2, curb / 2),
                          (sw / 2, (e - a) / 2, curb / 2))

        # Buildings fill each block behind a grass strip, with occasional empty lots.
        for x0, x1 in blocks:
            x = x0 + sw + rng.uniform(1.0, 4.0)
            while True:
                width = rng.uniform(10.0, 28.0)
                if x + width > x1 - sw - 1.0:
                    break
                if rng.random() >= cfg.building_gap:
                    depth, height = rng.uniform(8.0, 20.0), rng.uniform(5.0, 25.0)
                    setback = rng.uniform(3.5, 8.0)
                    b.obj("building")
                    b.box("building", (x + width / 2, side * (W + sw + setback + depth / 2), height / 2),
                          (width / 2, depth / 2, height / 2))
                x += width + rng.uniform(0.5, 5.0)

        for x in _poisson_positions(rng, 0.0, L, cfg.trees_per_100m):
            if not layout.in_cross(x, sw + 2.5):
                _tree(b, x, side * (W + sw + rng.uniform(0.8, 2.2)))
        for x in _poisson_positions(rng, 0.0, L, cfg.poles_per_100m):
            if not layout.in_cross(x, sw + 0.5):
                _street_lamp(b, x, side * (W + 0.45), side, curb)
        for x in _poisson_positions(rng, 0.0, L, cfg.signs_per_100m):
            if not layout.in_cross(x, sw + 0.5):
                _traffic_sign(b, x, side * (W + 0.35), curb, facing=side)
        for x in _poisson_positions(rng, 0.0, L, cfg.fences_per_100m):
            length = rng.uniform(6.0, 20.0)
            if layout.in_cross(np.array([x, x + length]), sw + 0.5).any():
                continue
            h = rng.uniform(1.0, 1.8)
            b.obj("fence")
            y = side * (W + sw + rng.uniform(0.3, 3.0))
            b.box("fence", (x + length / 2, y, h / 2), (length / 2, 0.03, h / 2))
        for x in _poisson_positions(rng, 0.0, L, cfg.pedestrians_per_100m):
            standing = rng.random() < 0.3
            vx = 0.0 if standing else float(rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.6))
            _pedestrian(b, x, side * (W + rng.uniform(0.9, sw - 0.4)), vx)
        for c in cross:  # one traffic light per corner facing the main street's traffic
            _traffic_light(b, c - side * (Wc + 0.6), side * (W + 0.5), side, curb)

    # Traffic. Moving lanes are populated over the stretch their vehicles cover in `duration`.
    ego_lane, right_lane, oncoming_lane, parked_lane = -W / 4, -3 * W / 4, W / 4, 3 * W / 4

    def pick_vehicle() -> str:
        return str(rng.choice(["car", "truck", "bus"], p=[0.75, 0.15, 0.10]))

    for x in _fill_lane(rng, 0.0, L, cfg.moving_vehicles_per_100m, (ego_start_x - 12.0, ego_start_x + 15.0)):
        _vehicle(b, pick_vehicle(), x, ego_lane, 1.0, ego_speed)
    right_speed = rng.uniform(4.0, 6.0)
    reach = right_speed * duration
    right_density = cfg.moving_vehicles_per_100m + cfg.riders_per_100m
    for x in _fill_lane(rng, -reach, L, right_density, (math.inf, math.inf)):
        if rng.random() < cfg.riders_per_100m / max(right_density, 1e-9):
            cls = "bicyclist" if rng.random() < 0.55 else "motorcyclist"
            _rider(b, cls, x, right_lane - 0.6, 1.0, right_speed)
        else:
            _vehicle(b, pick_vehicle(), x, right_lane, 1.0, right_speed)
    oncoming_speed = rng.uniform(7.0, 11.0)
    reach = oncoming_speed * duration
    for x in _fill_lane(rng, 0.0, L + reach, cfg.moving_vehicles_per_100m, (math.inf, math.inf)):
        _vehicle(b, pick_vehicle(), x, oncoming_lane, -1.0, oncoming_speed)
    for x in _fill_lane(rng, 0.0, L, cfg.parked_vehicles_per_100m, (math.inf, math.inf)):
        if not layout.in_cross(x, 6.0):
            cls = str(rng.choice(["car", "truck"], p=[0.9, 0.1]))
            _vehicle(b, cls, x, parked_lane + rng.uniform(-0.2, 0.2), float(rng.choice([-1.0, 1.0])), 0.0)

    # Kerb-side cones and barriers on the right edge (clear of the right lane's traffic).
    for x in _poisson_positions(rng, 0.0, L, cfg.cones_per_100m / 3):
        for k in range(int(rng.integers(1, 5))):
            b.obj("traffic cone")
            b.frustum("traffic cone", x + 2.0 * k, -(W - 0.3), 0.0, rng.uniform(0.5, 0.75), 0.17, 0.03)
    for x in _poisson_positions(rng, 0.0, L, cfg.barriers_per_100m):
        b.obj("barrier")
        b.box("barrier", (x, -(W + sw - 0.4), curb + 0.45), (1.0, 0.25, 0.45))
    # Clutter last, so worlds without it draw exactly the random numbers they always drew.
    if cfg.clutter_per_100m > 0 or cfg.clutter_surfaces_per_100m > 0:
        for side in (-1.0, 1.0):
            for x in _poisson_positions(rng, 0.0, L, cfg.clutter_per_100m):
                if not layout.in_cross(x, sw + 0.5):
                    _clutter(b, x, side * (W + rng.uniform(0.5, sw + 2.5)), curb)
            for x in _poisson_positions(rng, 0.0, L, cfg.clutter_surfaces_per_100m):
                if not layout.in_cross(x, sw + 5.0):
                    _clutter_surface(b, x, side * (W + sw + rng.uniform(1.5, 3.0)))
    return b.build(layout)
