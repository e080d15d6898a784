"""SPEC steps 9-11: decode the variants, compare each +/- pair, smooth, and give every pixel a mask.

Results are brought to the input size by resizing real-valued maps (difference maps,
or one-hot masks for the bilinear baseline) and taking the argmax there, never by
interpolating an integer label map.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchvision.transforms.functional import gaussian_blur


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """SPEC step 9: latents [V, 4, h, w] -> RGB images [V, 3, H, W] in [-1, 1], float32."""
    size = chunk_size if chunk_size > 0 else len(latents)
    scale = vae.config.scaling_factor
    return torch.cat([
        vae.decode((latents[s:s + size] / scale).to(vae.dtype)).sample.float()
        for s in range(0, len(latents), size)
    ])


def resize_latents(latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """Trade-off switch: latents [V, 4, h, w] resized (bilinear, antialiased) to decode at `resolution` px."""
    side = resolution // 8
    return F.interpolate(latents, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def resize_maps(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """Difference maps [K, h, w] bilinearly resized to the working resolution (no-op when already there)."""
    if maps.shape[-2:] == (resolution, resolution):
        return maps
    return F.interpolate(maps[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)[:, 0]


def difference_maps(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel RGB L2 distance between each variant pair (2i: -lambda, 2i+1: +lambda) -> [K, H, W]."""
    pairs = images.unflatten(0, (-1, 2))  # [K, 2, 3, H, W]
    return (pairs[:, 0] - pairs[:, 1]).norm(dim=1)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """SPEC step 10: Gaussian filter of each map (kernel 2*ceil(3 sigma)+1); sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(maps[:, None], [kernel, kernel], [sigma, sigma])[:, 0]


def _resized(maps: torch.Tensor, size: Tuple[int, int]) -> Iterable[torch.Tensor]:
    for m in maps:
        yield F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def argmax_at_size(maps: torch.Tensor, size: Tuple[int, int], keep: bool = False
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """SPEC step 11: bilinearly resize each of K maps to `size` and take the per-pixel argmax.

    One map is resized at a time (memory O(H*W) unless `keep`); ties go to the lower index.
    """
    best = torch.full(size, -torch.inf, device=maps.device)
    labels = torch.zeros(size, dtype=torch.long, device=maps.device)
    kept = []
    for i, resized in enumerate(_resized(maps, size)):
        better = resized > best
        labels[better] = i
        best = torch.maximum(best, resized)
        if keep:
            kept.append(resized)
    return labels, (torch.stack(kept) if keep else None)


def bilinear_labels(lowres_labels: torch.Tensor, num_masks: int, size: Tuple[int, int]) -> torch.Tensor:
    """Baseline: one-hot low-res masks upsampled bilinearly to `size`, then argmax."""
    one_hot = F.one_hot(lowres_labels, num_masks).permute(2, 0, 1).float()
    return argmax_at_size(one_hot, size)[0]
