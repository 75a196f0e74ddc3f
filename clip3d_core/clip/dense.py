"""Dense (per-patch) CLIP image features in the joint image-text space, MaskCLIP-style.

The ViT runs unchanged up to its last block. There, attention pooling is what ties the class token
to the text space, so patch tokens take the value path of the last attention instead of attending
(MaskCLIP, Zhou et al. ECCV 2022) and then the class token's head (`ln_post`, `proj`). Each patch
thereby gets what the class token would get if the patch were all the image attended to. The class
token itself takes the normal path and equals `model.encode_image`.

Any input size (multiple of the patch size) works: the positional embedding is resized bicubically
to the input's patch grid, exactly as open_clip resizes it when loading weights at another size.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from clip3d_core.clip.loader import ClipLoadError, LoadedClip

LastBlock = Literal["value", "maskclip"]
LAST_BLOCK_MODES: tuple[str, ...] = typing.get_args(LastBlock)


@dataclass(frozen=True)
class DenseConfig:
    """How dense CLIP features are made: the last block's path ("value": residual-free, the
    default; "maskclip": value path plus residual and MLP, as in MaskCLIP) and the short image side
    fed to the encoder (None = the model's native size). A fusion model is trained on features made
    one way and its checkpoint records it, so inference makes them the same way."""

    last_block: LastBlock = "value"
    short_side: int | None = None


class ImageInputError(ValueError):
    """Images handed to the dense encoder have the wrong type, shape or sizes."""


@dataclass(frozen=True)
class PatchGrid:
    """Maps pixels of the ORIGINAL image to the patch grid of its resized copy.

    Pixel coordinates are continuous, `u` = column, `v` = row, pixel i covering [i, i+1) -- the
    convention of `geometry` (`PinholeCamera.scaled` scales K directly, `in_image` is 0 <= u < W),
    so projected points map without half-pixel shifts.
    """

    input_hw: tuple[int, int]  # size fed to the ViT (multiples of patch_size)
    grid_hw: tuple[int, int]  # (gh, gw) = input_hw // patch_size
    patch_size: int
    image_hw: tuple[int, int]  # original image size the pixel coordinates refer to

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): input pixels per original pixel."""
        return self.input_hw[1] / self.image_hw[1], self.input_hw[0] / self.image_hw[0]

    def _patch_coords(self, uv: torch.Tensor) -> torch.Tensor:
        """[..., 2] continuous (col, row) patch coordinates; patch c spans [c, c + 1)."""
        sx, sy = self.scale
        scale = uv.new_tensor([sx / self.patch_size, sy / self.patch_size])
        return uv * scale

    def pixel_to_patch(self, uv: torch.Tensor) -> torch.Tensor:
        """[..., 2] original-image pixels -> [...] long flat patch index (row * gw + col), clamped
        to the grid (mask points outside the image yourself)."""
        gh, gw = self.grid_hw
        pc = self._patch_coords(uv.float()).floor().long()
        col = pc[..., 0].clamp(0, gw - 1)
        row = pc[..., 1].clamp(0, gh - 1)
        return row * gw + col

    def patch_centres(self) -> torch.Tensor:
        """[gh * gw, 2] (u, v) of every patch centre in original-image pixels, flat-index order."""
        gh, gw = self.grid_hw
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pc = torch.stack([cols, rows], -1).reshape(-1, 2).double() + 0.5
        sx, sy = self.scale
        step = torch.tensor([self.patch_size / sx, self.patch_size / sy], dtype=torch.float64)
        return (pc * step).float()

    def sample(self, features: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Bilinear [N, D] from `features` [D, gh, gw] at original-image pixels `uv` [N, 2]
        (border-clamped), renormalised to unit length."""
        if features.ndim != 3 or tuple(features.shape[1:]) != self.grid_hw:
            raise ValueError(f"features {tuple(features.shape)} do not match grid {self.grid_hw}")
        h, w = self.image_hw
        # align_corners=False: the grid spans [-1, 1] edge to edge, as the image spans [0, W]
        norm = uv.to(features.dtype).new_tensor([2.0 / w, 2.0 / h])
        grid = (uv.to(features.dtype) * norm - 1.0).view(1, 1, -1, 2)
        out = F.grid_sample(features[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        return F.normalize(out[0, :, 0].T, dim=-1)


@dataclass
class DenseFeatures:
    features: torch.Tensor  # [B, D, gh, gw] float32, unit length per patch
    cls: torch.Tensor  # [B, D] float32, = model.encode_image (not normalised)
    grid: PatchGrid


def resize_pos_embed(pos: torch.Tensor, native_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """[1 + gh0*gw0, W] class + patch position embeddings resized to `grid` (open_clip's way:
    bicubic, antialiased, align_corners=False). Identity at the native grid."""
    if tuple(grid) == tuple(native_grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, *native_grid, -1).permute(0, 3, 1, 2)
    dtype = patch_pos.dtype
    patch_pos = F.interpolate(
        patch_pos.float(), size=grid, mode="bicubic", antialias=True, align_corners=False
    )
    patch_pos = patch_pos.to(dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos])


def _check_supported(visual: nn.Module) -> None:
    why = None
    if not isinstance(visual, VisionTransformer):
        why = f"image tower is {type(visual).__name__}, not an open_clip VisionTransformer"
    elif visual.attn_pool is not None:
        why = "attentional pooling (CoCa-style) has no per-patch path"
    elif visual.pool_type not in ("tok", "avg") or visual.proj is None:
        why = f"pool_type {visual.pool_type!r} / missing projection"
    elif not visual.transformer.batch_first:
        why = "sequence-first transformer"
    else:
        last = visual.transformer.resblocks[-1]
        if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
            why = f"last block {type(last).__name__} is not a standard nn.MultiheadAttention block"
    if why:
        raise ClipLoadError(f"dense CLIP features are not supported for this model: {why}")


class DenseClipEncoder(nn.Module):
    """Frozen CLIP image tower -> per-patch features and the class embedding, batched over cameras.

    `last_block="value"` (default) keeps only the value projection of the last attention, without
    its residual and MLP: residual-free patch tokens are markedly cleaner (ClearCLIP, Lan et al.
    ECCV 2024). `"maskclip"` reproduces MaskCLIP's reference code (value + residual + MLP).
    """

    def __init__(self, loaded: LoadedClip, last_block: str = "value") -> None:
        super().__init__()
        if last_block not in LAST_BLOCK_MODES:
            raise ValueError(f"last_block {last_block!r} not one of {LAST_BLOCK_MODES}")
        _check_supported(loaded.model.visual)
        self.visual: VisionTransformer = loaded.model.visual
        self.last_block = last_block
        self.patch_size = int(loaded.patch_size)
        self.native_hw = loaded.image_size
        self.native_grid = tuple(int(g) for g in self.visual.grid_size)
        self.register_buffer("mean", torch.tensor(loaded.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(loaded.image_std).view(1, 3, 1, 1), persistent=False)

    def input_size(self, image_hw: tuple[int, int], short_side: int | None = None) -> tuple[int, int]:
        """(H, W) an image of `image_hw` is resized to: aspect kept, short side ~`short_side`
        (default: the model's native size), both rounded to multiples of the patch size."""
        short = short_side or min(self.native_hw)
        s = short / min(image_hw)
        p = self.patch_size
        return tuple(max(p, round(d * s / p) * p) for d in image_hw)  # type: ignore[return-value]

    def prepare(
        self,
        images: Sequence[np.ndarray],
        short_side: int | None = None,
        upload: Callable[[Sequence[np.ndarray]], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[float, float]]:
        """uint8 HxWx3 RGB images of one size -> ([B, 3, H, W] float in [0, 1], (sx, sy)) where
        (sx, sy) = resized / original size, as `PinholeCamera.scaled` takes it. ``upload`` stacks the
        uint8 images onto a device (e.g. through reused pinned buffers, `runtime.HostBuffers`), so
        the conversion and resize run there; default: stacked and resized on the host."""
        if len(images) == 0:
            raise ImageInputError("no images")
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ImageInputError(f"image {i}: expected uint8 HxWx3 RGB, got {desc}")
        sizes = {img.shape[:2] for img in images}
        if len(sizes) != 1:
            raise ImageInputError(f"images differ in size {sorted(sizes)}; encode each size separately")
        image_hw = images[0].shape[:2]
        if min(image_hw) < 1:
            raise ImageInputError(f"empty image {image_hw}")
        hw = self.input_size(image_hw, short_side)
        stacked = upload(images) if upload is not None else torch.from_numpy(np.stack(images))
        batch = stacked.permute(0, 3, 1, 2).float().div_(255.0)
        if hw != image_hw:
            batch = F.interpolate(batch, size=hw, mode="bilinear", antialias=True, align_corners=False)
            batch = batch.clamp_(0.0, 1.0)
        return batch, (hw[1] / image_hw[1], hw[0] / image_hw[0])

    def encode(
        self,
        images: Sequence[np.ndarray],
        short_side: int | None = None,
        upload: Callable[[Sequence[np.ndarray]], torch.Tensor] | None = None,
    ) -> DenseFeatures:
        """`prepare` + `forward`: the grid maps pixels of the given (original) images."""
        batch, _ = self.prepare(images, short_side, upload)
        return self(batch.to(self.mean.device), image_hw=tuple(images[0].shape[:2]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_hw: tuple[int, int] | None = None) -> DenseFeatures:
        """`images` [B, 3, H, W] RGB in [0, 1] (H, W multiples of the patch size); `image_hw` is the
        original size pixel coordinates will refer to (default: the input size)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ImageInputError(f"expected [B, 3, H, W] images, got {tuple(images.shape)}")
        p = self.patch_size
        h, w = int(images.shape[2]), int(images.shape[3])
        if h % p or w % p or h == 0 or w == 0:
            raise ImageInputError(f"input {h}x{w} is not a positive multiple of the patch size {p}")
        grid_hw = (h // p, w // p)
        v = self.visual
        dtype = v.conv1.weight.dtype
        x = ((images - self.mean) / self.std).to(dtype)

        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls_tok = v.class_embedding.to(dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1)
        x = x + resize_pos_embed(v.positional_embedding, self.native_grid, grid_hw).to(dtype)
        x = v.ln_pre(x)  # patch dropout is the identity in eval
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        last: ResidualAttentionBlock = v.transformer.resblocks[-1]

        cls = self._class_embedding(last, x)
        patches = self._value_path(last, x[:, 1:])
        dense = F.normalize((v.ln_post(patches) @ v.proj).float(), dim=-1)
        dense = dense.transpose(1, 2).reshape(x.shape[0], -1, *grid_hw)
        grid = PatchGrid(input_hw=(h, w), grid_hw=grid_hw, patch_size=p, image_hw=tuple(image_hw or (h, w)))
        return DenseFeatures(features=dense.contiguous(), cls=cls.float(), grid=grid)

    def _class_embedding(self, last: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """The image embedding through the unchanged last block and pooling (= encode_image)."""
        v = self.visual
        if v.pool_type == "tok":  # only the class token's output is needed: query it alone
            kv = last.ln_1(x)
            q = x[:, :1]
            y = q + last.ls_1(last.attn(last.ln_1(q), kv, kv, need_weights=False)[0])
            y = y + last.ls_2(last.mlp(last.ln_2(y)))
        else:
            y = last(x)
        pooled, _ = v._pool(y)
        return pooled @ v.proj

    def _value_path(self, last: ResidualAttentionBlock, tokens: torch.Tensor) -> torch.Tensor:
        attn = last.attn
        width = tokens.shape[-1]
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width :]
        value = F.linear(last.ln_1(tokens), attn.in_proj_weight[2 * width :], bias)
        out = last.ls_1(attn.out_proj(value))
        if self.last_block == "maskclip":
            out = out + tokens
            out = out + last.ls_2(last.mlp(last.ln_2(out)))
        return out

