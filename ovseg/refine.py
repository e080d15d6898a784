"""TCL's evaluation-time refinements of its grounding masks: PAMR and the KP branch (kakaobrain/tcl,
``models/tcl/pamr.py``, ``TCL.kp_branch``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KP_OFFSET, KP_SCALE = 0.25, 10.0  # TCL's kp_branch: sigmoid((s_clip - 0.25) * 10)
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


def kp_branch(clip_cosine: Tensor) -> Tensor:
    """TCL's KP masks from the frozen CLIP's MaskCLIP cosines: ``sigmoid(10 (s_clip - 0.25))``, mixed into TCL's
    masks as ``kp_w * kp + (1 - kp_w) * mask``."""
    return torch.sigmoid((clip_cosine - KP_OFFSET) * KP_SCALE)


def pamr_refine(
    image: Tensor, masks: Tensor, iterations: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS
) -> Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as TCL applies it.

    ``image`` [B, K, H, W] and ``masks`` [B, C, H, W] at the same size. For every pixel and each of
    the 8 neighbours at each dilation (replicate padding), the affinity is
    ``-|x - x_n| / (1e-8 + 0.1 * sigma)`` per channel, ``sigma`` the standard deviation of the pixel's
    3 x 3 neighbourhoods (centre included) over all dilations; affinities are averaged over channels
    and softmax-normalised over the neighbours. Each iteration replaces every mask value by the
    affinity-weighted mean of its neighbours' values.
    """
    neighbours = _neighbour_values(image, dilations, centre=False)  # [B, K, 8n, H, W]
    sigma = _neighbour_values(image, dilations, centre=True).std(dim=2, keepdim=True)
    affinity = (-(neighbours - image[:, :, None]).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True)
    affinity = affinity.softmax(dim=2)  # [B, 1, 8n, H, W]
    for _ in range(iterations):
        masks = (_neighbour_values(masks, dilations, centre=False) * affinity).sum(dim=2)
    return masks


def _neighbour_values(x: Tensor, dilations: Sequence[int], centre: bool) -> Tensor:
    """[B, C, P, H, W]: for every pixel, the values at its 3 x 3 offsets (times each dilation), replicate-padded."""
    height, width = x.shape[-2:]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if centre or (dy, dx) != (0, 0)]
    values = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        values += [padded[..., d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width] for dy, dx in offsets]
    return torch.stack(values, dim=2)
