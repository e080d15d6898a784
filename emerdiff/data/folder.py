"""A user's own labelled images (``data.dataset: folder``), in mmsegmentation's CustomDataset layout.

Its metadata is the folder's own: class names from ``classes.txt``, ignore index 255, colours from
the labels' palette.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from emerdiff.data.datasets import DatasetNotFoundError, Interpolation, LabelError, Sample, SegmentationDataset
from emerdiff.data.labels import DatasetMetadata, colours, lookup_table, voc_colormap
from emerdiff.image import IMAGE_SUFFIXES


class LabelledFolder(SegmentationDataset):
    """A user's own labelled images, in mmsegmentation's CustomDataset layout (``data.dataset: folder``).

    Its metadata is the folder's: class names from ``classes.txt`` (line 1 names class 0), ignore index
    255, colours from the labels' palette when they are palette PNGs (else PASCAL VOC's colour map).

    Args:
        reduce_zero_label: label 0 means "ignore" and 1..C are the classes (mmsegmentation's option of the
            same name): every label value shifts down by one.
    """

    IGNORE_INDEX: ClassVar[int] = 255
    CLASSES_FILE: ClassVar[str] = "classes.txt"
    DEFAULT_SPLIT = ""  # the whole folder is the split
    LAYOUT = (
        "  images/<id>.jpg   (any of " + " ".join(sorted(IMAGE_SUFFIXES)) + "; not in sub-folders)\n"
        "  labels/<id>.png   (8-bit grey or palette PNG of class ids: 0..C-1, 255 = ignore;\n"
        "                     with data.reduce_zero_label=true: 0 = ignore, 1..C = the classes)\n"
        "  classes.txt       (C lines, one class name per line, in class-id order)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        size: int | None = None,
        interpolation: Interpolation = "bicubic",
        reduce_zero_label: bool = False,
    ) -> None:
        self.reduce_zero_label = reduce_zero_label
        super().__init__(root, split, size, interpolation)
        self.folder_metadata = self._read_metadata()
        offset = int(reduce_zero_label)
        self._lookup = lookup_table({offset + c: c for c in range(self.folder_metadata.num_classes)}, self.IGNORE_INDEX)

    @classmethod
    def metadata(cls, root: str | Path | None = None, **options: Any) -> DatasetMetadata:
        """The metadata of the folder at `root` read with `options` (it needs the root: the class names are the
        folder's)."""
        if root is None:
            raise ValueError(f"a labelled folder's class names come from ROOT/{cls.CLASSES_FILE}: set data.root")
        return cls(root, **options).folder_metadata

    def _find_samples(self) -> list[Sample]:
        image_dir, label_dir = self._require(self.root / "images"), self._require(self.root / "labels")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        repeated = [stem for stem, count in Counter(p.stem for p in images).items() if count > 1]
        if repeated:
            raise DatasetNotFoundError(
                self._layout_message(f"several images are named {repeated[0]!r}: keep one image per <id>")
            )
        return self._checked([Sample(p.stem, p, label_dir / f"{p.stem}.png") for p in images])

    def _read_metadata(self) -> DatasetMetadata:
        """Class names from classes.txt (one per line, none empty), the ignore index and the class colours."""
        path = self._require(self.root / self.CLASSES_FILE)
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8-sig").rstrip().splitlines())
        if not names:
            raise DatasetNotFoundError(self._layout_message(f"{str(path)!r} names no class"))
        if "" in names:
            empty = f"line {names.index('') + 1} of {str(path)!r} is empty: name a class on every line"
            raise DatasetNotFoundError(self._layout_message(empty))
        most = self.IGNORE_INDEX - int(self.reduce_zero_label)
        if len(names) > most:
            raise DatasetNotFoundError(
                self._layout_message(
                    f"{str(path)!r} names {len(names)} classes, more than the {most} that label values below 255 "
                    "(the ignore label) can hold"
                )
            )
        return DatasetMetadata(
            name=self.root.resolve().name,
            classes=names,
            ignore_index=self.IGNORE_INDEX,
            palette=self._classcolours(len(names)),
        )

    def _classcolours(self, num_classes: int) -> tuple[tuple[int, int, int], ...]:
        """The first label's palette entries of the classes when it is a palette PNG, else VOC's colour map."""
        first = int(self.reduce_zero_label)
        with Image.open(self.samples[0].label_path) as label:
            palette = label.getpalette() if label.mode == "P" else None
        if palette is None or len(palette) < 3 * (first + num_classes):
            return colours(voc_colormap(num_classes))
        return colours(np.reshape(palette, (-1, 3))[first : first + num_classes])

    def _label_lookup(self) -> np.ndarray:
        return self._lookup

    def _decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Class ids of a label file; a value that is neither a class nor ignored is a LabelError naming both."""
        labels = super()._decode_label(raw, path)
        ignored = {self.IGNORE_INDEX, 0} if self.reduce_zero_label else {self.IGNORE_INDEX}
        unknown = [int(v) for v in np.unique(raw[labels == self.IGNORE_INDEX]) if int(v) not in ignored]
        if unknown:
            count, classes_file = self.folder_metadata.num_classes, self.root / self.CLASSES_FILE
            values = f"1..{count} (the classes), 0" if self.reduce_zero_label else f"0..{count - 1}"
            hint = (
                "; labels that number the classes from 1 with 0 = unlabelled need data.reduce_zero_label=true"
                if not self.reduce_zero_label and unknown[-1] == count
                else ""
            )
            raise LabelError(
                f"{path}: label value {unknown[-1]} is not a class: {classes_file} names {count} classes, so labels "
                f"hold {values} or 255 (ignored). Fix the label or name the missing classes in {classes_file}{hint}"
            )
        return labels
