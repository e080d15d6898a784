"""Named evaluation splits: an explicit, read-only table from split name to dataset class.

Nothing is registered at import time; callers look names up with ``build_dataset`` or
``dataset_metadata``. To add a split, add an entry to ``DATASETS``: its class's ``metadata(root,
**options)`` gives the class names (shipped ones need no root). ``folder`` is a user's own labelled
folder (`LabelledFolder`): its metadata comes from its root, not from the package.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from emerdiff.data.datasets import (
    ADE20K150,
    VOC2012,
    Cityscapes19,
    Cityscapes27,
    CocoObject,
    CocoStuff27,
    CocoStuff171,
    PascalContext59,
    PascalContext459,
    SegmentationDataset,
)
from emerdiff.data.folder import LabelledFolder
from emerdiff.data.labels import DatasetMetadata
from emerdiff.data.toyworld import ToyWorld


@dataclass(frozen=True)
class DatasetSpec:
    """A named split: the dataset class that reads it and the split it passes."""

    dataset_cls: type[SegmentationDataset]
    split: str

    def takes(self, option: str) -> bool:
        """Whether the dataset class takes keyword `option` (image_list, reduce_zero_label, ...)."""
        return option in inspect.signature(self.dataset_cls).parameters


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "coco_stuff171_val": DatasetSpec(CocoStuff171, "val2017"),
        "coco_stuff27_val": DatasetSpec(CocoStuff27, "val2017"),
        "coco_object_val": DatasetSpec(CocoObject, "val2017"),
        "ade20k_val": DatasetSpec(ADE20K150, "validation"),
        "pascal_context59_val": DatasetSpec(PascalContext59, "val"),
        "pascal_context459_val": DatasetSpec(PascalContext459, "validation"),
        "cityscapes19_val": DatasetSpec(Cityscapes19, "val"),
        "cityscapes27_val": DatasetSpec(Cityscapes27, "val"),
        "voc2012_val": DatasetSpec(VOC2012, "val"),
        "folder": DatasetSpec(LabelledFolder, ""),
        "toyworld_val": DatasetSpec(ToyWorld, "val"),
    }
)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a named split; a ValueError lists the valid names for an unknown one."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def dataset_metadata(name: str, root: str | Path | None = None, **options: Any) -> DatasetMetadata:
    """Class names, ignore index and palette of a named split.

    A registered split ships them (no disk access); ``folder`` reads them from the labelled folder at `root`
    with the `options` it takes (reduce_zero_label). Options a split does not take do not change its metadata.
    """
    spec = dataset_spec(name)
    return spec.dataset_cls.metadata(root, **{k: v for k, v in options.items() if spec.takes(k)})


def build_dataset(name: str, root: str | Path, **options: Any) -> SegmentationDataset:
    """Construct a named split from `root`; options go to the dataset (size, interpolation, image_list, ...).

    An option the split does not take is a ValueError naming the splits that take it.
    """
    spec = dataset_spec(name)
    for option in options:
        if not spec.takes(option):
            takers = ", ".join(n for n, s in DATASETS.items() if s.takes(option)) or "no split"
            raise ValueError(f"{option} is not supported by {name}; it is an option of {takers}")
    return spec.dataset_cls(root, split=spec.split, **options)
