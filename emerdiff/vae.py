"""steps 2 and 9: the VAE between pixels and latents (encode the photo, decode the variants)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .models import at_least_float32


@torch.no_grad()
def encode_image(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """step 2: z0 = mean of the VAE posterior x scaling factor, float32 (float64 for a float64 VAE) [B, 4, R/8, R/8]."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return at_least_float32(posterior.mean) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """step 9: latents [V, 4, h, w] -> RGB images [V, 3, H, W] in [-1, 1], float32 or float64 (one VAE call)."""
    return at_least_float32(vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample)


@contextmanager
def float32_vae(vae: AutoencoderKL) -> Iterator[AutoencoderKL]:
    """The VAE in float32 for the block, then back in its dtype: SDXL's VAE overflows in float16."""
    dtype = vae.dtype
    try:
        yield vae.to(torch.float32)
    finally:
        vae.to(dtype)


def overflowed(vae: AutoencoderKL, tensor: torch.Tensor) -> bool:
    """A half-precision VAE's result holds NaN or inf (never asked of a float32 VAE or on the meta device)."""
    return vae.dtype != torch.float32 and tensor.device.type != "meta" and not torch.isfinite(tensor).all()


def resize_latents(latents: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Trade-off switch: latents [V, 4, h, w] resized (bilinear, antialiased) to decode at `size` px (int: square)."""
    height, width = (size, size) if isinstance(size, int) else size
    return F.interpolate(latents, size=(height // 8, width // 8), mode="bilinear", align_corners=False, antialias=True)


def decode_size(size: tuple[int, int], resolution: int, decode_resolution: int) -> tuple[int, int]:
    """The (h, w) the variants are decoded at: the working `size`, or scaled so that its shorter side is
    `decode_resolution` (a trade-off; 0 = off), each side a multiple of 8."""
    if decode_resolution in (0, resolution):
        return size[0], size[1]
    scale = decode_resolution / min(size)
    return max(8, round(size[0] * scale / 8) * 8), max(8, round(size[1] * scale / 8) * 8)
