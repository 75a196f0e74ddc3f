"""Per-frame overhead of the clip3d node around the model, over real DDS between two processes.

The node runs here; a peer process publishes clouds (header stamp = its wall clock at publish) and
receives the labelled clouds, one frame in flight at a time. Per frame (medians reported):

  transport_in   peer publish -> node callback (serialise, DDS, deserialise, executor dispatch)
  wait           node callback -> worker start (sync + hand-over)
  convert_in     PointCloud2 -> numpy, camera decoding
  model          Segmenter.segment (reported separately; not overhead); since issue 8 also the
                 labelled records (`label_frame`), which convert_out held before
  convert_out    labelled records -> PointCloud2
  publish        labels_meta + cloud publish (serialise into DDS)
  transport_out  node publish done -> peer callback (DDS, deserialise)
  end_to_end     peer publish -> peer receives the labelled cloud
  overhead       end_to_end - model

plus serialise / deserialise of the input cloud alone (rclpy.serialization) and `callback_check`:
the layout check the node runs on the callback thread for every cloud (`conversions.check_cloud`,
header and field table only). Models: `fake` (no
model time: pure node cost) and `tiny` (an untrained clip3d-tiny checkpoint on CPU).

The peer's glibc malloc keeps freed memory (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set
for it): by default whether each received multi-MB cloud is page-faulted in afresh or reuses the
last one's memory depends on the peer's heap layout, i.e. on what it happened to import, and that
alone moved transport_out at 120k points from ~1.5 to ~7 ms between trees whose node did not
change (issue 9 note). The node process is left as deployed.

    .venv/bin/python benchmarks/node_overhead.py [--points 30000 120000] [--frames 20] [--models fake tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
# The receiving peer keeps freed message buffers instead of returning them to the OS (module doc).
PEER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


def make_cloud(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    az, r = rng.uniform(-np.pi, np.pi, n), rng.uniform(2.0, 50.0, n)
    pts = np.zeros(n, XYZI)
    pts["x"], pts["y"] = r * np.cos(az), r * np.sin(az)
    pts["z"], pts["intensity"] = rng.uniform(-2.0, 1.0, n), rng.uniform(0.0, 1.0, n)
    return pts


# ------------------------------------------------------------------------------------ peer process
def run_peer(ns: str, points: int, frames: int, timeout_s: float) -> None:
    """Publish `frames` clouds one at a time; print one JSON line per frame."""
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from clip3d_ros.conversions import array_to_cloud

    rclpy.init()
    node = Node("bench_peer", namespace=ns)
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    got: list[tuple[int, int]] = []
    node.create_subscription(
        PointCloud2,
        f"{ns}/clip3d/output/pointcloud",
        lambda m: got.append((m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, time.time_ns())),
        qos,
    )
    pub = node.create_publisher(PointCloud2, f"{ns}/clip3d/input/pointcloud", qos)
    msg = array_to_cloud(make_cloud(points))
    msg.header.frame_id = "lidar"
    deadline = time.monotonic() + timeout_s
    while not (pub.get_subscription_count() and node.count_publishers(f"{ns}/clip3d/output/pointcloud")):
        rclpy.spin_once(node, timeout_sec=0.05)
        if time.monotonic() > deadline:
            raise SystemExit("peer: the node never appeared")
    time.sleep(0.5)  # let the reverse (output) matching settle too
    for k in range(frames):
        sent = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
        pub.publish(msg)
        while len(got) <= k:
            rclpy.spin_once(node, timeout_sec=0.05)
            if time.monotonic() > deadline:
                raise SystemExit(f"peer: frame {k} never came back")
        print(json.dumps({"stamp_ns": sent, "received_ns": got[k][1]}), flush=True)
    node.destroy_node()
    rclpy.shutdown()


# ------------------------------------------------------------------------------------ node side
def serialisation_ms(points: int, repeats: int = 5) -> tuple[float, float]:
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import PointCloud2

    from clip3d_ros.conversions import array_to_cloud

    msg = array_to_cloud(make_cloud(points))
    ser, de = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        raw = serialize_message(msg)
        t1 = time.perf_counter()
        deserialize_message(raw, PointCloud2)
        de.append((time.perf_counter() - t1) * 1e3)
        ser.append((t1 - t0) * 1e3)
    return statistics.median(ser), statistics.median(de)


def callback_check_ms(points: int, repeats: int = 200) -> float | None:
    """Median time of the callback-thread layout check on one cloud (None before issue 8)."""
    from clip3d_ros import conversions

    check = getattr(conversions, "check_cloud", None)
    if check is None:
        return None
    msg = conversions.array_to_cloud(make_cloud(points))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        check(msg, 2_000_000)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tiny_checkpoint(folder: Path) -> Path:
    from clip3d_core.checkpoint import build_untrained_checkpoint
    from clip3d_core.clip import tiny_clip_config
    from clip3d_core.model import ModelConfig

    return build_untrained_checkpoint(folder / "tiny.pt", ModelConfig.small(embed_dim=32), tiny_clip_config())


def bench_case(model: str, points: int, frames: int, checkpoint: Path | None, domain: int) -> dict[str, Any]:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from clip3d_ros.node import Clip3DNode
    from clip3d_ros.testing import FakeSegmenter

    ns = f"/bench{os.getpid()}_{model}_{points}"
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    overrides = [
        Parameter("qos.cloud.reliability", value="reliable"),
        # Trees before issue 8 took the topics as parameters; later ones ignore these.
        Parameter("cloud_topic", value="~/input/pointcloud"),
        Parameter("output_topic", value="~/output/pointcloud"),
    ]
    segmenter = None
    if model == "fake":
        segmenter = FakeSegmenter()
    else:
        overrides.append(Parameter("checkpoint", value=str(checkpoint)))
    node = Clip3DNode(segmenter=segmenter, context=ctx, namespace=ns, parameter_overrides=overrides)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    warmup = 2
    env = os.environ | {"ROS_DOMAIN_ID": str(domain)} | PEER_MALLOC
    peer = subprocess.run(
        [sys.executable, __file__, "--peer", ns, "--points", str(points), "--frames", str(frames + warmup)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    executor.shutdown(timeout_sec=5)
    spinner.join(timeout=5)
    timings = {t.stamp_ns: t for t in node.timings}
    node.destroy_node()
    rclpy.shutdown(context=ctx)
    if peer.returncode != 0:
        raise RuntimeError(f"peer failed: {peer.stderr[-2000:]}")
    rows = [json.loads(line) for line in peer.stdout.splitlines() if line.startswith("{")][warmup:]
    per_frame = []
    for r in rows:
        t = timings[r["stamp_ns"]]
        end_ns = t.stamp_ns + round(t.header_to_publish_ms * 1e6)  # header stamp = peer publish time
        e2e = (r["received_ns"] - r["stamp_ns"]) / 1e6
        per_frame.append(
            {
                "transport_in_ms": (t.receipt_ns - r["stamp_ns"]) / 1e6,
                "wait_ms": t.wait_ms,
                "convert_in_ms": t.convert_in_ms,
                "model_ms": t.model_ms,
                "convert_out_ms": t.convert_out_ms,
                "publish_ms": t.publish_ms,
                "transport_out_ms": (r["received_ns"] - end_ns) / 1e6,
                "end_to_end_ms": e2e,
                "overhead_ms": e2e - t.model_ms,
            }
        )
    medians = {k: statistics.median(f[k] for f in per_frame) for k in per_frame[0]}
    ser, de = serialisation_ms(points)
    return {
        "model": model,
        "points": points,
        "frames": len(per_frame),
        "serialise_ms": ser,
        "deserialise_ms": de,
        "callback_check_ms": callback_check_ms(points),
    } | {k: round(v, 3) for k, v in medians.items()}


COLUMNS = [
    ("model", "model"),
    ("points", "points"),
    ("serialise_ms", "ser"),
    ("deserialise_ms", "deser"),
    ("callback_check_ms", "check"),
    ("transport_in_ms", "in"),
    ("wait_ms", "wait"),
    ("convert_in_ms", "conv_in"),
    ("model_ms", "MODEL"),
    ("convert_out_ms", "conv_out"),
    ("publish_ms", "pub"),
    ("transport_out_ms", "out"),
    ("end_to_end_ms", "e2e"),
    ("overhead_ms", "OVERHEAD"),
]


def table(results: list[dict[str, Any]]) -> str:
    head = " ".join(f"{title:>9}" for _, title in COLUMNS)
    lines = ["median ms per frame (OVERHEAD = e2e - MODEL)", head]
    for r in results:
        cells = [
            f"{r[k]!s:>9}" if isinstance(r[k], str | int | None) else f"{r[k]:>9.3f}" for k, _ in COLUMNS
        ]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, nargs="+", default=[30_000, 120_000])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=["fake", "tiny"], default=["fake", "tiny"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        run_peer(args.peer, args.points[0], args.frames, args.timeout)
        return 0

    from clip3d_ros.testing import ros_domain_id

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp)) if "tiny" in args.models else None
        for model in args.models:
            for n in args.points:
                frames = args.frames if model == "fake" else max(3, args.frames // 4)
                results.append(bench_case(model, n, frames, checkpoint, ros_domain_id(9)))
                print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
