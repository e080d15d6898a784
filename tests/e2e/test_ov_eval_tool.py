"""tools/ov_eval.py end to end on real labelled photos in VOC layout, with the miniature SD and a tiny random CLIP.

Random weights make the scores meaningless; these tests check the bookkeeping: what is cached, that the
reported mIoU is the one the cached label maps give, that reruns and tools/eval.py's masks are reused
without loading models, and that DDP sums to the single-process numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, load_tool, voc_folder
import emerdiff
from emerdiff import load_config
from emerdiff.data import DATASETS, build_dataset, dataset_metadata
from ovseg import UNLABELLED, read_vocabulary
from ovseg.config import ovseg_settings

VOC = dataset_metadata("voc2012_val")
SIZE = 96  # evaluated resolution: shorter side resized to 96, central 96 x 96 crop
# A short scheduler grid (t_m = 201 lies on the 10-step grid) keeps the miniature SD fast on a CPU.
FAST = ["segmentor.resolution=128", "segmentor.num_masks=3", "segmentor.num_inference_steps=10",
        "segmentor.t_modulate=201", f"data.size={SIZE}", "data.num_workers=0"]
# With this seed the random CLIP gets some pixels right, so the hand computation below is not all zeros.
CLIP_SEED = "ovseg.clip_init_seed=3"


BACKGROUND = 0  # VOC's class 0


def ov_command(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--vocab", "voc", "--cfg", str(REPO / "configs/ov/voc.yaml"), "--cfg", str(TINY), f"data.root={root}",
            "--output", str(out), *FAST, CLIP_SEED, *extra]


def read_results(out: Path) -> dict:
    return json.loads((out / "ov" / "results.json").read_text())


@pytest.fixture(scope="module")
def tools():
    return {"eval": load_tool("eval"), "ov_eval": load_tool("ov_eval")}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return voc_folder(tmp_path_factory.mktemp("voc") / "VOC2012", count=2)


@pytest.fixture(scope="module")
def fresh_run(tools, voc_root, tmp_path_factory) -> Path:
    """tools/ov_eval.py alone in an empty folder: it segments, names and scores every image."""
    out = tmp_path_factory.mktemp("ov")
    assert tools["ov_eval"].main(ov_command(voc_root, out)) == 0
    return out


@pytest.fixture(scope="module")
def eval_run(tools, voc_root, fresh_run, tmp_path_factory) -> Path:
    """tools/eval.py with the same model, segmentor and data settings, in a folder holding only EmerDiff's masks.

    The masks are the ones tools/ov_eval.py cached in `fresh_run` (segmenting again would cost a second
    SD run): tools/eval.py scoring them without loading SD shows that both tools share one cache.
    """
    out = tmp_path_factory.mktemp("eval")
    shutil.copytree(fresh_run / "cache", out / "cache")
    command = ["--cfg", str(REPO / "configs/eval/voc.yaml"), "--cfg", str(TINY), f"data.root={voc_root}",
               "--output", str(out), *FAST, "eval.protocols=[hungarian]"]
    with pytest.MonkeyPatch.context() as patch:
        forbid(patch, SD)
        assert tools["eval"].main(command) == 0
    return out


def forbid(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    """Make loading the given models fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although its outputs are cached")

    for target in targets:
        monkeypatch.setattr(target, refuse)


SD = "emerdiff.models.build_random_sd"
CLIP = "ovseg.labeller.load_clip"


def test_one_command_scores_maskclip_and_emerdiff_side_by_side(fresh_run):
    results = read_results(fresh_run)
    assert results["dataset"] == "voc2012_val" and results["vocab"] == "voc"
    assert (results["emerdiff_version"], results["format_version"]) == (emerdiff.__version__, 1)
    assert results["num_images"] == 2 and results["num_classes"] == 21
    assert list(results["results"]) == ["maskclip", "emerdiff"]
    for scores in results["results"].values():
        assert 0 < scores["miou"] <= 100 and 0 < scores["pixel_acc"] <= 100
        assert list(scores["iou"]) == list(read_vocabulary("voc").names)
        # absent from the photos: under mmseg's convention no IoU if never predicted, IoU 0 if predicted
        assert scores["miou_convention"] == "mmseg" and scores["iou"]["aeroplane"] in (None, 0.0)
    assert results["settings"]["ovseg"]["clip_model"] == "ovseg-tiny"
    table = (fresh_run / "ov" / "results.md").read_text()
    assert "| MaskCLIP (per patch, upsampled) |" in table and "| MaskCLIP + EmerDiff masks |" in table
    assert "random weights" in table and "say nothing about the quality" in table
    assert not (fresh_run / "results.json").exists()  # tools/eval.py's results file name stays free


