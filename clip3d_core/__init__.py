"""clip3d_core: open-vocabulary LiDAR segmentation by transferring CLIP into a sparse 3D network."""

from clip3d_core import _compat

_compat.apply()

__version__ = "0.1.0"
