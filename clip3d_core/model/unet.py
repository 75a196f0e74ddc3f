"""Sparse 3D U-Net on spconv (Pointcept SpUNet layout).

stem (SubMConv3d) -> encoder stages [stride-2 SparseConv3d, residual SubM blocks] ->
decoder stages [SparseInverseConv3d (same indice_key as the matching down conv, so voxels land
exactly where they came from), concat skip, residual SubM blocks] -> per-voxel features at the
input resolution. Norms are plain BatchNorm1d on the feature matrix, so
`nn.SyncBatchNorm.convert_sync_batchnorm` works unchanged for DDP.

The convolutions come from the sparse backend (`sparse_backend`: spconv or spconv-triton); the
containers here are plain torch modules, so one process can hold U-Nets of both backends and the
parameter names (hence checkpoints) are the same for both.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from clip3d_core.model import sparse_backend
from clip3d_core.model.config import BackboneConfig

SparseTensor = Any  # the backend's SparseConvTensor


class ConvNormReLU(nn.Sequential):
    """A sparse conv, then BatchNorm and ReLU on its feature matrix (keys ``0``, ``1``, ``2``)."""

    def __init__(self, conv: nn.Module, channels: int, norm: partial[nn.BatchNorm1d]) -> None:
        super().__init__(conv, norm(channels), nn.ReLU(inplace=True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        conv, bn, relu = self
        x = conv(x)
        return x.replace_feature(relu(bn(x.features)))


class BasicBlock(nn.Module):
    """Two 3x3x3 submanifold convs with a residual (1x1x1 projection when the width changes)."""

    def __init__(
        self, sp: ModuleType, in_channels: int, channels: int, norm: partial[nn.BatchNorm1d], indice_key: str
    ) -> None:
        super().__init__()
        self.conv1 = sp.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = norm(channels)
        self.conv2 = sp.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        # A 1x1x1 conv is a per-voxel linear map: no rulebook needed.
        self.proj = (
            nn.Identity()
            if in_channels == channels
            else nn.Sequential(nn.Linear(in_channels, channels, bias=False), norm(channels))
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        identity = self.proj(x.features)
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + identity))


class Blocks(nn.Sequential):
    """Residual blocks in a row (keys ``0``, ``1``, ...), each taking and returning a sparse tensor."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        for block in self:
            x = block(x)
        return x


def _blocks(
    sp: ModuleType, in_channels: int, channels: int, count: int, norm: partial[nn.BatchNorm1d], key: str
) -> Blocks:
    return Blocks(
        *(BasicBlock(sp, in_channels if i == 0 else channels, channels, norm, key) for i in range(count))
    )


class SparseUNet(nn.Module):
    """Voxel features [V, in_channels] on a (batch, z, y, x) grid -> voxel features [V, out_channels]."""

    def __init__(self, cfg: BackboneConfig, backend: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = sparse_backend.resolve(backend)
        sp = sparse_backend.module(self.backend)
        norm = partial(nn.BatchNorm1d, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        stages = len(cfg.channels)

        self.stem = ConvNormReLU(
            sp.SubMConv3d(
                cfg.in_channels, cfg.stem_channels, 3, padding=1, bias=False, indice_key="stem"
            ),
            cfg.stem_channels,
            norm,
        )

        # Encoder stage s: grid level s -> s+1 (down conv keyed "down{s}"), then blocks at level s+1.
        skip_channels = [cfg.stem_channels, *cfg.channels[:-1]]  # width entering stage s
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for s in range(stages):
            self.down.append(
                ConvNormReLU(
                    sp.SparseConv3d(
                        skip_channels[s], cfg.channels[s], 2, stride=2, bias=False, indice_key=f"down{s}"
                    ),
                    cfg.channels[s],
                    norm,
                )
            )
            self.encoder.append(
                _blocks(sp, cfg.channels[s], cfg.channels[s], cfg.blocks[s], norm, f"subm{s + 1}")
            )

        # Decoder stage j undoes encoder stage s = stages-1-j: level s+1 -> s, concat the level-s skip.
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        width = cfg.channels[-1]
        for j in range(stages):
            s = stages - 1 - j
            out = cfg.decoder_channels[j]
            self.up.append(
                ConvNormReLU(
                    sp.SparseInverseConv3d(width, out, 2, bias=False, indice_key=f"down{s}"), out, norm
                )
            )
            # The level-0 blocks share the stem's rulebook (same voxels, same 3x3x3 kernel).
            key = f"subm{s}" if s > 0 else "stem"
            self.decoder.append(_blocks(sp, out + skip_channels[s], out, cfg.decoder_blocks[j], norm, key))
            width = out

    @property
    def out_channels(self) -> int:
        return self.cfg.out_channels

    def forward(
        self, features: Tensor, coords: Tensor, spatial_shape: tuple[int, int, int], batch_size: int
    ) -> Tensor:
        """Args: features [V, C_in]; coords [V, 4] int32 (batch, z, y, x). Returns [V, out_channels]
        in the row order of ``coords``."""
        sp = sparse_backend.module(self.backend)  # a module attribute would not deepcopy/pickle
        x = sp.SparseConvTensor(features, coords.int(), list(spatial_shape), batch_size)
        x = self.stem(x)
        skips = [x]
        for down, encoder in zip(self.down, self.encoder):
            x = encoder(down(x))
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for up, decoder, skip in zip(self.up, self.decoder, reversed(skips)):
            x = up(x)
            x = decoder(x.replace_feature(torch.cat((x.features, skip.features), dim=1)))
        return x.features
