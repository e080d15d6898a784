"""Dense CLIP image embeddings (one per cell) in CLIP's joint image-text space: one base, one subclass per encoder.

`ClipDenseEncoder` is "a CLIP ViT that gives dense embeddings": tokens at any grid (positional
embeddings resized), a block reduced to its value path, and sliding windows averaged where they
overlap. Each encoder says only how one window becomes embeddings (`dense_window`): MaskCLIP
here, TCL in `ovseg/tcl.py`.

MaskCLIP (Zhou et al., ECCV 2022) reads dense features off a CLIP ViT by replacing the last
block's attention with its value path: every token attends only to itself, so the attention
output is ``out_proj(v_proj(ln_1(x)))`` (the q/k projections are never used). The official
implementation (chongzhou/MaskCLIP, ``mmseg/models/backbones/vit.py``, ``return_qkv``) then
keeps the block's residual and MLP on that value: ``v = x + out_proj(v_proj(ln_1(x)))``,
``v = v + mlp(ln_2(v))``, followed by ``ln_post`` and the visual projection ``proj``.
``keep_residual=True`` (default) reproduces that; ``keep_residual=False`` keeps only the bare
value path ``out_proj(v_proj(ln_1(x)))`` (no residual, no MLP), the variant ClearCLIP
(Lan et al., ECCV 2024) found less noisy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn


@runtime_checkable
class DenseEncoder(Protocol):
    """Image batch [B,3,H,W] (normalised with ``mean``/``std``) -> L2-normalised [B,D,H/stride,W/stride]."""

    stride: int
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor: ...


class ClipDenseEncoder(nn.Module):
    """A CLIP ViT's dense embeddings, ``cells_per_patch`` per patch side, with sliding-window inference.

    Images larger than ``window`` (default: the model's input size) are covered by windows of that
    size every ``window_stride`` pixels (default: half a window) plus one flush with the far edge
    (mmseg's slide mode); each window's normalised embeddings are averaged where windows overlap,
    then renormalised. H and W must be multiples of ``stride``. ``mean`` / ``std`` default to the
    model's preprocessing. Subclasses implement `dense_window`.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        cells_per_patch: int = 1,
        window: int | tuple[int, int] | None = None,
        window_stride: int | tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        windows_per_pass: int = 16,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_class_token_vit(visual, name)
        self.patch = visual.patch_size[0]
        if self.patch % cells_per_patch:
            raise TypeError(f"{name} needs patches divisible by {cells_per_patch}, got {visual.patch_size}")
        self.visual = visual
        self.stride = self.patch // cells_per_patch
        self.embed_dim = visual.output_dim
        preprocess = open_clip.get_model_preprocess_cfg(visual)
        self.mean = tuple(mean if mean is not None else preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(std if std is not None else preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.window = pair(window) if window is not None else tuple(visual.image_size)
        default_stride = tuple(max(self.stride, w // 2 // self.stride * self.stride) for w in self.window)
        self.window_stride = pair(window_stride) if window_stride is not None else default_stride
        self.windows_per_pass = windows_per_pass
        for size in (*self.window, *self.window_stride):
            if size <= 0 or size % self.stride:
                raise ValueError(
                    f"window and window_stride must be positive multiples of the {self.cell_name} {self.stride}"
                )
        if any(step > size for step, size in zip(self.window_stride, self.window, strict=True)):
            raise ValueError(
                f"window_stride {self.window_stride} must not exceed the window {self.window}: "
                "windows further apart than their size leave pixels no window covers"
            )

    @property
    def cell_name(self) -> str:
        """What one embedding covers, for messages: the patch, or a finer stride."""
        return "patch size" if self.stride == self.patch else "stride"

    def dense_window(self, images: Tensor) -> Tensor:
        """[N,3,h,w] -> [N,D,h/stride,w/stride] un-normalised dense embeddings of whole windows."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] normalised images -> [B,D,H/stride,W/stride] L2-normalised embeddings."""
        self.check_images(images)
        fused = self.slide(images, lambda crops: F.normalize(self.dense_window(crops), dim=1), self.stride)
        return F.normalize(fused, dim=1)

    def check_images(self, images: Tensor) -> None:
        """[B, 3, H, W] with H and W multiples of the stride."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the {self.cell_name} {self.stride}; "
                "resize or pad first"
            )

    def clip_tokens(self, images: Tensor) -> Tensor:
        """Class token + patch tokens with positional embeddings for this grid (bicubically resized), after ln_pre."""
        visual = self.visual
        x = visual.conv1(images)  # [N, width, gh, gw]
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = visual.positional_embedding
        if grid != tuple(visual.grid_size):
            patch_pos = pos[1:].reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], patch_pos.flatten(2)[0].T], dim=0)
        cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def slide(self, images: Tensor, encode: Callable[[Tensor], Tensor], cell: int) -> Tensor:
        """Average ``encode(windows)`` (maps with one value per ``cell`` pixels) over overlapping windows."""
        batch, _, height, width = images.shape
        win_h, win_w = min(self.window[0], height), min(self.window[1], width)
        origins = [
            (top, left)
            for top in window_starts(height, win_h, self.window_stride[0])
            for left in window_starts(width, win_w, self.window_stride[1])
        ]
        total: Tensor | None = None
        count: Tensor | None = None
        for start in range(0, len(origins), self.windows_per_pass):
            chunk = origins[start : start + self.windows_per_pass]
            crops = torch.cat([images[..., top : top + win_h, left : left + win_w] for top, left in chunk])
            for (top, left), out in zip(chunk, encode(crops).split(batch), strict=True):
                if total is None or count is None:
                    total = out.new_zeros(batch, out.shape[1], height // cell, width // cell)
                    count = out.new_zeros(1, 1, height // cell, width // cell)
                cells = (..., slice(top // cell, (top + win_h) // cell), slice(left // cell, (left + win_w) // cell))
                total[cells] += out
                count[cells] += 1
        assert total is not None and count is not None  # window_starts gives every side at least one window
        return total / count


class MaskCLIPEncoder(ClipDenseEncoder):
    """MaskCLIP's dense embeddings from an open_clip ViT, one per patch.

    ``window`` defaults to the model's input size, ``window_stride`` to half a window. An image
    that fits in one window is encoded whole, with the positional embeddings resized to its grid.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        window: int | tuple[int, int] | None = None,
        window_stride: int | tuple[int, int] | None = None,
        keep_residual: bool = True,
        windows_per_pass: int = 16,
    ) -> None:
        super().__init__(visual, 1, window, window_stride, windows_per_pass=windows_per_pass)
        self.keep_residual = keep_residual

    def forward(self, images: Tensor) -> Tensor:
        """As the base, but an image that fits in one window is encoded whole (no window average)."""
        self.check_images(images)
        if all(s <= w for s, w in zip(images.shape[-2:], self.window, strict=True)):
            return F.normalize(self.dense_window(images), dim=1)
        return super().forward(images)

    def dense_window(self, images: Tensor) -> Tensor:
        """[N,3,h,w] -> [N,D,h/patch,w/patch]: all blocks, the last one's value path, ln_post and proj."""
        images = images.to(self.visual.conv1.weight.dtype)
        x = self.clip_tokens(images)  # [N, 1 + gh * gw, width]
        grid_h, grid_w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        *blocks, last = self.visual.transformer.resblocks
        for block in blocks:
            x = block(x)
        tokens = value_path(last, x, self.keep_residual)[:, 1:]  # drop the class token
        tokens = self.visual.ln_post(tokens) @ self.visual.proj  # [N, gh * gw, D]
        return tokens.transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)


def value_path(block: ResidualAttentionBlock, x: Tensor, keep_residual: bool = True) -> Tensor:
    """A CLIP block whose attention is restricted to each token itself: ``out_proj(v_proj(ln_1(x)))``, then the
    block's residual and MLP if kept (MaskCLIP's last block; TCL's ``ignore_last_attn``, an attention mask of 0 on
    the diagonal and -inf elsewhere, is the same thing)."""
    attn = block.attn
    width = x.shape[-1]
    value = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    value = block.ls_1(attn.out_proj(value))
    if not keep_residual:
        return value
    x = x + value
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels, plus a last window flush with the far edge (mmseg's slide)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_class_token_vit(visual: nn.Module, encoder: str) -> None:
    """Reject towers the value-path surgery does not apply to (timm, ResNet, attention pooling, sequence-first)."""
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"{encoder} needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise TypeError(f"{encoder} needs a class-token ViT without attention pooling")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise TypeError(f"{encoder} needs square patches, got {visual.patch_size}")
    blocks = visual.transformer.resblocks
    if not visual.transformer.batch_first or not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise TypeError(f"{encoder} needs batch-first ResidualAttentionBlocks (nn.MultiheadAttention)")
