"""emerdiff.predict.export: COCO JSON and mask PNGs rebuilt from a results folder, read back by pycocotools."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from emerdiff.predict import OutputOptions, OutputStore, PredictedImage
from emerdiff.predict.export import ImageMasks, coco_dict, export, read_results, write_coco, write_mask_pngs
from emerdiff.predict.names import MaskNames
from emerdiff.segmentor import SegmentationOutput


def _blobs(height: int, width: int, k: int, seed: int) -> np.ndarray:
    """An [H, W] label map of k irregular regions (nearest of k random centres), every mask non-empty."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, size=(k, 2)) * (height, width)
    rows, cols = np.mgrid[:height, :width]
    distance = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    labels = distance.argmin(axis=0)
    labels.flat[:k] = np.arange(k)  # every id present at least once
    return labels


def _save(store: OutputStore, name: str, labels: np.ndarray, k: int, arrays=None) -> None:
    """A finished image in a results folder, as tools/predict.py leaves it (its extras' arrays in the npz)."""

    class Extras:
        def arrays(self):
            return arrays

        def record(self):
            return {}

        def write(self, store, name, photo):
            pass

    tensor = torch.from_numpy(labels)
    output = SegmentationOutput(tensor, tensor, tensor[:2, :2], torch.ones(k, 2, 2, dtype=torch.bool),
                                torch.zeros(k, 4), seed=0)
    photo = torch.zeros(3, *labels.shape, dtype=torch.uint8)
    store.save(PredictedImage(name, f"/photos/{name}.jpg", photo, output, 0.1,
                              extras=Extras() if arrays is not None else None), rank=0)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A results folder of two images, one of them in a subfolder with an empty mask (id 3 wins no pixel)."""
    store = OutputStore(tmp_path, OutputOptions(overlay=False))
    _save(store, "a", _blobs(24, 40, 5, seed=1), 5)
    empty = _blobs(30, 20, 3, seed=2)
    _save(store, "trip/b", empty, 4)
    store.finish_run()
    return tmp_path


def _decoded_labels(coco: COCO, image_id: int) -> np.ndarray:
    """The label map the annotations of an image decode to (-1 where none), mask id from 'mask N'."""
    info = coco.imgs[image_id]
    labels = np.full((info["height"], info["width"]), -1)
    for annotation in coco.imgToAnns[image_id]:
        pixels = coco.annToMask(annotation).astype(bool)
        assert not (labels[pixels] >= 0).any()  # masks do not overlap
        labels[pixels] = int(coco.cats[annotation["category_id"]]["name"].removeprefix("mask "))
    return labels


def test_coco_json_decodes_with_pycocotools_to_exactly_our_label_maps(folder):
    coco = COCO(str(write_coco(folder)))
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == ["a.jpg", "trip/b.jpg"]
    assert [(coco.imgs[i]["height"], coco.imgs[i]["width"]) for i in sorted(coco.imgs)] == [(24, 40), (30, 20)]
    for image_id, image in zip(sorted(coco.imgs), read_results(folder)):
        np.testing.assert_array_equal(_decoded_labels(coco, image_id), image.labels)
    assert [c["name"] for c in coco.dataset["categories"]] == [f"mask {k}" for k in range(5)]
    assert len(coco.imgToAnns[2]) == 3  # mask 3 of trip/b has no pixel: no annotation


def test_area_and_bbox_of_each_annotation_are_those_of_its_mask(folder):
    coco = COCO(str(write_coco(folder)))
    labels = read_results(folder)[0].labels
    for annotation in coco.imgToAnns[1]:
        rows, cols = np.nonzero(labels == int(coco.cats[annotation["category_id"]]["name"][5:]))
        assert annotation["area"] == len(rows) and annotation["iscrowd"] == 0 and "score" not in annotation
        assert annotation["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_named_masks_take_their_vocabulary_class_as_category_and_their_score(tmp_path):
    labels = _blobs(16, 16, 3, seed=3)
    names = {"ov_labels": np.array([2, 0, 2])[labels], "mask_classes": np.array([2, 0, 2]),
             "mask_scores": np.array([0.25, 0.5, np.nan], dtype=np.float32),
             "class_names": np.asarray(["cat", "dog", "sky"])}
    store = OutputStore(tmp_path, OutputOptions(overlay=False))
    _save(store, "x", labels, 3, arrays=names)
    store.finish_run()
    coco = COCO(str(write_coco(tmp_path)))
    assert [c["name"] for c in coco.dataset["categories"]] == ["cat", "dog", "sky"]
    classes = np.full(labels.shape, -1)
    for annotation in coco.imgToAnns[1]:
        classes[coco.annToMask(annotation).astype(bool)] = annotation["category_id"] - 1
    np.testing.assert_array_equal(classes, names["ov_labels"])
    assert sorted(a.get("score", -1) for a in coco.dataset["annotations"]) == [-1, 0.25, 0.5]  # NaN: no score


def test_images_with_and_without_named_masks_cannot_share_one_coco_file():
    plain = ImageMasks("a", "a.png", np.zeros((2, 2), dtype=np.int64), 1)
    named = ImageMasks("b", "b.png", np.zeros((2, 2), dtype=np.int64), 1,
                       MaskNames(["cat"], np.array([0]), np.array([0.5]), np.zeros((2, 2), dtype=np.int64)))
    with pytest.raises(ValueError, match="named"):
        coco_dict([plain, named])


def test_mask_pngs_are_one_binary_png_per_mask_id_empty_masks_included(folder):
    image = read_results(folder)[1]
    target = write_mask_pngs(folder, image)
    assert target == folder / "trip" / "b_masks"
    assert sorted(p.name for p in target.iterdir()) == ["00.png", "01.png", "02.png", "03.png"]
    for k in range(4):
        with Image.open(target / f"{k:02d}.png") as png:
            np.testing.assert_array_equal(np.asarray(png), np.where(image.labels == k, 255, 0))


def test_export_writes_the_formats_asked_for_and_refuses_unknown_ones(folder):
    written = export(folder, ["masks", "coco"])
    assert written == [folder / "coco.json", folder / "a_masks", folder / "trip" / "b_masks"]
    assert json.loads((folder / "coco.json").read_text())["images"][0]["file_name"] == "a.jpg"
    with pytest.raises(ValueError, match="valid: coco, masks"):
        export(folder, ["voc"])


def test_a_folder_that_is_not_a_results_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a results folder"):
        write_coco(tmp_path)
