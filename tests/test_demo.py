"""The browser demo's segmentation callback, without a browser (emerdiff/app/demo; the page itself: tests/e2e)."""

import io
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from skimage import data

from conftest import tiny_segmentor

gr = pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")

from emerdiff.app.demo.page import (DemoPage, ModelNotes, annotated_panel, build_demo, mask_colours,  # noqa: E402
                                    sample_photos, toy_scenes)
from emerdiff.app.demo.segmenter import STAGE_TITLES, DemoSegmenter  # noqa: E402
from emerdiff.app.demo.uploads import DISPLAY_SIDE, read_upload  # noqa: E402
from emerdiff.predict import render  # noqa: E402
from emerdiff.predict.names import MaskNames  # noqa: E402
from emerdiff.cli.common.messages import TOY_MODEL_NOTICE  # noqa: E402
from emerdiff.cli.demo import page_notes  # noqa: E402
from emerdiff.config import load_config  # noqa: E402
from emerdiff.data import toyworld  # noqa: E402
from emerdiff.profiling import STAGES  # noqa: E402
from emerdiff.toy import SD_FOLDER  # noqa: E402

SMALL = dict(resolution=64, num_masks=4, denoise_steps=3)
CLASSES = ("sky", "ground")


class ParityNames:
    """The extras a parity step returns (`emerdiff.predict.ImageExtras`): named masks, no files of their own."""

    def __init__(self, names: MaskNames) -> None:
        self.names = names

    def arrays(self):
        return self.names.arrays()

    def record(self):
        return {}

    def write(self, store, name, photo):
        raise AssertionError("the demo's downloads list no extra files")

    def figure_classes(self):
        return None


def parity_naming(vocabulary):
    """A stand-in for ovseg's CLIP naming: even masks are the first class of the vocabulary, odd ones the second."""
    names = [n.strip() for n in vocabulary.split(",")]
    if len(names) < 2:
        raise ValueError("give two classes")

    def step(image, output):
        assert image.shape == (3, *output.labels.shape)  # the photo as the prediction tool reads it
        classes = np.arange(output.num_masks) % 2
        return ParityNames(MaskNames(names, classes, np.linspace(0.2, 0.3, output.num_masks),
                                     classes[output.labels.numpy()]))

    return step


