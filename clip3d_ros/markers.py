"""Thing instances as RViz markers (`~/output/objects`, label-bag's /clip3d/objects): one builder for
rclpy and rosbags messages alike, as `conversions.cloud_parts` is for clouds.

Per frame: a DELETEALL marker first (the previous frame's boxes go), then per instance an
oriented CUBE (class colour, half transparent) and a TEXT_VIEW_FACING "class score" above it; ids
are the frame's instance ids.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clip3d_core.geometry.boxes import InstanceBox, instance_boxes

T_MARKER = "visualization_msgs/msg/Marker"
T_MARKER_ARRAY = "visualization_msgs/msg/MarkerArray"
CUBE, TEXT_VIEW_FACING, ADD, DELETEALL = 1, 9, 0, 3  # visualization_msgs/Marker constants
MIN_SIZE = 0.05  # m: a flat or one-point instance still shows


def rclpy_msg(msgtype: str) -> Any:
    """A default rclpy message of ``"pkg/msg/Name"``."""
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)()


def frame_boxes(records: np.ndarray) -> list[InstanceBox]:
    """The instance boxes of a labelled cloud's records (`conversions.labelled_points` with
    `instance`)."""
    xyz = np.stack([records["x"], records["y"], records["z"]], axis=1)
    return instance_boxes(xyz, records["label"], records["instance"], records["score"])


def object_markers(
    boxes: Sequence[InstanceBox], names: Sequence[str], colours: np.ndarray, header: Any,
    new: Callable[[str], Any] = rclpy_msg,
) -> Any:
    """MarkerArray for ``boxes`` (labels index ``names`` / ``colours`` uint8 [C, 3]); ``new(type)``
    makes a default message (`rclpy_msg`, or `bag.new_msg` for rosbags)."""
    clear = new(T_MARKER)
    clear.header, clear.action = header, DELETEALL
    clear.pose.orientation.w = 1.0  # rclpy's default quaternion; rosbags' zero one is not a rotation
    markers = [clear]
    for box in boxes:
        known = 0 <= box.label < len(names)
        rgb = colours[box.label] / 255.0 if known else np.full(3, 0.5)
        name = names[box.label] if known else "?"
        cube, text = new(T_MARKER), new(T_MARKER)
        for m in (cube, text):
            m.header, m.id, m.action = header, int(box.instance), ADD
            m.pose.position.x, m.pose.position.y, m.pose.position.z = (float(v) for v in box.center)
        cube.ns, cube.type = "objects", CUBE
        cube.pose.orientation.z, cube.pose.orientation.w = math.sin(box.yaw / 2), math.cos(box.yaw / 2)
        cube.scale.x, cube.scale.y, cube.scale.z = (max(float(v), MIN_SIZE) for v in box.size)
        cube.color.r, cube.color.g, cube.color.b = (float(v) for v in rgb)
        cube.color.a = 0.5
        text.ns, text.type, text.text = "labels", TEXT_VIEW_FACING, f"{name} {box.score:.2f}"
        text.pose.position.z = float(box.center[2] + box.size[2] / 2 + 0.5)
        text.pose.orientation.w = 1.0
        text.scale.z = 0.8
        text.color.r = text.color.g = text.color.b = text.color.a = 1.0
        markers += [cube, text]
    out = new(T_MARKER_ARRAY)
    out.markers = markers
    return out
