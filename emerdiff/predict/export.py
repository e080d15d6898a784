"""Exports of a results folder into formats labelling tools read: COCO JSON with RLE masks, one PNG per mask.

Everything is rebuilt from the folder's ``manifest.jsonl`` and ``NAME.npz`` files, so a finished
folder can be exported at any time (``tools/export.py DIR --format coco``; the demo exports its
one-image folders the same way)::

    DIR/coco.json            images (file name, size), one annotation per non-empty mask
    DIR/NAME_masks/NN.png    one binary PNG per mask id NN (0 / 255), empty masks included

COCO annotations: ``segmentation`` is compressed RLE (pycocotools), with ``area``, ``bbox`` [x, y, w, h],
``iscrowd`` 0, and ``score`` where the mask has one (its cosine when masks are named). The category is the
mask's class when the run named masks (`emerdiff.predict.names`), else
class-agnostic ``mask N`` for mask id N. Category and annotation ids start at 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_file, read_jsonl
from .layout import MANIFEST
from .names import MaskNames

COCO_FILE = "coco.json"
MASKS_ENDING = "_masks"  # NAME_masks/NN.png
FORMATS = ("coco", "masks")


@dataclass
class ImageMasks:
    """One image's masks as the exports need them."""

    name: str  # the image's name in the results folder (NAME)
    file_name: str  # the photo's file name relative to the input root, as COCO's images[].file_name
    labels: np.ndarray  # [H, W] mask id per pixel
    num_masks: int
    names: MaskNames | None = None  # each mask's class, when masks are named

    @classmethod
    def from_arrays(cls, name: str, file_name: str, arrays: Mapping[str, np.ndarray]) -> ImageMasks:
        """From NAME.npz's entries (`SegmentationOutput.to_numpy()`, plus the named-masks entries if any)."""
        return cls(
            name=name,
            file_name=file_name,
            labels=np.asarray(arrays["labels"]),
            num_masks=len(arrays["lowres_masks"]),
            names=MaskNames.from_arrays(arrays),
        )

    @property
    def named(self) -> bool:
        return self.names is not None


def read_results(folder: str | Path) -> list[ImageMasks]:
    """Every finished image of a results folder of tools/predict.py, sorted by name."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"'{folder}' is not a results folder of tools/predict.py (no {MANIFEST})")
    records = sorted(read_jsonl(folder / MANIFEST), key=lambda r: r["name"])
    images = []
    for record in records:
        with np.load(folder / f"{record['name']}.npz") as arrays:
            images.append(
                ImageMasks.from_arrays(record["name"], source_file_name(record["name"], record["path"]), arrays)
            )
    return images


def source_file_name(name: str, path: str) -> str:
    """The photo's path relative to the input root: NAME plus the photo's suffix (unless NAME kept it)."""
    return name if Path(name).name == Path(path).name else name + Path(path).suffix


def coco_dict(images: Sequence[ImageMasks]) -> dict:
    """COCO JSON (``images``, ``annotations``, ``categories``) of the masks of `images`.

    All images are named or none is; named images share their vocabulary's categories (ordered
    as first seen), else mask id N has the category ``mask N``.
    """
    named = {image.named for image in images}
    if len(named) > 1:
        raise ValueError("cannot export images with named masks together with images without")
    if named == {True}:
        names: dict[str, int] = {}
        for mask_names in (image.names for image in images if image.names is not None):
            for vocabulary_name in mask_names.class_names:
                names.setdefault(vocabulary_name, len(names) + 1)
    else:
        names = {f"mask {k}": k + 1 for k in range(max((image.num_masks for image in images), default=0))}
    categories = [
        {"id": i, "name": n, "supercategory": "class" if named == {True} else "mask"} for n, i in names.items()
    ]
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, image in enumerate(images, start=1):
        height, width = image.labels.shape
        coco_images.append({"id": image_id, "file_name": image.file_name, "height": int(height), "width": int(width)})
        for k in range(image.num_masks):
            pixels = image.labels == k
            if not pixels.any():
                continue  # a mask that won no pixel at full resolution has no region to annotate
            if image.names is not None:
                class_name = image.names.name(k)
                category = names[class_name] if class_name is not None else None
                score = float(image.names.mask_scores[k])
            else:
                category, score = names[f"mask {k}"], math.nan
            annotations.append(_annotation(len(annotations) + 1, image_id, category, pixels, score))
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def _annotation(annotation_id: int, image_id: int, category: int | None, pixels: np.ndarray, score: float) -> dict:
    from pycocotools import mask as coco_mask  # only needed by COCO exports

    rle = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
    entry: dict[str, Any] = {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(coco_mask.area(rle)),
        "bbox": [float(v) for v in coco_mask.toBbox(rle)],
        "iscrowd": 0,
    }
    if not math.isnan(score):
        entry["score"] = round(score, 4)
    return entry


def write_coco(folder: str | Path, file_name: str = COCO_FILE) -> Path:
    """DIR/coco.json (or DIR/`file_name`) of every finished image of a results folder; returns its path."""
    folder = Path(folder)
    coco = coco_dict(read_results(folder))
    with atomic_file(folder / file_name) as handle:
        handle.write(json.dumps(coco).encode())
    return folder / file_name


def write_mask_pngs(folder: str | Path, image: ImageMasks) -> Path:
    """DIR/NAME_masks/NN.png: one binary PNG (0 / 255) per mask id of `image`; returns the folder."""
    target = Path(folder) / f"{image.name}{MASKS_ENDING}"
    digits = max(2, len(str(image.num_masks - 1)))
    for k in range(image.num_masks):
        with atomic_file(target / f"{k:0{digits}d}.png") as handle:
            Image.fromarray(((image.labels == k) * 255).astype(np.uint8)).save(handle, format="PNG")
    return target


def export(folder: str | Path, formats: Sequence[str]) -> list[Path]:
    """Write the exports `formats` (of FORMATS) of a results folder; returns what was written."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    written = []
    if "coco" in formats:
        written.append(write_coco(folder))
    if "masks" in formats:
        written += [write_mask_pngs(folder, image) for image in read_results(folder)]
    return written
