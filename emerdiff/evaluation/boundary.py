"""Boundary IoU (Cheng et al., CVPR 2021): IoU counted only near the contours, where upsampling errs.

For a binary mask M, its boundary band ``M_d`` is the pixels of M within distance d (chessboard: d
erosions by a 3x3 square) of its contour; the image border counts as contour, as in the authors'
code, which pads the mask with one background pixel before eroding. For class c, with G the
ground-truth mask and P the predicted one, ``BIoU_c = |G_d & P_d| / |G_d | P_d|`` summed over the
images of the split; pixels whose ground truth is ignored are not counted. d is
`DILATION_RATIO` of the image diagonal, rounded (Cheng et al.'s default): 4 px at 128x128,
14 px at 512x512.

`SegmentationWithBoundary` is the evaluation's per-image metric: the confusion matrix of
`emerdiff.evaluation.metrics` plus the boundary counts, and its scores carry both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..choices import MIOU_CONVENTIONS
from .metrics import ConfusionMatrixMetric, SegmentationScores

DILATION_RATIO = 0.02


def boundary_dilation(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """d in pixels for an image: `ratio` of its diagonal, rounded, at least 1."""
    return max(1, int(round(ratio * math.hypot(height, width))))


def boundary_bands(masks: torch.Tensor, dilation: int) -> torch.Tensor:
    """[N, H, W] bool masks -> their boundary bands: mask pixels within `dilation` of the contour or the border."""
    padded = F.pad(masks[:, None].float(), (1, 1, 1, 1), value=0.0)  # the image border is contour
    eroded = -F.max_pool2d(-padded, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return masks & (eroded[:, 0, 1:-1, 1:-1] < 0.5)


def boundary_counts(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: |G_d & P_d|, |G_d | P_d| and |G_d| of one [H, W] class map against its ground truth."""
    classes = torch.arange(num_classes, device=target.device)[:, None, None]
    valid = (target != ignore_index)[None]
    gt_band = boundary_bands(target[None] == classes, dilation) & valid
    pred_band = boundary_bands(preds[None] == classes, dilation) & valid
    return ((gt_band & pred_band).sum((1, 2)), (gt_band | pred_band).sum((1, 2)), gt_band.sum((1, 2)))


@dataclass
class BoundaryScores(SegmentationScores):
    """mIoU and pixel accuracy with the mean and per-class Boundary IoU of the same class maps."""

    boundary_miou: float = float("nan")
    boundary_iou: torch.Tensor | None = None  # (num_classes,) float64, NaN for classes left out of the mean

    def to_dict(self, prefix: str = "", class_names: Sequence[str] | None = None) -> dict[str, float]:
        return {**super().to_dict(prefix, class_names), f"{prefix}bIoU": self.boundary_miou}

    def in_percent(self, class_names: Sequence[str]) -> dict:
        return {
            **super().in_percent(class_names),
            "boundary_miou": None if math.isnan(self.boundary_miou) else 100.0 * self.boundary_miou,
            "boundary_dilation_ratio": DILATION_RATIO,
        }


def boundary_scores(
    intersection: torch.Tensor, union: torch.Tensor, gt_band: torch.Tensor, convention: str
) -> tuple[float, torch.Tensor]:
    """Mean and per-class Boundary IoU; the classes averaged follow the mIoU `convention`."""
    averaged = union > 0 if MIOU_CONVENTIONS[convention].union_classes else gt_band > 0
    iou = torch.where(
        averaged, intersection.double() / union.clamp(min=1), torch.full_like(union, float("nan"), dtype=torch.float64)
    )
    return (iou[averaged].mean().item() if averaged.any() else float("nan")), iou


class SegmentationWithBoundary(ConfusionMatrixMetric):
    """The confusion matrix plus per-class boundary-band intersections and unions; all states summed across ranks."""

    boundary_intersection: torch.Tensor  # the states (add_state): [C] int64 pixel counts of the boundary bands
    boundary_union: torch.Tensor
    boundary_gt: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, convention: str = "detectron2", **kwargs) -> None:
        super().__init__(num_classes, ignore_index, convention, **kwargs)
        for name in ("boundary_intersection", "boundary_union", "boundary_gt"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Count one [H, W] class map (or a batch [B, H, W]) against its ground truth."""
        super().update(preds, target)
        preds = torch.as_tensor(preds, device=self.confmat.device).long()
        target = torch.as_tensor(target, device=self.confmat.device).long()
        for pred, gt in zip(preds.reshape(-1, *preds.shape[-2:]), target.reshape(-1, *target.shape[-2:]), strict=True):
            counts = boundary_counts(pred, gt, self.num_classes, self.ignore_index, boundary_dilation(*gt.shape))
            self.boundary_intersection += counts[0]
            self.boundary_union += counts[1]
            self.boundary_gt += counts[2]

    def compute(self) -> BoundaryScores:
        """mIoU, pixel accuracy, per-class IoU and Boundary IoU of everything counted so far."""
        scores = super().compute()
        mean, per_class = boundary_scores(
            self.boundary_intersection, self.boundary_union, self.boundary_gt, self.convention
        )
        return BoundaryScores(scores.miou, scores.pixel_acc, scores.iou, scores.convention, mean, per_class)
