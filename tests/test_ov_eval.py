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
import torch
from torch import nn

from conftest import REPO, TINY, load_tool, voc_folder
from emerdiff import load_config
from emerdiff.config import OVSegConfig
from emerdiff.data import DATASETS, build_dataset, dataset_metadata
from ovseg import UNLABELLED, read_vocabulary
from ovseg.lightning import open_vocab_settings
from ovseg.pipeline import OpenVocabLabeller, build_labeller, patch_multiple

VOC = dataset_metadata("voc2012_val")
SIZE = 96  # evaluated resolution: shorter side resized to 96, central 96 x 96 crop
# A short scheduler grid (t_m = 201 lies on the 10-step grid) keeps the miniature SD fast on a CPU.
FAST = ["segmentor.resolution=128", "segmentor.num_masks=3", "segmentor.num_inference_steps=10",
        "segmentor.t_modulate=201", f"data.size={SIZE}", "data.num_workers=0"]
# With this seed the random CLIP gets some pixels right, so the hand computation below is not all zeros.
CLIP_SEED = "ovseg.clip_init_seed=3"


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
def eval_run(tools, voc_root, tmp_path_factory) -> Path:
    """tools/eval.py with the same model, segmentor and data settings: its cache holds EmerDiff's masks."""
    out = tmp_path_factory.mktemp("eval")
    command = ["--cfg", str(REPO / "configs/eval/voc.yaml"), "--cfg", str(TINY), f"data.root={voc_root}",
               "--output", str(out), *FAST, "eval.protocols=[hungarian]"]
    assert tools["eval"].main(command) == 0
    return out


