"""Oriented instance boxes: a rotated box of points gives back its centre, size and yaw."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip3d_core.geometry.boxes import instance_boxes


def box_points(center, size, yaw, n) -> np.ndarray:
    """A regular n^3 grid filling the box (symmetric, so its principal axes are the box axes)."""
    t = np.linspace(-0.5, 0.5, n)
    local = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3) * np.array(size)
    c, s = math.cos(yaw), math.sin(yaw)
    xy = local[:, :2] @ np.array([[c, s], [-s, c]])
    return np.c_[xy, local[:, 2]] + np.array(center)


def test_boxes_recover_pose_and_size() -> None:
    rng = np.random.default_rng(0)
    car = box_points((10.0, -3.0, 0.8), (4.5, 1.8, 1.5), 0.6, 7)  # 343 points
    bus = box_points((-5.0, 8.0, 1.6), (11.0, 2.5, 3.2), -2.9, 8)  # 512; yaw folds to -2.9 + pi
    road = rng.random((300, 3)) * 20
    xyz = np.r_[car, bus, road]
    semantic = np.r_[np.full(343, 3), np.full(512, 2), np.zeros(300, int)]
    semantic[5] = 7  # one stray label: the majority wins
    instance = np.r_[np.full(343, 4), np.full(512, 9), np.zeros(300, int)]
    score = np.r_[np.full(343, 0.8), np.full(512, 0.6), np.zeros(300)]
    boxes = instance_boxes(xyz, semantic, instance, score)
    assert [b.instance for b in boxes] == [4, 9] and [b.label for b in boxes] == [3, 2]
    car_box, bus_box = boxes
    np.testing.assert_allclose(car_box.center, (10.0, -3.0, 0.8), atol=1e-6)
    np.testing.assert_allclose(car_box.size, (4.5, 1.8, 1.5), atol=1e-6)
    assert car_box.yaw == pytest.approx(0.6, abs=1e-6) and car_box.score == pytest.approx(0.8)
    assert bus_box.yaw == pytest.approx(-2.9 + math.pi, abs=1e-6) and bus_box.num_points == 512
    np.testing.assert_allclose(bus_box.size, (11.0, 2.5, 3.2), atol=1e-6)
    corners = car_box.corners_xy()
    assert np.allclose(np.sort(np.linalg.norm(corners - np.array([10.0, -3.0]), axis=1)),
                       math.hypot(2.25, 0.9))
    assert instance_boxes(xyz, semantic, instance, min_points=400)[0].instance == 9
    assert instance_boxes(xyz[:1], semantic[:1], np.array([1]))[0].size == (0.0, 0.0, 0.0)


def test_bev_outlines_each_instance_box() -> None:
    """bev pictures of panoptic output: each instance's footprint is outlined (white) where the box
    edge lies, and nothing is drawn without instance ids."""
    from clip3d_core.clip import Vocabulary
    from clip3d_core.viz import draw_boxes, render_bev

    rng = np.random.default_rng(0)
    a = rng.uniform([4.0, 2.0, 0.0], [8.0, 4.0, 1.5], size=(300, 3))  # axis-aligned 4 m x 2 m
    b = rng.uniform([-6.0, -5.0, 0.0], [-4.0, -1.0, 1.5], size=(300, 3))
    xyz = np.concatenate([a, b])
    labels = np.zeros(600, np.uint16)
    instances = np.repeat(np.array([1, 2], np.uint32), 300)
    extent, pixel = (-10.0, -10.0, 10.0, 10.0), 0.1
    colours = np.repeat(Vocabulary.from_strings(["car"]).colours, 600, axis=0)
    plain = render_bev(xyz, colours, extent, pixel)
    boxes = instance_boxes(xyz, labels, instances)
    drawn = draw_boxes(plain, boxes, extent, pixel)
    white = (drawn == 255).all(axis=2) & ~(plain == 255).all(axis=2)
    assert white.sum() > 2 * (40 + 20)  # at least the long edges of both footprints
    for box in boxes:  # every footprint corner is on the outline (row = (x1 - x), col = (y1 - y))
        for x, y in box.corners_xy():
            r, c = int(np.rint((10.0 - x) / pixel)), int(np.rint((10.0 - y) / pixel))
            assert white[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].any()
    assert np.array_equal(draw_boxes(plain, [], extent, pixel), plain)


def test_camera_overlays_box_each_instance_in_the_image() -> None:
    """Camera overlays of panoptic output: a white rectangle spans each instance's visible pixels
    (its corners at the extreme points), points without an instance get none."""
    from clip3d_core.viz import draw_image_boxes

    image = np.zeros((60, 80, 3), np.uint8)
    uv = np.array([[10.2, 5.0], [30.9, 20.5], [20.0, 12.0],  # instance 3: u 10..30, v 5..20
                   [50.0, 40.0], [70.5, 55.2],  # instance 7: u 50..70, v 40..55
                   [5.0, 50.0], [np.nan, 3.0]])  # no instance; a non-finite pixel
    instances = np.array([3, 3, 3, 7, 7, 0, 7], np.uint32)
    drawn = draw_image_boxes(image, uv, instances)
    white = (drawn == 255).all(axis=2)
    for u0, v0, u1, v1 in ((10, 5, 30, 20), (50, 40, 70, 55)):
        assert white[v0, u0:u1 + 1].all() and white[v1, u0:u1 + 1].all()  # top and bottom edges
        assert white[v0:v1 + 1, u0].all() and white[v0:v1 + 1, u1].all()  # left and right edges
        assert not white[v0 + 1:v1, u0 + 1:u1].any()  # an outline, not a fill
    assert white.sum() == 2 * (21 + 16) * 2 - 8  # the two outlines only (corners counted once)
    assert not draw_image_boxes(image, uv, np.zeros(7, np.uint32)).any()
