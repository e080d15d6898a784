"""Semantic segmentation evaluation datasets, read from their standard on-disk layouts.

Every dataset returns one dict per image::

    {"image": uint8 numpy array, H x W x 3 (RGB),
     "label": int64 numpy array, H x W, class ids 0..C-1 and the ignore index elsewhere,
     "meta":  {"id": unique image id usable as a file name, "path": image file path}}

Images stay uint8 numpy arrays so that the segmentor owns its own normalisation; the
default collate turns them into tensors (use batch size 1 or a custom collate when
``size`` is None, since full images differ in size).

Class names, ignore index and palette are class-level metadata (``Dataset.metadata()``),
read on first use from the JSON files in ``emerdiff/data/metadata/``, which also hold the
map from raw annotation values to class ids. The ignore index is 255 everywhere except
PASCAL-Context-459, where 255 is a real class and the ignore index is 65535. A user's own
labelled folder (`LabelledFolder`) brings its metadata along: its ``classes.txt`` and its labels' palette.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from emerdiff.config import UserError
from emerdiff.image import IMAGE_SUFFIXES

Interpolation = Literal["bilinear", "bicubic"]

from emerdiff.choices import INTERPOLATIONS as _RESAMPLE  # segmentor.interpolation -> PIL filter


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root does not have the expected directory layout."""


class EmptySplitError(DatasetNotFoundError):
    """A dataset split was found on disk but lists no images."""


class LabelError(UserError, ValueError):
    """A label file that does not decode to class ids (colour image, unknown value); the message names the fix."""


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


def _colours(rows: Iterable[Iterable[int]]) -> tuple[tuple[int, int, int], ...]:
    """RGB rows (lists, arrays) as the tuples of `DatasetMetadata.palette`."""
    return tuple((int(r), int(g), int(b)) for r, g, b in rows)


def _lookup_table(label_map: Mapping[int, int], ignore_index: int) -> np.ndarray:
    """Raw annotation value -> class id, the ignore index for unlisted values (read-only)."""
    # Raw annotations are 8- or 16-bit, so a 65536-entry table covers every raw value.
    lookup = np.full(1 << 16, ignore_index, dtype=np.int64)
    for raw, class_id in label_map.items():
        lookup[raw] = class_id
    lookup.setflags(write=False)
    return lookup


@functools.cache
def _load_label_set(label_set: str) -> tuple[DatasetMetadata, np.ndarray]:
    """Read one metadata JSON file: its metadata and a raw-value -> class-id lookup table."""
    text = resources.files("emerdiff.data").joinpath("metadata", f"{label_set}.json").read_text()
    spec = json.loads(text)
    classes = tuple(spec["classes"])
    metadata = DatasetMetadata(
        name=spec["name"],
        classes=classes,
        ignore_index=int(spec["ignore_index"]),
        palette=_colours(spec.get("palette") or voc_colormap(len(classes))),
    )
    label_map = {int(raw): class_id for raw, class_id in spec["label_map"].items()}
    return metadata, _lookup_table(label_map, metadata.ignore_index)


def load_metadata(label_set: str) -> DatasetMetadata:
    """Metadata of a label set by file stem, e.g. "ade20k150" (cached)."""
    return _load_label_set(label_set)[0]


def resize_and_center_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so the shorter side is `size`, then cut the central size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, int(width * scale)), max(size, int(height * scale))
    image = image.resize((new_width, new_height), resample=resample)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Sample:
    """One image of a split: its id and the two files it is read from."""

    id: str
    image_path: Path
    label_path: Path


