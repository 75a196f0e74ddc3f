"""Process control for the demo: the node's parameter file, environment and process, the live
vocabulary change."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clip3d_ros import bag
from clip3d_ros.demo.config import NODE, OUTPUT_TOPIC, shipped_file
from clip3d_ros.demo.recorder import Recorder
from clip3d_ros.tools import make_bag

log = logging.getLogger(__name__)


def node_parameters(checkpoint: Path, vocabulary: list[str], drive_bag: Path) -> dict[str, Any]:
    """The node's parameter file: topics of the bag, the camera with its extrinsic from the bag's
    /tf_static (also in TF for nodes that have tf2), sim time from the replayed /clock."""
    reader = bag.open_reader(drive_bag)
    try:
        tf = bag.read_static_transforms(reader)
        info_conn = bag.require_topic(reader, "/camera/front/camera_info", [bag.T_CAMERA_INFO])
        _, _, info = next(bag.iter_messages(reader, [info_conn]))
        T_cam_lidar = tf.lookup(info.header.frame_id, make_bag.LIDAR_FRAME)
    finally:
        reader.close()
    topics = make_bag.CameraTopics("front")
    return {
        NODE: {
            "ros__parameters": {
                "use_sim_time": True,
                "checkpoint": str(checkpoint),
                "vocabulary": vocabulary,
                "skip_without_subscribers": True,
                "cameras": {
                    "names": ["front"],
                    "front": {
                        "image_topic": topics.image,
                        "info_topic": topics.info,
                        "frame_id": topics.frame_id,
                        "T_cam_lidar": [float(v) for v in T_cam_lidar.reshape(-1)],
                    },
                },
            }
        }
    }


def ros_env(domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(shipped_file("config/fastdds_loopback.xml")))
    return env


@contextmanager
def child_process(
    cmd: Sequence[str], env: dict[str, str], log_path: Path, name: str
) -> Iterator[subprocess.Popen]:
    """A subprocess logging to `log_path`; SIGINT on exit, then SIGTERM / SIGKILL if it lingers."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop on %s", name, signal.Signals(sig).name)
            log.info("%s exited with %s", name, proc.returncode)


def set_vocabulary(node: Any, names: list[str], timeout: float = 30.0) -> str | None:
    """SetParameters(vocabulary) on the node; None on success, else the reason."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    client = AsyncParameterClient(node, NODE)
    if not client.wait_for_services(timeout_sec=timeout):
        return f"parameter services of /{NODE} not available"
    future = client.set_parameters([Parameter("vocabulary", Parameter.Type.STRING_ARRAY, names)])
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not future.done():
        return "SetParameters timed out"
    result = future.result().results[0]
    return None if result.successful else result.reason or "rejected"


def _wait_for_node(
    node: Any, recorder: Recorder, proc: subprocess.Popen, timeout: float, log_path: Path
) -> None:
    """Until the node publishes labelled clouds and its first vocabulary map reached us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"the node exited with {proc.returncode} during start-up:\n{tail}")
        if node.count_publishers(OUTPUT_TOPIC) > 0 and recorder.vocabularies:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the node did not come up within {timeout:.0f} s; see {log_path}")