def test_caches_hold_masks_in_eval_format_and_labels_in_vocabulary_ids(fresh_run, voc_root):
    dataset = build_dataset("voc2012_val", voc_root, size=SIZE)
    for item in dataset:
        image_id = item["meta"]["id"]
        with np.load(fresh_run / "ov" / "cache" / f"{image_id}.npz") as named, \
                np.load(fresh_run / "cache" / f"{image_id}.npz") as masks:
            assert {"gt", "ov_labels", "ov_labels_baseline"} <= set(named.files)
            assert {"gt", "labels", "labels_bilinear", "lowres_masks", "mask_embeddings"} <= set(masks.files)
            assert np.array_equal(named["gt"], item["label"])
            assert named["ov_labels"].shape == named["ov_labels_baseline"].shape == (SIZE, SIZE)
            assert named["ov_labels"].min() >= UNLABELLED and named["ov_labels"].max() < VOC.num_classes
            assert named["ov_labels_baseline"].min() >= 0 and named["ov_labels_baseline"].max() < VOC.num_classes
            # every pixel of an EmerDiff mask carries that mask's class
            assert len(named["mask_classes"]) == len(masks["mask_embeddings"])
            assert np.array_equal(named["ov_labels"], named["mask_classes"][masks["labels"]])
    assert not list((fresh_run / "ov" / "cache").glob(".*"))  # no temporary files left behind


def hand_scores(out: Path, key: str, convention: str) -> tuple[float, float]:
    """mIoU and pixel accuracy (percent) of a cached label map against gt, counted pixel by pixel.

    mmseg averages the classes with a non-empty union (predicted but absent: IoU 0); detectron2 those in the gt.
    Background pixels are not scored: MaskCLIP's own VOC evaluation is "w/o background" (ovseg.background=ignore).
    """
    confusion = np.zeros((VOC.num_classes, VOC.num_classes))
    missed = np.zeros(VOC.num_classes)  # ground-truth pixels predicted as no class (UNLABELLED)
    for path in sorted((out / "ov" / "cache").glob("*.npz")):
        with np.load(path) as cached:
            for truth, predicted in zip(cached["gt"].ravel(), cached[key].ravel()):
                if truth in (VOC.ignore_index, BACKGROUND):
                    continue
                if 0 <= predicted < VOC.num_classes:
                    confusion[truth, predicted] += 1
                else:
                    missed[truth] += 1
    hits, gt_pixels = np.diag(confusion), confusion.sum(1) + missed
    union = gt_pixels + confusion.sum(0) - hits
    averaged = gt_pixels > 0 if convention == "detectron2" else union > 0
    iou = hits[averaged] / union[averaged]
    return 100 * iou.mean(), 100 * hits.sum() / gt_pixels.sum()