@pytest.fixture(scope="module")
def segmenter(tiny_components, tmp_path_factory):
    model = tiny_segmentor(tiny_components, **SMALL)
    return DemoSegmenter(model, naming=parity_naming, workdir=tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def page(segmenter):
    return DemoPage(segmenter)


def save(tmp_path, name, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def small(array: np.ndarray, side: int = 96) -> Image.Image:
    img = Image.fromarray(array)
    img.thumbnail((side, side))
    return img


def error_message(excinfo) -> str:
    return str(excinfo.value.message if hasattr(excinfo.value, "message") else excinfo.value)


@pytest.mark.parametrize("name, content, expected", [
    ("notes.png", b"this is not a picture", "is not an image the demo can read"),
    ("empty.jpg", b"", "is not an image the demo can read"),
    ("cut.png", None, "could not be read as an image"),  # a real PNG cut in half
])
def test_an_unreadable_upload_is_reported_by_name_not_as_a_traceback(page, tmp_path, name, content, expected):
    if content is None:
        buffer = io.BytesIO()
        small(data.coffee()).save(buffer, format="PNG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    for callback in (page.preview, lambda p: page.segment(p, 4, 10.0)):
        with pytest.raises(gr.Error) as excinfo:
            callback(str(path))
        assert expected in error_message(excinfo) and name in error_message(excinfo)


def test_a_huge_upload_is_refused_before_it_is_decoded(page, tmp_path):
    path = save(tmp_path, "huge.png", Image.new("1", (8000, 6000)))  # 48 MP, a few KB on disk
    with pytest.raises(gr.Error) as excinfo:
        page.segment(path, 4, 10.0)
    assert "8000 x 6000" in error_message(excinfo) and "MP" in error_message(excinfo)


def test_a_tiny_picture_and_a_missing_photo_are_refused(page, tmp_path):
    with pytest.raises(gr.Error, match="at least 16 pixels"):
        page.segment(save(tmp_path, "icon.png", Image.new("RGB", (8, 8))), 4, 10.0)
    with pytest.raises(gr.Error, match="Upload a photo"):
        page.segment(None, 4, 10.0)


@pytest.mark.parametrize("k, lam, expected", [(0, 10.0, "K"), (2.5, 10.0, "whole number"), (4, 0.0, "lambda")])
def test_settings_out_of_range_are_refused(page, tmp_path, k, lam, expected):
    with pytest.raises(gr.Error, match=expected):
        page.segment(save(tmp_path, "coffee.png", small(data.coffee())), k, lam)


def test_grayscale_and_rgba_photos_are_segmented_at_their_size_with_a_note(tmp_path):
    gray = read_upload(save(tmp_path, "camera.png", small(data.camera())))
    assert gray.photo.shape == (96, 96, 3) and gray.photo.dtype == np.uint8
    assert np.array_equal(gray.photo[..., 0], gray.photo[..., 2]) and "grayscale" in gray.notes[0]
    rgba = np.dstack([data.astronaut(), np.full(data.astronaut().shape[:2], 128, np.uint8)])
    photo = read_upload(save(tmp_path, "astronaut.png", small(rgba))).photo
    assert photo.shape == (96, 96, 3)
    assert "transparency" in read_upload(save(tmp_path, "astronaut.png", small(rgba))).notes[0]


def test_a_large_photo_is_shrunk_to_the_longest_side_with_a_note(tmp_path):
    upload = read_upload(save(tmp_path, "chelsea.png", Image.fromarray(data.chelsea())), max_side=200)
    assert max(upload.photo.shape[:2]) == 200 and upload.photo.shape[1] == 200  # chelsea is 451 wide, 300 high
    assert "shrunk from 451 x 300" in upload.notes[0]


def test_an_uploads_note_is_shown_once_when_uploaded_and_listed_in_the_summary(page, tmp_path):
    path = save(tmp_path, "camera.png", small(data.camera(), 64))  # grayscale: a note
    with pytest.warns(UserWarning, match="grayscale photo") as shown:  # gr.Warning outside a request: a warning
        photo, layers = page.preview(path)
    assert len(shown) == 1 and photo.shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3) and layers == []
    with warnings.catch_warnings(record=True) as again:  # a second toast of the note would be a warning here
        warnings.simplefilter("always")
        text = page.segment(path, 3, 8.0)[4]
    assert not [w for w in again if "grayscale" in str(w.message)] and "- note: grayscale photo" in text


def test_segment_returns_the_four_panels_and_valid_downloads(page, tmp_path):
    photo = small(data.astronaut(), 80)
    shown, kmeans, bilinear, emerdiff, text, files, rows, selected = page.segment(
        save(tmp_path, "astronaut.png", photo), 3, 8.0)
    assert shown[0].shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3) and shown[1] == []  # the photo panel has no layers
    for base, layers in (kmeans, bilinear, emerdiff):
        assert base.shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3) and 1 <= len(layers) <= 3
        coverage = sum((mask > 0).astype(int) for mask, _ in layers)
        assert np.all(coverage == 1)  # every pixel in exactly one mask layer
    png, npz, coco = files
    assert png.endswith("astronaut.png") and npz.endswith("astronaut.npz") and coco.endswith("astronaut_coco.json")
    arrays = np.load(npz)
    with Image.open(png) as label_png:
        assert label_png.mode == "P"
        assert np.array_equal(np.asarray(label_png), arrays["labels"])
    document = json.loads(Path(coco).read_text())
    assert document["images"] == [{"id": 1, "file_name": "astronaut.png", "height": 80, "width": 80}]
    decoded = np.full((80, 80), -1)
    for annotation in document["annotations"]:  # class-agnostic categories "mask N" with id N + 1
        decoded[coco_mask.decode(annotation["segmentation"]) > 0] = annotation["category_id"] - 1
    assert np.array_equal(decoded, arrays["labels"])
    assert arrays["labels"].shape == (80, 80) and arrays["lowres_masks"].shape[0] <= 3
    assert len(rows) == arrays["lowres_masks"].shape[0] and abs(sum(r["share"] for r in rows) - 1) < 1e-9
    assert f"**{len(rows)} masks**" in text and selected == ""


def test_k_and_lambda_of_a_request_leave_the_shared_model_alone(segmenter, tmp_path):
    before = asdict(segmenter.params)
    mine = segmenter.segmentor(2, 5.0)
    assert (mine.params.num_masks, mine.params.lam) == (2, 5.0) and mine.unet is segmenter.base.unet
    result = segmenter.run(save(tmp_path, "coffee.png", small(data.coffee(), 64)), 2, 5.0)
    assert result.num_masks <= 2
    assert asdict(segmenter.params) == before and asdict(segmenter.base.params) == before


def test_a_vocabulary_names_the_masks_in_the_legend_and_the_npz_with_progress_through_every_stage(page, tmp_path):
    reports = []
    *_, emerdiff, text, files, rows, _ = page.segment(save(tmp_path, "chelsea.png", small(data.chelsea())), 4, 10.0,
                                                      "sky, ground", progress=lambda *report: reports.append(report))
    legend = [label for _, label in emerdiff[1]]
    assert set(legend) <= set(CLASSES) and legend  # one highlightable entry per class present
    arrays = np.load(files[1])
    assert list(arrays["class_names"]) == list(CLASSES)
    assert np.array_equal(arrays["ov_labels"], arrays["mask_classes"][arrays["labels"]])
    assert "| mask | class |" in text and all(r["class"] == CLASSES[r["mask"] % 2] for r in rows)
    assert "sky" in DemoPage.describe(rows, "sky") and DemoPage.describe(rows, "mask 1").startswith("**mask 1**")

    stages = [*STAGES, "naming"]
    assert [text for _, text in reports[:-1]] == [f"{i + 1}/{len(stages)} {STAGE_TITLES[name]}"
                                                 for i, name in enumerate(stages)]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1


