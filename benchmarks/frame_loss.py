"""Valid frames lost by the clip3d node in the two patterns of issue 8 (in-process node on
loopback DDS; the model is simulated: `FakeSegmenter` sleeping `--model-ms` per frame).

  bad_after_valid    a valid cloud at t, the same cloud with 10 bytes cut from `data` at
                     t + 1 ms, `--gap-ms` between pairs: how many valid clouds are labelled, how
                     many malformed ones are counted as bad input.
  same_stamp_sensors two valid clouds within ~1 ms with one stamp and different `frame_id` (two
                     LiDARs on one topic), `--gap-ms` idle between pairs: how many are labelled.

Each scenario runs `--runs` times (fresh node each). The code measured is whatever `clip3d_ros`
is importable, so the same script measures an older tree with PYTHONPATH pointing at it:

    nice -n 10 .venv/bin/python benchmarks/frame_loss.py --label after \
        --json benchmarks/results/frame_loss.json
    PYTHONPATH=/path/to/old/tree nice -n 10 .venv/bin/python benchmarks/frame_loss.py --label before \
        --json benchmarks/results/frame_loss.json

`--json` merges this label's results into the file (other labels kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO / "config" / "fastdds_loopback.xml"))

XYZI = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])


def make_cloud(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = np.zeros(n, XYZI)
    for c in ("x", "y", "z"):
        pts[c] = rng.normal(0.0, 20.0, n)
    pts["intensity"] = rng.uniform(0.0, 1.0, n)
    return pts


def run_once(scenario: str, pairs: int, points: int, gap_s: float, model_s: float, domain: int) -> dict:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from clip3d_ros.conversions import array_to_cloud
    from clip3d_ros.node import Clip3DNode
    from clip3d_ros.testing import FakeSegmenter, wait_for

    ns = f"/frameloss{os.getpid()}_{scenario}_{time.monotonic_ns()}"
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    rel = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node = Clip3DNode(
        segmenter=FakeSegmenter(segment_delay_s=model_s),
        context=ctx,
        namespace=ns,
        parameter_overrides=[
            Parameter("qos.cloud.reliability", value="reliable"),
            Parameter("qos.cloud.depth", value=50),
            Parameter("skip_without_subscribers", value=False),
            # Trees before issue 8 took the topics as parameters; later ones ignore these.
            Parameter("cloud_topic", value="~/input/pointcloud"),
            Parameter("output_topic", value="~/output/pointcloud"),
        ],
    )
    peer = Node("frameloss_peer", namespace=ns, context=ctx)
    out: list[tuple[int, str]] = []
    peer.create_subscription(
        PointCloud2,
        f"{ns}/clip3d/output/pointcloud",
        lambda m: out.append((m.header.stamp.sec, m.header.frame_id)),
        rel,
    )
    pub = peer.create_publisher(PointCloud2, f"{ns}/clip3d/input/pointcloud", rel)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    executor.add_node(peer)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert wait_for(lambda: pub.get_subscription_count() > 0, 20), "node never subscribed"
        time.sleep(0.3)
        valid = 0
        for k in range(pairs):
            first = array_to_cloud(make_cloud(points, k))
            second = array_to_cloud(make_cloud(points, k))
            for msg in (first, second):
                msg.header.stamp.sec, msg.header.frame_id = 1000 + k, "lidar"
            if scenario == "bad_after_valid":
                second.header.stamp.nanosec = 1_000_000  # t + 1 ms
                second.data = second.data[:-10]
                valid += 1
            else:
                second.header.frame_id = "lidar_2"
                valid += 2
            pub.publish(first)
            pub.publish(second)
            time.sleep(gap_s)
        wait_for(lambda: len(out) >= valid, 5.0)
        time.sleep(0.3)
        snap = node.diagnostics.snapshot()
    finally:
        executor.shutdown(timeout_sec=5)
        spinner.join(timeout=5)
        node.destroy_node()
        peer.destroy_node()
        rclpy.shutdown(context=ctx)
    return {
        "valid_sent": valid,
        "valid_labelled": len(out),
        "bad_counted": int(snap["bad_inputs"].get("cloud", 0)),
        "dropped": int(snap["dropped"]),
        "queue_high_water": snap.get("queue_high_water"),  # absent before issue 8
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", required=True, help="name of this measurement, e.g. before / after")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--points", type=int, default=30_000)
    parser.add_argument("--gap-ms", type=float, default=200.0)
    parser.add_argument("--model-ms", type=float, default=50.0, help="simulated model time per frame")
    parser.add_argument("--scenarios", nargs="+", default=["bad_after_valid", "same_stamp_sensors"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import clip3d_ros
    from clip3d_ros.testing import ros_domain_id

    source = Path(clip3d_ros.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results: dict[str, Any] = {
        "source": str(source),
        "commit": commit or None,  # (plus uncommitted changes, if any)
        "settings": {
            "runs": args.runs,
            "pairs": args.pairs,
            "points": args.points,
            "gap_ms": args.gap_ms,
            "simulated_model_ms": args.model_ms,
        },
        "scenarios": {},
    }
    for scenario in args.scenarios:
        gap_s, model_s = args.gap_ms / 1e3, args.model_ms / 1e3
        runs = [
            run_once(scenario, args.pairs, args.points, gap_s, model_s, ros_domain_id(11))
            for _ in range(args.runs)
        ]
        labelled = [r["valid_labelled"] for r in runs]
        results["scenarios"][scenario] = {
            "runs": runs,
            "valid_labelled_median": statistics.median(labelled),
            "valid_sent": runs[0]["valid_sent"],
        }
        print(
            f"{args.label:>8} {scenario:<20} valid labelled per run: {labelled} of {runs[0]['valid_sent']};"
            f" bad counted {[r['bad_counted'] for r in runs]}; dropped {[r['dropped'] for r in runs]}",
            flush=True,
        )
    if args.json:
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        merged[args.label] = results
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
