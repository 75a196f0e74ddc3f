"""Bird's-eye and camera-overlay pictures of labelled frames."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from clip3d_core.clip.vocabulary import Vocabulary
from clip3d_core.geometry import project_points
from clip3d_ros import bag, conversions
from clip3d_ros.demo.config import OUTPUT_TOPIC
from clip3d_ros.labelling import CameraResolver
from clip3d_ros.tools import make_bag

log = logging.getLogger(__name__)


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
    resolver = CameraResolver("front")
    written = []
    for stamp, msg in sorted(clouds.items()):
        records = conversions.cloud_to_array(msg)
        xyz, labels = conversions.xyz_of(records), records["label"]
        vocab = vocabularies[versions.get(stamp, max(vocabularies))]
        title = f"t = {(stamp - start_ns) / 1e9:.1f} s, vocabulary v{vocab.version}{note}"
        instances = records["instance"] if "instance" in records.dtype.names else None  # panoptic
        bev = bev_png(out_dir / f"bev_{stamp}.png", xyz, labels, vocab, title=title, instances=instances)
        entry = {"stamp": str(stamp), "vocabulary_version": vocab.version, "bev": bev.name}
        if stamp in images and stamp in camera_msgs:
            info = camera_msgs[stamp]
            camera = resolver.from_info(  # the node's and label-bag's camera model, same image size
                info, tf.lookup(info.header.frame_id, msg.header.frame_id), images[stamp].shape[:2]
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
                instances=None if instances is None else instances[seen],
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
