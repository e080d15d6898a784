"""steps 9-11 after decoding: compare each +/- pair, smooth, and give every pixel a mask.

Results are brought to the input size by resizing real-valued maps (difference maps, or
one-hot masks for the bilinear baseline) and taking the argmax there, never by
interpolating an integer label map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from .models import at_least_float32


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Difference maps [K, h, w] bilinearly resized to the working size (no-op when already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def difference_maps(variants: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 distance over the channels (RGB, or the 4 latent channels) between each variant pair
    (2i: -lambda, 2i+1: +lambda): [2K, C, H, W] -> [K, H, W]."""
    pairs = variants.unflatten(0, (-1, 2))  # [K, 2, C, H, W]
    return (pairs[:, 0] - pairs[:, 1]).norm(dim=1)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """step 10: Gaussian filter of each map (kernel 2*ceil(3 sigma)+1); sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(maps[:, None], [kernel, kernel], [sigma, sigma])[:, 0]


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> Iterable[torch.Tensor]:
    for m in maps:
        yield F.interpolate(at_least_float32(m[None, None]), size=size, mode="bilinear", align_corners=False)[0, 0]


def argmax_at_size(
    maps: torch.Tensor, size: tuple[int, int], keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """step 11: bilinearly resize each of K maps to `size` and take the per-pixel argmax.

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


def bilinear_labels(lowres_labels: torch.Tensor, num_masks: int, size: tuple[int, int]) -> torch.Tensor:
    """Baseline: one-hot low-res masks upsampled bilinearly to `size`, then argmax."""
    one_hot = F.one_hot(lowres_labels, num_masks).permute(2, 0, 1).float()
    return argmax_at_size(one_hot, size)[0]
