"""Training: CLIP-guided stage, self-training stage, annotation-free setting; DDP via torchrun.

Entry points: `clip3d train --config training/<name>.yaml` (`Trainer`), `clip3d evaluate`.
"""

from clip3d_core.training.config import TrainConfig, apply_overrides, load_train_config
from clip3d_core.training.engine import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "apply_overrides", "load_train_config"]
