"""Training telemetry: TensorBoard scalars, a tqdm progress bar and periodic log lines (rank 0 only)."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class Monitor:
    """Running means of scalars between log points; writes on the main process only.

    Other ranks get a silent monitor, so call sites never branch on the rank."""

    def __init__(
        self,
        log_dir: Path | None,
        *,
        enabled: bool,
        total: int,
        initial: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._writer = None
        self._bar = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        if tensorboard and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))
        if progress:
            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True)

    def update(self, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            if math.isfinite(value):
                self._sums[key] += value
                self._counts[key] += 1
        if self._bar is not None:
            self._bar.update(1)
            if "loss" in scalars:
                self._bar.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)

    def flush(self, step: int, prefix: str = "train") -> dict[str, float]:
        """Write the running means at `step`, reset them and return them."""
        means = {k: self._sums[k] / self._counts[k] for k in self._sums if self._counts[k]}
        self._sums.clear()
        self._counts.clear()
        if self.enabled and means:
            self.scalars(step, means, prefix)
            text = " ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
            log.info("it %d %s (%.1f s)", step, text, time.perf_counter() - self._t0)
        return means

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
