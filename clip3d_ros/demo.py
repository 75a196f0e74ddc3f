"""End-to-end demo: synthetic drive bag -> model -> the clip3d node (own process) -> labelled bag.

    python -m clip3d_ros.demo --out demo_output        (what `make demo` runs)

Steps, each reusing its result from an earlier run when the inputs match:
1. `clip3d make-bag`: a synthetic drive (LiDAR, front camera, CameraInfo, /tf_static).
2. A model: trained with `clip3d train --config training/synthetic_tiny.yaml` (cached by config
   hash), or `--checkpoint PATH`, or `--untrained` (random weights: wiring checks only).
3. The node `python -m clip3d_ros.node` in its own process, parameters written to
   `node_params.yaml` (checkpoint, vocabulary, topics, the camera's LiDAR->camera extrinsic).
4. `clip3d replay --clock` plays the bag into it (sim time); this process records the node's
   labelled clouds, labels_meta and vocabulary map into `labelled_bag/` and sets a new
   vocabulary through the node's SetParameters service part-way through.
5. Bird's-eye and camera-overlay PNGs of a few frames, `summary.json` and `summary.md` (frames
   in/out, header-stamp -> labelled-cloud latency percentiles, label histogram per vocabulary).
Every process stays on DDS loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, its own domain id,
config/fastdds_loopback.xml); the node is always shut down, also on errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import clip3d_core  # first: applies the torch/spconv compat fixes
from clip3d_core.clip.vocabulary import Vocabulary
from clip3d_core.data.synthetic.config import SyntheticConfig
from clip3d_core.geometry import project_points
from clip3d_ros import bag, conversions
from clip3d_ros.tools import make_bag
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "training" / "synthetic_tiny.yaml"
FASTDDS_PROFILE = REPO / "config" / "fastdds_loopback.xml"
NODE = "clip3d"
OUTPUT_TOPIC = f"/{NODE}/labelled_points"
META_TOPIC = f"/{NODE}/labels_meta"
VOCAB_TOPIC = f"/{NODE}/vocabulary"
# Set part-way through the replay: coarser classes, built from the synthetic world's class names
# (synonyms are averaged in text space, so a merged class still points where its members do).
VOCABULARY_V2 = [
    "road",
    "sidewalk",
    "building",
    "vegetation|tree|grass",
    "vehicle|car|truck|bus",
    "person|pedestrian|bicyclist|motorcyclist",
    "pole|traffic sign|traffic light",
]


@dataclass
class DemoConfig:
    out: Path
    seconds: float = 20.0
    rate_hz: float = 10.0
    seed: int = 0
    storage: str = "sqlite3"
    replay_rate: float = 1.0
    checkpoint: Path | None = None  # use this model instead of training one
    untrained: bool = False  # random weights (wiring checks, tests)
    train_config: Path = TRAIN_CONFIG
    cache_dir: Path | None = None  # trained checkpoints keyed by config hash (besides `out`)
    vocabulary_v2: list[str] = field(default_factory=lambda: list(VOCABULARY_V2))
    change_at: float = 0.4  # fraction of the replay after which the vocabulary changes
    pictures: int = 4  # frames drawn as PNGs
    workers: int = max(1, min(2, os.cpu_count() or 1))  # bag rendering processes
    domain_id: int | None = None  # None: $ROS_DOMAIN_ID, else derived from the process id
    synthetic: SyntheticConfig | None = None  # base world config; None: the training config's
    # torch threads of the node and of training: OpenMP threads spin-wait, so on a 2-core machine
    # shared with the replay and this recorder one thread is several times faster than two.
    node_threads: int = 1
    node_start_timeout: float = 180.0
    drain_timeout: float = 30.0  # after the replay: wait this long at most for the last outputs


# ------------------------------------------------------------------------------------ artefacts
def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_world(train_config: Path) -> SyntheticConfig:
    """The synthetic world (sensors) the model is trained on, so the demo drives the same sensors."""
    from clip3d_core.training import load_train_config

    return load_train_config(train_config).data.typed_options().world


def prepare_bag(cfg: DemoConfig) -> tuple[Path, SyntheticConfig]:
    """The synthetic drive bag in `out/drive_bag`, rebuilt only when its recipe changed."""
    base = cfg.synthetic if cfg.synthetic is not None else training_world(cfg.train_config)
    synthetic = make_bag.drive_config(cfg.seconds, cfg.rate_hz, cfg.seed, base)
    recipe = {"synthetic": dataclasses.asdict(synthetic), "storage": cfg.storage}
    path, stamp = cfg.out / "drive_bag", cfg.out / "drive_bag.recipe.json"
    if path.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        log.info("reusing %s", path)
        return path, synthetic
    shutil.rmtree(path, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    make_bag.write_drive_bag(path, synthetic, storage=cfg.storage, workers=cfg.workers)
    stamp.write_text(json.dumps(recipe, indent=1))
    return path, synthetic


def prepare_checkpoint(cfg: DemoConfig, env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, how it was obtained)."""
    if cfg.checkpoint is not None:
        return cfg.checkpoint, {"source": "given", "path": str(cfg.checkpoint)}
    if cfg.untrained:
        from clip3d_core.checkpoint import build_untrained_checkpoint
        from clip3d_core.clip import tiny_clip_config
        from clip3d_core.data.synthetic.world import CLASS_NAMES
        from clip3d_core.model.config import ModelConfig

        path = cfg.out / "model" / "untrained.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_untrained_checkpoint(
                path, ModelConfig.small(embed_dim=32), tiny_clip_config(), vocabulary=list(CLASS_NAMES)
            )
        return path, {"source": "untrained", "path": str(path)}
    return train_checkpoint(cfg, env)


