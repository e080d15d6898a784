"""Evaluation protocols: per-image matching, dataset-level clustering, concept embeddings."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from emerdiff.evaluation.metrics import ConfusionMatrixMetric
from emerdiff.evaluation.protocols import (
    UNMATCHED,
    ConceptSums,
    assign_to_concepts,
    cluster_and_match,
    concept_sums,
    match_image,
    overlap_matrix,
    relabel,
)

IGNORE = 255


@pytest.fixture(autouse=True)
def single_threaded_faiss():
    """faiss' OpenMP start-up costs far more than these tiny k-means runs; restore afterwards."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def miou(preds, target, num_classes):
    metric = ConfusionMatrixMetric(num_classes=num_classes, ignore_index=IGNORE)
    metric.update(torch.as_tensor(preds), torch.as_tensor(target))
    return metric.compute()


def strip(*runs):
    """A 1 x N map from (value, length) runs, to write small images by hand."""
    return np.concatenate([np.full(n, v) for v, n in runs])[None]


# --- overlap matrix ---------------------------------------------------------------------------


def test_overlap_matrix_counts_class_pixels_per_segment_and_skips_ignored_pixels():
    segments = np.array([[0, 0, 1, 1], [2, 2, 2, 1]])
    target = np.array([[3, IGNORE, 3, 0], [0, 0, 9, 0]])  # 9 is outside the 4 classes
    expected = np.array(
        [
            [0, 0, 0, 1],  # segment 0: one class-3 pixel (the other is ignored)
            [2, 0, 0, 1],  # segment 1: two class-0 pixels, one class-3 pixel
            [2, 0, 0, 0],  # segment 2: two class-0 pixels (the 9 is not counted)
        ]
    )
    assert np.array_equal(overlap_matrix(segments, target, num_classes=4), expected)


def test_overlap_matrix_accepts_torch_tensors_and_a_fixed_segment_count():
    segments = torch.tensor([[0, 0], [1, 1]])
    counts = overlap_matrix(segments, torch.tensor([[1, 1], [0, 1]]), num_classes=2, num_segments=4)
    assert counts.shape == (4, 2)
    assert counts.tolist() == [[0, 2], [1, 1], [0, 0], [0, 0]]


# --- per-image protocol -----------------------------------------------------------------------


def test_hungarian_on_permuted_segment_ids_gives_perfect_miou():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(24, 24))
    target[:3] = IGNORE
    permutation = rng.permutation(6)
    segments = permutation[np.where(target == IGNORE, 0, target)]  # any segment on ignored pixels

    result = match_image(segments, target, num_classes=6)

    assert np.array_equal(result.segment_to_class[permutation], np.arange(6))
    scores = miou(result.labels, target, num_classes=6)
    assert scores.miou == 1.0 and scores.pixel_acc == 1.0


def test_hungarian_leaves_extra_segments_unmatched_and_scores_them_as_misses():
    # class 0 is split into segments 0 (4 px) and 1 (2 px); class 1 is segment 2 (2 px)
    target = strip((0, 6), (1, 2))
    segments = strip((0, 4), (1, 2), (2, 2))

    result = match_image(segments, target, num_classes=2)

    assert result.segment_to_class.tolist() == [0, UNMATCHED, 1]
    assert result.labels.tolist() == strip((0, 4), (UNMATCHED, 2), (1, 2)).tolist()
    scores = miou(result.labels, target, num_classes=2)
    # class 0: TP 4, FN 2, FP 0 -> 4/6; class 1 keeps IoU 1: the misses are no false positives
    assert scores.iou.tolist() == pytest.approx([4 / 6, 1.0])
    assert scores.pixel_acc == pytest.approx(6 / 8)


def test_hungarian_never_gives_a_segment_a_class_absent_from_the_image():
    target = strip((2, 6))
    segments = strip((0, 2), (1, 2), (2, 2))
    result = match_image(segments, target, num_classes=5)
    assert sorted(result.segment_to_class.tolist()) == [UNMATCHED, UNMATCHED, 2]


def test_hungarian_maximises_total_overlap_rather_than_taking_the_best_pair_first():
    # segment 0 holds 5 px of class 0 and 4 px of class 1; segment 1 holds 4 px of class 0.
    # Best pair first would take (0 -> 0) and leave segment 1 empty-handed (total 5);
    # the optimum is (0 -> 1, 1 -> 0) with total 8.
    target = strip((0, 5), (1, 4), (0, 4))
    segments = strip((0, 9), (1, 4))
    assert match_image(segments, target, num_classes=2).segment_to_class.tolist() == [1, 0]