def forbid(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    """Make loading the given models fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although its outputs are cached")

    for target in targets:
        monkeypatch.setattr(target, refuse)


SD = "emerdiff.models.build_random_sd"
CLIP = "ovseg.pipeline.load_clip"


def test_one_command_scores_maskclip_and_emerdiff_side_by_side(fresh_run):
    results = read_results(fresh_run)
    assert results["dataset"] == "voc2012_val" and results["vocab"] == "voc"
    assert results["num_images"] == 2 and results["num_classes"] == 21
    assert list(results["results"]) == ["maskclip", "emerdiff"]
    for scores in results["results"].values():
        assert 0 < scores["miou"] <= 100 and 0 < scores["pixel_acc"] <= 100
        assert list(scores["iou"]) == list(read_vocabulary("voc").names)
        assert scores["iou"]["aeroplane"] is None  # absent from the photos: no IoU, not averaged
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


def hand_scores(out: Path, key: str) -> tuple[float, float]:
    """mIoU and pixel accuracy (percent) of a cached label map against gt, counted pixel by pixel."""
    confusion = np.zeros((VOC.num_classes, VOC.num_classes))
    missed = np.zeros(VOC.num_classes)  # ground-truth pixels predicted as no class (UNLABELLED)
    for path in sorted((out / "ov" / "cache").glob("*.npz")):
        with np.load(path) as cached:
            for truth, predicted in zip(cached["gt"].ravel(), cached[key].ravel()):
                if truth == VOC.ignore_index:
                    continue
                if 0 <= predicted < VOC.num_classes:
                    confusion[truth, predicted] += 1
                else:
                    missed[truth] += 1
    hits, gt_pixels = np.diag(confusion), confusion.sum(1) + missed
    present = gt_pixels > 0
    iou = hits[present] / (gt_pixels + confusion.sum(0) - hits)[present]
    return 100 * iou.mean(), 100 * hits.sum() / gt_pixels.sum()


@pytest.mark.parametrize("method, key", [("emerdiff", "ov_labels"), ("maskclip", "ov_labels_baseline")])
def test_reported_scores_equal_a_hand_computation_from_the_cached_label_maps(fresh_run, method, key):
    scores = read_results(fresh_run)["results"][method]
    miou, pixel_acc = hand_scores(fresh_run, key)
    assert pixel_acc > 0  # some pixels right, so the comparison below is not between zeros
    assert scores["miou"] == pytest.approx(miou, abs=1e-9)
    assert scores["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-9)


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


def test_labels_cached_with_other_clip_settings_are_refused_naming_the_setting(tools, fresh_run, voc_root, tmp_path,
                                                                               capsys, monkeypatch):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    forbid(monkeypatch, SD, CLIP)
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main(ov_command(voc_root, tmp_path, "ovseg.templates=imagenet"))
    assert exit_info.value.code == 2
    assert "ovseg.templates: 'maskclip' -> 'imagenet'" in capsys.readouterr().err


def test_vocabulary_with_another_class_count_than_the_split_is_a_clear_error(tools, voc_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main([*ov_command(voc_root, tmp_path), "--vocab", "cat,dog,grass"])
    assert exit_info.value.code == 2
    assert "3 classes but voc2012_val has 21" in capsys.readouterr().err


def test_unknown_encoder_is_a_clear_error_listing_the_valid_ones(tools, voc_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools["ov_eval"].main(ov_command(voc_root, tmp_path, "ovseg.encoder=tcl"))
    assert exit_info.value.code == 2
    assert "ovseg.encoder='tcl' is unknown; valid: maskclip" in capsys.readouterr().err


def test_two_process_ddp_over_full_caches_gives_the_numbers_of_one_process(fresh_run, voc_root, tmp_path):
    shutil.copytree(fresh_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "ov" / "results.json").unlink()
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    subprocess.run([sys.executable, str(REPO / "tools/ov_eval.py"), *ov_command(voc_root, tmp_path, *ddp)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    assert read_results(tmp_path)["results"] == read_results(fresh_run)["results"]


# --- the per-image step, without Stable Diffusion ---------------------------------------------------


class ColourEncoder(nn.Module):
    """A DenseEncoder whose embedding of a patch is its mean colour: red, green and blue are 'classes'."""

    stride, embed_dim, mean, std = 8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2] % self.stride == 0 and images.shape[-1] % self.stride == 0
        return nn.functional.normalize(nn.functional.avg_pool2d(images, self.stride), dim=1)


def test_labeller_names_each_mask_and_the_baseline_on_an_image_of_any_size():
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    image[:, :35, 0] = 255  # left half red
    image[:, 35:, 1] = 255  # right half green
    segments = np.zeros((50, 70), dtype=np.int64)
    segments[:, 35:] = 1
    labeller = OpenVocabLabeller(ColourEncoder(), torch.eye(3))  # classes: red, green, blue
    named = labeller(image, segments, num_masks=3)
    assert named.mask_classes.tolist() == [0, 1, UNLABELLED]  # mask 2 has no pixel
    assert torch.equal(named.labels, torch.from_numpy(segments))
    assert named.baseline.shape == (50, 70)
    assert (named.baseline[:, :30] == 0).all() and (named.baseline[:, 40:] == 1).all()
    assert patch_multiple(50, 8) == 48 and patch_multiple(70, 8) == 72 and patch_multiple(3, 8) == 8


def test_random_clip_is_the_same_in_every_build_so_ddp_ranks_agree(tmp_path):
    settings = OVSegConfig(vocab="voc", clip_model="ovseg-tiny", clip_pretrained=None)
    vocab = read_vocabulary("voc")
    first, second = (build_labeller(settings, vocab, tmp_path) for _ in range(2))
    image = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    assert torch.equal(first.text, second.text)
    assert torch.equal(first.dense_embeddings(image), second.dense_embeddings(image))
    assert first.dense_embeddings(image).shape == (32, 4, 6)


def test_cached_labels_depend_on_the_vocabulary_content_and_clip_side_not_on_caches_or_paper_numbers():
    vocab = read_vocabulary("cat,dog")
    base = open_vocab_settings({}, OVSegConfig(vocab="cat,dog"), vocab)
    elsewhere = OVSegConfig(vocab="cat,dog", clip_cache_dir="/x", text_cache_dir="/y", paper_miou={"emerdiff": 1.0},
                            paper_note="n")
    assert open_vocab_settings({}, elsewhere, vocab) == base
    assert open_vocab_settings({}, OVSegConfig(vocab="cat,dog", window=112), vocab) != base
    assert open_vocab_settings({}, OVSegConfig(vocab="cat,dog"), read_vocabulary("cat,wolf")) != base


def test_threshold_needs_a_vocabulary_with_a_background_class(tmp_path):
    settings = OVSegConfig(vocab="cat,dog", clip_model="ovseg-tiny", clip_pretrained=None, background_threshold=0.2)
    with pytest.raises(ValueError, match="background"):
        build_labeller(settings, read_vocabulary("cat,dog"), tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ov").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ov_config_names_a_split_its_vocabulary_fits_and_shares_eval_masks(path):
    cfg = load_config(path, overrides=["data.root=/data/x"])
    assert cfg.data.dataset in DATASETS
    assert len(read_vocabulary(cfg.ovseg.vocab)) == dataset_metadata(cfg.data.dataset).num_classes
    assert set(cfg.ovseg.paper_miou) <= {"maskclip", "emerdiff"}
    twins = [load_config(p) for p in (REPO / "configs" / "eval").glob("*.yaml")]
    twin = next(t for t in twins if t.data.dataset == cfg.data.dataset)
    # the same prediction settings, so tools/eval.py and tools/ov_eval.py share OUTPUT/cache
    assert cfg.data.size == twin.data.size and cfg.segmentor == twin.segmentor and cfg.model == twin.model
