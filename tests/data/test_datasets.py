"""Dataset loaders on miniature trees in each dataset's exact layout, and the split registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from emerdiff.data import (
    ADE20K150,
    DATASETS,
    VOC2012,
    Cityscapes19,
    Cityscapes27,
    CocoObject,
    CocoStuff27,
    CocoStuff171,
    DatasetNotFoundError,
    EmptySplitError,
    PascalContext59,
    PascalContext459,
    build_dataset,
    dataset_metadata,
    load_metadata,
    voc_colormap,
)


def write_image(path: Path, height: int, width: int, color=(200, 30, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8)).save(path)


def write_label(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    """8-bit PNG, 8-bit palette PNG or 16-bit TIFF, as the file's dataset stores it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", raw.shape[::-1], raw.astype(np.uint8).tobytes())
        image.putpalette(voc_colormap(256).reshape(-1).tolist())
    else:
        image = Image.fromarray(raw)
    image.save(path)


def write_pair(image_path: Path, label_path: Path, raw: np.ndarray, palette: bool = False) -> None:
    write_image(image_path, *raw.shape)
    write_label(label_path, raw, palette)


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


# Each builder writes one image with the given raw annotation in the dataset's layout and
# returns the image id the dataset must report.


def coco_tree(root: Path, raw: np.ndarray) -> str:
    write_pair(root / "images/val2017/000000000139.jpg", root / "annotations/val2017/000000000139.png", raw)
    return "000000000139"


def ade_tree(root: Path, raw: np.ndarray) -> str:
    image_id = "ADE_val_00000001"
    write_pair(
        root / f"images/validation/{image_id}.jpg", root / f"annotations/validation/{image_id}.png", raw
    )
    return image_id


def context59_tree(root: Path, raw: np.ndarray) -> str:
    write_pair(root / "JPEGImages/2008_000008.jpg", root / "SegmentationClassContext/2008_000008.png", raw)
    write_pair(root / "JPEGImages/2008_000002.jpg", root / "SegmentationClassContext/2008_000002.png", raw)
    write_list(root / "ImageSets/SegmentationContext/val.txt", ["2008_000008"])  # 2008_000002 is train
    return "2008_000008"


def context459_tree(root: Path, raw: np.ndarray) -> str:
    raw16 = raw.astype(np.uint16)
    write_pair(
        root / "images/validation/2008_000008.jpg", root / "annotations_ctx459/validation/2008_000008.tif", raw16
    )
    return "2008_000008"


def cityscapes_tree(root: Path, raw: np.ndarray) -> str:
    stem = "frankfurt_000000_000294"
    write_pair(
        root / f"leftImg8bit/val/frankfurt/{stem}_leftImg8bit.png",
        root / f"gtFine/val/frankfurt/{stem}_gtFine_labelIds.png",
        raw,
    )
    return stem


def voc_tree(root: Path, raw: np.ndarray) -> str:
    write_pair(root / "JPEGImages/2007_000033.jpg", root / "SegmentationClass/2007_000033.png", raw, palette=True)
    write_list(root / "ImageSets/Segmentation/val.txt", ["2007_000033"])
    return "2007_000033"


DECODING_CASES = [
    # dataset, tree, raw annotation values, expected class ids
    # COCO-Stuff PNG = COCO id - 1: 11 has no category, 12 = stop sign, 181 = wood, 255 unlabeled
    (CocoStuff171, coco_tree, [0, 11, 12, 181, 255], [0, 255, 11, 170, 255]),
    # coarse: person -> person (9), stop sign -> outdoor (8), wood -> solid (24)
    (CocoStuff27, coco_tree, [0, 11, 12, 181, 255], [9, 255, 8, 24, 255]),
    # objects: things shift by one (person 1, toothbrush 80), stuff and unlabeled are background
    (CocoObject, coco_tree, [0, 11, 12, 89, 91, 181, 255], [1, 255, 12, 80, 0, 0, 0]),
    (ADE20K150, ade_tree, [0, 1, 2, 150, 151], [255, 0, 1, 149, 255]),
    (PascalContext59, context59_tree, [0, 1, 2, 59, 255], [255, 0, 1, 58, 255]),
    # 16-bit: 255 and 458 are real classes, 65535 is the ignore index
    (PascalContext459, context459_tree, [0, 255, 458, 459, 65535], [0, 255, 458, 65535, 65535]),
    # labelIds: 7 road, 8 sidewalk, 9 parking (no trainId), 11 building, 33 bicycle
    (Cityscapes19, cityscapes_tree, [0, 7, 8, 9, 11, 33], [255, 0, 1, 255, 2, 18]),
    (Cityscapes27, cityscapes_tree, [0, 6, 7, 8, 9, 33], [255, 255, 0, 1, 2, 26]),
    (VOC2012, voc_tree, [0, 1, 15, 20, 255], [0, 1, 15, 20, 255]),
]