@pytest.mark.parametrize("method, key", [("emerdiff", "ov_labels"), ("maskclip", "ov_labels_baseline")])
def test_reported_scores_equal_a_hand_computation_from_the_cached_label_maps(fresh_run, method, key):
    scores = read_results(fresh_run)["results"][method]
    assert scores["miou_convention"] == "mmseg"  # the open-vocabulary papers' convention, by default
    miou, pixel_acc = hand_scores(fresh_run, key, "mmseg")
    assert pixel_acc > 0  # some pixels right, so the comparison below is not between zeros
    for path in (fresh_run / "ov" / "cache").glob("*.npz"):  # MaskCLIP never names the background
        with np.load(path) as cached:
            assert (cached["gt"] == BACKGROUND).any() and not (cached[key] == BACKGROUND).any()
    assert scores["miou"] == pytest.approx(miou, abs=1e-9)
    assert scores["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-9)


def test_forced_detectron2_convention_rescores_the_cache_over_the_classes_present_in_the_ground_truth(
        tools, fresh_run, voc_root, tmp_path, monkeypatch):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    forbid(monkeypatch, SD, CLIP)  # the convention is scoring only: the caches stay valid
    assert tools["ov_eval"].main(ov_command(voc_root, tmp_path, "eval.miou_convention=detectron2")) == 0
    results = read_results(tmp_path)["results"]
    for method, key in (("emerdiff", "ov_labels"), ("maskclip", "ov_labels_baseline")):
        miou, _ = hand_scores(tmp_path, key, "detectron2")
        assert results[method]["miou_convention"] == "detectron2"
        assert results[method]["miou"] == pytest.approx(miou, abs=1e-9)
    # the random CLIP names classes absent from the photos, which mmseg counts as IoU 0: the two differ here
    assert results["maskclip"]["miou"] > read_results(fresh_run)["results"]["maskclip"]["miou"]
    assert "- mIoU convention: detectron2." in (tmp_path / "ov" / "results.md").read_text()


def test_rerun_over_full_caches_loads_no_model_and_gives_identical_results(tools, fresh_run, voc_root, tmp_path,
                                                                           monkeypatch):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    forbid(monkeypatch, SD, CLIP)
    assert tools["ov_eval"].main(ov_command(voc_root, tmp_path)) == 0
    assert (tmp_path / "ov" / "results.json").read_text() == (fresh_run / "ov" / "results.json").read_text()


def test_masks_of_a_prior_eval_run_in_the_same_output_are_reused_without_loading_sd(tools, eval_run, fresh_run,
                                                                                   voc_root, monkeypatch):
    eval_results = (eval_run / "results.json").read_text()
    forbid(monkeypatch, SD)
    assert tools["ov_eval"].main(ov_command(voc_root, eval_run)) == 0
    assert read_results(eval_run)["results"] == read_results(fresh_run)["results"]
    assert (eval_run / "results.json").read_text() == eval_results  # tools/eval.py's results untouched


def another_voc_vocabulary(folder: Path) -> Path:
    """VOC's 21 classes with one name worded otherwise: the same split, another vocabulary."""
    names = ["airplane" if name == "aeroplane" else name for name in read_vocabulary("voc").names]
    path = folder / "my_voc.txt"
    path.write_text("\n".join(names) + "\n")
    return path


@pytest.mark.parametrize("change", [["ovseg.templates=imagenet"], ["--vocab", "{vocab}"]], ids=["templates", "vocab"])
def test_labels_cached_with_other_naming_settings_are_refused_before_the_run_with_the_relabel_advice(
        change, tools, fresh_run, voc_root, tmp_path, capsys, monkeypatch):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    forbid(monkeypatch, SD, CLIP, "pytorch_lightning.Trainer.test")  # refused before the run, not at its first image
    vocab = another_voc_vocabulary(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main([*ov_command(voc_root, tmp_path), *[a.format(vocab=vocab) for a in change]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    named = "ovseg.templates: 'maskclip' -> 'imagenet'" if "ovseg.templates=imagenet" in change else \
        f"ovseg.vocab: 'voc' -> '{vocab}'"
    assert error.startswith(f"error: {tmp_path / 'ov' / 'cache'} holds labels named with other settings (")
    assert named in error
    assert f"pass --relabel to name the images again on the EmerDiff masks cached in {tmp_path / 'cache'}" in error


def test_relabel_names_the_cached_masks_with_another_vocabulary_without_segmenting(tools, fresh_run, voc_root,
                                                                                  tmp_path, monkeypatch):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    masks = {path.name: path.read_bytes() for path in (tmp_path / "cache").glob("*.npz")}
    forbid(monkeypatch, SD)  # only CLIP runs
    vocab = another_voc_vocabulary(tmp_path)
    assert tools["ov_eval"].main([*ov_command(voc_root, tmp_path), "--vocab", str(vocab), "--relabel"]) == 0
    results = read_results(tmp_path)
    assert results["vocab"] == str(vocab) and "airplane" in results["results"]["emerdiff"]["iou"]
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").glob("*.npz")} == masks  # reused as they were


def test_vocabulary_with_another_class_count_than_the_split_is_a_clear_error(tools, voc_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main([*ov_command(voc_root, tmp_path), "--vocab", "cat,dog,grass"])
    assert exit_info.value.code == 2
    assert "3 classes but voc2012_val has 21" in capsys.readouterr().err


def test_unknown_encoder_is_a_clear_error_listing_the_valid_ones(tools, voc_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main(ov_command(voc_root, tmp_path, "ovseg.encoder=nonsense"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "ovseg.encoder" in error and "nonsense" in error and "maskclip" in error
    assert not (tmp_path / "ov").exists()  # refused before anything is written


def test_two_process_ddp_over_full_caches_gives_the_numbers_of_one_process(fresh_run, voc_root, tmp_path):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "ov" / "results.json").unlink()
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    subprocess.run([sys.executable, str(REPO / "tools/ov_eval.py"), *ov_command(voc_root, tmp_path, *ddp)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    assert read_results(tmp_path)["results"] == read_results(fresh_run)["results"]


# --- the shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ov").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ov_config_names_a_split_its_vocabulary_fits_and_shares_eval_masks(path):
    cfg = load_config(path, overrides=["data.root=/data/x"])
    assert cfg.data.dataset in DATASETS
    settings = ovseg_settings(cfg)
    assert len(read_vocabulary(settings.vocab)) == dataset_metadata(cfg.data.dataset).num_classes
    assert set(settings.paper_miou) <= {"maskclip", "emerdiff"}
    twins = [load_config(p) for p in (REPO / "configs" / "eval").glob("*.yaml")]
    twin = next(t for t in twins if t.data.dataset == cfg.data.dataset)
    # the same prediction settings, so tools/eval.py and tools/ov_eval.py share OUTPUT/cache
    assert cfg.data.size == twin.data.size and cfg.segmentor == twin.segmentor and cfg.model == twin.model
    assert cfg.eval.crop == twin.eval.crop
