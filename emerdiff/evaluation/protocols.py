"""Evaluation protocols: how class-agnostic segments get ground-truth class ids (docs/evaluation.md).

Three protocols, each named by where its matching happens:

- per image (DiffSeg, DiffCut): ``match_image`` matches one image's segments to that
  image's classes, one-to-one with the Hungarian algorithm, or many-to-one by majority;
- per dataset (paper Table 1): ``cluster_and_match`` clusters the mask embeddings of the
  whole dataset into as many clusters as classes and runs one Hungarian matching;
- concept embedding (paper Table 2): ``concept_sums`` + ``assign_to_concepts`` give each
  mask the class whose concept embedding is nearest (cosine); concepts come from one
  image or from the whole dataset depending on which masks are summed.

All of them start from an overlap matrix (``overlap_matrix``): pixels of each ground-truth
class inside each segment. A segment that gets no class is mapped to ``UNMATCHED``;
``emerdiff.evaluation.metrics.ConfusionMatrixMetric`` counts its pixels as false negatives of their
true class and as false positives of no class. A one-to-one match is kept only if the
segment and the class share at least one pixel, because a zero-overlap pairing is an
arbitrary tie that would only add false positives (DiffSeg's reference code keeps such
pairings, including pairings with classes absent from the image). ``keep_empty_pairs=True``
keeps every pairing the Hungarian algorithm returns, as STEGO's and PiCIE's code do (the
``stego`` mIoU convention of `emerdiff.evaluation.metrics`).

Inputs are numpy arrays or torch tensors (any device); outputs are numpy arrays. Per-image
inputs of the dataset-level protocols are plain arrays, so they can be gathered across
DDP ranks (e.g. ``all_gather`` and concatenate) before the dataset-wide step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..clustering import kmeans

ArrayLike = np.ndarray | torch.Tensor

UNMATCHED: int = -1
"""Class id given to segments without a class; never a valid class id."""


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def overlap_matrix(
    segments: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    num_segments: int | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Pixels of each ground-truth class inside each segment, (num_segments, num_classes) int64.

    segments: H x W segment ids in [0, num_segments) (num_segments defaults to max + 1).
    target: H x W class ids; the ignore index and ids outside [0, num_classes) are not counted.
    """
    segments, target = _to_numpy(segments), _to_numpy(target)
    if segments.shape != target.shape:
        raise ValueError(f"segments {segments.shape} and target {target.shape} differ in shape")
    segments, target = segments.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
    if num_segments is None:
        num_segments = int(segments.max()) + 1 if segments.size else 0
    if segments.size and (segments.min() < 0 or segments.max() >= num_segments):
        raise ValueError(f"segment ids must lie in [0, {num_segments}), got {segments.min()}..{segments.max()}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    flat = segments[valid] * num_classes + target[valid]
    return np.bincount(flat, minlength=num_segments * num_classes).reshape(num_segments, num_classes)


def relabel(segments: ArrayLike, segment_to_class: ArrayLike) -> np.ndarray:
    """Class map of a segment map: each pixel takes its segment's class (or UNMATCHED)."""
    segments, segment_to_class = _to_numpy(segments).astype(np.int64), _to_numpy(segment_to_class)
    return segment_to_class.astype(np.int64)[segments]


def _hungarian(overlap: np.ndarray, score: np.ndarray, keep_empty_pairs: bool = False) -> np.ndarray:
    """One-to-one row -> column map maximising total score; pairs without overlap stay UNMATCHED
    unless `keep_empty_pairs`."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    keep = np.ones(len(rows), dtype=bool) if keep_empty_pairs else overlap[rows, cols] > 0
    mapping = np.full(overlap.shape[0], UNMATCHED, dtype=np.int64)
    mapping[rows[keep]] = cols[keep]
    return mapping


@dataclass(frozen=True)
class ImageMatching:
    """Result of a per-image protocol."""

    segment_to_class: np.ndarray  # (num_segments,) int64 class id or UNMATCHED
    labels: np.ndarray  # H x W int64 class map (UNMATCHED where the segment got no class)


def match_image(
    segments: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    *,
    ignore_index: int = 255,
    assignment: str = "hungarian",
    criterion: str = "overlap",
    keep_empty_pairs: bool = False,
) -> ImageMatching:
    """Per-image protocol: give one image's segments class ids using that image's ground truth.

    assignment="hungarian" matches segments and classes one-to-one (scipy
    linear_sum_assignment), maximising the summed pixel overlap (criterion="overlap", as in
    DiffSeg's code) or the summed IoU (criterion="iou"); extra segments stay UNMATCHED.
    keep_empty_pairs keeps Hungarian pairings without a common pixel (see the module docstring).
    assignment="majority" gives every segment the class it overlaps most (many-to-one);
    only segments lying entirely on ignored pixels stay UNMATCHED. Pixel counts leave out
    ignored pixels.
    """
    overlap = overlap_matrix(segments, target, num_classes, ignore_index=ignore_index)
    if assignment == "majority":
        segment_to_class = np.where(overlap.sum(axis=1) > 0, overlap.argmax(axis=1), UNMATCHED)
    elif assignment == "hungarian":
        if criterion == "overlap":
            score = overlap.astype(np.float64)
        elif criterion == "iou":
            union = overlap.sum(axis=1, keepdims=True) + overlap.sum(axis=0, keepdims=True) - overlap
            score = overlap / np.maximum(union, 1)
        else:
            raise ValueError(f"criterion must be 'overlap' or 'iou', got {criterion!r}")
        segment_to_class = _hungarian(overlap, score, keep_empty_pairs)
    else:
        raise ValueError(f"assignment must be 'hungarian' or 'majority', got {assignment!r}")
    return ImageMatching(segment_to_class=segment_to_class, labels=relabel(segments, segment_to_class))


def _check_masks(embeddings: np.ndarray, class_histograms: np.ndarray) -> None:
    if embeddings.ndim != 2 or class_histograms.ndim != 2:
        raise ValueError(
            f"expected embeddings (N, D) and class_histograms (N, C), "
            f"got {embeddings.shape} and {class_histograms.shape}"
        )
    if embeddings.shape[0] != class_histograms.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {class_histograms.shape[0]} class histograms")


@dataclass(frozen=True)
class DatasetMatching:
    """Result of the dataset-level protocol; masks are in the order they were passed in."""

    cluster_of_mask: np.ndarray  # (N,) int64 k-means cluster of each mask
    cluster_to_class: np.ndarray  # (num_clusters,) int64 class id or UNMATCHED
    class_of_mask: np.ndarray  # (N,) int64 class id or UNMATCHED
    histogram: np.ndarray  # (num_clusters, C) int64 pixels of each class in each cluster


def cluster_and_match(
    embeddings: ArrayLike,
    class_histograms: ArrayLike,
    *,
    num_clusters: int | None = None,
    seed: int = 0,
    restarts: int = 5,
    iters: int = 50,
    l2_normalize: bool = False,
) -> DatasetMatching:
    """Dataset-level protocol (paper Table 1): k-means over all masks, then one Hungarian matching.

    embeddings: (N, D) mask embeddings of the whole dataset (every rank's masks, gathered).
    class_histograms: (N, C) pixels of each class in each mask (``overlap_matrix`` rows).
    num_clusters defaults to C. Clusters are matched one-to-one to classes on the cluster x
    class pixel histogram summed over the dataset; to relabel an image, index
    ``class_of_mask`` with that image's mask rows and apply ``relabel`` to its segment map.
    """
    histograms = _to_numpy(class_histograms)
    _check_masks(_to_numpy(embeddings), histograms)
    k = histograms.shape[1] if num_clusters is None else num_clusters
    clusters = cluster_masks(embeddings, k, seed=seed, restarts=restarts, iters=iters, l2_normalize=l2_normalize)
    return match_clusters(clusters, histograms, k)


def cluster_masks(
    embeddings: ArrayLike,
    num_clusters: int,
    *,
    seed: int = 0,
    restarts: int = 5,
    iters: int = 50,
    l2_normalize: bool = False,
) -> np.ndarray:
    """(N,) int64 k-means cluster of each mask embedding: faiss, seeded, best of `restarts` runs of `iters` iterations,
    no subsampling, on the raw embeddings or on L2-normalised ones with spherical centroids if `l2_normalize`."""
    x = np.ascontiguousarray(_to_numpy(embeddings), dtype=np.float32)
    if not 0 < num_clusters <= len(x):
        raise ValueError(f"need 0 < num_clusters <= number of masks, got {num_clusters} clusters for {len(x)} masks")
    if l2_normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    assignment, _ = kmeans(x, num_clusters, seed=seed, restarts=restarts, iters=iters, spherical=l2_normalize)
    return assignment.numpy()


def match_clusters(
    cluster_of_mask: np.ndarray, class_histograms: ArrayLike, num_clusters: int, keep_empty_pairs: bool = False
) -> DatasetMatching:
    """Match clusters one-to-one to classes (Hungarian) on their summed (N, C) class histograms.

    A cluster paired with a class it shares no pixel with stays UNMATCHED, unless `keep_empty_pairs`
    (STEGO / PiCIE: every cluster takes the class of its pairing).
    """
    histograms = _to_numpy(class_histograms).astype(np.int64)
    histogram = np.zeros((num_clusters, histograms.shape[1]), dtype=np.int64)
    np.add.at(histogram, cluster_of_mask, histograms)
    cluster_to_class = _hungarian(histogram, histogram.astype(np.float64), keep_empty_pairs)
    return DatasetMatching(
        cluster_of_mask=cluster_of_mask,
        cluster_to_class=cluster_to_class,
        class_of_mask=cluster_to_class[cluster_of_mask],
        histogram=histogram,
    )


@dataclass(frozen=True)
class ConceptSums:
    """Sufficient statistics of concept embeddings; add them across images or DDP ranks.

    The concept embedding of class c is the mean embedding of its pixels. Every pixel
    carries the embedding of its mask, so with n[m, c] the pixels of class c in mask m:
    concept[c] = sum_m n[m, c] * e[m] / sum_m n[m, c] = weighted_sum[c] / pixels[c].
    """

    weighted_sum: np.ndarray  # (C, D) float64, sum_m n[m, c] * e[m]
    pixels: np.ndarray  # (C,) int64, sum_m n[m, c]

    def __add__(self, other: ConceptSums) -> ConceptSums:
        return ConceptSums(self.weighted_sum + other.weighted_sum, self.pixels + other.pixels)

    @property
    def embeddings(self) -> np.ndarray:
        """(C, D) concept embeddings; NaN rows for classes without pixels."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.weighted_sum / self.pixels[:, None]


def concept_sums(embeddings: ArrayLike, class_histograms: ArrayLike) -> ConceptSums:
    """Concept statistics of a set of masks: (N, D) embeddings, (N, C) class pixel counts.

    Pass one image's masks for per-image concepts, or sum the results of all images (and
    ranks) for per-dataset concepts.
    """
    e = _to_numpy(embeddings).astype(np.float64)
    n = _to_numpy(class_histograms).astype(np.int64)
    _check_masks(e, n)
    return ConceptSums(weighted_sum=n.T.astype(np.float64) @ e, pixels=n.sum(axis=0))


def assign_to_concepts(embeddings: ArrayLike, concepts: ConceptSums) -> np.ndarray:
    """Concept-embedding protocol (paper Table 2): class of the nearest concept by cosine, (N,) int64.

    Only classes with at least one pixel in `concepts` are candidates; without any, every
    mask is UNMATCHED.
    """
    e = _to_numpy(embeddings).astype(np.float64)
    if e.ndim != 2 or e.shape[1] != concepts.weighted_sum.shape[1]:
        raise ValueError(f"expected embeddings (N, {concepts.weighted_sum.shape[1]}), got {e.shape}")
    present = concepts.pixels > 0
    if not present.any():
        return np.full(e.shape[0], UNMATCHED, dtype=np.int64)
    centres = concepts.embeddings[present]
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return np.flatnonzero(present)[(e @ centres.T).argmax(axis=1)].astype(np.int64)
