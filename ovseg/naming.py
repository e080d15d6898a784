"""Name class-agnostic masks: pool dense CLIP embeddings inside each mask, pick the closest class text.

Masks and dense embeddings must cover the same image extent (at any resolutions).

Mask embedding (choice and why): each mask is resampled onto the embedding grid as coverage
weights (how many of the mask's pixels fall in each cell, a pixel belonging to the cell that
contains its centre), and the mask embedding is the weighted mean of the cell embeddings,
L2-normalised. This equals upsampling the embeddings to image size by pixel-centre nearest
neighbour (``mode="nearest-exact"``) and averaging them over the mask's pixels, exactly, at
a cost of K*h*w*D instead of K*H*W*D and without materialising image-size embeddings.
(Bilinear upsampling would only blend neighbouring cells near mask borders; MaskCLIP's
embeddings are per patch anyway.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELLED = -1  # class id of empty masks, and of pixels no mask covers (mask-stack input)


@dataclass(frozen=True)
class MaskLabels:
    """Per-mask classes and scores, and the image's label map in vocabulary ids.

    The one type for "the class of each mask" across ovseg: the labeller returns it (with the
    baseline beside it, `ovseg.labeller.OpenVocabOutput`), the prediction tool saves it
    (`ovseg.outputs.NamedMasks`).
    """

    class_ids: Tensor  # [K] int64 vocabulary id per mask; UNLABELLED for empty masks
    scores: Tensor  # [K] float cosine similarity to the best class; NaN for empty masks
    label_map: Tensor  # [H, W] int64 vocabulary ids
    mask_embeddings: Tensor  # [K, D] L2-normalised; zero rows for empty masks


def label_masks(
    dense: Tensor,
    masks: Tensor,
    text: Tensor,
    *,
    num_masks: int | None = None,
    background_id: int | None = None,
    threshold: float | None = None,
    exclude: int | None = None,
) -> MaskLabels:
    """Give each mask the class whose text embedding is most similar to the mask's mean embedding.

    ``dense``: [D, h, w] embeddings; ``text``: [C, D] class embeddings; ``masks``: an [H, W]
    integer label map with segment ids in [0, K) (K = ``num_masks`` or max id + 1), or a
    [K, H, W] stack of bool/float masks (a pixel then takes its highest-valued mask; pixels
    no mask covers get UNLABELLED). Ties between classes go to the lowest class id.
    A mask with no pixels gets class UNLABELLED and score NaN. Background: a mask whose best
    class is ``background_id`` is background; with ``threshold`` set (default off), a mask
    whose best cosine is below it also becomes ``background_id``. Class ``exclude`` is never chosen by
    similarity (e.g. a background that is not named by prompts); the threshold can still give it.
    """
    if threshold is not None and background_id is None:
        raise ValueError("threshold needs a background_id to assign low-scoring masks to")
    _check_embeddings(dense, text)
    weights, segments = _coverage(masks, (dense.shape[1], dense.shape[2]), num_masks)
    embeddings = F.normalize(weights @ dense.flatten(1).T.float(), dim=-1)
    similarity = embeddings @ F.normalize(text.float(), dim=-1).T  # [K, C]
    if exclude is not None:
        similarity[:, exclude] = float("-inf")
    class_ids = similarity.argmax(dim=1)
    scores = similarity.gather(1, class_ids[:, None])[:, 0]
    if threshold is not None and background_id is not None:  # (a threshold alone is refused above)
        class_ids = torch.where(scores < threshold, torch.full_like(class_ids, background_id), class_ids)
    empty = weights.sum(dim=1) == 0
    class_ids = class_ids.masked_fill(empty, UNLABELLED)
    scores = scores.masked_fill(empty, float("nan"))
    covered = segments >= 0
    label_map = torch.where(covered, class_ids[segments.clamp(min=0)], UNLABELLED)
    return MaskLabels(class_ids=class_ids, scores=scores, label_map=label_map, mask_embeddings=embeddings)


def maskclip_labels(
    dense: Tensor,
    text: Tensor,
    size: tuple[int, int],
    *,
    background_id: int | None = None,
    threshold: float | None = None,
    exclude: int | None = None,
    classes_per_pass: int = 32,
) -> Tensor:
    """Plain MaskCLIP baseline: per-cell cosine maps, bilinearly upsampled to ``size``, argmax per pixel.

    Similarity maps are interpolated, never the integer labels. Classes are processed
    ``classes_per_pass`` at a time (same result, less memory); ties go to the lowest id.
    With ``threshold`` set, pixels whose best cosine is below it become ``background_id``; class
    ``exclude`` is never chosen by similarity.
    """
    if threshold is not None and background_id is None:
        raise ValueError("threshold needs a background_id to assign low-scoring pixels to")
    _check_embeddings(dense, text)
    cells = torch.einsum("dhw,cd->chw", F.normalize(dense.float(), dim=0), F.normalize(text.float(), dim=-1))
    best = cells.new_full(tuple(size), float("-inf"))
    labels = torch.zeros(tuple(size), dtype=torch.long, device=cells.device)
    for start in range(0, len(cells), classes_per_pass):
        maps = F.interpolate(cells[None, start : start + classes_per_pass], size=tuple(size), mode="bilinear")[0]
        if exclude is not None and start <= exclude < start + len(maps):
            maps[exclude - start] = float("-inf")
        score, index = maps.max(dim=0)
        better = score > best  # strict, so an earlier (lower) class id keeps ties
        best = torch.where(better, score, best)
        labels = torch.where(better, index + start, labels)
    if threshold is not None and background_id is not None:  # (a threshold alone is refused above)
        labels = labels.masked_fill(best < threshold, background_id)
    return labels


def _coverage(masks: Tensor, grid: tuple[int, int], num_masks: int | None) -> tuple[Tensor, Tensor]:
    """[K, h*w] mask pixels per embedding cell, and the [H, W] segment id per pixel (-1: none)."""
    height, width = masks.shape[-2:]
    cells = _pixel_cells((height, width), grid, masks.device).flatten()
    num_cells = grid[0] * grid[1]
    if masks.ndim == 2 and not masks.is_floating_point() and masks.dtype != torch.bool:
        segments = masks.long()
        if segments.numel() and segments.min() < 0:
            raise ValueError("label map segment ids must be non-negative")
        count = int(segments.max()) + 1 if segments.numel() else 0
        k = count if num_masks is None else num_masks
        if count > k:
            raise ValueError(f"label map has segment id {count - 1} but num_masks is {k}")
        flat = segments.flatten() * num_cells + cells
        weights = torch.bincount(flat, minlength=k * num_cells).view(k, num_cells).float()
        return weights, segments
    if masks.ndim != 3:
        raise ValueError(f"masks must be an [H, W] integer label map or a [K, H, W] stack, got {tuple(masks.shape)}")
    stack = masks.float()
    weights = stack.new_zeros(len(stack), num_cells).index_add_(1, cells, stack.flatten(1))
    value, segments = stack.max(dim=0)
    return weights, segments.masked_fill(value <= 0, -1)


def _pixel_cells(size: tuple[int, int], grid: tuple[int, int], device: torch.device) -> Tensor:
    """[H, W] index of the embedding cell containing each pixel centre."""
    rows = ((torch.arange(size[0], device=device, dtype=torch.float64) + 0.5) * grid[0] / size[0]).long()
    cols = ((torch.arange(size[1], device=device, dtype=torch.float64) + 0.5) * grid[1] / size[1]).long()
    return rows.clamp(max=grid[0] - 1)[:, None] * grid[1] + cols.clamp(max=grid[1] - 1)[None, :]


def _check_embeddings(dense: Tensor, text: Tensor) -> None:
    """Dense [D, h, w] and text [C, D] with matching D."""
    if dense.ndim != 3 or text.ndim != 2 or dense.shape[0] != text.shape[1]:
        raise ValueError(f"expected dense [D, h, w] and text [C, D], got {tuple(dense.shape)} and {tuple(text.shape)}")
