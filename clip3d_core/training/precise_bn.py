"""Precise BatchNorm statistics (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

BatchNorm's running statistics are an exponential average with a small momentum (0.01 in the
sparse U-Net), so after a short run, or after the weights moved a lot, they still describe early
weights and evaluation-mode predictions suffer. Recomputing them as a plain average over some
training batches with the final weights fixes that; the weights themselves do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from clip3d_core.training.distributed import DistInfo, average_buffers_


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], info: DistInfo) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them over `batches`
    ((points, batch_index) pairs); returns the number of batches used. Averaged over processes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    count = 0
    try:
        for points, batch_index in batches:
            model(points, batch_index)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    average_buffers_(model, info)
    return count