@pytest.mark.parametrize(
    ("dataset_cls", "tree", "raw", "expected"), DECODING_CASES, ids=[c[0].__name__ for c in DECODING_CASES]
)
def test_dataset_reads_its_layout_and_maps_raw_values_to_class_ids(tmp_path, dataset_cls, tree, raw, expected):
    dtype = np.uint16 if max(raw) > 255 else np.uint8
    raw_map = np.array([raw, raw[::-1]], dtype=dtype)
    image_id = tree(tmp_path, raw_map)

    dataset = dataset_cls(tmp_path)
    assert len(dataset) == 1
    item = dataset[0]

    assert item["label"].dtype == np.int64
    assert item["label"].tolist() == [expected, expected[::-1]]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (2, len(raw), 3)
    assert item["meta"]["id"] == image_id
    assert Path(item["meta"]["path"]).is_file() and image_id in item["meta"]["path"]


@pytest.mark.parametrize(
    ("dataset_cls", "num_classes", "ignore_index"),
    [
        (CocoStuff171, 171, 255),
        (CocoStuff27, 27, 255),
        (CocoObject, 81, 255),
        (ADE20K150, 150, 255),
        (PascalContext59, 59, 255),
        (PascalContext459, 459, 65535),
        (Cityscapes19, 19, 255),
        (Cityscapes27, 27, 255),
        (VOC2012, 21, 255),
    ],
)
def test_metadata_has_one_unique_name_and_colour_per_class(dataset_cls, num_classes, ignore_index):
    meta = dataset_cls.metadata()
    assert meta.num_classes == num_classes
    assert len(set(meta.classes)) == num_classes
    assert len(meta.palette) == num_classes
    assert meta.ignore_index == ignore_index
    assert meta.ignore_index >= num_classes


def test_coarse_and_object_coco_label_maps_cover_exactly_the_171_fine_classes():
    import json
    from importlib import resources

    def raw_ids(label_set):
        text = resources.files("emerdiff.data").joinpath("metadata", f"{label_set}.json").read_text()
        return set(json.loads(text)["label_map"])

    assert raw_ids("coco_stuff27") == raw_ids("coco_stuff171")
    assert raw_ids("coco_object") == raw_ids("coco_stuff171") | {"255"}
    assert load_metadata("coco_stuff27").classes[9] == "person"


def test_cityscapes_lists_every_city_in_sorted_order(tmp_path):
    raw = np.full((2, 2), 7, dtype=np.uint8)
    for stem in ["munster_000001_000019", "frankfurt_000001_000000", "frankfurt_000000_000294"]:
        city = stem.split("_")[0]
        write_pair(
            tmp_path / f"leftImg8bit/val/{city}/{stem}_leftImg8bit.png",
            tmp_path / f"gtFine/val/{city}/{stem}_gtFine_labelIds.png",
            raw,
        )
    ids = [s.id for s in Cityscapes19(tmp_path).samples]
    assert ids == ["frankfurt_000000_000294", "frankfurt_000001_000000", "munster_000001_000019"]


