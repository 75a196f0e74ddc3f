"""Instance boxes as MarkerArray: one builder, the same message for rclpy and rosbags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip3d_core.geometry.boxes import InstanceBox
from clip3d_ros import bag, markers

BOXES = [InstanceBox(3, 1, 0.8, (1.0, 2.0, 0.5), (4.0, 2.0, 1.5), 0.3, 40),
         InstanceBox(5, 7, 0.4, (-3.0, 0.0, 0.2), (0.0, 0.5, 1.0), -1.2, 1)]  # label outside the vocabulary
NAMES, COLOURS = ["road", "car"], np.array([[1, 2, 3], [200, 0, 0]], np.uint8)


def test_markers_clear_the_frame_then_box_and_text_per_instance() -> None:
    arr = markers.object_markers(BOXES, NAMES, COLOURS, bag.new_msg("std_msgs/msg/Header"), new=bag.new_msg)
    clear, *rest = arr.markers
    assert clear.action == markers.DELETEALL and len(rest) == 4
    cubes = [m for m in rest if m.type == markers.CUBE]
    texts = [m for m in rest if m.type == markers.TEXT_VIEW_FACING]
    assert [m.id for m in cubes] == [m.id for m in texts] == [3, 5]
    assert [m.text for m in texts] == ["car 0.80", "? 0.40"]
    c = cubes[0]
    assert (c.pose.position.x, c.pose.position.y, c.pose.position.z) == (1.0, 2.0, 0.5)
    assert 2 * math.atan2(c.pose.orientation.z, c.pose.orientation.w) == pytest.approx(0.3)
    assert (c.scale.x, c.scale.y, c.scale.z) == (4.0, 2.0, 1.5)
    assert (c.color.r, c.color.a) == (pytest.approx(200 / 255), 0.5)
    assert cubes[1].scale.x == markers.MIN_SIZE  # a flat instance still shows


def test_rclpy_and_rosbags_markers_are_the_same_message() -> None:
    pytest.importorskip("rclpy")
    from rclpy.serialization import serialize_message
    from std_msgs.msg import Header

    ts = bag.typestore()
    from_rclpy = ts.deserialize_cdr(bytes(serialize_message(
        markers.object_markers(BOXES, NAMES, COLOURS, Header()))), markers.T_MARKER_ARRAY)
    built = markers.object_markers(BOXES, NAMES, COLOURS, bag.new_msg("std_msgs/msg/Header"), new=bag.new_msg)
    raw = bytes(ts.serialize_cdr(built, markers.T_MARKER_ARRAY))
    from_bag = ts.deserialize_cdr(raw, markers.T_MARKER_ARRAY)
    assert repr(from_rclpy) == repr(from_bag)  # every field, after the float32 wire round trip
