"""Semantic segmentation scores from a confusion matrix that is safe to reduce across processes.

Convention: ``confmat[g, p]`` counts pixels of ground-truth class ``g`` predicted as class
``p``. The matrix has one extra last column, ``confmat[g, num_classes]``, for pixels whose
prediction is no class at all (any value outside ``[0, num_classes)``, e.g. a segment the
protocol left unmatched): such a pixel is a false negative of its true class and a false
positive of no class. Pixels whose ground truth is the ignore index or outside
``[0, num_classes)`` are not counted. Scores are fractions in [0, 1]; callers format percent.

Which classes mIoU averages is a convention (`emerdiff.choices.MIOU_CONVENTIONS`), and the communities we compare
with differ:

- ``detectron2``: classes present in the ground truth; a class predicted but absent from the
  ground truth has no IoU and is left out;
- ``mmseg`` (mmsegmentation: MaskCLIP, TCL, GroupViT): classes with a non-empty union, so a class
  predicted but absent from the ground truth scores IoU 0;
- ``stego`` (STEGO, PiCIE): averaged as ``mmseg``; its matching differs too (every cluster takes
  a class, zero-overlap pairs included: `emerdiff.evaluation.protocols`). With more clusters than
  classes, `stego_scores` follows STEGO's ``UnsupervisedMetrics`` instead of this matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

from ..choices import MIOU_CONVENTIONS


@dataclass  # not frozen: torchmetrics rebuilds compute() results with apply_to_collection
class SegmentationScores:
    """mIoU and pixel accuracy (fractions) plus the per-class IoU behind them.

    Under the default ``detectron2`` convention, miou averages IoU over the classes present in the
    ground truth (nonzero row of the confusion matrix); a class never in the ground truth has IoU
    NaN and is not averaged, even if it was predicted. Under ``mmseg`` and ``stego``, every class
    with a non-empty union is averaged (a predicted-but-absent class has IoU 0); only a class
    neither present nor predicted has IoU NaN.
    """

    miou: float
    pixel_acc: float
    iou: torch.Tensor  # (num_classes,) float64, NaN for classes left out of the mean
    convention: str = "detectron2"  # which classes miou averages (MIOU_CONVENTIONS)

    def to_dict(self, prefix: str = "", class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat dict for loggers: mIoU, pAcc and IoU-<class name or id> (NaN for absent classes)."""
        names = class_names if class_names is not None else [str(c) for c in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"{len(names)} class names for {len(self.iou)} classes")
        scores = {f"{prefix}mIoU": self.miou, f"{prefix}pAcc": self.pixel_acc}
        scores.update({f"{prefix}IoU-{name}": float(v) for name, v in zip(names, self.iou, strict=True)})
        return scores

    def in_percent(self, class_names: Sequence[str]) -> dict:
        """JSON-ready miou, pixel_acc and per-class iou by name, in percent; None where a score is NaN (absent)."""
        return {
            "miou": _percent(self.miou),
            "pixel_acc": _percent(self.pixel_acc),
            "miou_convention": self.convention,
            "iou": {name: _percent(float(v)) for name, v in zip(class_names, self.iou, strict=False)},
        }


