"""The demo run: bag -> model -> node process <- replay, recorded, then pictures and summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from typing import Any

import yaml

from clip3d_ros.demo.artefacts import checkpoint_vocabulary, prepare_bag, prepare_checkpoint
from clip3d_ros.demo.config import OBJECTS_TOPIC, OUTPUT_TOPIC, DemoConfig
from clip3d_ros.demo.pictures import draw_frames
from clip3d_ros.demo.processes import _wait_for_node, child_process, node_parameters, ros_env, set_vocabulary
from clip3d_ros.demo.recorder import Recorder, _drain
from clip3d_ros.demo.report import label_statistics, percentiles, summary_markdown, vocabulary_from_map
from clip3d_ros.tools import make_bag

log = logging.getLogger(__name__)


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
                "-r",
                f"~/output/objects:={OBJECTS_TOPIC}",
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
        object_messages = recorder.object_messages
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
    histograms, objects = label_statistics(labelled, vocabularies, versions)
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
        "objects": objects,
        "objects_topic": OBJECTS_TOPIC,
        "object_messages": object_messages,
        "labelled_bag": str(labelled),
        "pictures": pictures,
        "runtime_s": runtime,
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (cfg.out / "summary.md").write_text(summary_markdown(json.loads(json.dumps(summary))))
    return summary
