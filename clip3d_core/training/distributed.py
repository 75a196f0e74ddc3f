"""torchrun / DDP helpers: process-group setup from the env:// contract, rank-0 I/O, samplers.

Launch with `torchrun --nproc_per_node G [--nnodes N --node_rank R --master_addr A] -m
clip3d_core.cli train ...`. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; without them everything runs as a single process and no process group is created.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from clip3d_core.config import ConfigError
from clip3d_core.training.config import is_device_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when CUDA is available, else CPU; "cuda" -> this process's GPU;
    "cuda:N" -> that GPU; "cpu". Anything else, or CUDA asked for where there is none, raises
    `ConfigError` rather than silently running somewhere else."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not is_device_name(name):
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine")
    if name.startswith("cuda:"):
        index = int(name[5:])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (env:// init): nccl on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    log.info("rank %d/%d (local %d) joined the %s process group", rank, world_size, local_rank, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    *,
    sync_batchnorm: bool = True,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """DDP-wrap `model` (already on `device`) when running distributed; identity otherwise.

    BatchNorm becomes SyncBatchNorm on GPU (statistics over the global batch; torch implements
    SyncBatchNorm for accelerators only, so CPU/gloo runs keep per-process statistics)."""
    if not info.distributed:
        return model
    if sync_batchnorm and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over processes (for logged scalars); a no-op single-process."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_reduce_sum_(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over processes (confusion matrices, counts)."""
    if info.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


class IterationBatchSampler(Sampler[list[int]]):
    """Endless batches for iteration-based training, resumable at any iteration.

    Wraps a `DistributedSampler` (each process sees a disjoint shard, reshuffled per epoch with
    `set_epoch`); `start_iteration` skips the batches already consumed, so a resumed run sees the
    same frames in the same order as an uninterrupted one."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        info: DistInfo,
        *,
        seed: int,
        start_iteration: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.sampler = DistributedSampler(
            dataset,  # type: ignore[arg-type]
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.batch_size = batch_size
        self.start_iteration = start_iteration
        per_epoch = len(self.sampler) // batch_size
        if per_epoch == 0:
            raise ValueError(
                f"{len(self.sampler)} frames per process cannot fill a batch of {batch_size}: "
                "use fewer processes, a smaller batch or more frames"
            )
        self.batches_per_epoch = per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start_iteration, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for b in range(skip, self.batches_per_epoch):
                yield indices[b * self.batch_size : (b + 1) * self.batch_size]
            skip = 0
            epoch += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


def average_buffers_(module: nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    if not info.distributed:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf /= info.world_size
