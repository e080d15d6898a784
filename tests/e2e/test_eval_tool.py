"""tools/eval.py end to end on real labelled photos in VOC layout, with the miniature random SD.

The scores of a random model mean nothing; these tests check the bookkeeping: cache, resume,
rescoring without the model, DDP reduction, and agreement with a hand computation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from conftest import REPO, TINY, load_tool, voc_folder
import emerdiff
from emerdiff import load_config
from emerdiff.data import DATASETS, build_dataset, dataset_metadata
from emerdiff.choices import PROTOCOLS
from emerdiff.evaluation import METHODS

VOC = dataset_metadata("voc2012_val")
SIZE = 96  # evaluated resolution: shorter side resized to 96, central 96 x 96 crop
# A short scheduler grid (t_m = 201 lies on the 10-step grid) keeps the miniature SD fast on a CPU.
FAST = ["segmentor.resolution=128", "segmentor.num_masks=3", "segmentor.num_inference_steps=10",
        "segmentor.t_modulate=201", f"data.size={SIZE}", "data.num_workers=0"]
CACHE_KEYS = {"gt", "labels", "labels_bilinear", "lowres_masks", "mask_embeddings"}
TOOL = [sys.executable, str(REPO / "tools" / "eval.py")]
# One thread per process, here and in the subprocesses: on the shared 2-core machine OpenMP threads
# waiting for each other make the miniature model ~10x slower, and DDP ranks get one thread each
# anyway (the same thread count keeps float rounding, hence predictions, identical across runs).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--cfg", str(REPO / "configs/eval/voc.yaml"), "--cfg", str(TINY), f"data.root={root}",
            "--output", str(out), *FAST, *extra]


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and faiss thread in this process while these tests run (see ONE_THREAD_ENV)."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def eval_tool():
    return load_tool("eval")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return voc_folder(tmp_path_factory.mktemp("voc") / "VOC2012")


@pytest.fixture(scope="module")
def first_run(eval_tool, voc_root, tmp_path_factory) -> Path:
    """One uninterrupted single-process evaluation; the reference for the other runs."""
    out = tmp_path_factory.mktemp("run")
    assert eval_tool.main(command(voc_root, out)) == 0
    return out


def test_one_command_writes_every_protocol_for_both_methods_and_a_table(first_run):
    results = read_results(first_run)
    assert results["dataset"] == "voc2012_val" and results["num_images"] == 3
    assert (results["emerdiff_version"], results["format_version"]) == (emerdiff.__version__, 1)
    for method in METHODS:
        assert list(results["results"][method]) == ["hungarian", "dataset", "concept_image", "concept_dataset"]
        for scores in results["results"][method].values():
            assert 0 <= scores["miou"] <= 100 and 0 <= scores["pixel_acc"] <= 100
            assert len(scores["iou"]) == VOC.num_classes
            if scores["miou_convention"] == "detectron2":
                assert scores["iou"]["aeroplane"] is None  # absent from the photo: no IoU, not averaged
            else:  # stego: a cluster paired with the absent class makes it count, with IoU 0
                assert scores["iou"]["aeroplane"] in (None, 0.0)
    table = (first_run / "results.md").read_text()
    assert "| per-image Hungarian |" in table and "| dataset-level k-means + Hungarian (Table 1) |" in table
    assert "EmerDiff mIoU | paper | bilinear mIoU | paper" in table
    assert "random weights" in table  # the miniature model's numbers are flagged as meaningless
    assert "used 9 k-means clusters instead of 21" in table  # 3 images x 3 masks < 21 classes


def test_cache_holds_each_image_at_the_evaluated_resolution(first_run, voc_root):
    dataset = build_dataset("voc2012_val", voc_root, size=SIZE)
    for item in dataset:
        with np.load(first_run / "cache" / f"{item['meta']['id']}.npz") as cached:
            assert CACHE_KEYS <= set(cached.files)
            assert np.array_equal(cached["gt"], item["label"])
            assert cached["labels"].shape == cached["labels_bilinear"].shape == (SIZE, SIZE)
            assert len(cached["lowres_masks"]) == len(cached["mask_embeddings"])
    assert not list((first_run / "cache").glob(".*"))  # no temporary files left behind


def hand_hungarian(segments: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Confusion (C x C+1, last column = unmatched) of one image matched one-to-one on IoU, written from scratch."""
    valid = gt != ignore
    seg, cls = segments[valid], gt[valid]
    k = segments.max() + 1
    inter = np.zeros((k, num_classes))
    for s, c in zip(seg, cls):
        inter[s, c] += 1
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    segment_class = np.full(k, num_classes)  # unmatched segments predict "no class"
    for r, c in zip(rows, cols):
        if inter[r, c] > 0:
            segment_class[r] = c
    confusion = np.zeros((num_classes, num_classes + 1))
    for s, c in zip(seg, cls):
        confusion[c, segment_class[s]] += 1
    return confusion