def test_coco_image_list_restricts_the_split(tmp_path):
    raw = np.zeros((2, 2), dtype=np.uint8)
    for image_id in ["000000000139", "000000000285"]:
        write_pair(
            tmp_path / f"images/val2017/{image_id}.jpg", tmp_path / f"annotations/val2017/{image_id}.png", raw
        )
    write_list(tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt", ["000000000285"])

    dataset = CocoStuff27(tmp_path, image_list=tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")
    assert [s.id for s in dataset.samples] == ["000000000285"]


def test_size_resizes_the_shorter_side_then_crops_the_centre_with_nearest_labels(tmp_path):
    # 20 x 40 image; label columns: 10 of class 1, 20 of class 2, 10 of class 3 (raw +1).
    raw = np.zeros((20, 40), dtype=np.uint8)
    raw[:, :10], raw[:, 10:30], raw[:, 30:] = 2, 3, 4
    raw[5, 20] = 0  # one unlabeled pixel
    ade_tree(tmp_path, raw)

    item = ADE20K150(tmp_path, size=10, interpolation="bilinear")[0]

    assert item["image"].shape == (10, 10, 3)
    assert item["label"].shape == (10, 10)
    # resized to 10 x 20, the central 10 columns are exactly the class-2 band
    assert set(np.unique(item["label"])) <= {2, 255}
    assert np.abs(item["image"].astype(int) - [200, 30, 90]).max() <= 3


def test_default_collate_batches_fixed_size_items(tmp_path):
    raw = np.ones((6, 9), dtype=np.uint8)
    for image_id in ["ADE_val_00000001", "ADE_val_00000002"]:
        write_pair(
            tmp_path / f"images/validation/{image_id}.jpg", tmp_path / f"annotations/validation/{image_id}.png", raw
        )
    batch = next(iter(DataLoader(ADE20K150(tmp_path, size=4), batch_size=2)))
    assert tuple(batch["image"].shape) == (2, 4, 4, 3)
    assert tuple(batch["label"].shape) == (2, 4, 4)
    assert batch["meta"]["id"] == ["ADE_val_00000001", "ADE_val_00000002"]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset_cls", [CocoStuff171, ADE20K150, PascalContext59, PascalContext459, Cityscapes19, VOC2012]
)
def test_wrong_root_raises_a_file_not_found_error_showing_the_expected_layout(tmp_path, dataset_cls):
    root = tmp_path / "not_a_dataset"
    with pytest.raises(DatasetNotFoundError) as error:
        dataset_cls(root)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert str(root) in message
    assert dataset_cls.LAYOUT.format(split=dataset_cls.DEFAULT_SPLIT) in message


def test_missing_annotation_folder_is_named_in_the_error(tmp_path):
    write_image(tmp_path / "images/validation/ADE_val_00000001.jpg", 4, 4)
    with pytest.raises(DatasetNotFoundError, match="annotations/validation"):
        ADE20K150(tmp_path)


def test_image_without_its_label_file_is_an_error(tmp_path):
    ade_tree(tmp_path, np.ones((2, 2), dtype=np.uint8))
    write_image(tmp_path / "images/validation/ADE_val_00000002.jpg", 2, 2)
    with pytest.raises(DatasetNotFoundError, match="ADE_val_00000002.png"):
        ADE20K150(tmp_path)


def test_split_folders_without_images_raise_an_empty_split_error(tmp_path):
    (tmp_path / "images/validation").mkdir(parents=True)
    (tmp_path / "annotations/validation").mkdir(parents=True)
    with pytest.raises(EmptySplitError, match="no images found"):
        ADE20K150(tmp_path)


def test_empty_split_list_raises_an_empty_split_error(tmp_path):
    write_list(tmp_path / "ImageSets/Segmentation/val.txt", [])
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(EmptySplitError):
        VOC2012(tmp_path)


def test_rgb_label_image_is_rejected(tmp_path):
    ade_tree(tmp_path, np.ones((2, 2), dtype=np.uint8))
    write_image(tmp_path / "annotations/validation/ADE_val_00000001.png", 2, 2)  # colour, not ids
    with pytest.raises(ValueError, match="single-channel"):
        ADE20K150(tmp_path)[0]


# --- registry -----------------------------------------------------------------------------------


def test_registry_names_every_evaluation_split():
    assert set(DATASETS) == {
        "coco_stuff171_val",
        "coco_stuff27_val",
        "coco_object_val",
        "ade20k_val",
        "pascal_context59_val",
        "pascal_context459_val",
        "cityscapes19_val",
        "cityscapes27_val",
        "voc2012_val",
    }
    assert dataset_metadata("cityscapes27_val").num_classes == 27


def test_build_dataset_constructs_the_named_split_with_options(tmp_path):
    voc_tree(tmp_path, np.zeros((8, 12), dtype=np.uint8))
    dataset = build_dataset("voc2012_val", tmp_path, size=4)
    assert isinstance(dataset, VOC2012)
    assert dataset.split == "val"
    assert dataset[0]["label"].shape == (4, 4)


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'ade20k'") as error:
        build_dataset("ade20k", "/nowhere")
    assert all(name in str(error.value) for name in DATASETS)
