"""End-to-end demo: synthetic drive bag -> model -> the clip3d node (own process) -> labelled bag.

    python -m clip3d_ros.demo --out demo_output        (what `make demo` runs)

Steps, each reusing its result from an earlier run when the inputs match:
1. `clip3d make-bag`: a synthetic drive (LiDAR, front camera, CameraInfo, /tf_static).
2. A model: trained with `clip3d train --config training/synthetic_tiny.yaml` (cached by config
   hash; `--train-config training/synthetic_panoptic_demo.yaml`, `make demo-panoptic`, trains a
   panoptic model), or `--checkpoint PATH`, or `--untrained` (random weights: wiring checks only).
3. The node `python -m clip3d_ros.node` in its own process, parameters written to
   `node_params.yaml` (checkpoint, vocabulary, topics, the camera's LiDAR->camera extrinsic).
4. `clip3d replay --clock` plays the bag into it (sim time); this process records the node's
   labelled clouds, labels_meta, vocabulary map and (panoptic models) objects MarkerArrays into
   `labelled_bag/` and sets a new
   vocabulary through the node's SetParameters service part-way through.
5. Bird's-eye (with a box around each instance of a panoptic model) and camera-overlay PNGs of a
   few frames, `summary.json` and `summary.md` (frames in/out, header-stamp -> labelled-cloud
   latency percentiles, label histogram per vocabulary, objects per class for panoptic models).
Every process stays on DDS loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, its own domain id,
config/fastdds_loopback.xml); the node is always shut down, also on errors.

Modules: `config` (settings, shipped files), `artefacts` (bag and model, cached), `processes`
(node process, parameters, live vocabulary change), `recorder` (labelled bag, latency), `pictures`,
`report` (summary), `run` (the sequence), `cli`.
"""

from clip3d_ros.demo.config import META_TOPIC, OBJECTS_TOPIC, OUTPUT_TOPIC, VOCAB_TOPIC, DemoConfig
from clip3d_ros.demo.report import vocabulary_from_map
from clip3d_ros.demo.run import run_demo

__all__ = [
    "META_TOPIC",
    "OBJECTS_TOPIC",
    "OUTPUT_TOPIC",
    "VOCAB_TOPIC",
    "DemoConfig",
    "run_demo",
    "vocabulary_from_map",
]
