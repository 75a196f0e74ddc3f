"""Label a bag's LiDAR clouds offline into a new bag (rosbags only: no ROS runtime needed).

Writes what the node publishes, under the node's topic names by default:
  /clip3d/labelled_points  PointCloud2  x, y, z, [intensity], label (uint16), score, rgb, [instance
                           (uint32, panoptic models)]; input header,
                           input point order and count
  /clip3d/vocabulary       std_msgs/String JSON vocabulary map (transient local)
  /clip3d/labels_meta      std_msgs/String JSON per cloud: stamp, vocabulary version, cameras used
  /clip3d/objects          visualization_msgs/MarkerArray per cloud (panoptic models): the node's
                           ~/output/objects boxes
Cameras (`--camera IMAGE_TOPIC INFO_TOPIC`, repeatable) are matched to each cloud by nearest header
stamp within `--slop`; their LiDAR->camera extrinsics come from the bag's /tf_static. Images are
used by fusion models only. `--copy` / `--copy-all` carry input topics over unchanged. Output
bags are MCAP (the rosbag2 default since Iron) unless `--storage` says otherwise.

Fleet scale: the inputs are bags or folders of bags. One input bag -> OUTPUT is the new bag;
otherwise OUTPUT is a folder receiving one labelled bag per input bag, under its name. Bags are
sharded over processes: under `torchrun` (RANK / WORLD_SIZE; `--device cuda` becomes
`cuda:$LOCAL_RANK`) or `--shard I/N`, process I labels bags I, I + N, ... of the sorted list.
Each bag is written to `NAME.partial` and renamed when complete, so a killed run, started again
with the same arguments, skips the finished bags and redoes only the interrupted ones.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from rosbags.interfaces import Connection
from rosbags.rosbag2 import Reader
from tqdm import tqdm

from clip3d_core.clip import ClipLoadError
from clip3d_core.clip.vocabulary import VocabularyError
from clip3d_core.geometry import PinholeCamera
from clip3d_ros import bag, conversions, markers
from clip3d_ros.labelling import CAMERA_ERRORS, CameraResolver, ImageLimits, decode_cloud, label_frame
from clip3d_ros.vocabulary_map import labels_meta_payload

log = logging.getLogger(__name__)

OUTPUT_TOPIC = "/clip3d/labelled_points"
VOCABULARY_TOPIC = "/clip3d/vocabulary"
LABELS_META_TOPIC = "/clip3d/labels_meta"
OBJECTS_TOPIC = "/clip3d/objects"


@dataclass
class CameraSource:
    """One camera in the input bag: its image and CameraInfo topics."""

    image_topic: str
    info_topic: str

    @property
    def name(self) -> str:
        """The info topic's namespace: /camera/front/camera_info -> front."""
        return PurePosixPath(self.info_topic).parent.name or self.info_topic


@dataclass
class LabelOptions:
    cloud_topic: str = "/lidar/points"
    cameras: Sequence[CameraSource] = ()
    output_topic: str = OUTPUT_TOPIC
    vocabulary_topic: str = VOCABULARY_TOPIC
    labels_meta_topic: str = LABELS_META_TOPIC
    objects_topic: str = OBJECTS_TOPIC  # written for panoptic models only
    intensity_field: str = ""
    lidar_frame: str = ""  # "" = the cloud's header frame_id
    slop: float = 0.05  # seconds between a cloud and an image that still match
    copy_topics: Sequence[str] = ()
    copy_all: bool = False
    storage: str = "mcap"
    max_frames: int | None = None
    progress: bool = True
    image_limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class LabelStats:
    clouds: int = 0
    labelled: int = 0
    failed: int = 0
    copied: Counter[str] = field(default_factory=Counter)
    label_counts: Counter[str] = field(default_factory=Counter)
    cameras_used: Counter[str] = field(default_factory=Counter)
    issues: Counter[str] = field(default_factory=Counter)  # labelled anyway: bad_intensity, empty_cloud...