def test_iou_criterion_can_prefer_a_smaller_overlap_with_a_better_fitting_class():
    # segment 0: 30 px of class 0 (which has 1000 px) and all 20 px of class 1;
    # segment 1: the other 970 px of class 0 and all 5000 px of class 2.
    target = strip((0, 30), (1, 20), (0, 970), (2, 5000))
    segments = strip((0, 50), (1, 5970))
    # overlap: 30 + 5000 (0 -> class 0, 1 -> class 2) beats 20 + 5000 and 970 + 20
    by_overlap = match_image(segments, target, num_classes=3, criterion="overlap")
    assert by_overlap.segment_to_class.tolist() == [0, 2]
    # IoU: 20/50 + 5000/5970 beats 30/1020 + 5000/5970
    by_iou = match_image(segments, target, num_classes=3, criterion="iou")
    assert by_iou.segment_to_class.tolist() == [1, 2]


def test_majority_gives_each_segment_its_most_frequent_class_even_when_shared():
    target = strip((0, 6), (1, 2))
    segments = strip((0, 4), (1, 3), (2, 1))  # segment 1: 2 px of class 0, 1 px of class 1
    result = match_image(segments, target, num_classes=2, assignment="majority")
    assert result.segment_to_class.tolist() == [0, 0, 1]
    scores = miou(result.labels, target, num_classes=2)
    # class 0: TP 6, FP 1 -> 6/7; class 1: TP 1, FN 1 -> 1/2
    assert scores.iou.tolist() == pytest.approx([6 / 7, 1 / 2])


def test_majority_leaves_a_segment_on_ignored_pixels_unmatched():
    target = strip((0, 3), (IGNORE, 3))
    segments = strip((0, 3), (1, 3))
    result = match_image(segments, target, num_classes=1, assignment="majority")
    assert result.segment_to_class.tolist() == [0, UNMATCHED]


def test_unknown_matching_options_are_rejected():
    target = segments = strip((0, 2))
    with pytest.raises(ValueError, match="assignment"):
        match_image(segments, target, num_classes=1, assignment="greedy")
    with pytest.raises(ValueError, match="criterion"):
        match_image(segments, target, num_classes=1, criterion="dice")


def test_relabel_maps_every_pixel_to_its_segment_class():
    segments = torch.tensor([[0, 1], [2, 2]])
    assert relabel(segments, np.array([4, UNMATCHED, 0])).tolist() == [[4, UNMATCHED], [0, 0]]


# --- dataset-level protocol -------------------------------------------------------------------


