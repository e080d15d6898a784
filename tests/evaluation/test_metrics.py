"""The confusion-matrix metric: counting convention, mIoU over present classes, DDP-safe state."""

from __future__ import annotations

import math

import pytest
import torch

from emerdiff.evaluation.metrics import ConfusionMatrixMetric, scores_from_confusion

IGNORE = 255


def scores(preds, target, num_classes=3):
    metric = ConfusionMatrixMetric(num_classes=num_classes, ignore_index=IGNORE)
    metric.update(torch.as_tensor(preds), torch.as_tensor(target))
    return metric.compute()


def test_perfect_prediction_scores_one():
    target = torch.randint(0, 5, (2, 16, 16))
    result = scores(target, target, num_classes=5)
    assert result.miou == 1.0
    assert result.pixel_acc == 1.0


def test_hand_worked_example_matches_iou_and_pixel_accuracy_computed_by_hand():
    target = [[0, 0, 0], [1, 1, 2]]
    preds = [[0, 0, 1], [1, 2, 2]]
    # rows = ground truth, cols = prediction:
    #   class 0: 3 pixels, 2 right, 1 predicted as 1      -> TP 2, FN 1
    #   class 1: 2 pixels, 1 right, 1 predicted as 2      -> TP 1, FN 1
    #   class 2: 1 pixel, right                           -> TP 1
    # predicted as 0: 2 px, as 1: 2 px, as 2: 2 px
    # IoU = TP / (GT + predicted - TP): 2/3, 1/3, 1/2
    result = scores(preds, target)
    assert result.iou.tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert result.miou == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert result.pixel_acc == pytest.approx(4 / 6)


def test_confusion_matrix_rows_are_ground_truth_and_columns_predictions():
    metric = ConfusionMatrixMetric(num_classes=3)
    metric.update(torch.tensor([2, 2, 1]), torch.tensor([0, 0, 0]))
    assert metric.confmat[0].tolist() == [0, 1, 2, 0]
    assert metric.confmat[1:].sum() == 0


def test_ignore_pixels_are_not_counted_whatever_is_predicted_there():
    target = [[0, 1, IGNORE, IGNORE]]
    base = scores([[0, 1, 0, 1]], target, num_classes=2)
    other = scores([[0, 1, 1, 5]], target, num_classes=2)
    assert base.miou == other.miou == 1.0
    assert base.pixel_acc == other.pixel_acc == 1.0


def test_ground_truth_outside_the_class_range_is_ignored():
    metric = ConfusionMatrixMetric(num_classes=2)
    metric.update(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 7, -1]))
    assert metric.confmat.sum() == 2
    assert metric.compute().miou == 1.0


def test_class_absent_from_ground_truth_has_nan_iou_and_is_not_averaged():
    # class 2 is predicted once but never occurs in the ground truth
    result = scores([0, 0, 2, 1], [0, 0, 0, 1])
    assert math.isnan(result.iou[2])
    assert result.iou[:2].tolist() == pytest.approx([2 / 3, 1.0])
    assert result.miou == pytest.approx((2 / 3 + 1.0) / 2)


def test_prediction_outside_the_classes_is_a_false_negative_and_no_false_positive():
    # -1 (an unmatched segment) on a class-0 pixel: a miss of class 0 that takes
    # nothing away from class 1, whose IoU stays perfect
    result = scores([0, -1, 1, 1], [0, 0, 1, 1], num_classes=2)
    assert result.iou.tolist() == pytest.approx([1 / 2, 1.0])
    assert result.pixel_acc == pytest.approx(3 / 4)


def test_image_without_valid_pixels_gives_nan_scores():
    result = scores([0, 1], [IGNORE, IGNORE], num_classes=2)
    assert math.isnan(result.miou) and math.isnan(result.pixel_acc)


def test_states_of_two_metrics_add_up_like_a_ddp_reduce_to_one_metric_over_all_data():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(-1, 6, (4, 12, 12), generator=generator)
    target = torch.randint(0, 6, (4, 12, 12), generator=generator)
    target[:, :2] = IGNORE
    whole, rank0, rank1 = (ConfusionMatrixMetric(num_classes=6) for _ in range(3))
    whole.update(preds, target)
    rank0.update(preds[:3], target[:3])
    rank1.update(preds[3:], target[3:])

    assert torch.equal(rank0.confmat + rank1.confmat, whole.confmat)
    rank0.merge_state(rank1)  # applies the registered dist_reduce_fx, as a DDP sync would
    merged, expected = rank0.compute(), whole.compute()
    assert merged.miou == expected.miou
    assert merged.pixel_acc == expected.pixel_acc
    assert torch.equal(merged.iou, expected.iou)


def test_update_accumulates_and_reset_clears():
    metric = ConfusionMatrixMetric(num_classes=2)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    metric.update(torch.tensor([1]), torch.tensor([1]))
    assert metric.confmat.sum() == 3
    metric.reset()
    assert metric.confmat.sum() == 0


def test_mismatched_shapes_are_rejected():
    metric = ConfusionMatrixMetric(num_classes=2)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_to_dict_names_scores_by_class():
    result = scores_from_confusion(torch.tensor([[3, 1, 0], [0, 0, 0]]))
    flat = result.to_dict(prefix="val/", class_names=["sky", "tree"])
    assert flat["val/mIoU"] == pytest.approx(3 / 4)
    assert flat["val/pAcc"] == pytest.approx(3 / 4)
    assert flat["val/IoU-sky"] == pytest.approx(3 / 4)
    assert math.isnan(flat["val/IoU-tree"])


# --- mIoU conventions (docs/evaluation.md): which classes the mean runs over ---------------------------