def test_a_vocabulary_the_naming_rejects_is_reported(page, tmp_path):
    with pytest.raises(gr.Error, match="vocabulary: give two classes"):
        page.segment(save(tmp_path, "coffee.png", small(data.coffee(), 64)), 3, 10.0, "sky")


def test_without_naming_a_vocabulary_is_refused(tiny_components, tmp_path):
    page = DemoPage(DemoSegmenter(tiny_segmentor(tiny_components, **SMALL), workdir=tmp_path))
    with pytest.raises(gr.Error, match="without mask naming"):
        page.segment(save(tmp_path, "coffee.png", small(data.coffee(), 64)), 3, 10.0, "cat, dog")


def test_panel_layers_use_the_label_png_palette_and_white_boundaries():
    labels = np.array([[0, 0, 1, 1]] * 4)
    base, layers = annotated_panel(np.zeros((4, 4, 3), np.uint8), labels, [("mask 0", [0]), ("mask 1", [1]),
                                                                          ("mask 2", [2])])
    assert [label for _, label in layers] == ["mask 0", "mask 1"]  # an empty mask gets no legend entry
    assert np.all(base[:, 1] == 255) and np.all(base[:, [0, 2, 3]] == 0)  # the boundary between the two masks
    assert mask_colours(3)["mask 2"] == "#%02x%02x%02x" % tuple(int(v) for v in render.palette(3)[2])



@pytest.mark.parametrize("config, overrides, offered", [
    ("toy", [], "toy"),
    ("toy", ["model.random_init=true", "model.arch=toyworld"], "random"),  # the toy architecture, untrained
    ("tiny", [], "random"),
    ("emerdiff_sd15", [], "real"),
])
def test_the_page_says_which_model_runs_and_offers_its_samples(config, overrides, offered):
    notes = page_notes(load_config(config, overrides=overrides))
    if offered == "toy":  # the toy world's trained model: its scenes, its vocabulary, never called Stable Diffusion
        assert notes == ModelNotes.toy(TOY_MODEL_NOTICE) and notes.samples is toy_scenes
        assert "not Stable Diffusion" in notes.notice and "not Stable Diffusion" in notes.result_note
        assert notes.vocabulary == "toyworld"
    elif offered == "random":
        assert "random weights" in notes.notice and "no meaning" in notes.result_note
        assert notes.samples is sample_photos and notes.vocabulary == ""
    else:
        assert notes == ModelNotes() and notes.notice is None and notes.samples is sample_photos


def test_toy_scenes_are_validation_scenes_the_toy_model_never_trained_on(tmp_path):
    samples = toy_scenes(tmp_path, 3)
    seeds = list(toyworld.val_seeds(3))
    assert [p.name for p in samples.paths] == [f"{toyworld.scene_id(seed)}.png" for seed in seeds]
    assert min(seeds) >= toyworld.VAL_SEED_START and "never trained on" in samples.heading
    for path, seed in zip(samples.paths, seeds):  # the scene of its seed, pixel for pixel (PNG is lossless)
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image), toyworld.draw_scene(seed).image)


def test_the_toy_page_shows_its_notice_and_scenes_and_starts_with_the_toyworld_vocabulary(segmenter, tmp_path):
    notes = ModelNotes.toy(TOY_MODEL_NOTICE)
    app = build_demo(segmenter, toy_scenes(tmp_path, 2), notes)
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert TOY_MODEL_NOTICE in by_id["intro"].value and by_id["vocabulary"].value == "toyworld"
    assert by_id["samples"].label == toy_scenes(tmp_path, 2).heading
    assert [Path(sample[0]).name for sample in by_id["samples"].samples] == ["val_1000000.png", "val_1000001.png"]


@pytest.mark.skipif(not (SD_FOLDER / "model_index.json").is_file(), reason="the toy model's weights are not shipped")
def test_the_demo_segments_a_toy_scene_with_the_trained_toy_model_and_names_its_masks_with_the_toy_classes(tmp_path):
    from emerdiff import EmerDiff
    from ovseg.any_vocab import AnyVocabulary
    from ovseg.config import ovseg_settings

    cfg = load_config("toy")
    notes = page_notes(cfg)
    model = EmerDiff.from_config(cfg)
    page = DemoPage(DemoSegmenter(model, naming=AnyVocabulary(ovseg_settings(cfg), tmp_path), workdir=tmp_path), notes)
    scene = notes.samples(tmp_path / "samples").paths[0]
    *panels, text, files, rows, _ = page.segment(str(scene), 6, 10.0, notes.vocabulary)
    arrays = np.load(files[1])
    assert arrays["labels"].shape == (toyworld.SIZE, toyworld.SIZE)  # the scene's own size
    assert list(arrays["class_names"]) == list(toyworld.CLASSES)
    assert np.array_equal(arrays["ov_labels"], arrays["mask_classes"][arrays["labels"]])
    assert {label for _, label in panels[3][1]} <= set(toyworld.CLASSES)  # EmerDiff's legend: toy-world classes
    assert notes.result_note in text and "random weights" not in text
