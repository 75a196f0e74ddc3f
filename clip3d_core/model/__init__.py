"""The 3D network: sparse U-Net backbone, CLIP-space head, cosine classifier, 2D-3D fusion."""

from clip3d_core.model.config import MODEL_PRESETS, BackboneConfig, ModelConfig, ModelPreset
from clip3d_core.model.fusion import GatedFusion
from clip3d_core.model.head import CosineClassifier, ProjectionHead
from clip3d_core.model.network import Clip3DNet, PointOutput
from clip3d_core.model.unet import SparseUNet

__all__ = [
    "MODEL_PRESETS",
    "BackboneConfig",
    "Clip3DNet",
    "CosineClassifier",
    "GatedFusion",
    "ModelConfig",
    "ModelPreset",
    "PointOutput",
    "ProjectionHead",
    "SparseUNet",
]