def cached_hungarian_confusion(cache: Path, key: str) -> np.ndarray:
    """The per-image Hungarian confusion summed over the cached predictions of `key`, computed by hand."""
    confusion = np.zeros((VOC.num_classes, VOC.num_classes + 1))
    for path in sorted(cache.glob("*.npz")):
        with np.load(path) as cached:
            confusion += hand_hungarian(cached[key], cached["gt"], VOC.num_classes, VOC.ignore_index)
    return confusion


def test_hungarian_scores_equal_a_hand_computation_from_the_cached_files(first_run):
    results = read_results(first_run)["results"]
    for method, key in (("emerdiff", "labels"), ("bilinear", "labels_bilinear")):
        confusion = cached_hungarian_confusion(first_run / "cache", key)
        tp, gt_pixels = np.diag(confusion), confusion.sum(1)
        present = gt_pixels > 0
        iou = tp[present] / (gt_pixels + confusion[:, :-1].sum(0) - tp)[present]
        assert results[method]["hungarian"]["miou"] == pytest.approx(100 * iou.mean(), abs=1e-9)
        assert results[method]["hungarian"]["pixel_acc"] == pytest.approx(100 * tp.sum() / gt_pixels.sum(), abs=1e-9)


def test_results_name_each_protocols_convention_and_a_forced_one_rescores_the_cache_without_the_model(
        eval_tool, first_run, voc_root, tmp_path, monkeypatch):
    results = read_results(first_run)["results"]
    for method in METHODS:
        assert {p: s["miou_convention"] for p, s in results[method].items()} == {
            "hungarian": "detectron2", "dataset": "stego", "concept_image": "detectron2",
            "concept_dataset": "detectron2"}
    assert "| dataset-level k-means + Hungarian (Table 1) |" in (first_run / "results.md").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every image is cached")

    monkeypatch.setattr("emerdiff.models.build_random_sd", no_model)
    shutil.copytree(first_run / "cache", tmp_path / "cache")
    assert eval_tool.main(command(voc_root, tmp_path, "eval.miou_convention=mmseg", "eval.protocols=[hungarian]")) == 0
    rescored = read_results(tmp_path)
    assert rescored["protocol_settings"]["miou_convention"] == "mmseg"
    for method, key in (("emerdiff", "labels"), ("bilinear", "labels_bilinear")):
        confusion = cached_hungarian_confusion(first_run / "cache", key)
        tp, gt_pixels = np.diag(confusion), confusion.sum(1)
        union = gt_pixels + confusion[:, :-1].sum(0) - tp
        assert rescored["results"][method]["hungarian"]["miou_convention"] == "mmseg"
        assert rescored["results"][method]["hungarian"]["miou"] == pytest.approx(
            100 * (tp[union > 0] / union[union > 0]).mean(), abs=1e-9)


def test_rescoring_a_full_cache_never_loads_the_model_and_gives_identical_results(
        eval_tool, first_run, voc_root, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every image is cached")

    monkeypatch.setattr("emerdiff.models.build_random_sd", no_model)
    shutil.copytree(first_run / "cache", tmp_path / "cache")
    assert eval_tool.main(command(voc_root, tmp_path)) == 0
    assert (tmp_path / "results.json").read_text() == (first_run / "results.json").read_text()

    # another protocol is scored from the same cache and merged: the earlier protocols' numbers stay
    assert eval_tool.main(command(voc_root, tmp_path, "eval.protocols=[majority,hungarian]")) == 0
    rescored, reference = read_results(tmp_path)["results"], read_results(first_run)["results"]
    assert list(rescored["emerdiff"]) == ["hungarian", "majority", "dataset", "concept_image", "concept_dataset"]
    for protocol in ("hungarian", "dataset", "concept_image", "concept_dataset"):
        assert rescored["emerdiff"][protocol] == reference["emerdiff"][protocol]


def test_a_csv_logger_records_the_scores_of_results_json(eval_tool, first_run, voc_root, tmp_path):
    shutil.copytree(first_run / "cache", tmp_path / "cache")  # a rescore: no model
    assert eval_tool.main(command(voc_root, tmp_path, "trainer.logger=csv")) == 0
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        logged = next(csv.DictReader(handle))
    scores = read_results(tmp_path)["results"]
    for method in ("emerdiff", "bilinear"):
        for protocol, value in scores[method].items():
            assert float(logged[f"{method}/{protocol}/miou"]) == pytest.approx(value["miou"], rel=1e-6)


def test_the_voc_photos_as_a_labelled_folder_score_exactly_as_the_voc_split(eval_tool, first_run, voc_root, tmp_path):
    folder = tmp_path / "mine"  # images/, labels/ (VOC's palette PNGs) and classes.txt: a user's own folder
    shutil.copytree(voc_root / "JPEGImages", folder / "images")
    shutil.copytree(voc_root / "SegmentationClass", folder / "labels")
    (folder / "classes.txt").write_text("\n".join(VOC.classes) + "\n")
    out = tmp_path / "out"
    argv = ["--cfg", "eval/folder", "--cfg", "tiny", f"data.root={folder}", "--output", str(out), *FAST]
    assert eval_tool.main(argv) == 0
    assert read_results(out)["results"] == read_results(first_run)["results"]


def test_cache_made_with_other_settings_is_refused_naming_the_setting(eval_tool, first_run, voc_root, tmp_path,
                                                                      capsys):
    shutil.copytree(first_run / "cache", tmp_path / "cache")
    with pytest.raises(SystemExit) as exit_info:
        eval_tool.main(command(voc_root, tmp_path, "segmentor.lam=5"))
    assert exit_info.value.code == 2
    assert "segmentor.lam: 10.0 -> 5.0" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [("eval.protocols=[hungarian,typo]", "eval.protocols"),
                                               ("eval.match_criterion=dice", "eval.match_criterion")])
