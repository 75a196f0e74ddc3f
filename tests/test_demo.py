"""A tiny end-to-end demo: synthetic bag -> node subprocess -> replay -> labelled bag + pictures.

Same code path as `make demo` with a 16-beam LiDAR, a 96x64 camera, 15 frames and an untrained
model (training has its own tests); real DDS on loopback in this module's own domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("rclpy")

from clip3d_core.data.synthetic.config import CameraConfig, LidarConfig, SyntheticConfig
from clip3d_core.segmenter import Segmenter
from clip3d_ros import bag, conversions
from clip3d_ros.demo import META_TOPIC, OUTPUT_TOPIC, VOCAB_TOPIC, DemoConfig, run_demo, vocabulary_from_map
from clip3d_ros.testing import ros_domain_id
from clip3d_ros.tools.label_bag import BagLabeller, LabelOptions
from clip3d_ros.vocabulary_map import parse_labels_meta, parse_vocabulary_map


def test_tiny_demo_end_to_end(tmp_path: Path) -> None:
    world = SyntheticConfig(
        lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=256),
        cameras=(CameraConfig(width=96, height=64),),
    )
    cfg = DemoConfig(
        out=tmp_path / "demo",
        seconds=1.5,
        rate_hz=10.0,
        replay_rate=0.5,
        untrained=True,
        synthetic=world,
        pictures=2,
        workers=1,
        change_at=0.3,
        domain_id=ros_domain_id(42),
        vocabulary_v2=["road|street", "building", "vehicle|car|truck"],
        node_start_timeout=120.0,
    )
    summary = run_demo(cfg)
    out = cfg.out

    # every input frame was seen, the node answered some of them and shut down cleanly
    assert summary["frames_in"] == 15
    assert 1 <= summary["frames_out"] <= 15
    assert summary["node_exit_code"] == 0
    assert summary["latency_ms"]["p50"] > 0
    assert summary["vocabulary_change"]["status"] == "applied"

    # the labelled bag: one cloud per answered frame, same points as the input at that stamp
    inputs = {}
    reader = bag.open_reader(out / "drive_bag")
    for _, ts, msg in bag.iter_messages(reader, bag.connections_for(reader, ["/lidar/points"])):
        inputs[ts] = conversions.cloud_to_array(msg)
    reader.close()
    reader = bag.open_reader(out / "labelled_bag")
    clouds = list(bag.iter_messages(reader, bag.connections_for(reader, [OUTPUT_TOPIC])))
    maps = [
        parse_vocabulary_map(m.data)
        for _, _, m in bag.iter_messages(reader, bag.connections_for(reader, [VOCAB_TOPIC]))
    ]
    version_of = {
        ts: parse_labels_meta(m.data)["version"]
        for _, ts, m in bag.iter_messages(reader, bag.connections_for(reader, [META_TOPIC]))
    }
    reader.close()
    assert len(clouds) == summary["frames_out"]
    for _, ts, msg in clouds:
        records = conversions.cloud_to_array(msg)
        assert ts == bag.stamp_ns(msg.header) and ts in inputs
        np.testing.assert_array_equal(conversions.xyz_of(records), conversions.xyz_of(inputs[ts]))
        assert records.dtype["label"] == np.dtype("<u2")
    # the initial vocabulary and the one set mid-run were both recorded
    assert len({m["version"] for m in maps}) >= 2
    assert [e["name"] for e in maps[-1]["entries"]] == ["road", "building", "vehicle"]

    # offline labelling (label-bag) of the same frames with the node's first vocabulary gives the
    # node's output: same layout, same labels (up to spconv's CPU float-order noise at ties)
    first = min(maps, key=lambda m: m["version"])
    labeller = BagLabeller(
        Segmenter.from_checkpoint(
            summary["model"]["path"], vocabulary=vocabulary_from_map(first).to_strings()
        ),
        LabelOptions(progress=False),
    )
    labeller.run(out / "drive_bag", tmp_path / "offline")
    reader = bag.open_reader(tmp_path / "offline")
    offline = {ts: m for _, ts, m in bag.iter_messages(reader, bag.connections_for(reader, [OUTPUT_TOPIC]))}
    reader.close()
    compared = 0
    for _, ts, msg in clouds:
        if version_of[ts] != first["version"]:
            continue
        node_rec, off_rec = conversions.cloud_to_array(msg), conversions.cloud_to_array(offline[ts])
        assert node_rec.dtype == off_rec.dtype
        assert np.mean(node_rec["label"] == off_rec["label"]) > 0.999
        compared += 1
    assert compared >= 1  # the vocabulary changes only after a frame labelled with the first one

    # histogram per vocabulary version covers every labelled point
    total = sum(sum(h.values()) for h in summary["label_histogram"].values())
    assert total == sum(len(inputs[ts]) for _, ts, _ in clouds)

    # pictures and summaries
    assert 1 <= len(summary["pictures"]) <= 2
    for pic in summary["pictures"]:
        for key in ("bev", "overlay"):
            with Image.open(out / pic[key]) as img:
                assert img.size[0] > 64 and img.size[1] > 64
    saved = json.loads((out / "summary.json").read_text())
    assert saved["frames_out"] == summary["frames_out"]
    assert "Latency" in (out / "summary.md").read_text()
    # a semantic model has no objects: none recorded, none counted
    assert summary["objects"] == {} and summary["object_messages"] == 0
    assert "## Objects" not in (out / "summary.md").read_text()


def test_the_demo_finds_its_files_in_an_installed_package(tmp_path, monkeypatch) -> None:
    """Outside a source tree (installed wheel / colcon install) training/ and config/ come from
    share/clip3d_ros, where setup.py's data files put them."""
    import sys

    from clip3d_ros.demo import config

    repo = Path(__file__).resolve().parents[1]
    assert config.shipped_file("training/synthetic_tiny.yaml") == repo / "training/synthetic_tiny.yaml"
    share = tmp_path / "prefix" / "share" / "clip3d_ros"
    (share / "training").mkdir(parents=True)
    (share / "training" / "synthetic_tiny.yaml").write_text("name: x\n")
    monkeypatch.setattr(config, "SOURCE_TREE", tmp_path / "no_source_tree")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert config.shipped_file("training/synthetic_tiny.yaml") == share / "training/synthetic_tiny.yaml"
    assert config.DemoConfig(out=tmp_path).train_config == share / "training/synthetic_tiny.yaml"
    with pytest.raises(FileNotFoundError, match=r"fastdds_loopback\.xml"):
        config.shipped_file("config/fastdds_loopback.xml")
    assert "training/synthetic_tiny.yaml" in (repo / "setup.py").read_text()