@dataclass
class _StampIndex:
    """Header stamps -> bag timestamps of one topic, for nearest-stamp lookups."""

    stamps: list[int]
    bag_times: list[int]

    def nearest(self, stamp: int, slop_ns: int) -> int | None:
        i = bisect.bisect_left(self.stamps, stamp)
        best = min(
            (j for j in (i - 1, i) if 0 <= j < len(self.stamps)),
            key=lambda j: abs(self.stamps[j] - stamp),
            default=None,
        )
        if best is None or abs(self.stamps[best] - stamp) > slop_ns:
            return None
        return self.bag_times[best]


def _index(reader: Reader, conn: Connection) -> _StampIndex:
    pairs = sorted((bag.peek_stamp_ns(raw), ts) for _, ts, raw in reader.messages([conn]))
    return _StampIndex([s for s, _ in pairs], [t for _, t in pairs])


@dataclass
class _CameraStream:
    """One camera's topics in the input bag with their stamp indexes."""

    source: CameraSource
    image: Connection
    images: _StampIndex
    info: Connection
    infos: _StampIndex
    resolver: CameraResolver


class BagLabeller:
    """Labels one input bag into one output bag with a `Segmenter`."""

    def __init__(self, segmenter: Any, options: LabelOptions) -> None:
        if segmenter.vocabulary is None:
            raise VocabularyError("the segmenter has no vocabulary: pass --vocabulary")
        self.segmenter = segmenter
        self.options = options

    def run(self, in_path: str | Path, out_path: str | Path) -> LabelStats:
        opts = self.options
        stats = LabelStats()
        reader = bag.open_reader(in_path)
        try:
            cloud_conn = bag.require_topic(reader, opts.cloud_topic, [bag.T_CLOUD])
            cams = [self._camera_stream(reader, c) for c in opts.cameras]
            tf = bag.read_static_transforms(reader)
            copy = (
                [c for c in reader.connections if c.topic != opts.cloud_topic]
                if opts.copy_all
                else (bag.connections_for(reader, opts.copy_topics) if opts.copy_topics else [])
            )
            storage = opts.storage
            vocab = self.segmenter.vocabulary
            with bag.BagWriter(out_path, storage) as writer:
                writer.add_topic(opts.output_topic, bag.T_CLOUD)
                writer.add_topic(opts.vocabulary_topic, bag.T_STRING, bag.QOS_LATCHED)
                writer.add_topic(opts.labels_meta_topic, bag.T_STRING)
                if self.segmenter.panoptic is not None:
                    writer.add_topic(opts.objects_topic, markers.T_MARKER_ARRAY)
                for conn in copy:
                    writer.add_connection_like(conn)
                copy_ids = {c.id for c in copy}
                total = (
                    cloud_conn.msgcount
                    if opts.max_frames is None
                    else min(cloud_conn.msgcount, opts.max_frames)
                )
                bar = tqdm(
                    total=total,
                    desc=f"label-bag {Path(out_path).name}",
                    unit="cloud",
                    disable=not opts.progress,
                )
                for conn, ts, raw in reader.messages([cloud_conn, *copy]):
                    if conn.id in copy_ids:
                        writer.write_raw(conn.topic, ts, raw)
                        stats.copied[conn.topic] += 1
                        continue
                    if opts.max_frames is not None and stats.clouds >= opts.max_frames:
                        if not copy:
                            break
                        continue
                    if stats.clouds == 0:
                        writer.write(
                            opts.vocabulary_topic,
                            ts,
                            bag.msg_class(bag.T_STRING)(
                                data=json.dumps(vocab.as_dict(), separators=(",", ":"))
                            ),
                        )
                    stats.clouds += 1
                    bar.update()
                    try:
                        cloud, meta, objects = self._label(
                            reader, bag.deserialize(raw, bag.T_CLOUD), cams, tf, stats
                        )
                    except ValueError as exc:  # every bad-input error in clip3d is a ValueError
                        stats.failed += 1
                        log.warning("cloud at %d ns not labelled: %s", ts, exc)
                        continue
                    writer.write(opts.labels_meta_topic, ts, meta)
                    writer.write(opts.output_topic, ts, cloud)
                    if objects is not None:
                        writer.write(opts.objects_topic, ts, objects)
                    stats.labelled += 1
                bar.close()
        finally:
            reader.close()
        log.info(
            "labelled %d/%d clouds into %s (%d failed); copied %s",
            stats.labelled,
            stats.clouds,
            out_path,
            stats.failed,
            dict(stats.copied),
        )
        return stats

    # ------------------------------------------------------------------------------------ helpers
    def _camera_stream(self, reader: Reader, cam: CameraSource) -> _CameraStream:
        image = bag.require_topic(reader, cam.image_topic, [bag.T_IMAGE, bag.T_COMPRESSED])
        info = bag.require_topic(reader, cam.info_topic, [bag.T_CAMERA_INFO])
        resolver = CameraResolver(cam.name, limits=self.options.image_limits)
        return _CameraStream(cam, image, _index(reader, image), info, _index(reader, info), resolver)

    @staticmethod
    def _fetch(reader: Reader, conn: Connection, bag_time: int) -> Any:
        for _, _, raw in reader.messages([conn], start=bag_time, stop=bag_time + 1):
            return bag.deserialize(raw, conn.msgtype)
        raise bag.BagError(f"{conn.topic}: no message at {bag_time} ns")

    def _images(
        self,
        reader: Reader,
        stamp: int,
        lidar_frame: str,
        cams: Sequence[_CameraStream],
        tf: bag.StaticTransforms,
    ) -> tuple[list[np.ndarray], list[PinholeCamera], list[str], list[str]]:
        """Images within `slop` of the cloud stamp with their cameras; names used and missing."""
        images, cameras, used, missing = [], [], [], []
        slop_ns = round(self.options.slop * 1e9)
        for stream in cams:
            cam = stream.source
            image_t, info_t = stream.images.nearest(stamp, slop_ns), stream.infos.nearest(stamp, slop_ns)
            if image_t is None or info_t is None:
                missing.append(cam.name)
                continue
            try:
                info = self._fetch(reader, stream.info, info_t)
                rgb = conversions.msg_to_rgb(self._fetch(reader, stream.image, image_t))
                camera = stream.resolver.from_info(
                    info, tf.lookup(info.header.frame_id, lidar_frame), rgb.shape[:2]
                )
            except (bag.BagError, *CAMERA_ERRORS) as exc:
                log.warning("camera %s skipped for the cloud at %d ns: %s", cam.name, stamp, exc)
                missing.append(cam.name)
                continue
            images.append(rgb)
            cameras.append(camera)
            used.append(cam.name)
        return images, cameras, used, missing

    def _label(
        self,
        reader: Reader,
        msg: Any,
        cams: Sequence[_CameraStream],
        tf: bag.StaticTransforms,
        stats: LabelStats,
    ) -> tuple[Any, Any, Any]:
        """One cloud -> (labelled cloud, labels_meta String, objects MarkerArray or None for semantic
        models), rosbags messages; the same records, layout and markers as the node's
        (`clip3d_ros.labelling`, `clip3d_ros.markers`)."""
        cloud = decode_cloud(msg, self.options.intensity_field)
        for kind, reason in cloud.issues:
            stats.issues[kind] += 1
            log.debug("cloud at %d ns: %s (labelled anyway)", bag.stamp_ns(msg.header), reason)
        stamp = bag.stamp_ns(msg.header)
        lidar_frame = self.options.lidar_frame or msg.header.frame_id
        images, cameras, used, missing = self._images(reader, stamp, lidar_frame, cams, tf)
        frame = label_frame(
            self.segmenter.segment, cloud, images, cameras, vocabulary=self.segmenter.vocabulary,
            panoptic=self.segmenter.panoptic is not None,
        )
        if frame.result is not None:
            stats.label_counts.update(frame.result.class_counts())
        stats.cameras_used.update(used)
        meta = labels_meta_payload(
            msg.header.stamp, msg.header.frame_id, frame.vocabulary.version, len(frame.records), used, missing
        )
        objects = None
        if "instance" in frame.records.dtype.names:
            v = frame.vocabulary
            boxes = markers.frame_boxes(frame.records)
            objects = markers.object_markers(boxes, v.names, v.colours, msg.header, new=bag.new_msg)
        return (
            bag.cloud_msg(frame.records, msg.header, height=frame.height),
            bag.msg_class(bag.T_STRING)(data=json.dumps(meta, separators=(",", ":"))),
            objects,
        )


