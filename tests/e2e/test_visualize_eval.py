"""tools/visualize.py on a results folder of tools/eval.py: figure.png, one row per image (image | ground truth |
k-means nearest | bilinear | EmerDiff), read from the eval's cache, with the miniature random SD.

The masks of a random model mean nothing; these tests check that each panel shows exactly the evaluated arrays:
the ground truth and the per-image Hungarian classes of each method's masks, in the figure's palette.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool, voc_folder
from emerdiff.data import build_dataset, dataset_metadata
from emerdiff.evaluation.figure import PANEL_HEIGHT
from emerdiff.evaluation.protocols import UNMATCHED, match_image
from emerdiff.predict.render import TITLE_HEIGHT, palette, resize_nearest
from test_eval_tool import SIZE, command, one_thread  # noqa: F401 (one_thread: one torch and faiss thread here too)

VOC = dataset_metadata("voc2012_val")
IDS = ["2007_000001", "2007_000002"]
COLUMNS = ["image", "ground truth", "nearest", "bilinear", "emerdiff"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return voc_folder(tmp_path_factory.mktemp("voc") / "VOC2012", count=2)


@pytest.fixture(scope="module")
def evaluated(voc_root, tmp_path_factory) -> Path:
    """A finished tools/eval.py run over the two photos (k-means nearest, bilinear and EmerDiff masks cached)."""
    out = tmp_path_factory.mktemp("eval")
    assert load_tool("eval").main(command(voc_root, out, "eval.protocols=[hungarian]")) == 0
    return out


def draw(folder: Path, *args: str) -> np.ndarray:
    assert load_tool("visualize").main(["--output", str(folder), *args]) == 0
    with Image.open(folder / "figure.png") as figure:
        return np.asarray(figure.convert("RGB"))


def panel(figure: np.ndarray, row: int, column: str) -> np.ndarray:
    top, left = TITLE_HEIGHT + row * PANEL_HEIGHT, COLUMNS.index(column) * PANEL_HEIGHT  # square panels here
    return figure[top : top + PANEL_HEIGHT, left : left + PANEL_HEIGHT]


def painted(classes: np.ndarray) -> np.ndarray:
    """What a class map should look like in the figure: enlarged pixel for pixel, palette colours, black if < 0."""
    big = resize_nearest(classes, (PANEL_HEIGHT, PANEL_HEIGHT))
    return np.where((big >= 0)[..., None], palette(VOC.num_classes)[np.maximum(big, 0)], 0).astype(np.uint8)


@pytest.fixture(scope="module")
def figure(evaluated, voc_root) -> np.ndarray:
    return draw(evaluated, f"data.root={voc_root}", "--images", "2")


def test_figure_has_a_row_per_image_a_column_per_method_and_a_legend_line(figure):
    assert figure.shape == (TITLE_HEIGHT + 2 * PANEL_HEIGHT + TITLE_HEIGHT, 5 * PANEL_HEIGHT, 3)


def test_ground_truth_panels_are_the_palette_of_the_label_with_ignored_pixels_black(figure, voc_root):
    dataset = build_dataset("voc2012_val", voc_root, size=SIZE)
    for row, item in enumerate(dataset):
        label = item["label"].astype(np.int64)
        assert (label == VOC.ignore_index).any()  # the void boundaries of VOC's annotations
        np.testing.assert_array_equal(
            panel(figure, row, "ground truth"), painted(np.where(label == VOC.ignore_index, UNMATCHED, label))
        )
        image = Image.fromarray(item["image"]).resize((PANEL_HEIGHT, PANEL_HEIGHT), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(panel(figure, row, "image"), np.asarray(image))


def test_mask_panels_are_the_palette_of_their_per_image_hungarian_classes(figure, evaluated):
    for row, image_id in enumerate(IDS):
        with np.load(evaluated / "cache" / f"{image_id}.npz") as cached:
            gt, lowres = cached["gt"], cached["lowres_labels"]
            segments = {
                "nearest": resize_nearest(lowres, gt.shape),
                "bilinear": cached["labels_bilinear"],
                "emerdiff": cached["labels"],
            }
        for column, masks in segments.items():
            # eval's defaults: one-to-one on IoU, zero-overlap pairings dropped (detectron2 convention)
            classes = match_image(masks, gt, VOC.num_classes, criterion="iou").labels
            assert len(np.unique(classes)) >= 2
            np.testing.assert_array_equal(panel(figure, row, column), painted(classes))


def test_ids_choose_the_rows_and_their_order(evaluated, voc_root, figure):
    swapped = draw(evaluated, f"data.root={voc_root}", "--ids", ",".join(reversed(IDS)))
    assert swapped.shape == figure.shape
    np.testing.assert_array_equal(panel(swapped, 0, "emerdiff"), panel(figure, 1, "emerdiff"))
    np.testing.assert_array_equal(panel(swapped, 1, "ground truth"), panel(figure, 0, "ground truth"))
    one = draw(evaluated, f"data.root={voc_root}", "--images", "1")
    assert one.shape[0] == TITLE_HEIGHT + PANEL_HEIGHT + TITLE_HEIGHT


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "is neither a results folder of tools/predict.py (config.yaml) nor one of tools/eval.py"),
        (["--ids", "2007_999999"], "2007_999999: no such image in the split"),
        (["segmentor.lam=20"], "segmentor.lam=20: the figure shows the evaluated masks"),
        (["--cfg", "eval/ade20k"], "evaluated voc2012_val, not ade20k_val"),
        (["--images", "0"], "--images 0: give at least 1"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_status_2(evaluated, voc_root, tmp_path, capsys, arguments, message):
    folder = tmp_path if not arguments else evaluated
    with pytest.raises(SystemExit) as stop:
        load_tool("visualize").main(["--output", str(folder), f"data.root={voc_root}", *arguments])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_cache_of_another_ground_truth_is_refused(evaluated, voc_root, tmp_path, capsys):
    other = shutil.copytree(voc_root, tmp_path / "VOC2012")
    label = other / "SegmentationClass" / f"{IDS[0]}.png"
    with Image.open(label) as png:
        flipped = png.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    flipped.save(label)
    with pytest.raises(SystemExit) as stop:
        load_tool("visualize").main(["--output", str(evaluated), f"data.root={other}", "--images", "1"])
    assert stop.value.code == 2 and "holds another ground truth" in capsys.readouterr().err


def test_images_and_ids_are_refused_for_a_prediction_folder(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("{}\n")  # what makes a folder a prediction run's
    with pytest.raises(SystemExit) as stop:
        load_tool("visualize").main(["--output", str(tmp_path), "--images", "2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --images and --ids choose the images of an evaluation")
