"""Boundary IoU (emerdiff.evaluation.boundary) against counts worked out by hand."""

import math

import pytest
import torch

from emerdiff.evaluation.boundary import SegmentationWithBoundary, boundary_bands, boundary_dilation


def square(top: int, left: int, size: int = 6) -> torch.Tensor:
    """A 6x6 class map: class 1 on a 2x2 square at (top, left), class 0 elsewhere."""
    labels = torch.zeros(size, size, dtype=torch.int64)
    labels[top: top + 2, left: left + 2] = 1
    return labels


def test_the_dilation_is_two_percent_of_the_diagonal_rounded():
    assert boundary_dilation(128, 128) == 4  # 0.02 * 181.0 = 3.62
    assert boundary_dilation(512, 512) == 14  # 0.02 * 724.1 = 14.5 -> 14
    assert boundary_dilation(6, 6) == 1  # never below one pixel


def test_the_band_is_the_mask_within_d_of_its_contour_or_the_image_border():
    background = square(2, 3) == 0  # 32 pixels; only column 1, rows 1-4, is farther than 1 px from both
    band = boundary_bands(background[None], 1)[0]
    assert band.sum() == 28
    assert not band[1:5, 1].any() and band[0].all()


def test_a_shifted_square_scores_the_hand_counted_boundary_iou():
    """gt square at columns 2-3, predicted at 3-4: class 1 bands 2 / 6; class 0 bands 26 / 34."""
    metric = SegmentationWithBoundary(num_classes=2)
    metric.update(square(2, 3), square(2, 2))
    scores = metric.compute()
    assert scores.boundary_iou.tolist() == pytest.approx([26 / 34, 2 / 6])
    assert scores.boundary_miou == pytest.approx((26 / 34 + 2 / 6) / 2)
    assert scores.iou.tolist() == pytest.approx([30 / 34, 2 / 6])  # the confusion matrix is unchanged
    assert scores.in_percent(["a", "b"])["boundary_miou"] == pytest.approx(50 * (26 / 34 + 2 / 6))


def test_a_perfect_map_scores_one_and_ignored_pixels_are_not_counted():
    gt = square(2, 2)
    gt[0, :] = 255
    pred = square(2, 2)
    pred[0, :] = 1  # wrong only where the ground truth is ignored
    metric = SegmentationWithBoundary(num_classes=2, ignore_index=255)
    metric.update(pred, gt)
    assert metric.compute().boundary_miou == 1.0


def test_counts_add_up_over_images_before_dividing():
    metric = SegmentationWithBoundary(num_classes=2)
    metric.update(square(2, 3), square(2, 2))
    metric.update(square(2, 2), square(2, 2))  # perfect: class 1 band 4 / 4, class 0 band 32 / 32
    assert metric.compute().boundary_iou.tolist() == pytest.approx([(26 + 32) / (34 + 32), (2 + 4) / (6 + 4)])


def test_a_class_absent_from_the_ground_truth_is_left_out_under_detectron2():
    metric = SegmentationWithBoundary(num_classes=3)
    metric.update(square(2, 2), square(2, 2))
    scores = metric.compute()
    assert math.isnan(scores.boundary_iou[2]) and scores.boundary_miou == 1.0
