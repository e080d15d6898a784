"""Label sets: class names, ignore index and palette (`DatasetMetadata`), and the map from raw annotation values
to class ids, read on first use from the JSON files in ``emerdiff/data/metadata/``.

The ignore index is 255 everywhere except PASCAL-Context-459, where 255 is a real class and the
ignore index is 65535.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class DatasetMetadata:
    """Facts about a label set: class names (index = class id), ignore index, colours."""

    name: str
    classes: tuple[str, ...]
    ignore_index: int
    palette: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        """Number of classes, excluding the ignore index."""
        return len(self.classes)


def voc_colormap(num_colors: int) -> np.ndarray:
    """PASCAL VOC colour map (bits of the index spread over R, G, B), num_colors x 3 uint8."""
    index = np.arange(num_colors)
    colormap = np.zeros((num_colors, 3), dtype=np.uint8)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colormap[:, channel] |= ((index >> channel) & 1).astype(np.uint8) << shift
        index = index >> 3
    return colormap


def colours(rows: Iterable[Iterable[int]]) -> tuple[tuple[int, int, int], ...]:
    """RGB rows (lists, arrays) as the tuples of `DatasetMetadata.palette`."""
    return tuple((int(r), int(g), int(b)) for r, g, b in rows)


def lookup_table(label_map: Mapping[int, int], ignore_index: int) -> np.ndarray:
    """Raw annotation value -> class id, the ignore index for unlisted values (read-only)."""
    # Raw annotations are 8- or 16-bit, so a 65536-entry table covers every raw value.
    lookup = np.full(1 << 16, ignore_index, dtype=np.int64)
    for raw, class_id in label_map.items():
        lookup[raw] = class_id
    lookup.setflags(write=False)
    return lookup


@functools.cache
def load_label_set(label_set: str) -> tuple[DatasetMetadata, np.ndarray]:
    """Read one metadata JSON file: its metadata and a raw-value -> class-id lookup table."""
    text = resources.files("emerdiff.data").joinpath(f"metadata/{label_set}.json").read_text()
    spec = json.loads(text)
    classes = tuple(spec["classes"])
    metadata = DatasetMetadata(
        name=spec["name"],
        classes=classes,
        ignore_index=int(spec["ignore_index"]),
        palette=colours(spec.get("palette") or voc_colormap(len(classes))),
    )
    label_map = {int(raw): class_id for raw, class_id in spec["label_map"].items()}
    return metadata, lookup_table(label_map, metadata.ignore_index)


def load_metadata(label_set: str) -> DatasetMetadata:
    """Metadata of a label set by file stem, e.g. "ade20k150" (cached)."""
    return load_label_set(label_set)[0]
