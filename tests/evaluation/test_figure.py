"""emerdiff.evaluation.figure: the class maps an evaluation's figure shows, its colours, and what counts as an
evaluation's folder."""

import json

import numpy as np
import pytest

from emerdiff.config import EvalConfig
from emerdiff.data import DatasetMetadata, dataset_metadata
from emerdiff.evaluation.cache import CachedPrediction
from emerdiff.evaluation.figure import SavedEvaluation, class_colours, figure_row
from emerdiff.predict.render import palette

# Three masks on two classes, where the one-to-one matching on pixel overlap and the one on IoU disagree.
# Overlap (mask x class): mask 0 [0, 4], mask 1 [2, 0], mask 2 [3, 3]: best total 7 = mask 2 -> 0, mask 0 -> 1.
# IoU: mask 0 [0, 4/7], mask 1 [2/5, 0], mask 2 [3/8, 3/10]: best total 4/7 + 2/5 = mask 0 -> 1, mask 1 -> 0.
GT = np.array([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1]])
MASKS = np.array([[2, 1, 0, 2], [2, 0, 2, 2], [1, 2, 0, 0]])
TWO = DatasetMetadata("two", ("a", "b"), 255, ((200, 0, 0), (0, 200, 0)))
THREE = DatasetMetadata("three", ("a", "b", "c"), 255, ((200, 0, 0), (0, 200, 0), (0, 0, 200)))


def prediction(gt: np.ndarray = GT) -> CachedPrediction:
    return CachedPrediction(gt=gt, labels=MASKS, labels_bilinear=MASKS, lowres_labels=MASKS,
                            lowres_masks=np.stack([MASKS == k for k in range(3)]),
                            mask_embeddings=np.zeros((3, 4), np.float32))


@pytest.mark.parametrize(("criterion", "mask_class"), [("overlap", [1, -1, 0]), ("iou", [1, 0, -1])])
def test_every_method_shows_the_per_image_hungarian_classes_of_the_saved_criterion(criterion, mask_class):
    row = figure_row(np.zeros((3, 4, 3), np.uint8), prediction(), TWO, EvalConfig(match_criterion=criterion))
    assert list(row.classes) == ["nearest", "bilinear", "emerdiff"]
    for classes in row.classes.values():
        np.testing.assert_array_equal(classes, np.array(mask_class)[MASKS])


def test_the_stego_convention_keeps_a_pairing_without_a_common_pixel():
    """Class c has no pixel: the mask left over pairs with it under stego, and stays without a class otherwise."""
    image = np.zeros((3, 4, 3), np.uint8)
    default = figure_row(image, prediction(), THREE, EvalConfig(match_criterion="overlap"))
    stego = figure_row(image, prediction(), THREE, EvalConfig(match_criterion="overlap", miou_convention="stego"))
    np.testing.assert_array_equal(default.classes["emerdiff"], np.array([1, -1, 0])[MASKS])
    np.testing.assert_array_equal(stego.classes["emerdiff"], np.array([1, 2, 0])[MASKS])


def test_ignored_ground_truth_shows_as_no_class():
    gt = GT.copy()
    gt[0, 0] = 255
    row = figure_row(np.zeros((3, 4, 3), np.uint8), prediction(gt), TWO, EvalConfig())
    np.testing.assert_array_equal(row.gt, np.where(gt == 255, -1, gt))


def test_class_colours_are_the_splits_own_unless_one_is_black_the_colour_of_no_class():
    np.testing.assert_array_equal(class_colours(TWO), [[200, 0, 0], [0, 200, 0]])
    toy = dataset_metadata("toyworld_val")
    np.testing.assert_array_equal(class_colours(toy), np.asarray(toy.palette, np.uint8))
    voc = dataset_metadata("voc2012_val")
    assert voc.palette[0] == (0, 0, 0)  # VOC's background
    np.testing.assert_array_equal(class_colours(voc), palette(voc.num_classes))


def test_only_a_results_json_with_its_settings_beside_a_cache_is_an_evaluations_folder(tmp_path):
    assert SavedEvaluation.read(tmp_path) is None
    results = {"protocol_settings": {"match_criterion": "overlap", "crop": "none", "dataset_clusters_used": 4},
               "prediction_settings": {"data": {"dataset": "voc2012_val", "size": 96}, "model": {}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert SavedEvaluation.read(tmp_path) is None  # no cache/
    (tmp_path / "cache").mkdir()
    saved = SavedEvaluation.read(tmp_path)
    assert (saved.dataset, saved.size, saved.settings.match_criterion, saved.settings.crop) == (
        "voc2012_val", 96, "overlap", "none")
    (tmp_path / "results.json").write_text(json.dumps({"settings": results["prediction_settings"]}))  # ov_eval's
    assert SavedEvaluation.read(tmp_path) is None
