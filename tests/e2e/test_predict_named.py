"""tools/predict.py with ovseg.vocab: every mask named from the vocabulary, in files users can open."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import TINY, load_tool
from emerdiff.files import read_jsonl
from emerdiff.predict.render import TITLE_HEIGHT

predict = load_tool("predict")

VOCAB = ["cat", "dog", "grass", "sky", "rocket"]


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for name, image in [("chelsea.png", data.chelsea()), ("rocket.jpg", data.rocket())]:
        small = Image.fromarray(image)
        small.thumbnail((120, 120))
        small.save(photos / name)
    out = tmp_path_factory.mktemp("named")
    argv = ["--cfg", str(TINY), "--input", str(photos), "--output", str(out), "segmentor.resolution=64",
            "segmentor.num_masks=3", f"ovseg.vocab={','.join(VOCAB)}", "ovseg.clip_init_seed=3"]
    assert predict.main(argv) == 0
    return out


@pytest.mark.parametrize("name", ["chelsea", "rocket"])
def test_every_pixel_takes_the_class_of_its_mask_in_npz_png_and_manifest(named_run, name):
    arrays = np.load(named_run / f"{name}.npz")
    assert arrays["class_names"].tolist() == VOCAB
    ov, labels, classes = arrays["ov_labels"], arrays["labels"], arrays["mask_classes"]
    assert ov.shape == labels.shape and classes.shape == (arrays["lowres_masks"].shape[0],)
    present = np.unique(labels)
    assert np.array_equal(ov, classes[labels])  # each EmerDiff mask carries exactly one class
    assert set(classes[present].tolist()) <= set(range(len(VOCAB)))
    assert np.array_equal(np.asarray(Image.open(named_run / f"{name}_ov.png")), ov)
    record = {r["name"]: r for r in read_jsonl(named_run / "manifest.jsonl")}[name]
    assert [m["class"] for m in record["masks"]] == [VOCAB[c] if c >= 0 else None for c in classes.tolist()]
    scores = arrays["mask_scores"]
    assert all(np.isnan(s) or abs(m["score"] - s) < 1e-4 for m, s in zip(record["masks"], scores.tolist()))


def test_overlay_has_a_legend_row_per_class_present(named_run):
    arrays = np.load(named_run / "chelsea.npz")
    height, width = arrays["ov_labels"].shape
    overlay = Image.open(named_run / "chelsea_ov_overlay.jpg")
    rows = len(np.unique(arrays["ov_labels"][arrays["ov_labels"] >= 0]))
    assert overlay.size == (width, height + 22 * rows)


def test_changing_the_vocabulary_in_the_same_output_is_refused(named_run, capsys):
    argv = ["--cfg", str(TINY), "--input", str(named_run), "--output", str(named_run), "segmentor.resolution=64",
            "segmentor.num_masks=3", "ovseg.vocab=cat,dog", "ovseg.clip_init_seed=3"]
    with pytest.raises(SystemExit) as exc:
        predict.main(argv)
    assert exc.value.code == 2 and "ovseg.vocab" in capsys.readouterr().err


def test_a_setting_that_does_not_change_results_may_differ_when_resuming_a_named_folder(named_run, tmp_path, capsys):
    photos = Path(read_jsonl(named_run / "manifest.jsonl")[0]["path"]).parent
    argv = ["--cfg", str(TINY), "--input", str(photos), "--output", str(named_run), "segmentor.resolution=64",
            "segmentor.num_masks=3", f"ovseg.vocab={','.join(VOCAB)}", "ovseg.clip_init_seed=3",
            f"ovseg.clip_cache_dir={tmp_path}"]  # run-only: where open_clip looks for weights
    assert predict.main(argv) == 0
    assert "2 already done" in capsys.readouterr().out


def test_figures_asked_for_after_the_run_are_drawn_from_the_saved_arrays_with_a_class_legend(
        named_run, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although every image is done")

    monkeypatch.setattr("emerdiff.models.build_random_sd", refuse)
    monkeypatch.setattr("ovseg.labeller.load_clip", refuse)
    out = tmp_path / "out"
    shutil.copytree(named_run, out)
    (out / "rocket_ov_overlay.jpg").unlink()  # a lost picture is drawn again too
    photos = Path(read_jsonl(named_run / "manifest.jsonl")[0]["path"]).parent
    argv = ["--cfg", str(TINY), "--input", str(photos), "--output", str(out), "segmentor.resolution=64",
            "segmentor.num_masks=3", f"ovseg.vocab={','.join(VOCAB)}", "ovseg.clip_init_seed=3", "--figure"]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert "drew the missing pictures of 2 finished images" in printed and "0 to segment" in printed
    assert (out / "rocket_ov_overlay.jpg").read_bytes() == (named_run / "rocket_ov_overlay.jpg").read_bytes()
    for name in ("chelsea", "rocket"):
        with np.load(out / f"{name}.npz") as arrays:
            height, width = arrays["labels"].shape
            classes = len(np.unique(arrays["ov_labels"][arrays["ov_labels"] >= 0]))
        figure = Image.open(out / f"{name}_figure.png")  # five panels: ... | EmerDiff | classes, then the legend
        assert figure.size == (5 * width, height + TITLE_HEIGHT + TITLE_HEIGHT * classes)