def check_convention(convention: str) -> None:
    """Raise a ValueError for a name that is not one of `MIOU_CONVENTIONS`."""
    if convention not in MIOU_CONVENTIONS:
        raise ValueError(f"mIoU convention {convention!r} is unknown; valid: {', '.join(MIOU_CONVENTIONS)}")


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def scores_from_confusion(confmat: torch.Tensor, convention: str = "detectron2") -> SegmentationScores:
    """Scores of a (C, C + 1) confusion matrix laid out as described in the module docstring.

    `convention` (`MIOU_CONVENTIONS`) decides which classes mIoU averages.
    """
    num_classes = confmat.shape[0]
    if confmat.ndim != 2 or confmat.shape[1] != num_classes + 1:
        raise ValueError(f"expected a (C, C + 1) confusion matrix, got shape {tuple(confmat.shape)}")
    check_convention(convention)
    counts = confmat.to(torch.float64)
    true_positive = counts.diagonal()
    gt_pixels = counts.sum(dim=1)  # includes the "no class" column: misses are false negatives
    predicted_pixels = counts[:, :num_classes].sum(dim=0)
    union = gt_pixels + predicted_pixels - true_positive
    averaged = union > 0 if MIOU_CONVENTIONS[convention].union_classes else gt_pixels > 0
    iou = torch.where(averaged, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    total = gt_pixels.sum()
    return SegmentationScores(
        miou=iou[averaged].mean().item() if averaged.any() else float("nan"),
        pixel_acc=(true_positive.sum() / total).item() if total > 0 else float("nan"),
        iou=iou,
        convention=convention,
    )


class ConfusionMatrixMetric(Metric):
    """Accumulates a (num_classes, num_classes + 1) int64 confusion matrix; computes mIoU.

    The only state is the confusion matrix, reduced with a sum across processes, so the
    result under DDP equals the result of one process that saw all the data.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, convention: str = "detectron2", **kwargs) -> None:
        super().__init__(**kwargs)
        check_convention(convention)
        self.convention = convention
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes + 1, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Count one batch of integer label maps of equal shape (any shape, e.g. B x H x W)."""
        preds = torch.as_tensor(preds, device=self.confmat.device)
        target = torch.as_tensor(target, device=self.confmat.device)
        if preds.shape != target.shape:
            raise ValueError(f"preds and target differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        preds, target = preds[valid], target[valid]
        no_class = self.num_classes  # index of the extra column
        preds = torch.where((preds >= 0) & (preds < self.num_classes), preds, no_class)
        width = self.num_classes + 1
        counts = torch.bincount(target * width + preds, minlength=self.num_classes * width)
        self.confmat += counts.reshape(self.num_classes, width)

    def compute(self) -> SegmentationScores:
        """mIoU, pixel accuracy and per-class IoU of everything counted so far, under this metric's convention."""
        return scores_from_confusion(self.confmat, self.convention)


def stego_scores(stats: torch.Tensor | np.ndarray, convention: str = "stego") -> SegmentationScores:
    """STEGO's scores (``UnsupervisedMetrics``, src/utils.py) of a (clusters, classes) pixel count matrix with
    more clusters than classes, as STEGO's code computes them.

    1. ``update`` counts only pixels whose cluster id is below the number of classes: the rows of clusters
       numbered from ``num_classes`` on are zeroed here.
    2. ``compute``: a Hungarian matching of the classes to clusters gives each class one cluster; the clusters
       the matching of clusters to classes leaves out are pooled into one pseudo-class row, with a zero column.
    3. IoU of the ``num_classes + 1`` rows; mIoU averages those with a non-empty union (the pseudo-class
       scores 0 when it holds pixels); accuracy is the diagonal over all counted pixels.
    ``iou`` holds the real classes; ``miou`` is STEGO's mean, the pseudo-class included.
    """
    counts = torch.as_tensor(stats, dtype=torch.float64).clone()
    num_clusters, num_classes = counts.shape
    if num_clusters <= num_classes:
        raise ValueError(f"stego_scores needs more clusters than classes, got {num_clusters} for {num_classes}")
    counts[num_classes:] = 0  # STEGO's update: preds >= n_classes are masked out
    matched_clusters, _ = linear_sum_assignment(counts.numpy(), maximize=True)
    _, cluster_of_class = linear_sum_assignment(counts.T.numpy(), maximize=True)
    missing = sorted(set(range(num_clusters)) - set(matched_clusters.tolist()))
    histogram = torch.cat([counts[cluster_of_class], counts[missing].sum(0, keepdim=True)])
    histogram = torch.cat([histogram, histogram.new_zeros(num_classes + 1, 1)], dim=1)
    true_positive = histogram.diagonal()
    union = histogram.sum(0) + histogram.sum(1) - true_positive
    iou = true_positive / union  # NaN where the union is empty, as in STEGO
    total = histogram.sum()
    return SegmentationScores(
        miou=iou[~iou.isnan()].mean().item() if (~iou.isnan()).any() else float("nan"),
        pixel_acc=(true_positive.sum() / total).item() if total > 0 else float("nan"),
        iou=iou[:num_classes],
        convention=convention,
    )
