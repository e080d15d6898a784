"""step 1: read any supported image into RGB and resize it to SD's working size (aspect kept by default)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import UserError

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})  # image files


class ImageLoadError(UserError, ValueError):
    """An input that cannot be read as an image; the message names the file and the problem."""


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8; 16/32-bit and float modes are rescaled, alpha is dropped, gray is replicated."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8, or raise ImageLoadError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image '{path}' does not exist")
    if path.is_dir():
        raise ImageLoadError(f"'{path}' is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"cannot read image '{path}': the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(
            f"cannot read image '{path}': not a readable image ({exc}); use PNG, JPEG, BMP, TIFF or WebP"
        ) from exc


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[2] == 4 else np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr
    if arr.dtype == np.uint8:
        scaled = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        scaled = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        scaled = arr.astype(np.float32)
    else:
        raise ImageLoadError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)


def load_image(image: ImageInput) -> torch.Tensor:
    """Any supported input -> float32 RGB tensor [3, H, W] in [0, 1].

    Paths and PIL images are decoded; arrays are HxW(x3|x4) uint8/uint16/float; tensors are
    CHW (1, 3 or 4 channels) float in [0, 1] or uint8.
    """
    if isinstance(image, (str, Path)):
        rgb = _array_to_tensor(read_image(image))
    elif isinstance(image, Image.Image):
        rgb = _array_to_tensor(_pil_to_array(image))
    elif isinstance(image, np.ndarray):
        rgb = _array_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ImageLoadError(f"expected a CHW tensor with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        rgb = image[:3].float() / 255.0 if image.dtype == torch.uint8 else image[:3].float()
        rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb
    else:
        raise ImageLoadError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, array or tensor")
    if min(rgb.shape[1:]) < 1:
        raise ImageLoadError(f"image has no pixels (size {tuple(rgb.shape[1:])})")
    return rgb.clamp(0, 1).contiguous()


def working_size(
    height: int, width: int, resolution: int, aspect: str = "keep", max_pixels: int | None = None
) -> tuple[int, int]:
    """SD's (h, w) for an image of height x width (step 1).

    ``square``: resolution x resolution. ``keep``: the shorter side at `resolution`, the longer
    side in proportion rounded to a multiple of 64 (so every UNet level has whole tokens), at
    most `max_pixels` in all (null: twice the square's pixels).
    """
    if aspect == "square":
        return resolution, resolution
    longer = min(proportional_side(height, width, resolution), longest_side(resolution, max_pixels))
    return (resolution, longer) if height <= width else (longer, resolution)


def proportional_side(height: int, width: int, resolution: int) -> int:
    """The longer working side that keeps the image's aspect ratio, the shorter at `resolution` (multiple of 64)."""
    short, long = min(height, width), max(height, width)
    return max(resolution, round(resolution * long / short / 64) * 64)


def longest_side(resolution: int, max_pixels: int | None = None) -> int:
    """The longest working side `max_pixels` allows (null: twice the square's pixels), a multiple of 64."""
    cap = max_pixels or 2 * resolution * resolution
    return max(resolution, cap // resolution // 64 * 64)


def capped_aspect_note(
    height: int, width: int, resolution: int, aspect: str = "keep", max_pixels: int | None = None
) -> str | None:
    """A line saying how `max_pixels` changed an image's aspect ratio for the model, or None when it did not."""
    if aspect == "square" or proportional_side(height, width, resolution) <= longest_side(resolution, max_pixels):
        return None
    size = working_size(height, width, resolution, aspect, max_pixels)
    cap = max_pixels or f"null = 2 x {resolution}^2"
    return (
        f"a {width}x{height} image ({max(height, width) / min(height, width):.3g}:1) is processed at "
        f"{size[1]}x{size[0]} ({max(size) / min(size):.3g}:1): segmentor.max_pixels ({cap}) caps the working size "
        "(the masks still cover the whole image at its own size); raise segmentor.max_pixels to keep its aspect "
        "ratio, at the cost of memory and time"
    )


def largest_working_size(resolution: int, aspect: str = "keep", max_pixels: int | None = None) -> tuple[int, int]:
    """The largest (h, w) `working_size` can give: what memory is planned for."""
    return working_size(1, 10**6, resolution, aspect, max_pixels)


def to_model_input(rgb: torch.Tensor, size: int | tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [1, 3, h, w] in [-1, 1] at `size` (an int: square), anti-aliased (step 1)."""
    shape = (size, size) if isinstance(size, int) else (size[0], size[1])
    resized = F.interpolate(rgb[None], size=shape, mode=interpolation, antialias=True, align_corners=False)
    return resized.clamp(0, 1) * 2 - 1


def image_seed(rgb: torch.Tensor, base_seed: int) -> int:
    """A 63-bit seed from the base seed and the image content, so results never depend on batch-mates."""
    pixels = (rgb * 255).round().to(torch.uint8).cpu().numpy()
    digest = hashlib.sha256(str(base_seed).encode() + str(pixels.shape).encode() + pixels.tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