def test_mmseg_convention_scores_a_predicted_but_absent_class_as_zero_where_detectron2_leaves_it_out():
    # class 0: 4 pixels, 3 right and 1 predicted as class 2; class 1: 4 pixels, all right; class 2 is absent.
    target = [[0, 0, 0, 0], [1, 1, 1, 1]]
    preds = [[0, 0, 0, 2], [1, 1, 1, 1]]
    # by hand: IoU0 = 3 / (4 + 3 - 3) = 0.75, IoU1 = 4 / 4 = 1, IoU2 = 0 / (0 + 1 - 0) = 0
    detectron2 = scores(preds, target)
    assert detectron2.miou == pytest.approx((0.75 + 1) / 2) and math.isnan(detectron2.iou[2])
    for convention in ("mmseg", "stego"):
        metric = ConfusionMatrixMetric(num_classes=3, ignore_index=IGNORE, convention=convention)
        metric.update(torch.as_tensor(preds), torch.as_tensor(target))
        result = metric.compute()
        assert result.miou == pytest.approx((0.75 + 1 + 0) / 3)
        assert result.iou.tolist() == pytest.approx([0.75, 1.0, 0.0])
        assert result.pixel_acc == detectron2.pixel_acc == pytest.approx(7 / 8)
        assert result.convention == convention


def test_a_class_neither_present_nor_predicted_is_left_out_under_every_convention():
    confmat = torch.tensor([[2, 1, 0, 0], [0, 3, 0, 1], [0, 0, 0, 0]])  # class 2: no pixel, never predicted
    for convention in ("detectron2", "mmseg", "stego"):
        result = scores_from_confusion(confmat, convention)
        assert math.isnan(result.iou[2]) and result.miou == pytest.approx((2 / 3 + 3 / 5) / 2)


def test_pixels_of_no_class_never_make_a_class_count_as_predicted():
    # the last column ("no class") is a miss of class 0, not a prediction of any class: nothing new is averaged
    confmat = torch.tensor([[1, 0, 3], [0, 0, 0]])
    assert scores_from_confusion(confmat, "mmseg").miou == pytest.approx(1 / 4)
    assert math.isnan(scores_from_confusion(confmat, "mmseg").iou[1])


def test_unknown_convention_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="detectron2, mmseg, stego"):
        ConfusionMatrixMetric(num_classes=2, convention="coco")
    with pytest.raises(ValueError, match="'coco' is unknown"):
        scores_from_confusion(torch.zeros(2, 3, dtype=torch.long), "coco")


def test_scores_in_percent_name_their_convention_beside_the_numbers():
    result = scores([[0, 1]], [[0, 1]], num_classes=2)
    assert result.in_percent(["a", "b"]) == {"miou": 100.0, "pixel_acc": 100.0, "miou_convention": "detectron2",
                                             "iou": {"a": 100.0, "b": 100.0}}


# ---- STEGO's scores with more clusters than classes ----------------------------------------------------

# 8 clusters (rows) x 6 classes (columns). Clusters 6 and 7 are numbered past the classes: STEGO's update drops
# their pixels. Clusters 0-5 match classes 0-5 (the Hungarian optimum), none is left for the pseudo-class.
STEGO_CASE = [[40, 2, 0, 0, 0, 0], [3, 30, 0, 0, 0, 0], [0, 0, 25, 5, 0, 0], [0, 0, 4, 20, 0, 0],
              [0, 0, 0, 0, 35, 6], [0, 0, 0, 0, 2, 10], [10, 0, 0, 0, 0, 8], [0, 5, 0, 6, 0, 0]]
# IoU = tp / (column + row - tp) over clusters 0-5: 40/45, 30/35, 25/34, 20/29, 35/43, 10/18; accuracy 160/182
STEGO_IOU = [40 / 45, 30 / 35, 25 / 34, 20 / 29, 35 / 43, 10 / 18]


def test_stego_scores_with_extra_clusters_are_stegos_hand_computed_numbers():
    from emerdiff.evaluation.metrics import stego_scores

    scores = stego_scores(torch.tensor(STEGO_CASE))
    assert scores.miou == pytest.approx(sum(STEGO_IOU) / 6, abs=1e-12)  # 0.75675
    assert scores.pixel_acc == pytest.approx(160 / 182, abs=1e-12)
    torch.testing.assert_close(scores.iou, torch.tensor(STEGO_IOU, dtype=torch.float64))
    # ours before: clusters 6 and 7 unmatched, their pixels false negatives of classes 0, 1, 3 and 5
    confmat = torch.zeros(6, 7, dtype=torch.int64)
    for cluster, row in enumerate(STEGO_CASE):
        confmat[:, min(cluster, 6)] += torch.tensor(row)
    assert scores_from_confusion(confmat, "stego").miou < scores.miou - 0.03


def test_the_dataset_protocol_under_stegos_convention_scores_extra_clusters_as_stego(monkeypatch):
    """eval.dataset_clusters above the class count: one mask per cluster, each holding one row of STEGO_CASE."""
    import numpy as np

    from emerdiff.config import EvalConfig
    from emerdiff.evaluation import scoring

    histograms = np.array(STEGO_CASE, dtype=np.int64)
    monkeypatch.setattr(scoring, "cluster_masks", lambda embeddings, num_clusters, **kwargs: np.arange(8))
    masks = scoring.DatasetMasks(embeddings=np.eye(8, dtype=np.float32), histograms={"emerdiff": histograms},
                                 num_images=8)
    result = scoring.dataset_protocol_scores(masks, ["dataset"], 6, EvalConfig(dataset_clusters=8))
    assert result.scores["emerdiff"]["dataset"].miou == pytest.approx(sum(STEGO_IOU) / 6, abs=1e-12)
