"""Dense CLIP image embeddings (one per patch) in CLIP's joint image-text space, MaskCLIP-style.

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


class MaskCLIPEncoder(nn.Module):
    """MaskCLIP dense embeddings from an open_clip ViT, with sliding-window inference for large images.

    Images larger than ``window`` (default: the model's input size) are covered by windows
    of that size every ``window_stride`` pixels (default: half a window); each window's
    normalised embeddings are averaged where windows overlap, then renormalised. Smaller
    images (or a ``window`` larger than the image) are encoded whole, with the positional
    embeddings resized bicubically to the patch grid. H and W must be multiples of the patch.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        window: int | tuple[int, int] | None = None,
        window_stride: int | tuple[int, int] | None = None,
        keep_residual: bool = True,
        windows_per_pass: int = 16,
    ) -> None:
        super().__init__()
        _check_supported(visual)
        self.visual = visual
        self.keep_residual = keep_residual
        self.windows_per_pass = windows_per_pass
        self.stride = visual.patch_size[0]
        self.embed_dim = visual.output_dim
        preprocess = open_clip.get_model_preprocess_cfg(visual)
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.window = _pair(window) if window is not None else tuple(visual.image_size)
        default_stride = tuple(max(self.stride, w // 2 // self.stride * self.stride) for w in self.window)
        self.window_stride = _pair(window_stride) if window_stride is not None else default_stride
        for size in (*self.window, *self.window_stride):
            if size <= 0 or size % self.stride:
                raise ValueError(f"window and window_stride must be positive multiples of the patch size {self.stride}")

    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] normalised images -> [B,D,H/stride,W/stride] L2-normalised embeddings."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the patch size {self.stride}; resize or pad first"
            )
        images = images.to(self.visual.conv1.weight.dtype)
        win_h, win_w = min(self.window[0], height), min(self.window[1], width)
        if (win_h, win_w) == (height, width):
            return F.normalize(self.encode_window(images), dim=1)
        return self._slide(images, win_h, win_w)

    def encode_window(self, images: Tensor) -> Tensor:
        """[N,3,h,w] -> [N,D,h/stride,w/stride] un-normalised dense embeddings for whole inputs."""
        x = self._embed_tokens(images)  # [N, 1 + gh * gw, width]
        grid_h, grid_w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        *blocks, last = self.visual.transformer.resblocks
        for block in blocks:
            x = block(x)
        tokens = self._value_path(last, x)[:, 1:]  # drop the class token
        tokens = self.visual.ln_post(tokens) @ self.visual.proj  # [N, gh * gw, D]
        return tokens.transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        """Patch tokens plus class token with positional embeddings for this grid, after ln_pre."""
        x = self.visual.conv1(images)  # [N, width, gh, gw]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        return self.visual.ln_pre(x)

    def _positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Learned positional embeddings, bicubically resized from the pretraining grid to ``grid``."""
        pos = self.visual.positional_embedding
        if tuple(grid) == tuple(self.visual.grid_size):
            return pos
        patch_pos = pos[1:].reshape(1, *self.visual.grid_size, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], patch_pos.flatten(2)[0].T], dim=0)

    def _value_path(self, block: ResidualAttentionBlock, x: Tensor) -> Tensor:
        """The last block with self-only attention: out_proj(v), plus residual and MLP if kept."""
        attn = block.attn
        width = x.shape[-1]
        value = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
        value = block.ls_1(attn.out_proj(value))
        if not self.keep_residual:
            return value
        x = x + value
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _slide(self, images: Tensor, win_h: int, win_w: int) -> Tensor:
        """Average the normalised embeddings of overlapping windows, then renormalise."""
        batch, _, height, width = images.shape
        p = self.stride
        origins = [
            (top, left)
            for top in _window_starts(height, win_h, self.window_stride[0])
            for left in _window_starts(width, win_w, self.window_stride[1])
        ]
        total = images.new_zeros(batch, self.embed_dim, height // p, width // p)
        count = images.new_zeros(1, 1, height // p, width // p)
        for start in range(0, len(origins), self.windows_per_pass):
            chunk = origins[start : start + self.windows_per_pass]
            crops = torch.cat([images[..., top : top + win_h, left : left + win_w] for top, left in chunk])
            features = F.normalize(self.encode_window(crops), dim=1).split(batch)
            for (top, left), feature in zip(chunk, features, strict=True):
                cells = (..., slice(top // p, (top + win_h) // p), slice(left // p, (left + win_w) // p))
                total[cells] += feature
                count[cells] += 1
        return F.normalize(total / count, dim=1)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels, plus a last window flush with the far edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_supported(visual: nn.Module) -> None:
    """Reject towers the value-path surgery does not apply to (timm, ResNet, attention pooling)."""
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"MaskCLIPEncoder needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise TypeError("MaskCLIPEncoder needs a class-token ViT without attention pooling")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise TypeError(f"MaskCLIPEncoder needs square patches, got {visual.patch_size}")
    blocks = visual.transformer.resblocks
    if not visual.transformer.batch_first or not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise TypeError("MaskCLIPEncoder needs batch-first ResidualAttentionBlocks (nn.MultiheadAttention)")
