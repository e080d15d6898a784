"""Protocol dispatch and scoring: dataset-wide confusion from mask histograms, gathered masks, settings checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff.config import EvalConfig
from emerdiff.evaluation import (ConfusionMatrixMetric, DatasetMasks, MaskRecords, check_settings,
                                 confusion_from_histograms, dataset_protocol_scores, per_image_class_map)
from emerdiff.evaluation.protocols import UNMATCHED, overlap_matrix, relabel


def test_dataset_confusion_from_mask_histograms_equals_the_metric_on_relabelled_maps():
    rng = np.random.default_rng(0)
    segments = rng.integers(0, 6, size=(40, 50))
    gt = rng.integers(0, 5, size=(40, 50))
    gt[rng.random(gt.shape) < 0.1] = 255
    class_of_mask = np.array([3, UNMATCHED, 0, 0, 4, UNMATCHED])
    metric = ConfusionMatrixMetric(num_classes=5)
    metric.update(torch.from_numpy(relabel(segments, class_of_mask)), torch.from_numpy(gt))
    histograms = overlap_matrix(segments, gt, 5, num_segments=6)
    assert torch.equal(confusion_from_histograms(histograms, class_of_mask, 5), metric.confmat)


def test_dataset_protocols_score_planted_masks_perfectly():
    # two classes; masks of class c point along axis c and hold only class-c pixels
    embeddings = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    histograms = np.array([[10, 0], [5, 0], [0, 7], [0, 3]])
    masks = DatasetMasks(embeddings, {"emerdiff": histograms}, num_images=2)
    result = dataset_protocol_scores(masks, ["dataset", "concept_dataset"], 2, EvalConfig())
    assert result.num_clusters == 2
    for protocol in ("dataset", "concept_dataset"):
        assert result.scores["emerdiff"][protocol].miou == 1.0


def test_dataset_level_protocol_uses_fewer_clusters_when_the_split_has_fewer_masks_than_classes():
    embeddings = np.array([[1, 0], [0, 1]], dtype=np.float32)
    masks = DatasetMasks(embeddings, {"emerdiff": np.array([[4, 0, 0], [0, 4, 0]])}, num_images=1)
    result = dataset_protocol_scores(masks, ["dataset"], 3, EvalConfig())
    assert result.num_clusters == 2 and result.scores["emerdiff"]["dataset"].miou == 1.0


def test_gathered_masks_come_back_in_image_order_and_an_image_scored_twice_is_refused():
    records = MaskRecords(methods=["emerdiff"])
    for index, value in ((2, 2.0), (0, 0.0)):
        records.update(index, torch.full((2, 3), value), {"emerdiff": torch.ones(2, 4, dtype=torch.long)})
    masks = records.compute()
    assert masks.num_images == 2 and masks.embeddings[:, 0].tolist() == [0, 0, 2, 2]
    records.update(0, torch.zeros(1, 3), {"emerdiff": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(RuntimeError, match="more than once"):
        records.compute()


def test_per_image_hungarian_class_map_gives_each_mask_its_matched_class_and_refuses_dataset_protocols():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    gt = np.array([[2, 2, 0, 0], [2, 2, 0, 255]])
    histogram = overlap_matrix(segments, gt, 3, num_segments=2)
    classes = per_image_class_map("hungarian", segments, gt, np.eye(2, dtype=np.float32), histogram, 3, 255, "iou")
    assert classes.tolist() == [[2, 2, 0, 0], [2, 2, 0, 0]]
    with pytest.raises(ValueError, match="not a per-image protocol"):
        per_image_class_map("dataset", segments, gt, np.eye(2, dtype=np.float32), histogram, 3, 255, "iou")


@pytest.mark.parametrize("settings, key", [(EvalConfig(protocols=["hungarian", "typo"]), "eval.protocols"),
                                           (EvalConfig(protocols=[]), "eval.protocols"),
                                           (EvalConfig(match_criterion="dice"), "eval.match_criterion"),
                                           (EvalConfig(dataset_clusters=0), "eval.dataset_clusters")])
def test_settings_built_in_python_are_checked_by_the_config_rules_naming_the_key(settings, key):
    with pytest.raises(ValueError, match=key):
        check_settings(settings)
    check_settings(EvalConfig())  # the defaults pass


# --- mIoU conventions -----------------------------------------------------------------------------------


def three_separate_masks() -> DatasetMasks:
    """Three masks far apart (k-means with 3 clusters puts each alone); class 2 has no pixel anywhere.

    Cluster x class pixels: [10, 0, 0], [0, 6, 0], [0, 4, 0]: the Hungarian matching can only pair
    the third cluster with class 2, with which it shares no pixel.
    """
    embeddings = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=np.float32)
    return DatasetMasks(embeddings, {"emerdiff": np.array([[10, 0, 0], [0, 6, 0], [0, 4, 0]])}, num_images=1)


def test_dataset_protocol_under_stego_gives_a_zero_overlap_cluster_its_class_and_averages_that_class():
    # by hand, STEGO: cluster 2 -> class 2 (4 false positives), IoU = [10/10, 6/(10+6-6), 0/(0+4-0)]
    stego = dataset_protocol_scores(three_separate_masks(), ["dataset"], 3, EvalConfig(miou_convention="stego"))
    assert stego.scores["emerdiff"]["dataset"].miou == pytest.approx((1 + 0.6 + 0) / 3)
    # ours (detectron2): cluster 2 unmatched, its pixels misses of class 1; absent class 2 left out
    ours = dataset_protocol_scores(three_separate_masks(), ["dataset"], 3, EvalConfig(miou_convention="detectron2"))
    assert ours.scores["emerdiff"]["dataset"].miou == pytest.approx((1 + 0.6) / 2)
    # mmseg with our matching: nothing predicts class 2, so its union is empty and it is left out too
    mmseg = dataset_protocol_scores(three_separate_masks(), ["dataset"], 3, EvalConfig(miou_convention="mmseg"))
    assert mmseg.scores["emerdiff"]["dataset"].miou == pytest.approx((1 + 0.6) / 2)
    # pixel accuracy does not depend on the convention: 16 of 20 pixels right
    for result in (stego, ours, mmseg):
        assert result.scores["emerdiff"]["dataset"].pixel_acc == pytest.approx(16 / 20)


def test_per_image_hungarian_under_stego_keeps_the_zero_overlap_pairing_and_counts_the_absent_class():
    segments = np.array([[0, 0, 1, 1, 2, 2]])
    gt = np.array([[0, 0, 1, 1, 1, 1]])  # class 2 absent; segment 2 can only pair with it
    histogram = overlap_matrix(segments, gt, 3, num_segments=3)
    maps = {c: per_image_class_map("hungarian", segments, gt, np.eye(3, dtype=np.float32), histogram, 3, 255,
                                   "overlap", c) for c in ("detectron2", "stego")}
    assert maps["detectron2"].tolist() == [[0, 0, 1, 1, UNMATCHED, UNMATCHED]]
    assert maps["stego"].tolist() == [[0, 0, 1, 1, 2, 2]]
    # by hand: detectron2 IoU = [2/2, 2/4] over present classes; stego IoU = [1, 2/4, 0/2] over non-empty unions
    for convention, miou in (("detectron2", (1 + 0.5) / 2), ("stego", (1 + 0.5 + 0) / 3)):
        metric = ConfusionMatrixMetric(3, convention=convention)
        metric.update(torch.from_numpy(maps[convention]), torch.from_numpy(gt))
        assert metric.compute().miou == pytest.approx(miou)


def test_each_protocol_defaults_to_its_papers_convention_and_the_setting_forces_one_for_all():
    from emerdiff.choices import PROTOCOLS
    from emerdiff.evaluation import miou_convention

    assert miou_convention("dataset", EvalConfig()) == "stego"  # Table 1 is compared with STEGO
    assert miou_convention("concept_dataset", EvalConfig()) == "detectron2"
    assert {miou_convention(p, EvalConfig(miou_convention="mmseg")) for p in PROTOCOLS} == {"mmseg"}


def test_an_unknown_convention_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="eval.miou_convention"):
        check_settings(EvalConfig(miou_convention="coco"))