def train_checkpoint(cfg: DemoConfig, env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """`clip3d train --config <train_config>` unless a checkpoint of the same config text is cached."""
    key = _digest({"config": cfg.train_config.read_text(), "version": clip3d_core.__version__})
    cached = [cfg.out / "model" / f"trained-{key}.pt"]
    if cfg.cache_dir is not None:
        cached.append(cfg.cache_dir / f"demo-trained-{key}.pt")
    for path in cached:
        if path.is_file():
            log.info("reusing trained checkpoint %s", path)
            return path, {"source": "cache", "path": str(path), "config": str(cfg.train_config), "key": key}
    run_dir = cfg.out / "model" / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "clip3d_core.cli",
        "train",
        "--config",
        str(cfg.train_config),
        "--out",
        str(run_dir),
    ]
    log.info("training: %s", " ".join(cmd))
    t0 = time.monotonic()
    subprocess.run(cmd, env={"OMP_NUM_THREADS": str(cfg.node_threads), **env}, check=True)
    final = run_dir / "final.pt"
    if not final.is_file():
        raise FileNotFoundError(f"training finished without {final}")
    for path in cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(final, path)
    return cached[0], {
        "source": "trained",
        "path": str(cached[0]),
        "config": str(cfg.train_config),
        "key": key,
        "train_s": round(time.monotonic() - t0, 1),
    }


def checkpoint_vocabulary(path: Path) -> list[str]:
    from clip3d_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.vocabulary:
        return list(ckpt.vocabulary)
    from clip3d_core.data.synthetic.world import CLASS_NAMES

    return list(CLASS_NAMES)


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
    if FASTDDS_PROFILE.is_file():
        env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(FASTDDS_PROFILE))
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


