"""Protocol dispatch and scoring: every protocol of one image, and the dataset-wide protocols on gathered masks.

- Per-image protocols (``hungarian``, ``majority``, ``concept_image``) give each image a class map
  (`per_image_class_map`) that updates confusion-matrix metrics, whose states are summed across DDP ranks.
- Dataset-wide protocols (``dataset``, ``concept_dataset``) need every mask of the split: each
  mask's embedding and class histogram go into `MaskRecords`, a metric whose states are
  concatenated across ranks. Its class histograms also give the dataset-wide confusion matrices
  exactly (`confusion_from_histograms`), since relabelling a mask moves all of its pixels to one
  predicted class.

The matching itself is `emerdiff.evaluation.protocols`; the scores are `emerdiff.evaluation.metrics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..choices import MIOU_CONVENTIONS, PROTOCOLS
from ..config import EvalConfig, check_rules
from .metrics import SegmentationScores, scores_from_confusion, stego_scores
from .protocols import (
    UNMATCHED,
    assign_to_concepts,
    cluster_masks,
    concept_sums,
    match_clusters,
    match_image,
    overlap_matrix,
    relabel,
)

if TYPE_CHECKING:
    from ..data import DatasetMetadata
    from .cache import CachedPrediction

METHODS = ("emerdiff", "bilinear", "nearest")  # EmerDiff labels; bilinear, nearest upsampling of the same k-means masks
PER_IMAGE_PROTOCOLS = tuple(name for name, protocol in PROTOCOLS.items() if protocol.per_image)


def check_settings(settings: EvalConfig) -> None:
    """Raise a ConfigError (a ValueError) naming a bad `eval` setting, for an EvalConfig built in Python.

    The rules are the ones `emerdiff.config.load_config` checks on config files and overrides.
    """
    check_rules(OmegaConf.structured(settings), "eval.")


def miou_convention(protocol: str, settings: EvalConfig) -> str:
    """The mIoU convention a protocol is scored under: `eval.miou_convention`, or its papers' if that is null
    (`emerdiff.choices.PROTOCOLS`; docs/evaluation.md says why)."""
    return settings.miou_convention or PROTOCOLS[protocol].paper_convention


def per_image_class_map(
    protocol: str,
    segments: np.ndarray,
    gt: np.ndarray,
    embeddings: np.ndarray,
    histogram: np.ndarray,
    num_classes: int,
    ignore_index: int,
    criterion: str,
    convention: str = "detectron2",
) -> np.ndarray:
    """[H, W] class map (UNMATCHED where a mask got no class) of a per-image protocol, using this image's gt.

    Under a convention that keeps empty pairs (``stego``), the Hungarian matching keeps pairings without a common
    pixel.
    """
    if protocol in ("hungarian", "majority"):
        return match_image(
            segments,
            gt,
            num_classes,
            ignore_index=ignore_index,
            assignment=protocol,
            criterion=criterion,
            keep_empty_pairs=MIOU_CONVENTIONS[convention].keep_empty_pairs,
        ).labels
    if protocol == "concept_image":
        return relabel(segments, assign_to_concepts(embeddings, concept_sums(embeddings, histogram)))
    raise ValueError(f"{protocol!r} is not a per-image protocol; those are {', '.join(PER_IMAGE_PROTOCOLS)}")


@dataclass(frozen=True)
class ImageClassMaps:
    """One image scored by the per-image protocols: each method's mask/class overlaps and its class maps."""

    histograms: dict[str, np.ndarray]  # method -> [K, C] pixels of mask k with ground-truth class c
    classes: dict[str, dict[str, np.ndarray]]  # method -> protocol -> [H, W] class map (UNMATCHED: no class)


def image_class_maps(
    prediction: CachedPrediction, metadata: DatasetMetadata, settings: EvalConfig, protocols: Sequence[str]
) -> ImageClassMaps:
    """The class map each of `protocols` gives each method's masks of one cached prediction, as the evaluator
    scores them (and the evaluation's figure draws them)."""
    histograms, classes = {}, {}
    for method in METHODS:
        segments = prediction.segments(method)
        histograms[method] = overlap_matrix(
            segments,
            prediction.gt,
            metadata.num_classes,
            num_segments=prediction.num_masks,
            ignore_index=metadata.ignore_index,
        )
        classes[method] = {
            protocol: per_image_class_map(
                protocol,
                segments,
                prediction.gt,
                prediction.mask_embeddings,
                histograms[method],
                metadata.num_classes,
                metadata.ignore_index,
                settings.match_criterion,
                miou_convention(protocol, settings),
            )
            for protocol in protocols
        }
    return ImageClassMaps(histograms, classes)


def confusion_from_histograms(histograms: np.ndarray, class_of_mask: np.ndarray, num_classes: int) -> torch.Tensor:
    """(C, C + 1) confusion matrix when every pixel of mask m is predicted as class_of_mask[m] (or no class).

    The layout of `emerdiff.evaluation.metrics`: rows are ground truth, the last column counts pixels of masks
    that got no class.
    """
    confmat = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    column = np.where(class_of_mask == UNMATCHED, num_classes, class_of_mask)
    np.add.at(confmat.T, column, histograms)
    return torch.from_numpy(confmat)