def planted_masks(num_classes=3, per_class=40, dim=16, seed=0):
    """Masks whose embeddings sit around one centre per class and whose pixels are mostly that class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 10
    truth = np.repeat(np.arange(num_classes), per_class)
    embeddings = centres[truth] + rng.normal(size=(len(truth), dim))
    histograms = rng.integers(0, 5, size=(len(truth), num_classes))
    histograms[np.arange(len(truth)), truth] += 50
    return embeddings.astype(np.float32), histograms, truth


def test_dataset_level_protocol_recovers_a_planted_clustering():
    embeddings, histograms, truth = planted_masks()
    result = cluster_and_match(embeddings, histograms, seed=0)
    assert sorted(result.cluster_to_class.tolist()) == [0, 1, 2]
    assert np.array_equal(result.class_of_mask, truth)
    assert result.histogram.sum() == histograms.sum()


def test_dataset_level_protocol_relabels_an_image_from_its_mask_rows():
    embeddings, histograms, truth = planted_masks()
    result = cluster_and_match(torch.from_numpy(embeddings), torch.from_numpy(histograms))
    rows = np.array([5, 45, 85])  # the masks of one image: one of each planted class
    segments = np.array([[0, 1], [2, 2]])
    labels = relabel(segments, result.class_of_mask[rows])
    assert labels.tolist() == [[truth[5], truth[45]], [truth[85], truth[85]]]


def test_dataset_level_protocol_leaves_extra_clusters_unmatched():
    embeddings, histograms, _ = planted_masks()
    result = cluster_and_match(embeddings, histograms, num_clusters=5)
    matched = result.cluster_to_class[result.cluster_to_class != UNMATCHED]
    assert sorted(matched.tolist()) == [0, 1, 2]
    assert (result.cluster_to_class == UNMATCHED).sum() == 2


def test_dataset_level_protocol_is_reproducible_with_a_seed():
    embeddings, histograms, _ = planted_masks(per_class=15, seed=3)
    first = cluster_and_match(embeddings, histograms, seed=7, l2_normalize=True)
    second = cluster_and_match(embeddings, histograms, seed=7, l2_normalize=True)
    assert np.array_equal(first.cluster_of_mask, second.cluster_of_mask)


def test_dataset_level_protocol_needs_at_least_as_many_masks_as_clusters():
    with pytest.raises(ValueError, match="clusters"):
        cluster_and_match(np.zeros((2, 4)), np.ones((2, 3)))


# --- concept-embedding protocol ---------------------------------------------------------------


def test_concept_embedding_is_the_pixel_weighted_mean_of_mask_embeddings():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]])
    histograms = np.array([[3, 0, 0], [1, 2, 0]])  # class 2 has no pixel
    concepts = concept_sums(embeddings, histograms)
    # class 0: 3 pixels carrying [1, 0] and 1 pixel carrying [0, 1]
    assert concepts.embeddings[0].tolist() == pytest.approx([0.75, 0.25])
    assert concepts.embeddings[1].tolist() == pytest.approx([0.0, 1.0])
    assert np.isnan(concepts.embeddings[2]).all()


def test_concept_sums_of_images_add_up_to_the_dataset_concepts():
    embeddings, histograms, _ = planted_masks()
    per_image = [concept_sums(embeddings[i : i + 10], histograms[i : i + 10]) for i in range(0, 120, 10)]
    total = sum(per_image[1:], per_image[0])
    whole = concept_sums(embeddings, histograms)
    assert np.allclose(total.weighted_sum, whole.weighted_sum)
    assert np.array_equal(total.pixels, whole.pixels)


def test_concept_protocol_assigns_planted_embeddings_by_direction_not_magnitude():
    embeddings, histograms, truth = planted_masks()
    concepts = concept_sums(embeddings, histograms)
    scale = np.random.default_rng(1).uniform(0.1, 10.0, size=(len(embeddings), 1))
    assert np.array_equal(assign_to_concepts(embeddings * scale, concepts), truth)


def test_per_image_concepts_only_offer_classes_of_that_image_unlike_dataset_concepts():
    # mask 1 of this image points almost at class 2, which only occurs in another image
    image_embeddings = np.array([[1.0, 0.0, 0.0], [0.3, 0.0, 1.0]])
    image_histograms = np.array([[4, 2, 0], [0, 1, 0]])
    image = concept_sums(image_embeddings, image_histograms)
    other_image = concept_sums(np.array([[0.0, 0.0, 1.0]]), np.array([[0, 0, 5]]))

    assert assign_to_concepts(image_embeddings, image).tolist() == [0, 1]
    assert assign_to_concepts(image_embeddings, image + other_image).tolist() == [0, 2]


def test_masks_get_no_class_when_no_concept_has_pixels():
    concepts = ConceptSums(weighted_sum=np.zeros((3, 2)), pixels=np.zeros(3, dtype=np.int64))
    assert assign_to_concepts(np.ones((2, 2)), concepts).tolist() == [UNMATCHED, UNMATCHED]


def test_hungarian_keeps_zero_overlap_pairings_when_asked_as_stegos_code_does():
    # three segments, two classes present (0, 1) of three: the third segment can only pair with absent class 2
    segments = np.array([[0, 0, 1, 1, 2, 2]])
    target = np.array([[0, 0, 1, 1, 1, 1]])
    dropped = match_image(segments, target, 3, assignment="hungarian", criterion="overlap")
    kept = match_image(segments, target, 3, assignment="hungarian", criterion="overlap", keep_empty_pairs=True)
    assert dropped.segment_to_class.tolist() == [0, 1, UNMATCHED]
    assert kept.segment_to_class.tolist() == [0, 1, 2]
    assert kept.labels.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_dataset_level_matching_gives_every_cluster_a_class_when_keeping_empty_pairs():
    from emerdiff.evaluation.protocols import match_clusters

    clusters = np.array([0, 1, 2])
    histograms = np.array([[10, 0, 0], [0, 6, 0], [0, 4, 0]])  # cluster 2 shares no pixel with class 2
    assert match_clusters(clusters, histograms, 3).cluster_to_class.tolist() == [0, 1, UNMATCHED]
    assert match_clusters(clusters, histograms, 3, keep_empty_pairs=True).cluster_to_class.tolist() == [0, 1, 2]