def test_bad_eval_setting_stops_the_tool_before_any_prediction(eval_tool, voc_root, tmp_path, capsys, override,
                                                                message):
    with pytest.raises(SystemExit) as exit_info:
        eval_tool.main(command(voc_root, tmp_path, override))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_killed_evaluation_resumes_without_recomputing_finished_images(eval_tool, first_run, voc_root, tmp_path,
                                                                       monkeypatch):
    process = subprocess.Popen(TOOL + command(voc_root, tmp_path), cwd=REPO, env=ONE_THREAD_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*.npz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((tmp_path / "cache").glob("*.npz")))
    assert 1 <= finished < 3, "the run must be killed after its first image and before its last"

    from emerdiff.segmentor import EmerDiff

    calls = []
    segment = EmerDiff.segment
    monkeypatch.setattr(EmerDiff, "segment", lambda self, image: calls.append(1) or segment(self, image))
    assert eval_tool.main(command(voc_root, tmp_path)) == 0
    assert len(calls) == 3 - finished
    assert (tmp_path / "results.json").read_text() == (first_run / "results.json").read_text()


def test_two_process_ddp_gives_the_numbers_of_one_process(first_run, voc_root, tmp_path):
    # 3 images on 2 ranks: a sampler that pads with repeats would score one image twice
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    subprocess.run(TOOL + command(voc_root, tmp_path, *ddp), cwd=REPO, env=ONE_THREAD_ENV, check=True,
                   capture_output=True, timeout=300)
    results = read_results(tmp_path)
    assert results["num_images"] == 3
    assert results["results"] == read_results(first_run)["results"]


# --- the shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_eval_config_names_a_registered_split_and_only_known_paper_entries(path):
    cfg = load_config(path, overrides=["data.root=/data/x"])
    assert cfg.data.dataset in DATASETS
    assert cfg.data.size == (128 if cfg.data.dataset == "toyworld_val" else 512)  # the toy world's scenes: 128 px
    for protocol, by_method in cfg.eval.paper_miou.items():
        assert protocol in PROTOCOLS and set(by_method) <= set(METHODS)
    if cfg.data.image_list is not None:
        assert cfg.data.image_list.startswith("/data/x/")


def test_an_image_whose_prediction_fails_is_skipped_and_listed_and_the_rest_are_scored(eval_tool, voc_root,
                                                                                       tmp_path, monkeypatch):
    from emerdiff.segmentor import EmerDiff

    segment = EmerDiff.segment

    def failing_on_the_crop(self, image):  # the third photo is the 300 x 400 crop
        if image.shape[0] == 300:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return segment(self, image)

    monkeypatch.setattr(EmerDiff, "segment", failing_on_the_crop)
    out = tmp_path / "out"
    assert eval_tool.main(["--cfg", str(REPO / "configs/eval/voc.yaml"), "--cfg", str(TINY), f"data.root={voc_root}",
                          "--output", str(out), "data.size=null", "segmentor.resolution=64",
                          "segmentor.num_inference_steps=10", "segmentor.t_modulate=201",
                          "eval.protocols=[hungarian]", "data.num_workers=0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 2
    assert results["skipped"] == [{"id": "2007_000003", "type": "RuntimeError",
                                   "error": "CUDA error: an illegal memory access was encountered"}]
    assert "2 images" in (out / "results.md").read_text() and "2007_000003 (RuntimeError)" in \
        (out / "results.md").read_text()
