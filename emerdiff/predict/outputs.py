"""The results folder of a prediction run: per-image files written atomically, the manifest, the failures.

Layout (NAME = the image's path relative to the input root, without suffix)::

    DIR/NAME.png            label map at the input size (8-bit palette, 16-bit if K > 255)
    DIR/NAME_overlay.jpg    mask colours and boundaries over the photo   (output.overlay)
    DIR/NAME_figure.png     photo | k-means | bilinear | EmerDiff         (output.figure)
    DIR/NAME.npz            the SegmentationOutput arrays (+ the arrays of the image's extras)
    DIR/manifest.jsonl      one line per finished image, sorted by name (+ the fields of its extras), each with the
                            version of the release that wrote it (emerdiff_version, format_version)
    DIR/failures.jsonl      images of the last run that could not be read

Plug-ins add to an image's results through `ImageExtras` (computed on the module side by an
`ExtrasStep`, see `emerdiff.predict.lightning`): npz arrays, manifest fields and files of their own,
whose endings `OutputOptions.extra_files` lists. ovseg's mask names are one (`ovseg.outputs`:
NAME_ov.png, NAME_ov_overlay.jpg).

Every file appears complete or not at all (temporary file, then rename). Each rank appends to
its own files under ``DIR/.parts``; rank 0 merges them into the manifest when the run ends.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..files import atomic_file, read_jsonl, remove_temporary_files, version_record, write_jsonl
from ..image import ImageLoadError, read_image
from ..segmentor import SegmentationOutput
from . import render
from .layout import FAILURES, MANIFEST, PARTS_DIR


@dataclass
class OutputOptions:
    """Which pictures are written beside the label map and the arrays."""

    overlay: bool = True
    figure: bool = False
    overlay_alpha: float = 0.5
    jpeg_quality: int = 90
    extra_files: tuple[str, ...] = ()  # endings of the files the extras write, e.g. ("_ov.png",); none: not written

    @classmethod
    def from_config(cls, output: Any, extra_files: Sequence[str] = ()) -> OutputOptions:
        """The pictures the `output` config section (OutputConfig or its DictConfig) asks for."""
        return cls(
            overlay=output.overlay,
            figure=output.figure,
            overlay_alpha=output.overlay_alpha,
            jpeg_quality=output.jpeg_quality,
            extra_files=tuple(extra_files),
        )


class ImageExtras(Protocol):
    """What a plug-in adds to one image's results (e.g. ovseg's mask names)."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Entries added to NAME.npz."""

    def record(self) -> dict[str, Any]:
        """Fields added to the image's manifest line (JSON values)."""

    def write(self, store: OutputStore, name: str, photo: np.ndarray) -> None:
        """Write the plug-in's own files of the image (photo [H, W, 3] uint8), e.g. with `store.save_picture`;
        called when the store's options list them (`OutputOptions.extra_files`)."""

    def figure_classes(self) -> render.NamedLabels | None:
        """Per-pixel classes and their names for NAME_figure.png's class panel and legend, or None."""


ExtrasFromArrays = Callable[[Mapping[str, np.ndarray]], ImageExtras]  # a plug-in's extras rebuilt from NAME.npz


@dataclass
class PredictedImage:
    """One image's prediction and its source; `output` is None when `error` says why."""

    name: str
    path: str
    image: torch.Tensor | None = None  # [3, H, W] uint8, the photo as read
    output: SegmentationOutput | None = None
    seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None  # the exception's class name, e.g. ImageLoadError, OutOfMemoryError
    extras: ImageExtras | None = None  # what a plug-in computed for the image (EmerDiffPredictor(extras=...))