class SegmentationDataset(Dataset):
    """Base class: lists a split's samples on construction and decodes one per item.

    Args:
        root: the dataset's top folder (see each subclass's LAYOUT).
        split: split folder or list name; None means the validation split (DEFAULT_SPLIT).
        size: None keeps full images; an int resizes the shorter side to `size` (image with
            `interpolation`, label with nearest neighbour) and centre-crops size x size.
        interpolation: "bicubic" or "bilinear", for the image only.
    """

    LABEL_SET: ClassVar[str]
    LAYOUT: ClassVar[str]
    DEFAULT_SPLIT: ClassVar[str]

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        size: int | None = None,
        interpolation: Interpolation = "bicubic",
    ) -> None:
        if size is not None and size <= 0:
            raise ValueError(f"size must be a positive int or None, got {size}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        self.root = Path(root).expanduser()
        self.split = self.DEFAULT_SPLIT if split is None else split
        self.size = size
        self.interpolation = interpolation
        self._require(self.root)
        self.samples = self._find_samples()
        if not self.samples:
            raise EmptySplitError(self._layout_message("no images found"))

    @classmethod
    def metadata(cls) -> DatasetMetadata:
        """Class names, ignore index and palette of this dataset."""
        return load_metadata(cls.LABEL_SET)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        with Image.open(sample.image_path) as image_file:
            image = image_file.convert("RGB")
        with Image.open(sample.label_path) as label_file:
            raw = label_file.copy()  # P, L and I;16 images keep their raw values
        if image.size != raw.size:
            raise ValueError(
                f"{sample.label_path}: label size {raw.size} differs from image size {image.size}"
            )
        if self.size is not None:
            image = resize_and_center_crop(image, self.size, _RESAMPLE[self.interpolation])
            raw = resize_and_center_crop(raw, self.size, Image.Resampling.NEAREST)
        return {
            "image": np.array(image, dtype=np.uint8),
            "label": self._decode_label(np.array(raw), sample.label_path),
            "meta": {"id": sample.id, "path": str(sample.image_path)},
        }

    def _decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map raw annotation values to class ids; unlisted values become the ignore index."""
        if raw.ndim != 2 or raw.dtype not in (np.uint8, np.uint16):
            raise LabelError(
                f"{path}: expected a single-channel 8- or 16-bit label image, got shape {raw.shape} and dtype "
                f"{raw.dtype}; save class ids as a greyscale or palette PNG, not as colours"
            )
        return self._label_lookup()[raw]

    def _label_lookup(self) -> np.ndarray:
        """The raw value -> class id table of this dataset's labels."""
        return _load_label_set(self.LABEL_SET)[1]

    def _find_samples(self) -> list[Sample]:
        """List the split's samples, checking the layout on the way."""
        raise NotImplementedError

    def _layout_message(self, problem: str) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return (
            f"{type(self).__name__} (root={str(self.root)!r}{split}): {problem}.\n"
            f"Expected layout under the root:\n{self.LAYOUT.format(split=self.split)}"
        )

    def _require(self, path: Path) -> Path:
        """Return `path`, or raise DatasetNotFoundError showing the expected layout."""
        if not path.exists():
            raise DatasetNotFoundError(self._layout_message(f"missing {str(path)!r}"))
        return path

    def _samples_from_ids(
        self, ids: list[str], image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str
    ) -> list[Sample]:
        """Pair each id with its image and label file; every one of them must exist."""
        return self._checked(
            [Sample(i, image_dir / f"{i}{image_suffix}", label_dir / f"{i}{label_suffix}") for i in ids]
        )

    def _checked(self, samples: list[Sample]) -> list[Sample]:
        """`samples`, or a DatasetNotFoundError naming a missing image or label file."""
        missing = [p for s in samples for p in (s.image_path, s.label_path) if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(
                self._layout_message(f"{len(missing)} files of the split are missing, e.g. {str(missing[0])!r}")
            )
        return samples

    def _samples_from_image_dir(
        self, image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str
    ) -> list[Sample]:
        """One sample per image file in `image_dir`, with the label of the same stem."""
        self._require(image_dir)
        self._require(label_dir)
        ids = sorted(p.name[: -len(image_suffix)] for p in image_dir.glob(f"*{image_suffix}"))
        return self._samples_from_ids(ids, image_dir, image_suffix, label_dir, label_suffix)

    def _read_id_list(self, path: Path) -> list[str]:
        """Image ids from a text file, one per line."""
        lines = self._require(path).read_text().splitlines()
        return [line.strip() for line in lines if line.strip()]


class CocoStuff171(SegmentationDataset):
    """COCO-Stuff-164k with 171 classes (stuffthingmaps PNGs: COCO id - 1, 255 unlabeled).

    Args:
        image_list: optional text file of image ids (one per line) restricting the split,
            e.g. STEGO's ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt``.
    """

    LABEL_SET = "coco_stuff171"
    DEFAULT_SPLIT = "val2017"
    LAYOUT = (
        "  images/{split}/<id>.jpg\n"
        "  annotations/{split}/<id>.png   (stuffthingmaps_trainval2017: 8-bit, COCO id - 1, 255 unlabeled)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        size: int | None = None,
        interpolation: Interpolation = "bicubic",
        image_list: str | Path | None = None,
    ) -> None:
        self.image_list = None if image_list is None else Path(image_list)
        super().__init__(root, split, size, interpolation)

    def _find_samples(self) -> list[Sample]:
        image_dir = self._require(self.root / "images" / self.split)
        label_dir = self._require(self.root / "annotations" / self.split)
        if self.image_list is None:
            return self._samples_from_image_dir(image_dir, ".jpg", label_dir, ".png")
        ids = self._read_id_list(self.image_list)
        return self._samples_from_ids(ids, image_dir, ".jpg", label_dir, ".png")


class CocoStuff27(CocoStuff171):
    """COCO-Stuff-164k with the 27 coarse classes of IIC/PiCIE/STEGO (same files as 171)."""

    LABEL_SET = "coco_stuff27"


class CocoObject(CocoStuff171):
    """COCO-Object (GroupViT, TCL): background + the 80 COCO things, read from the COCO-Stuff files.

    Stuff and unlabeled pixels are background (class 0), as GroupViT's converter makes them,
    so the raw stuffthingmaps need no conversion.
    """

    LABEL_SET = "coco_object"


class ADE20K150(SegmentationDataset):
    """ADE20K SceneParsing, 150 classes (annotation 0 = unlabeled, k = class k - 1)."""

    LABEL_SET = "ade20k150"
    DEFAULT_SPLIT = "validation"
    LAYOUT = (
        "  (root is the ADEChallengeData2016 folder)\n"
        "  images/{split}/<id>.jpg\n"
        "  annotations/{split}/<id>.png   (8-bit, 0 = unlabeled, 1..150 = classes)"
    )

    def _find_samples(self) -> list[Sample]:
        return self._samples_from_image_dir(
            self.root / "images" / self.split, ".jpg", self.root / "annotations" / self.split, ".png"
        )


class PascalContext59(SegmentationDataset):
    """PASCAL-Context, 59 classes, mmsegmentation layout (0 = background, ignored)."""

    LABEL_SET = "pascal_context59"
    DEFAULT_SPLIT = "val"
    LAYOUT = (
        "  (root is VOCdevkit/VOC2010)\n"
        "  JPEGImages/<id>.jpg\n"
        "  SegmentationClassContext/<id>.png   (8-bit, 0 = background, 1..59 = classes)\n"
        "  ImageSets/SegmentationContext/{split}.txt   (one id per line)"
    )

    def _find_samples(self) -> list[Sample]:
        ids = self._read_id_list(self.root / "ImageSets" / "SegmentationContext" / f"{self.split}.txt")
        return self._samples_from_ids(
            ids, self.root / "JPEGImages", ".jpg", self.root / "SegmentationClassContext", ".png"
        )


class PascalContext459(SegmentationDataset):
    """PASCAL-Context, all 459 classes, detectron2 ``pascal_ctx_d2`` layout (16-bit TIFF labels).

    Labels are the full PASCAL-Context ids minus one (0..458); 65535 (unlabeled) is the
    ignore index, because 255 is a real class here.
    """

    LABEL_SET = "pascal_context459"
    DEFAULT_SPLIT = "validation"
    LAYOUT = (
        "  (root is the pascal_ctx_d2 folder)\n"
        "  images/{split}/<id>.jpg\n"
        "  annotations_ctx459/{split}/<id>.tif   (16-bit, 0..458 = classes, 65535 = unlabeled)"
    )

    def _find_samples(self) -> list[Sample]:
        return self._samples_from_image_dir(
            self.root / "images" / self.split, ".jpg", self.root / "annotations_ctx459" / self.split, ".tif"
        )


class Cityscapes19(SegmentationDataset):
    """Cityscapes fine annotations mapped from labelIds to the 19 trainIds."""

    LABEL_SET = "cityscapes19"
    DEFAULT_SPLIT = "val"
    LAYOUT = (
        "  leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
        "  gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (8-bit labelIds 0..33)"
    )
    _IMAGE_SUFFIX: ClassVar[str] = "_leftImg8bit.png"
    _LABEL_SUFFIX: ClassVar[str] = "_gtFine_labelIds.png"

    def _find_samples(self) -> list[Sample]:
        image_root = self._require(self.root / "leftImg8bit" / self.split)
        label_root = self._require(self.root / "gtFine" / self.split)
        samples = []
        for city_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
            samples += self._samples_from_image_dir(
                city_dir, self._IMAGE_SUFFIX, label_root / city_dir.name, self._LABEL_SUFFIX
            )
        return samples


class Cityscapes27(Cityscapes19):
    """Cityscapes with the 27 classes of PiCIE/STEGO: labelIds 7..33 -> 0..26, others ignored."""

    LABEL_SET = "cityscapes27"


class VOC2012(SegmentationDataset):
    """PASCAL VOC 2012 segmentation, 21 classes with background (255 = void boundary)."""

    LABEL_SET = "voc2012"
    DEFAULT_SPLIT = "val"
    LAYOUT = (
        "  (root is VOCdevkit/VOC2012)\n"
        "  JPEGImages/<id>.jpg\n"
        "  SegmentationClass/<id>.png   (palette PNG: 0 = background, 1..20 = classes, 255 = void)\n"
        "  ImageSets/Segmentation/{split}.txt   (one id per line)"
    )

    def _find_samples(self) -> list[Sample]:
        ids = self._read_id_list(self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt")
        return self._samples_from_ids(
            ids, self.root / "JPEGImages", ".jpg", self.root / "SegmentationClass", ".png"
        )


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
        self._lookup = _lookup_table(
            {offset + c: c for c in range(self.folder_metadata.num_classes)}, self.IGNORE_INDEX
        )

    @classmethod
    def metadata(cls, root: str | Path | None = None, reduce_zero_label: bool = False) -> DatasetMetadata:
        """The metadata of the folder at `root` (which it needs: the class names are the folder's)."""
        if root is None:
            raise ValueError(f"a labelled folder's class names come from ROOT/{cls.CLASSES_FILE}: set data.root")
        return cls(root, reduce_zero_label=reduce_zero_label).folder_metadata

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
            raise DatasetNotFoundError(self._layout_message(
                f"{str(path)!r} names {len(names)} classes, more than the {most} that label values below 255 "
                "(the ignore label) can hold"
            ))
        return DatasetMetadata(
            name=self.root.resolve().name, classes=names, ignore_index=self.IGNORE_INDEX,
            palette=self._class_colours(len(names)),
        )

    def _class_colours(self, num_classes: int) -> tuple[tuple[int, int, int], ...]:
        """The first label's palette entries of the classes when it is a palette PNG, else VOC's colour map."""
        first = int(self.reduce_zero_label)
        with Image.open(self.samples[0].label_path) as label:
            palette = label.getpalette() if label.mode == "P" else None
        if palette is None or len(palette) < 3 * (first + num_classes):
            return _colours(voc_colormap(num_classes))
        return _colours(np.reshape(palette, (-1, 3))[first: first + num_classes])

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
            hint = ("; labels that number the classes from 1 with 0 = unlabelled need data.reduce_zero_label=true"
                    if not self.reduce_zero_label and unknown[-1] == count else "")
            raise LabelError(
                f"{path}: label value {unknown[-1]} is not a class: {classes_file} names {count} classes, so labels "
                f"hold {values} or 255 (ignored). Fix the label or name the missing classes in {classes_file}{hint}"
            )
        return labels
