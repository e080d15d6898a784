"""steps 2 and 9: the VAE between pixels and latents (encode the photo, decode the variants)."""

from __future__ import annotations

from typing import Tuple, Union

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


def resize_latents(latents: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Trade-off switch: latents [V, 4, h, w] resized (bilinear, antialiased) to decode at `size` px (int: square)."""
    height, width = (size, size) if isinstance(size, int) else size
    return F.interpolate(latents, size=(height // 8, width // 8), mode="bilinear", align_corners=False,
                         antialias=True)


def decode_size(size: Tuple[int, int], resolution: int, decode_resolution: int) -> Tuple[int, int]:
    """The (h, w) the variants are decoded at: the working `size`, or scaled so that its shorter side is
    `decode_resolution` (a trade-off; 0 = off), each side a multiple of 8."""
    if decode_resolution in (0, resolution):
        return size[0], size[1]
    scale = decode_resolution / min(size)
    return max(8, round(size[0] * scale / 8) * 8), max(8, round(size[1] * scale / 8) * 8)
