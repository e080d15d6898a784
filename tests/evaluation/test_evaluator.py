"""Evaluators apart from Lightning: a plain loop scores (prediction, ground truth) pairs, the Lightning module drives
a list of them, and a new pass starts from empty metrics."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import REPO
from emerdiff.config import EvalConfig
from emerdiff.data import DatasetMetadata
from emerdiff.evaluation import (CachedEvaluation, CachedPrediction, PredictionCache, UnsupervisedEvaluator,
                                 evaluate_all)

TWO_CLASSES = DatasetMetadata("two", ("left", "right"), 255, ((0, 0, 0), (255, 255, 255)))
GT = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])  # left half class 0, right half class 1
SEGMENTS = np.array([[0, 0, 0, 1], [0, 0, 0, 1]])  # mask 0 spills one column into class 1


def prediction(gt: np.ndarray, segments: np.ndarray) -> CachedPrediction:
    """A cached prediction whose EmerDiff and bilinear labels are both `segments` (two masks)."""
    return CachedPrediction(gt=gt, labels=segments, labels_bilinear=segments, lowres_labels=np.zeros((1, 1), np.int64),
                            lowres_masks=np.ones((2, 1, 1), bool), mask_embeddings=np.eye(2, dtype=np.float32))


def per_image_evaluator(protocols=("hungarian", "majority")) -> UnsupervisedEvaluator:
    return UnsupervisedEvaluator("two", TWO_CLASSES, EvalConfig(protocols=list(protocols)), {"model": {}})


def test_a_plain_interpreter_scores_prediction_and_ground_truth_pairs_without_loading_lightning():
    script = """
import sys
import numpy as np
from emerdiff.config import EvalConfig
from emerdiff.data import DatasetMetadata
from emerdiff.evaluation import CachedPrediction, UnsupervisedEvaluator, evaluate_all

gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
segments = np.array([[0, 0, 0, 1], [0, 0, 0, 1]])
pairs = [(segments, gt), (np.fliplr(segments).copy(), np.fliplr(gt).copy())]
evaluator = UnsupervisedEvaluator("two", DatasetMetadata("two", ("left", "right"), 255, ((0, 0, 0), (9, 9, 9))),
                                  EvalConfig(protocols=["hungarian"]), {})
predictions = [CachedPrediction(gt=g, labels=s, labels_bilinear=s, lowres_labels=np.zeros((1, 1), np.int64),
                                lowres_masks=np.ones((2, 1, 1), bool), mask_embeddings=np.eye(2, dtype=np.float32))
               for s, g in pairs]
results = evaluate_all(evaluator, predictions)
scores = results.scores["emerdiff"]["hungarian"]
print(results.num_images, scores.miou, scores.pixel_acc, "pytorch_lightning" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    images, miou, pixel_acc, lightning = run.stdout.split()
    # by hand: in each image mask 0 takes class 0's 4 pixels and 2 of class 1, mask 1 the other 2 of class 1, so over
    # both images class 0 has IoU 8 / (8 + 4) and class 1 has IoU 4 / 8
    assert int(images) == 2 and lightning == "False"
    assert float(miou) == pytest.approx((8 / 12 + 4 / 8) / 2) and float(pixel_acc) == pytest.approx(12 / 16)


def test_scoring_twice_from_a_reset_gives_the_same_numbers_not_the_sum_of_both_passes():
    evaluator = per_image_evaluator()
    pairs = [prediction(GT, SEGMENTS), prediction(GT, GT)]
    first = evaluate_all(evaluator, pairs)
    again = evaluate_all(evaluator, pairs)
    assert first.num_images == again.num_images == 2
    for protocol in ("hungarian", "majority"):
        assert torch.equal(evaluator.metrics["emerdiff"][protocol].confmat,
                           torch.tensor([[8, 0, 0], [2, 6, 0]]))  # both images counted once, after the reset
        assert first.scores["emerdiff"][protocol].miou == again.scores["emerdiff"][protocol].miou


class FixedSegmentor(nn.Module):
    """A stand-in segmentor whose masks are always SEGMENTS."""

    def segment(self, image: np.ndarray) -> SimpleNamespace:
        arrays = {"labels": SEGMENTS, "labels_bilinear": SEGMENTS, "lowres_labels": np.zeros((1, 1), np.int64),
                  "lowres_masks": np.ones((2, 1, 1), bool), "mask_embeddings": np.eye(2, dtype=np.float32)}
        return SimpleNamespace(labels=torch.from_numpy(SEGMENTS), to_numpy=lambda: arrays)


class Images(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"image": np.zeros((2, 4, 3), np.uint8), "label": GT, "meta": {"id": f"im{index}"}, "index": index}


def test_the_lightning_module_drives_every_evaluator_to_the_plain_loops_numbers_and_resets_them_per_run(tmp_path):
    import pytorch_lightning as pl

    evaluators = [per_image_evaluator(), per_image_evaluator(("dataset", "concept_image"))]
    module = CachedEvaluation(lambda trainer: FixedSegmentor(), PredictionCache(tmp_path / "cache", {}),
                              evaluators=evaluators)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    plain = [evaluate_all(per_image_evaluator(protocols), [prediction(GT, SEGMENTS)] * 2)
             for protocols in (("hungarian", "majority"), ("dataset", "concept_image"))]
    for _ in range(2):  # the second run reads the cache and must not add to the first run's counts
        trainer.test(module, DataLoader(Images(), batch_size=None), verbose=False)
        assert [table.num_images for table in module.results] == [2, 2]
        for table, expected in zip(module.results, plain):
            assert table.to_dict() == expected.to_dict()
