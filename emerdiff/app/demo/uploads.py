"""The demo's uploads: a file a visitor sends, checked and read as an RGB photo, or a message saying what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emerdiff.image import load_image

MAX_UPLOAD = "100mb"  # Gradio refuses larger files in the page before they are sent
MAX_PIXELS = 40_000_000  # uploads above this are refused (8000 x 5000); PIL itself refuses bombs above ~179 MP
MAX_SIDE = 2048  # larger photos are shrunk to this longer side first (labels come back at the shrunk size)
MIN_SIDE = 16  # smaller pictures are refused: there is nothing to segment
DISPLAY_SIDE = 512  # panels are shown at most this large (the downloads keep the photo's size)
READABLE = "PNG, JPEG, BMP, TIFF or WebP"


class DemoInputError(ValueError):
    """An upload or a setting the demo cannot use; the message is meant for the visitor."""


@dataclass
class Upload:
    """A checked upload: the photo to segment, its name, and notes for the visitor (e.g. it was shrunk)."""

    photo: np.ndarray  # [H, W, 3] uint8
    name: str  # the file name without its suffix: the downloads are NAME.png, NAME.npz, NAME_coco.json
    file_name: str  # the uploaded file's name (COCO's images[].file_name)
    notes: list[str] = field(default_factory=list)


def read_upload(path: str | Path, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> Upload:
    """Open an uploaded file as an RGB photo, or raise DemoInputError saying what is wrong with it.

    Grayscale, palette, 16-bit and RGBA images are accepted (colour replicated, alpha dropped, as
    the prediction tool does), with a note; EXIF rotation is applied; a photo whose longer side is
    above `max_side` is shrunk to it, with a note; above `max_pixels` it is refused before decoding.
    """
    path = Path(path)
    name = path.stem or "upload"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DemoInputError(
                    f"'{path.name}' is {width} x {height} pixels ({width * height / 1e6:.0f} MP); "
                    f"the demo takes photos "
                    f"up to {max_pixels / 1e6:.0f} MP. Shrink it first (segmentation runs at "
                    f"{DISPLAY_SIDE}-ish pixels anyway)."
                )
            img.load()
            mode = img.mode
            transparent = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
            upright = ImageOps.exif_transpose(img)
            photo = (load_image(upright) * 255).round().byte().permute(1, 2, 0).numpy()
    except DemoInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DemoInputError(f"'{path.name}' is not an image the demo can read; upload a {READABLE} photo.") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt file, unsupported mode
        raise DemoInputError(
            f"'{path.name}' could not be read as an image ({exc}); upload a {READABLE} photo."
        ) from exc
    notes = []
    if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        notes.append("grayscale photo: segmented as RGB (gray in every channel)")
    if transparent:
        notes.append("transparency ignored: the colour channels are segmented as they are")
    if min(photo.shape[:2]) < MIN_SIDE:
        raise DemoInputError(
            f"'{path.name}' is only {photo.shape[1]} x {photo.shape[0]} pixels; "
            f"give a photo at least {MIN_SIDE} pixels on each side."
        )
    if max(photo.shape[:2]) > max_side:
        scale = max_side / max(photo.shape[:2])
        size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
        notes.append(f"shrunk from {photo.shape[1]} x {photo.shape[0]} to {size[0]} x {size[1]} pixels")
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS))
    return Upload(photo=np.ascontiguousarray(photo), name=name, file_name=path.name, notes=notes)