# ------------------------------------------------------------------------------------------ fleet
PARTIAL = ".partial"


def find_bags(inputs: Sequence[str | Path]) -> list[Path]:
    """Bag folders (with metadata.yaml) among `inputs`, and inside the folders given; sorted, so
    every process of a sharded run sees the same list."""
    found = []
    for item in map(Path, inputs):
        if (item / "metadata.yaml").is_file():
            found.append(item)
        elif item.is_dir():
            found += [
                d for d in item.iterdir() if (d / "metadata.yaml").is_file() and not d.name.endswith(PARTIAL)
            ]
        else:
            raise bag.BagError(f"{item}: neither a rosbag2 folder nor a folder of them")
    bags = sorted(set(found), key=lambda b: (b.name, str(b)))  # by name: the output names
    if not bags:
        raise bag.BagError(f"no rosbag2 folder in {[str(i) for i in inputs]}")
    names = [b.name for b in bags]
    if len(set(names)) != len(names):
        raise bag.BagError(f"two input bags share a name (their outputs would collide): {names}")
    return bags


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, spec: str | None = None) -> Shard:
        """`--shard I/N` when given, else torchrun's RANK / WORLD_SIZE, else the whole list."""
        if spec:
            rank, world = (int(x) for x in spec.split("/"))
        else:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            raise ValueError(f"shard {rank}/{world}: need 0 <= rank < world size")
        return cls(rank, world)

    def mine(self, bags: Sequence[Path]) -> list[Path]:
        return [b for i, b in enumerate(bags) if i % self.world == self.rank]