class OutputStore:
    """Writes and inspects one run folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path, options: OutputOptions) -> None:
        self.root = Path(root)
        self.options = options
        self.parts = self.root / PARTS_DIR

    def path(self, name: str, ending: str) -> Path:
        """The file of image `name` with `ending` (``.npz``, ``_overlay.jpg``, ...)."""
        return self.root / f"{name}{ending}"

    def files(self, name: str) -> list[Path]:
        """Every file an image's result consists of, with the current options."""
        endings = [".npz", ".png"]
        if self.options.overlay:
            endings.append("_overlay.jpg")
        if self.options.figure:
            endings.append("_figure.png")
        endings += self.options.extra_files
        return [self.path(name, ending) for ending in endings]

    def manifest(self) -> dict[str, dict]:
        """Finished images by name: the merged manifest plus what ranks recorded since."""
        sources = [self.root / MANIFEST] + sorted(self.parts.glob("manifest.rank*.jsonl"))
        return {r["name"]: r for source in sources for r in read_jsonl(source)}

    def done(self) -> set[str]:
        """Names recorded in the manifest whose files are all present."""
        return {name for name in self.manifest() if all(f.is_file() for f in self.files(name))}

    def failures(self) -> list[dict]:
        """The images the last finished run could not read."""
        return read_jsonl(self.root / FAILURES)

    def begin_run(self) -> None:
        """Rank 0, before any rank writes: drop temporary files, keep what a killed run recorded."""
        remove_temporary_files(self.root)
        self._merge_manifest()
        for part in self.parts.glob("failures.rank*.jsonl"):
            part.unlink()

    def save(self, result: PredictedImage, rank: int) -> None:
        """Write an image's files, then record it in this rank's manifest part."""
        assert result.output is not None and result.image is not None
        extras = result.extras
        arrays = result.output.to_numpy() | (extras.arrays() if extras is not None else {})
        photo = result.image.permute(1, 2, 0).numpy()
        with atomic_file(self.path(result.name, ".npz")) as handle:
            np.savez_compressed(handle, **arrays)
        self.save_picture(result.name, ".png", render.label_image(arrays["labels"], result.output.num_masks))
        if self.options.overlay:
            self.write_overlay(result.name, photo, arrays)
        if self.options.figure:
            self.write_figure(result.name, photo, arrays, extras)
        if extras is not None and self.options.extra_files:
            extras.write(self, result.name, photo)
        height, width = arrays["labels"].shape
        record = {
            "name": result.name,
            "path": result.path,
            "size": [height, width],
            "num_masks": result.output.num_masks,
            "seconds": round(result.seconds, 3),
            "seed": result.output.seed,
            **version_record("manifest"),
        }
        if extras is not None:
            record |= extras.record()
        self._append(f"manifest.rank{rank}.jsonl", record)

    def record_failure(self, result: PredictedImage, rank: int) -> None:
        """Note an image that could not be segmented in this rank's failures part."""
        self._append(
            f"failures.rank{rank}.jsonl",
            {"name": result.name, "path": result.path, "error": result.error, "type": result.error_type},
        )

    def finish_run(self) -> None:
        """Rank 0, after every rank finished: merge the parts into manifest.jsonl and failures.jsonl."""
        failures = [r for part in sorted(self.parts.glob("failures.rank*.jsonl")) for r in read_jsonl(part)]
        write_jsonl(self.root / FAILURES, sorted(failures, key=lambda r: r["name"]))
        self._merge_manifest()
        shutil.rmtree(self.parts, ignore_errors=True)

    def save_picture(self, name: str, ending: str, picture: Image.Image | np.ndarray) -> None:
        """NAME+ending, atomically: PNG for ``.png`` endings, else JPEG at `options.jpeg_quality`."""
        picture = Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture
        with atomic_file(self.path(name, ending)) as handle:
            if ending.endswith(".png"):
                picture.save(handle, format="PNG")
            else:
                picture.save(handle, format="JPEG", quality=self.options.jpeg_quality)

    def write_overlay(self, name: str, photo: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """NAME_overlay.jpg: mask colours and boundaries over the photo."""
        picture = render.overlay(photo, arrays["labels"], len(arrays["lowres_masks"]), self.options.overlay_alpha)
        self.save_picture(name, "_overlay.jpg", picture)

    def write_figure(
        self, name: str, photo: np.ndarray, arrays: Mapping[str, np.ndarray], extras: ImageExtras | None = None
    ) -> None:
        """NAME_figure.png: photo | low-res k-means masks | bilinear upsampling | EmerDiff labels (| classes)."""
        picture = render.figure(
            photo,
            arrays["lowres_labels"],
            arrays["labels_bilinear"],
            arrays["labels"],
            len(arrays["lowres_masks"]),
            self.options.overlay_alpha,
            extras.figure_classes() if extras is not None else None,
        )
        self.save_picture(name, "_figure.png", picture)

    def missing_pictures(self, name: str) -> list[str]:
        """Endings of the files the options ask for that a recorded image lacks while its NAME.npz is there.

        They can be drawn from the npz without segmenting again (`redraw`).
        """
        if not self.path(name, ".npz").is_file():
            return []
        return [path.name.removeprefix(Path(name).name) for path in self.files(name) if not path.is_file()]

    def redraw(
        self, name: str, photo: np.ndarray, endings: Sequence[str], extras: ExtrasFromArrays | None = None
    ) -> None:
        """Draw the files of image `name` with these `endings` again from its NAME.npz, without the model.

        `extras` rebuilds a plug-in's extras from the npz arrays: its files and the figure's class panel.
        """
        with np.load(self.path(name, ".npz")) as npz:
            arrays = dict(npz)
        plugin = extras(arrays) if extras is not None else None
        if ".png" in endings:
            self.save_picture(name, ".png", render.label_image(arrays["labels"], len(arrays["lowres_masks"])))
        if "_overlay.jpg" in endings:
            self.write_overlay(name, photo, arrays)
        if "_figure.png" in endings:
            self.write_figure(name, photo, arrays, plugin)
        if plugin is not None and set(endings) & set(self.options.extra_files):
            plugin.write(self, name, photo)

    def redraw_finished(
        self, extras: ExtrasFromArrays | None = None, endings: Sequence[str] | None = None
    ) -> tuple[int, dict[str, str]]:
        """Draw finished images' files again from their npz: `endings`, or else the ones each image lacks.

        Returns how many images were drawn, and the images skipped with why (their photo cannot be read).
        """
        drawn, skipped = 0, {}
        for name, record in self.manifest().items():
            wanted = self.missing_pictures(name) if endings is None else list(endings)
            if not wanted:
                continue
            try:
                photo = read_image(record["path"])
            except (ImageLoadError, FileNotFoundError) as exc:
                skipped[name] = str(exc)
                continue
            self.redraw(name, photo, wanted, extras)
            drawn += 1
        return drawn, skipped

    def _append(self, part: str, record: dict) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        with open(self.parts / part, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _merge_manifest(self) -> None:
        records = self.manifest()
        write_jsonl(self.root / MANIFEST, [records[name] for name in sorted(records)])
        for part in self.parts.glob("manifest.rank*.jsonl"):
            part.unlink()
