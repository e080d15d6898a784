"""The results folder of a prediction run: per-image files written atomically, the manifest, the failures.

Layout (NAME = the image's path relative to the input root, without suffix)::

    DIR/NAME.png            label map at the input size (8-bit palette, 16-bit if K > 255)
    DIR/NAME_overlay.jpg    mask colours and boundaries over the photo   (output.overlay)
    DIR/NAME_figure.png     photo | k-means | bilinear | EmerDiff         (output.figure)
    DIR/NAME.npz            the SegmentationOutput arrays (+ ov_labels, mask_classes, mask_scores, class_names)
    DIR/NAME_ov.png         with ovseg.vocab: label map in vocabulary ids (8-bit palette, 16-bit if > 255 classes)
    DIR/NAME_ov_overlay.jpg with ovseg.vocab: class colours over the photo with a legend of class names
    DIR/manifest.jsonl      one line per finished image, sorted by name
    DIR/failures.jsonl      images of the last run that could not be read

Every file appears complete or not at all (temporary file, then rename). Each rank appends to
its own files under ``DIR/.parts``; rank 0 merges them into the manifest when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

import numpy as np
import torch
from PIL import Image

from . import render
from .segmentor import SegmentationOutput

TEMP_SUFFIX = ".emerdiff-tmp"
PARTS_DIR = ".parts"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
CONFIG = "config.yaml"  # the resolved configuration of the run that wrote the folder


@dataclass
class OutputOptions:
    """Which pictures are written beside the label map and the arrays."""

    overlay: bool = True
    figure: bool = False
    overlay_alpha: float = 0.5
    jpeg_quality: int = 90
    named: bool = False  # masks are named from a vocabulary (ovseg.vocab)


@dataclass
class MaskNames:
    """Open-vocabulary names of one image's masks (ovseg): per pixel and per mask, in vocabulary ids."""

    class_names: Sequence[str]
    labels: np.ndarray  # [H, W] int64 vocabulary id of each pixel
    mask_classes: np.ndarray  # [K] int64 vocabulary id of each mask (-1: empty mask)
    mask_scores: np.ndarray  # [K] float cosine similarity of each mask to its class

    def arrays(self) -> Dict[str, np.ndarray]:
        """The npz entries: ov_labels, mask_classes, mask_scores, class_names."""
        return {"ov_labels": self.labels, "mask_classes": self.mask_classes, "mask_scores": self.mask_scores,
                "class_names": np.asarray(list(self.class_names))}

    def per_mask(self) -> List[dict]:
        """Manifest entries: each mask's class name and score."""
        return [{"class": self.class_names[c] if c >= 0 else None,
                 "score": None if np.isnan(s) else round(float(s), 4)}
                for c, s in zip(self.mask_classes.tolist(), self.mask_scores.tolist())]


@dataclass
class ImageResult:
    """One image's prediction and its source; `output` is None when `error` says why."""

    name: str
    path: str
    image: Optional[torch.Tensor] = None  # [3, H, W] uint8, the photo as read
    output: Optional[SegmentationOutput] = None
    seconds: float = 0.0
    error: Optional[str] = None
    names: Optional[MaskNames] = None  # with ovseg.vocab