# ------------------------------------------------------------------------------------ recording
class Recorder:
    """Subscribes (raw CDR) to the input cloud and the node's outputs; writes the outputs to a bag.

    Latency per frame = arrival of the labelled cloud - arrival of the input cloud with the same
    header stamp, both seen here (one host clock). The bag is written by a thread of its own:
    callbacks only enqueue (and sqlite connections must stay in the thread that opened them)."""

    def __init__(self, node: Any, path: Path, storage: str, start_ns: int) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import String

        self.start_ns = start_ns
        self.lock = threading.Lock()
        self.input_arrival: dict[int, float] = {}
        self.output_arrival: dict[int, float] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.vocabularies: dict[int, dict[str, Any]] = {}
        self._queue: queue.Queue[tuple[str, int, bytes] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._opened = threading.Event()
        self._thread = threading.Thread(
            target=self._write_loop, args=(path, storage), name="recorder", daemon=True
        )
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            raise self._error
        latched = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        cloud = make_bag.CLOUD_TOPIC
        node.create_subscription(PointCloud2, cloud, self._on_input, QoSProfile(depth=50), raw=True)
        node.create_subscription(PointCloud2, OUTPUT_TOPIC, self._on_output, QoSProfile(depth=10), raw=True)
        node.create_subscription(String, META_TOPIC, self._on_meta, QoSProfile(depth=50), raw=True)
        node.create_subscription(String, VOCAB_TOPIC, self._on_vocabulary, latched, raw=True)

    def _write_loop(self, path: Path, storage: str) -> None:
        try:
            with bag.BagWriter(path, storage) as writer:
                writer.add_topic(OUTPUT_TOPIC, bag.T_CLOUD)
                writer.add_topic(META_TOPIC, bag.T_STRING)
                writer.add_topic(VOCAB_TOPIC, bag.T_STRING, bag.QOS_LATCHED)
                self._opened.set()
                while (item := self._queue.get()) is not None:
                    writer.write_raw(*item)
        except Exception as exc:  # reported by close()
            self._error = exc
            self._opened.set()

    def close(self) -> None:
        """Finish the bag (everything received so far is in it); counts stay readable."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing the labelled bag failed: {self._error}") from self._error

    def _on_input(self, raw: bytes) -> None:
        now = time.monotonic()
        with self.lock:
            self.input_arrival.setdefault(bag.peek_stamp_ns(raw), now)

    def _on_output(self, raw: bytes) -> None:
        now = time.monotonic()
        stamp = bag.peek_stamp_ns(raw)
        with self.lock:
            self.output_arrival[stamp] = now
        self._queue.put((OUTPUT_TOPIC, stamp, raw))

    def _on_meta(self, raw: bytes) -> None:
        try:
            meta = parse_labels_meta(bag.deserialize(raw, bag.T_STRING).data)
        except ValueError as exc:
            log.warning("bad labels_meta message: %s", exc)
            return
        stamp = meta["stamp"]["sec"] * 1_000_000_000 + meta["stamp"]["nanosec"]
        with self.lock:
            self.meta[stamp] = meta
        self._queue.put((META_TOPIC, stamp, raw))

    def _on_vocabulary(self, raw: bytes) -> None:
        try:
            vocab = parse_vocabulary_map(bag.deserialize(raw, bag.T_STRING).data)
        except ValueError as exc:
            log.warning("bad vocabulary map message: %s", exc)
            return
        with self.lock:
            # Bag time of a map = the newest data stamp seen, so it sorts before the clouds using it.
            stamp = max([*self.output_arrival, *self.input_arrival, self.start_ns])
            self.vocabularies[vocab["version"]] = vocab
        self._queue.put((VOCAB_TOPIC, stamp, raw))

    def playing_s(self) -> float:
        """Seconds since the first input cloud arrived (0 before)."""
        with self.lock:
            first = min(self.input_arrival.values(), default=None)
        return 0.0 if first is None else time.monotonic() - first

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.input_arrival), len(self.output_arrival)

    def latencies_ms(self) -> np.ndarray:
        with self.lock:
            return np.array(
                [
                    (t - self.input_arrival[s]) * 1e3
                    for s, t in self.output_arrival.items()
                    if s in self.input_arrival
                ]
            )


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


# ------------------------------------------------------------------------------------ pictures
def vocabulary_from_map(vocab_map: dict[str, Any]) -> Vocabulary:
    return Vocabulary.from_strings(
        ["|".join(e["synonyms"]) for e in vocab_map["entries"]], version=int(vocab_map["version"])
    )


def draw_frames(
    labelled_bag: Path,
    drive_bag: Path,
    out_dir: Path,
    vocabularies: dict[int, Vocabulary],
    versions: dict[int, int],
    count: int,
    start_ns: int,
    note: str = "",
) -> list[dict[str, Any]]:
    """Bird's-eye + camera overlay PNGs of `count` labelled frames spread over the run."""
    import torch

    from clip3d_core.viz import bev_png, overlay_png

    reader = bag.open_reader(labelled_bag)
    try:
        conn = bag.require_topic(reader, OUTPUT_TOPIC, [bag.T_CLOUD])
        stamps = sorted(bag.peek_stamp_ns(raw) for _, _, raw in reader.messages([conn]))
        chosen = {
            stamps[i] for i in np.unique(np.linspace(0, len(stamps) - 1, min(count, len(stamps))).astype(int))
        }
        clouds = {
            bag.peek_stamp_ns(raw): bag.deserialize(raw, bag.T_CLOUD)
            for _, _, raw in reader.messages([conn])
            if bag.peek_stamp_ns(raw) in chosen
        }
    finally:
        reader.close()
    images, camera_msgs, tf = _camera_inputs(drive_bag, set(clouds))
    written = []
    for stamp, msg in sorted(clouds.items()):
        records = conversions.cloud_to_array(msg)
        xyz, labels = conversions.xyz_of(records), records["label"]
        vocab = vocabularies[versions.get(stamp, max(vocabularies))]
        title = f"t = {(stamp - start_ns) / 1e9:.1f} s, vocabulary v{vocab.version}{note}"
        bev = bev_png(out_dir / f"bev_{stamp}.png", xyz, labels, vocab, title=title)
        entry = {"stamp": str(stamp), "vocabulary_version": vocab.version, "bev": bev.name}
        if stamp in images and stamp in camera_msgs:
            info = camera_msgs[stamp]
            camera = conversions.camera_from_info_msg(
                info, tf.lookup(info.header.frame_id, msg.header.frame_id), "front"
            )
            finite = np.isfinite(xyz).all(axis=1)
            proj = project_points(torch.from_numpy(np.where(finite[:, None], xyz, 0.0)), [camera])
            seen = proj.visible[0].numpy() & finite
            entry["overlay"] = overlay_png(
                out_dir / f"camera_{stamp}.png",
                images[stamp],
                proj.uv[0].numpy()[seen],
                labels[seen],
                vocab,
                depth=proj.depth[0].numpy()[seen],
                title=title,
            ).name
        written.append(entry)
    return written


def _camera_inputs(
    drive_bag: Path, stamps: set[int]
) -> tuple[dict[int, np.ndarray], dict[int, Any], bag.StaticTransforms]:
    topics = make_bag.CameraTopics("front")
    reader = bag.open_reader(drive_bag)
    try:
        tf = bag.read_static_transforms(reader)
        conns = bag.connections_for(reader, [topics.image, topics.info])
        images, infos = {}, {}
        for conn, _, raw in reader.messages(conns):
            stamp = bag.peek_stamp_ns(raw)
            if stamp not in stamps:
                continue
            msg = bag.deserialize(raw, conn.msgtype)
            if conn.topic == topics.info:
                infos[stamp] = msg
            else:
                images[stamp] = conversions.msg_to_rgb(msg)
    finally:
        reader.close()
    return images, infos, tf


# ------------------------------------------------------------------------------------ summary
def label_histograms(
    labelled_bag: Path, vocabularies: dict[int, Vocabulary], versions: dict[int, int]
) -> dict[int, dict[str, int]]:
    """Points per class name for each vocabulary version (plus "unlabelled")."""
    hist: dict[int, Counter[str]] = defaultdict(Counter)
    reader = bag.open_reader(labelled_bag)
    try:
        conn = bag.require_topic(reader, OUTPUT_TOPIC, [bag.T_CLOUD])
        for _, _, msg in bag.iter_messages(reader, [conn]):
            stamp = bag.stamp_ns(msg.header)
            vocab = vocabularies[versions.get(stamp, max(vocabularies))]
            labels = conversions.cloud_to_array(msg)["label"].astype(np.int64)
            counts = np.bincount(np.minimum(labels, len(vocab)), minlength=len(vocab) + 1)
            names = [*vocab.names, "unlabelled"]
            hist[vocab.version].update({n: int(c) for n, c in zip(names, counts) if c})
    finally:
        reader.close()
    return {v: dict(c.most_common()) for v, c in sorted(hist.items())}


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(values.max()), 1),
        "mean": round(float(values.mean()), 1),
    }


