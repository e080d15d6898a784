"""tools/predict.py --export and tools/export.py end to end: COCO JSON and mask PNGs of a real run."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from skimage import data

from conftest import TINY, load_tool

predict = load_tool("predict")
export_tool = load_tool("export")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One small real photo segmented by the miniature model, exported in both formats by tools/predict.py."""
    photos = tmp_path_factory.mktemp("photos")
    small = Image.fromarray(data.coffee())
    small.thumbnail((64, 64))
    small.save(photos / "coffee.jpg")
    out = tmp_path_factory.mktemp("exported")
    argv = ["--cfg", str(TINY), "--input", str(photos), "--output", str(out), "segmentor.resolution=64",
            "segmentor.num_masks=4", "data.num_workers=0", "--export", "coco", "--export", "masks"]
    assert predict.main(argv) == 0
    return out


def test_predict_export_coco_decodes_to_the_label_png_of_the_run(exported):
    labels = np.asarray(Image.open(exported / "coffee.png"))
    coco = COCO(str(exported / "coco.json"))
    (image,) = coco.dataset["images"]
    assert image["file_name"] == "coffee.jpg" and (image["height"], image["width"]) == labels.shape
    decoded = np.full(labels.shape, -1)
    for annotation in coco.imgToAnns[image["id"]]:
        decoded[coco.annToMask(annotation).astype(bool)] = int(coco.cats[annotation["category_id"]]["name"][5:])
    np.testing.assert_array_equal(decoded, labels)


def test_predict_export_masks_writes_one_binary_png_per_mask_that_tiles_the_label_png(exported):
    labels = np.asarray(Image.open(exported / "coffee.png"))
    with np.load(exported / "coffee.npz") as arrays:
        num_masks = len(arrays["lowres_masks"])
    pngs = sorted((exported / "coffee_masks").iterdir())
    assert [p.name for p in pngs] == [f"{k:02d}.png" for k in range(num_masks)]
    for k, path in enumerate(pngs):
        np.testing.assert_array_equal(np.asarray(Image.open(path)) == 255, labels == k)


def test_export_tool_rebuilds_the_same_coco_json_from_a_finished_folder(exported, capsys):
    before = (exported / "coco.json").read_bytes()
    (exported / "coco.json").unlink()
    assert export_tool.main([str(exported), "--format", "coco"]) == 0
    assert (exported / "coco.json").read_bytes() == before
    assert "wrote coco export" in capsys.readouterr().out


def test_export_tool_on_a_folder_without_results_exits_with_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export_tool.main([str(tmp_path), "--format", "coco"])
    assert stop.value.code == 2 and "not a results folder" in capsys.readouterr().err