def test_the_panoptic_demo_records_objects_and_boxes_them(tmp_path: Path) -> None:
    """The demo's side of a panoptic model, without DDS (the node's side: test_ros_node): the
    recorder writes the node's objects MarkerArrays at their clouds' stamps, the summary counts the
    instances per class, and the bird's-eye pictures outline each instance (white boxes)."""
    from clip3d_core.testing import tiny_panoptic_checkpoint
    from clip3d_core.viz import bev_png
    from clip3d_ros.demo import OBJECTS_TOPIC
    from clip3d_ros.demo.pictures import draw_frames
    from clip3d_ros.demo.recorder import Recorder
    from clip3d_ros.demo.report import label_statistics
    from clip3d_ros.tools import make_bag

    world = SyntheticConfig(
        lidar=LidarConfig(pattern="vlp16", beams=16, azimuths=256),
        cameras=(CameraConfig(width=96, height=64),),
    )
    drive = make_bag.drive_config(0.3, 10.0, 0, world)
    make_bag.write_drive_bag(tmp_path / "drive", drive, workers=1, progress=False)
    seg = Segmenter.from_checkpoint(tiny_panoptic_checkpoint(tmp_path / "pan.pt"))
    BagLabeller(seg, LabelOptions(progress=False)).run(tmp_path / "drive", tmp_path / "offline")

    # what the node publishes (label-bag writes the same messages), through the demo's recorder
    class NoSubscriptions:
        def create_subscription(self, *args, **kwargs) -> None:
            return None

    recorder = Recorder(NoSubscriptions(), tmp_path / "labelled", "sqlite3", drive.start_stamp_ns)
    reader = bag.open_reader(tmp_path / "offline")
    for conn, _, raw in reader.messages(bag.connections_for(reader, [OUTPUT_TOPIC, OBJECTS_TOPIC])):
        (recorder._on_output if conn.topic == OUTPUT_TOPIC else recorder._on_objects)(raw)
    reader.close()
    recorder.close()
    reader = bag.open_reader(tmp_path / "labelled")
    clouds = {ts: conversions.cloud_to_array(m)
              for _, ts, m in bag.iter_messages(reader, bag.connections_for(reader, [OUTPUT_TOPIC]))}
    objects = {ts: m for _, ts, m in bag.iter_messages(reader, bag.connections_for(reader, [OBJECTS_TOPIC]))}
    reader.close()
    assert len(clouds) == drive.drive_frames == recorder.object_messages and set(objects) == set(clouds)
    for ts, records in clouds.items():
        cubes = {m.id for m in objects[ts].markers if m.ns == "objects"}
        assert cubes == set(np.unique(records["instance"][records["instance"] > 0]).tolist())

    vocab = seg.vocabulary
    hist, stats = label_statistics(tmp_path / "labelled", {vocab.version: vocab}, {})
    counts = [len(np.unique(r["instance"][r["instance"] > 0])) for r in clouds.values()]
    assert sum(counts) > 0, "the test needs at least one instance"
    (summary,) = stats.values()
    assert summary["frames"] == len(clouds) and summary["instances"] == sum(counts)
    assert summary["per_frame_max"] == max(counts) and sum(summary["per_class"].values()) == sum(counts)
    assert set(summary["per_class"]) <= {"car", "bus", "person"}  # thing classes only
    assert sum(hist[vocab.version].values()) == sum(len(r) for r in clouds.values())

    pictures = draw_frames(tmp_path / "labelled", tmp_path / "drive", tmp_path / "frames",
                           {vocab.version: vocab}, {}, 3, drive.start_stamp_ns)
    boxed = 0
    for pic in pictures:
        records = clouds[int(pic["stamp"])]
        plain = bev_png(tmp_path / "plain.png", conversions.xyz_of(records), records["label"], vocab,
                        title=f"t = {(int(pic['stamp']) - drive.start_stamp_ns) / 1e9:.1f} s, "
                              f"vocabulary v{vocab.version}")
        with Image.open(tmp_path / "frames" / pic["bev"]) as a, Image.open(plain) as b:
            drawn, bare = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        changed = (drawn != bare).any(axis=2)
        assert (drawn[changed] == 255).all()  # only the white outlines differ
        boxed += bool(changed.any())
        assert changed.any() == bool((records["instance"] > 0).any())
    assert boxed >= 1