def label_bags(
    labeller: BagLabeller, inputs: Sequence[str | Path], output: str | Path, shard: Shard = Shard()
) -> dict[str, LabelStats | None]:
    """Label this shard's bags of `inputs` (see the module docstring for OUTPUT and resuming).
    Returns bag name -> stats (None: finished by an earlier run, skipped)."""
    output = Path(output)
    bags = find_bags(inputs)
    single = len(inputs) == 1 and len(bags) == 1 and bags[0] == Path(inputs[0])
    done: dict[str, LabelStats | None] = {}
    for in_path in shard.mine(bags):
        final = output if single else output / in_path.name
        if final.exists():
            log.info("%s: already labelled in %s, skipped", in_path.name, final)
            done[in_path.name] = None
            continue
        partial = final.with_name(final.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)  # a run killed while writing it
        partial.parent.mkdir(parents=True, exist_ok=True)
        done[in_path.name] = labeller.run(in_path, partial)
        partial.rename(final)
    return done


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", help="input rosbag2 folders (sqlite3 or MCAP) and/or folders holding them"
    )
    parser.add_argument(
        "output",
        help="one input bag: the labelled bag's new folder; several: a folder for one labelled bag each",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="label bags I, I+N, ... (default: torchrun's RANK/WORLD_SIZE)",
    )
    parser.add_argument("--checkpoint", required=True, help="clip3d checkpoint (.pt)")
    parser.add_argument(
        "--vocabulary",
        nargs="+",
        default=None,
        help="class entries, synonyms joined by '|' (default: the checkpoint's)",
    )
    parser.add_argument(
        "--embedding-bank", default=None,
        help="precomputed text embedding bank (.pt); 'checkpoint': the checkpoint's own",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--score-threshold", type=float, default=None)
    parser.add_argument("--cloud-topic", default="/lidar/points")
    parser.add_argument(
        "--camera",
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGE_TOPIC", "INFO_TOPIC"),
        help="a camera's image (Image or CompressedImage) and CameraInfo topics; repeatable",
    )
    parser.add_argument(
        "--intensity-field", default="", help="'' = first of intensity, i, remission, reflectance"
    )
    parser.add_argument("--lidar-frame", default="", help="LiDAR TF frame ('' = the cloud's header frame_id)")
    parser.add_argument("--slop", type=float, default=0.05, help="max cloud/image stamp difference (s)")
    parser.add_argument("--output-topic", default=OUTPUT_TOPIC)
    parser.add_argument("--vocabulary-topic", default=VOCABULARY_TOPIC)
    parser.add_argument("--labels-meta-topic", default=LABELS_META_TOPIC)
    parser.add_argument("--objects-topic", default=OBJECTS_TOPIC, help="instance boxes (panoptic models)")
    parser.add_argument(
        "--copy", nargs="+", default=[], metavar="TOPIC", help="input topics to copy unchanged"
    )
    parser.add_argument("--copy-all", action="store_true", help="copy every input topic but the cloud")
    parser.add_argument("--storage", choices=sorted(bag.STORAGES), default="mcap")
    parser.add_argument("--max-frames", type=int, default=None, help="label only the first N clouds")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=ImageLimits.max_pixels,
        help="larger camera images are not used",
    )
    parser.add_argument(
        "--max-image-aspect",
        type=float,
        default=ImageLimits.max_aspect,
        help="nor images more elongated than this (long side / short side)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 is fastest on a busy small CPU)",
    )


