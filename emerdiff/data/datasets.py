"""Semantic segmentation evaluation datasets, read from their standard on-disk layouts.

Every dataset returns one dict per image::

    {"image": uint8 numpy array, H x W x 3 (RGB),
     "label": int64 numpy array, H x W, class ids 0..C-1 and the ignore index elsewhere,
     "meta":  {"id": unique image id usable as a file name, "path": image file path}}

Images stay uint8 numpy arrays so that the segmentor owns its own normalisation; the
default collate turns them into tensors (use batch size 1 or a custom collate when
``size`` is None, since full images differ in size).

Class names, ignore index and palette are the dataset's label set (``Dataset.metadata()``,
`emerdiff.data.labels`), shipped with the package. A user's own labelled folder
(`emerdiff.data.folder.LabelledFolder`) brings its metadata along: its ``classes.txt`` and its
labels' palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from emerdiff.choices import INTERPOLATIONS as _RESAMPLE  # segmentor.interpolation -> PIL filter
from emerdiff.config import UserError
from emerdiff.data.labels import DatasetMetadata, load_label_set, load_metadata

Interpolation = str  # a name of emerdiff.choices.INTERPOLATIONS (the config checks it)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root does not have the expected directory layout."""


class EmptySplitError(DatasetNotFoundError):
    """A dataset split was found on disk but lists no images."""


class LabelError(UserError, ValueError):
    """A label file that does not decode to class ids (colour image, unknown value); the message names the fix."""


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
    def metadata(cls, root: str | Path | None = None, **options: Any) -> DatasetMetadata:
        """Class names, ignore index and palette of the split at `root` read with `options` (the constructor's);
        a dataset with a shipped label set (LABEL_SET) needs neither."""
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
            raise ValueError(f"{sample.label_path}: label size {raw.size} differs from image size {image.size}")
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
        return load_label_set(self.LABEL_SET)[1]

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


class ListedSplit(SegmentationDataset):
    """A split that an `image_list` can restrict: the registry offers the option to the splits whose constructor
    takes it, which are the subclasses of this one.

    Args:
        image_list: optional text file of image ids (one per line) restricting the split.
    """

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

    def _listed_ids(self) -> list[str] | None:
        """The ids of `image_list`, or None without one (the whole split)."""
        return None if self.image_list is None else self._read_id_list(self.image_list)


class CocoStuff171(ListedSplit):
    """COCO-Stuff-164k with 171 classes (stuffthingmaps PNGs: COCO id - 1, 255 unlabeled).

    An `image_list` is e.g. STEGO's ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt``.
    """

    LABEL_SET = "coco_stuff171"
    DEFAULT_SPLIT = "val2017"
    LAYOUT = (
        "  images/{split}/<id>.jpg\n"
        "  annotations/{split}/<id>.png   (stuffthingmaps_trainval2017: 8-bit, COCO id - 1, 255 unlabeled)"
    )

    def _find_samples(self) -> list[Sample]:
        image_dir = self._require(self.root / "images" / self.split)
        label_dir = self._require(self.root / "annotations" / self.split)
        ids = self._listed_ids()
        if ids is None:
            return self._samples_from_image_dir(image_dir, ".jpg", label_dir, ".png")
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
        return self._samples_from_ids(ids, self.root / "JPEGImages", ".jpg", self.root / "SegmentationClass", ".png")
