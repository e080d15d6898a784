"""The prediction cache: what an entry depends on, and when an entry is refused as stale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emerdiff.config import ModelConfig, SegmentorConfig, fingerprint
from emerdiff.evaluation import CachedPrediction, PredictionCache, StaleCacheError, prediction_settings


def small_prediction(gt: np.ndarray) -> CachedPrediction:
    return CachedPrediction(gt=gt, labels=gt, labels_bilinear=gt, lowres_labels=gt[:2, :2],
                            lowres_masks=np.ones((1, 2, 2), bool), mask_embeddings=np.ones((1, 3), np.float32))


def test_cached_predictions_depend_on_result_settings_only():
    base = prediction_settings(ModelConfig(), SegmentorConfig(), "voc2012_val", 96)
    where_and_how_fast = prediction_settings(
        ModelConfig(device="cpu", local_files_only=True),
        SegmentorConfig(chunk_size=3, memory_budget_gb=1.0, channels_last=True, compile=True, compile_backend="eager",
                        compile_mode="max-autotune", keep_diff_maps=True),
        "voc2012_val", 96)
    assert where_and_how_fast == base
    assert prediction_settings(ModelConfig(), SegmentorConfig(lam=5.0), "voc2012_val", 96) != base
    assert prediction_settings(ModelConfig(dtype="float16"), SegmentorConfig(), "voc2012_val", 96) != base


def test_whole_image_crop_is_a_prediction_setting_and_the_default_centre_crop_leaves_old_caches_valid():
    default = prediction_settings(ModelConfig(), SegmentorConfig(), "voc2012_val", 96)
    assert default["data"] == {"dataset": "voc2012_val", "size": 96}  # as written before eval.crop existed
    assert prediction_settings(ModelConfig(), SegmentorConfig(), "voc2012_val", 96, "center") == default
    whole = prediction_settings(ModelConfig(), SegmentorConfig(), "voc2012_val", 96, "none")
    assert whole["data"] == {"dataset": "voc2012_val", "size": 96, "crop": "none"}


def test_cache_entry_with_another_ground_truth_is_refused(tmp_path):
    cache = PredictionCache(tmp_path, {"segmentor": {"num_masks": 3}})
    gt = np.zeros((4, 4), dtype=np.int64)
    cache.save("a", small_prediction(gt))
    assert np.array_equal(cache.load("a", gt).labels, gt)
    with pytest.raises(StaleCacheError, match="ground truth"):
        cache.load("a", gt + 1)
    assert PredictionCache(tmp_path, {}, overwrite=True).load("a", gt) is None


def test_cache_entry_made_with_other_settings_is_refused_naming_each_changed_setting(tmp_path):
    gt = np.zeros((4, 4), dtype=np.int64)
    PredictionCache(tmp_path, {"segmentor": {"lam": 10.0, "num_masks": 3}}).save("a", small_prediction(gt))
    now = PredictionCache(tmp_path, {"segmentor": {"lam": 5.0, "num_masks": 3}})
    with pytest.raises(StaleCacheError, match=r"segmentor\.lam: 10\.0 -> 5\.0") as refused:
        now.load("a", gt)
    assert "num_masks" not in str(refused.value)  # unchanged settings are not listed


def test_cache_entry_is_tagged_with_the_canonical_settings_fingerprint_whatever_the_key_order(tmp_path):
    gt = np.zeros((4, 4), dtype=np.int64)
    PredictionCache(tmp_path, {"b": {"y": 1, "x": 2}, "a": {}}).save("a", small_prediction(gt))
    with np.load(tmp_path / "a.npz") as stored:
        assert str(stored["settings"]) == fingerprint({"a": {}, "b": {"x": 2, "y": 1}})
        assert json.loads(str(stored["settings"])) == {"a": {}, "b": {"x": 2, "y": 1}}
    assert PredictionCache(tmp_path, {"a": {}, "b": {"x": 2, "y": 1}}).load("a", gt) is not None


def test_cache_counts_the_images_it_would_answer_and_none_when_asked_to_redo_them(tmp_path):
    gt = np.zeros((4, 4), dtype=np.int64)
    cache = PredictionCache(tmp_path, {})
    cache.save("a", small_prediction(gt))
    assert cache.count(["a", "b"]) == 1
    assert PredictionCache(tmp_path, {}, overwrite=True).count(["a", "b"]) == 0


def test_removing_temporary_files_drops_what_a_killed_run_was_writing_and_keeps_finished_entries(tmp_path):
    from emerdiff.files import TEMP_SUFFIX

    gt = np.zeros((4, 4), dtype=np.int64)
    cache = PredictionCache(tmp_path, {})
    cache.save("a", small_prediction(gt))
    (tmp_path / f".b.npz.4242{TEMP_SUFFIX}").write_bytes(b"half an entry")  # left by a SIGKILLed writer
    cache.remove_temporary_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