def _report(stats: LabelStats) -> dict[str, Any]:
    return {
        "clouds": stats.clouds,
        "labelled": stats.labelled,
        "failed": stats.failed,
        "label_counts": dict(stats.label_counts),
        "cameras_used": dict(stats.cameras_used),
        "copied": dict(stats.copied),
        "issues": dict(stats.issues),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from clip3d_core.checkpoint import CheckpointError
    from clip3d_core.segmenter import Segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    options = LabelOptions(
        cloud_topic=args.cloud_topic,
        cameras=[CameraSource(i, c) for i, c in args.camera],
        output_topic=args.output_topic,
        vocabulary_topic=args.vocabulary_topic,
        labels_meta_topic=args.labels_meta_topic,
        objects_topic=args.objects_topic,
        intensity_field=args.intensity_field,
        lidar_frame=args.lidar_frame,
        slop=args.slop,
        copy_topics=args.copy,
        copy_all=args.copy_all,
        storage=args.storage,
        max_frames=args.max_frames,
        image_limits=ImageLimits(args.max_image_pixels, args.max_image_aspect),
    )
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under torchrun
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        shard = Shard.from_env(args.shard)
        segmenter = Segmenter.from_checkpoint(
            args.checkpoint,
            device,
            embedding_bank=args.embedding_bank,
            vocabulary=args.vocabulary,
            score_threshold=args.score_threshold,
        )
        results = label_bags(BagLabeller(segmenter, options), args.inputs, args.output, shard)
    except (bag.BagError, CheckpointError, ClipLoadError, VocabularyError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    total = LabelStats()
    for stats in results.values():
        if stats is not None:
            total.clouds += stats.clouds
            total.labelled += stats.labelled
            total.failed += stats.failed
            for mine, theirs in (
                (total.label_counts, stats.label_counts),
                (total.cameras_used, stats.cameras_used),
                (total.copied, stats.copied),
                (total.issues, stats.issues),
            ):
                mine.update(theirs)
    report = _report(total) | {
        "shard": f"{shard.rank}/{shard.world}",
        "bags": {
            name: "skipped (done before)" if st is None else _report(st) for name, st in results.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0 if total.failed == 0 else 1