@dataclass
class DatasetMasks:
    """Every mask of the split in (image index, mask id) order, whichever rank predicted it."""

    embeddings: np.ndarray  # [N, D] float32
    histograms: dict[str, np.ndarray]  # method -> [N, C] int32 pixels of each class in each mask
    num_images: int


@dataclass
class DatasetScores:
    """Scores of the dataset-wide protocols and the number of k-means clusters actually used."""

    scores: dict[str, dict[str, SegmentationScores]]  # method -> protocol -> scores
    num_clusters: int | None


def dataset_protocol_scores(
    masks: DatasetMasks, protocols: Sequence[str], num_classes: int, settings: EvalConfig
) -> DatasetScores:
    """Score the dataset-wide protocols among `protocols` for every method from the gathered masks."""
    scores: dict[str, dict[str, SegmentationScores]] = {method: {} for method in masks.histograms}
    num_clusters = None
    if "dataset" in protocols:
        wanted = settings.dataset_clusters or num_classes
        num_clusters = min(wanted, len(masks.embeddings))
        if num_clusters < wanted:
            warnings.warn(
                f"only {num_clusters} masks in the split: the dataset-level protocol clusters them "
                f"into {num_clusters} clusters instead of {wanted}",
                stacklevel=1,
            )
        clusters = cluster_masks(
            masks.embeddings,
            num_clusters,
            seed=settings.kmeans_seed,
            restarts=settings.kmeans_restarts,
            iters=settings.kmeans_iters,
            l2_normalize=settings.kmeans_l2_normalize,
        )
    for method, histograms in masks.histograms.items():  # one k-means, matched on each method's histograms
        if num_clusters is not None:  # the dataset protocol, its masks clustered above
            convention = miou_convention("dataset", settings)
            rules = MIOU_CONVENTIONS[convention]
            if rules.stego_extra_clusters and num_clusters > num_classes:  # STEGO's own computation
                stats = np.zeros((num_clusters, num_classes), dtype=np.int64)
                np.add.at(stats, clusters, histograms)
                scores[method]["dataset"] = stego_scores(stats, convention)
            else:
                matching = match_clusters(clusters, histograms, num_clusters, keep_empty_pairs=rules.keep_empty_pairs)
                confmat = confusion_from_histograms(histograms, matching.class_of_mask, num_classes)
                scores[method]["dataset"] = scores_from_confusion(confmat, convention)
        if "concept_dataset" in protocols:
            classes = assign_to_concepts(masks.embeddings, concept_sums(masks.embeddings, histograms))
            scores[method]["concept_dataset"] = scores_from_confusion(
                confusion_from_histograms(histograms, classes, num_classes),
                miou_convention("concept_dataset", settings),
            )
    return DatasetScores(scores, num_clusters)


class MaskRecords(Metric):
    """Each mask's image index, embedding and per-method class histogram; states concatenated across ranks."""

    full_state_update = False
    images: list[torch.Tensor]  # the states (add_state): one entry per image
    image_of_mask: list[torch.Tensor]
    embeddings: list[torch.Tensor]

    def __init__(self, methods: Sequence[str] = METHODS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.methods = tuple(methods)
        self.add_state("images", default=[], dist_reduce_fx="cat")  # one entry per image
        self.add_state("image_of_mask", default=[], dist_reduce_fx="cat")
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        for method in self.methods:
            self.add_state(f"histograms_{method}", default=[], dist_reduce_fx="cat")

    def update(self, image_index: int, embeddings: torch.Tensor, histograms: Mapping[str, torch.Tensor]) -> None:
        """Record one image's K masks: embeddings [K, D], histograms method -> [K, C]."""
        device = self.device
        self.images.append(torch.tensor([image_index], device=device))
        self.image_of_mask.append(torch.full((len(embeddings),), image_index, device=device))
        self.embeddings.append(embeddings.to(device=device, dtype=torch.float32))
        for method in self.methods:
            # int32 halves the gathered volume; a mask's pixel count fits easily
            getattr(self, f"histograms_{method}").append(histograms[method].to(device=device, dtype=torch.int32))

    def compute(self) -> DatasetMasks:
        """All masks sorted by image index (stable, so each image keeps its mask order), on the CPU."""
        images = dim_zero_cat(self.images).cpu()
        if len(images.unique()) != len(images):
            raise RuntimeError("an image was scored more than once (a sampler repeated samples across ranks)")
        order = torch.argsort(dim_zero_cat(self.image_of_mask).cpu(), stable=True)
        return DatasetMasks(
            embeddings=dim_zero_cat(self.embeddings).cpu()[order].numpy(),
            histograms={m: dim_zero_cat(getattr(self, f"histograms_{m}")).cpu()[order].numpy() for m in self.methods},
            num_images=len(images),
        )
