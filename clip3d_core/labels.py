"""Label conventions shared by the core, the ROS node and the tools: the one home of the sentinels,
the class-count cap and the display colours.

- Published / stored labels are uint16 class ids into the vocabulary; `UNLABELLED` (65535) marks a
  point no class was assigned to (invalid point, or below the score threshold).
- Training and evaluation labels are long tensors with `IGNORE_INDEX` (-1) for "no label".
- A vocabulary has at most `MAX_CLASSES` entries, so every class id fits below `UNLABELLED`.
"""

from __future__ import annotations

UNLABELLED = 65535  # uint16 label of points no class was assigned to
IGNORE_INDEX = -1  # "no label" in training / evaluation label tensors
MAX_CLASSES = 1024  # vocabulary entries at most (every id stays far below UNLABELLED)

UNLABELLED_COLOUR = (128, 128, 128)  # grey of unlabelled points, in pictures and in the ROS `rgb` field alike

# SemanticKITTI's colours (RGB), the ones driving engineers know from its tools and RViz configs,
# with the darkest (sidewalk, motorcycle, truck, other-vehicle) lightened to read on black.
# Keys are normalised names (lower case, single spaces); a few common aliases share their class's colour.
DRIVING_PALETTE: dict[str, tuple[int, int, int]] = {
    "car": (100, 150, 245),
    "bicycle": (100, 230, 245),
    "motorcycle": (70, 110, 230),
    "truck": (140, 80, 235),
    "other vehicle": (90, 90, 255),
    "person": (255, 30, 30),
    "pedestrian": (255, 30, 30),
    "bicyclist": (255, 40, 200),
    "motorcyclist": (190, 50, 120),
    "road": (255, 0, 255),
    "parking": (255, 150, 255),
    "sidewalk": (170, 60, 170),
    "other ground": (175, 0, 75),
    "building": (255, 200, 0),
    "fence": (255, 120, 50),
    "vegetation": (0, 175, 0),
    "tree": (0, 175, 0),
    "trunk": (135, 60, 0),
    "terrain": (150, 240, 80),
    "grass": (150, 240, 80),
    "pole": (255, 240, 150),
    "traffic sign": (255, 0, 0),
}