def summary_markdown(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    lines = [
        "# clip3d demo",
        "",
        f"- drive: {s['bag']['frames']} frames ({s['bag']['seconds']} s at {s['bag']['rate_hz']} Hz), "
        f"replayed at x{s['replay']['rate']}",
        f"- model: {s['model']['source']} `{s['model']['path']}`",
        f"- frames in (clouds seen on {make_bag.CLOUD_TOPIC}): {s['frames_in']}; "
        f"frames out (labelled clouds): {s['frames_out']}",
        f"- vocabulary change: {s['vocabulary_change']['status']} at replay "
        f"{s['vocabulary_change'].get('at_s', '-')} s",
        f"- runtime: {s['runtime_s']['total']} s total "
        f"({', '.join(f'{k} {v} s' for k, v in s['runtime_s'].items() if k != 'total')})",
        "",
        "## Latency (header stamp -> labelled cloud received), ms",
        "",
        "| p50 | p90 | p99 | max | mean |",
        "|---|---|---|---|---|",
        f"| {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} | {lat['mean']} |",
        "",
        "## Labels per vocabulary version (points)",
        "",
    ]
    for version, hist in s["label_histogram"].items():
        total = sum(hist.values()) or 1
        lines += [
            f"### v{version} ({s['frames_per_version'].get(version, 0)} frames)",
            "",
            "| class | points | share |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {count} | {100 * count / total:.1f}% |" for name, count in hist.items()]
        lines.append("")
    lines += ["## Pictures", ""]
    for p in s["pictures"]:
        lines.append(
            f"- v{p['vocabulary_version']}: ![]({p['bev']})"
            + (f" ![]({p['overlay']})" if "overlay" in p else "")
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the run
def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from clip3d_ros.testing import ros_domain_id

    t_start = time.monotonic()
    runtime: dict[str, float] = {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    domain = (
        cfg.domain_id
        if cfg.domain_id is not None
        else int(os.environ.get("ROS_DOMAIN_ID") or ros_domain_id(90))
    )
    env = ros_env(domain)

    t = time.monotonic()
    drive_bag, synthetic = prepare_bag(cfg)
    runtime["bag"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    checkpoint, model_info = prepare_checkpoint(cfg, env)
    runtime["model"] = round(time.monotonic() - t, 1)
    vocabulary_v1 = checkpoint_vocabulary(checkpoint)
    params_path = cfg.out / "node_params.yaml"
    params_path.write_text(
        yaml.safe_dump(node_parameters(checkpoint.resolve(), vocabulary_v1, drive_bag), sort_keys=False)
    )

    labelled = cfg.out / "labelled_bag"
    shutil.rmtree(labelled, ignore_errors=True)
    frames_dir = cfg.out / "frames"
    shutil.rmtree(frames_dir, ignore_errors=True)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("clip3d_demo", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    change: dict[str, Any] = {"status": "not reached", "names": cfg.vocabulary_v2}
    replay_seconds = synthetic.drive_frames / synthetic.rate_hz / cfg.replay_rate
    try:
        recorder = Recorder(node, labelled, cfg.storage, synthetic.start_stamp_ns)
        try:
            node_cmd = [
                sys.executable,
                "-m",
                "clip3d_ros.node",
                "--ros-args",
                "--params-file",
                str(params_path),
                # the launch file's remappings: the node's topics are relative
                "-r",
                f"~/input/pointcloud:={make_bag.CLOUD_TOPIC}",
                "-r",
                f"~/output/pointcloud:={OUTPUT_TOPIC}",
            ]
            node_env = {"OMP_NUM_THREADS": str(cfg.node_threads), **env}  # an explicit setting wins
            with child_process(node_cmd, node_env, cfg.out / "node.log", "node") as node_proc:
                t = time.monotonic()
                _wait_for_node(node, recorder, node_proc, cfg.node_start_timeout, cfg.out / "node.log")
                runtime["node_start"] = round(time.monotonic() - t, 1)
                cam = make_bag.CameraTopics("front")
                # Start once the node (camera topics; cloud: node + this recorder) is matched.
                replay_cmd = [
                    sys.executable,
                    "-m",
                    "clip3d_core.cli",
                    "replay",
                    str(drive_bag),
                    "--clock",
                    "--rate",
                    str(cfg.replay_rate),
                    "--delay",
                    "0.5",
                    "--wait-for",
                    f"{make_bag.CLOUD_TOPIC}:2",
                    cam.image,
                    cam.info,
                ]
                t = time.monotonic()
                with child_process(replay_cmd, env, cfg.out / "replay.log", "replay") as replay_proc:
                    while replay_proc.poll() is None:
                        elapsed = recorder.playing_s()
                        if (
                            change["status"] == "not reached"
                            and elapsed >= cfg.change_at * replay_seconds
                            and recorder.counts()[1] > 0
                        ):
                            change["at_s"] = round(elapsed, 1)
                            reason = set_vocabulary(node, cfg.vocabulary_v2)
                            change["status"] = "applied" if reason is None else f"failed: {reason}"
                            log.info("vocabulary change at %.1f s: %s", elapsed, change["status"])
                        time.sleep(0.05)
                    if replay_proc.returncode != 0:
                        raise RuntimeError(
                            f"replay failed ({replay_proc.returncode}); see {cfg.out / 'replay.log'}"
                        )
                runtime["replay"] = round(time.monotonic() - t, 1)
                _drain(recorder, cfg.drain_timeout)
            node_exit = node_proc.returncode
        finally:
            recorder.close()
        frames_in, frames_out = recorder.counts()
        latencies = recorder.latencies_ms()
        vocab_maps = dict(recorder.vocabularies)
        versions = {s: int(m["version"]) for s, m in recorder.meta.items()}
    finally:
        executor.shutdown()
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)

    vocabularies = {v: vocabulary_from_map(m) for v, m in vocab_maps.items()}
    if not vocabularies or frames_out == 0:
        raise RuntimeError(
            f"the node labelled no frames (vocabulary maps: {sorted(vocabularies)}); "
            f"see {cfg.out / 'node.log'}"
        )
    t = time.monotonic()
    note = "  [UNTRAINED MODEL]" if model_info["source"] == "untrained" else ""
    pictures = draw_frames(
        labelled, drive_bag, frames_dir, vocabularies, versions, cfg.pictures, synthetic.start_stamp_ns, note
    )
    for p in pictures:
        p["bev"] = f"frames/{p['bev']}"
        if "overlay" in p:
            p["overlay"] = f"frames/{p['overlay']}"
    histograms = label_histograms(labelled, vocabularies, versions)
    runtime["pictures"] = round(time.monotonic() - t, 1)
    runtime["total"] = round(time.monotonic() - t_start, 1)
    summary = {
        "bag": {
            "path": str(drive_bag),
            "frames": synthetic.drive_frames,
            "seconds": cfg.seconds,
            "rate_hz": cfg.rate_hz,
            "seed": cfg.seed,
            "storage": cfg.storage,
        },
        "model": model_info,
        "replay": {"rate": cfg.replay_rate, "clock": True},
        "node_exit_code": node_exit,
        "ros_domain_id": domain,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "latency_ms": percentiles(latencies),
        "vocabulary_change": change,
        "vocabularies": {v: m for v, m in sorted(vocab_maps.items())},
        "frames_per_version": dict(sorted(Counter(versions.values()).items())),
        "label_histogram": histograms,
        "labelled_bag": str(labelled),
        "pictures": pictures,
        "runtime_s": runtime,
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (cfg.out / "summary.md").write_text(summary_markdown(json.loads(json.dumps(summary))))
    return summary


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


def _drain(recorder: Recorder, timeout: float) -> None:
    """After the replay: wait until the node has answered every frame it took (no new output
    for a few seconds) or `timeout`."""
    deadline, quiet = time.monotonic() + timeout, 0.0
    last = recorder.counts()[1]
    while time.monotonic() < deadline and quiet < 3.0:
        time.sleep(0.25)
        now = recorder.counts()[1]
        quiet = 0.0 if now != last else quiet + 0.25
        last = now


# ------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip3d_ros.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--seconds", type=float, default=20.0, help="drive length (s of sim time)")
    parser.add_argument("--rate", type=float, default=10.0, help="sensor rate (Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", choices=sorted(bag.STORAGES), default="sqlite3")
    parser.add_argument("--replay-rate", type=float, default=1.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this model instead of training")
    parser.add_argument("--untrained", action="store_true", help="random model weights (wiring check only)")
    parser.add_argument("--train-config", type=Path, default=TRAIN_CONFIG)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "clip3d")
    parser.add_argument("--pictures", type=int, default=4)
    parser.add_argument("--workers", type=int, default=DemoConfig.workers)
    parser.add_argument("--domain-id", type=int, default=None)
    parser.add_argument(
        "--node-threads",
        type=int,
        default=DemoConfig.node_threads,
        help="torch CPU threads of the node (unless OMP_NUM_THREADS is set)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = DemoConfig(
        out=args.out,
        seconds=args.seconds,
        rate_hz=args.rate,
        seed=args.seed,
        storage=args.storage,
        replay_rate=args.replay_rate,
        checkpoint=args.checkpoint,
        untrained=args.untrained,
        train_config=args.train_config,
        cache_dir=args.cache_dir,
        pictures=args.pictures,
        workers=args.workers,
        domain_id=args.domain_id,
        node_threads=args.node_threads,
    )
    try:
        summary = run_demo(cfg)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError, ValueError, FileNotFoundError) as exc:
        log.error("demo failed: %s", exc)
        return 1
    print((cfg.out / "summary.md").read_text())
    print(f"demo output in {cfg.out} ({summary['runtime_s']['total']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