def remove_temporary_files(folder: Path) -> None:
    """Drop what a killed run was writing under `folder` (files of other live runs sharing it would go too)."""
    for stale in folder.rglob(f"*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write a temporary file beside `path` and rename it onto `path` only once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: Path) -> List[dict]:
    """The records of a JSON-lines file; a line cut short by a killed process is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_jsonl(path: Path, records: List[dict]) -> None:
    """Replace `path` atomically with one JSON line per record."""
    with atomic_file(path) as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records).encode())


class OutputStore:
    """Writes and inspects one run folder (see the module docstring for the layout)."""

    def __init__(self, root: Union[str, Path], options: OutputOptions) -> None:
        self.root = Path(root)
        self.options = options
        self.parts = self.root / PARTS_DIR

    def files(self, name: str) -> List[Path]:
        """Every file an image's result consists of, with the current options."""
        endings = [".npz", ".png"]
        if self.options.overlay:
            endings.append("_overlay.jpg")
        if self.options.figure:
            endings.append("_figure.png")
        if self.options.named:
            endings += ["_ov.png", "_ov_overlay.jpg"]
        return [self._file(name, ending) for ending in endings]

    def manifest(self) -> Dict[str, dict]:
        """Finished images by name: the merged manifest plus what ranks recorded since."""
        sources = [self.root / MANIFEST] + sorted(self.parts.glob("manifest.rank*.jsonl"))
        return {r["name"]: r for source in sources for r in read_jsonl(source)}

    def done(self) -> Set[str]:
        """Names recorded in the manifest whose files are all present."""
        return {name for name in self.manifest() if all(f.is_file() for f in self.files(name))}

    def failures(self) -> List[dict]:
        """The images the last finished run could not read."""
        return read_jsonl(self.root / FAILURES)

    def begin_run(self) -> None:
        """Rank 0, before any rank writes: drop temporary files, keep what a killed run recorded."""
        remove_temporary_files(self.root)
        self._merge_manifest()
        for part in self.parts.glob("failures.rank*.jsonl"):
            part.unlink()

    def save(self, result: ImageResult, rank: int) -> None:
        """Write an image's files, then record it in this rank's manifest part."""
        assert result.output is not None and result.image is not None
        arrays = result.output.to_numpy() | (result.names.arrays() if result.names is not None else {})
        photo = result.image.permute(1, 2, 0).numpy()
        with atomic_file(self._file(result.name, ".npz")) as handle:
            np.savez_compressed(handle, **arrays)
        with atomic_file(self._file(result.name, ".png")) as handle:
            render.label_image(arrays["labels"], result.output.num_masks).save(handle, format="PNG")
        if self.options.overlay:
            self.write_overlay(result.name, photo, arrays)
        if self.options.figure:
            self.write_figure(result.name, photo, arrays)
        if result.names is not None:
            self.write_names(result.name, photo, result.names)
        height, width = arrays["labels"].shape
        record = {"name": result.name, "path": result.path, "size": [height, width],
                  "num_masks": result.output.num_masks, "seconds": round(result.seconds, 3), "seed": result.output.seed}
        if result.names is not None:
            record["masks"] = result.names.per_mask()
        self._append(f"manifest.rank{rank}.jsonl", record)

    def record_failure(self, result: ImageResult, rank: int) -> None:
        """Note an image that could not be segmented in this rank's failures part."""
        self._append(f"failures.rank{rank}.jsonl", {"name": result.name, "path": result.path, "error": result.error})

    def finish_run(self) -> None:
        """Rank 0, after every rank finished: merge the parts into manifest.jsonl and failures.jsonl."""
        failures = [r for part in sorted(self.parts.glob("failures.rank*.jsonl")) for r in read_jsonl(part)]
        write_jsonl(self.root / FAILURES, sorted(failures, key=lambda r: r["name"]))
        self._merge_manifest()
        shutil.rmtree(self.parts, ignore_errors=True)

    def write_overlay(self, name: str, photo: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """NAME_overlay.jpg: mask colours and boundaries over the photo."""
        picture = render.overlay(photo, arrays["labels"], len(arrays["lowres_masks"]), self.options.overlay_alpha)
        with atomic_file(self._file(name, "_overlay.jpg")) as handle:
            Image.fromarray(picture).save(handle, format="JPEG", quality=self.options.jpeg_quality)

    def write_figure(self, name: str, photo: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """NAME_figure.png: photo | low-res k-means masks | bilinear upsampling | EmerDiff labels."""
        picture = render.figure(photo, arrays["lowres_labels"], arrays["labels_bilinear"], arrays["labels"],
                                len(arrays["lowres_masks"]), self.options.overlay_alpha)
        with atomic_file(self._file(name, "_figure.png")) as handle:
            picture.save(handle, format="PNG")

    def write_names(self, name: str, photo: np.ndarray, names: MaskNames) -> None:
        """NAME_ov.png (vocabulary ids) and NAME_ov_overlay.jpg (class colours with a legend of names)."""
        with atomic_file(self._file(name, "_ov.png")) as handle:
            render.label_image(names.labels, len(names.class_names)).save(handle, format="PNG")
        picture = render.legend_overlay(photo, names.labels, names.class_names, self.options.overlay_alpha)
        with atomic_file(self._file(name, "_ov_overlay.jpg")) as handle:
            picture.save(handle, format="JPEG", quality=self.options.jpeg_quality)

    def _file(self, name: str, ending: str) -> Path:
        return self.root / f"{name}{ending}"

    def _append(self, part: str, record: dict) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        with open(self.parts / part, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _merge_manifest(self) -> None:
        records = self.manifest()
        write_jsonl(self.root / MANIFEST, [records[name] for name in sorted(records)])
        for part in self.parts.glob("manifest.rank*.jsonl"):
            part.unlink()
