"""tools/predict.py (and tools/visualize.py) end to end on real photos with the miniature model: outputs,
failures, resume, DDP, and which packages a run imports."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data

from conftest import REPO, TINY, assert_same_segmentation, imported_packages
from emerdiff import ConfigError
from emerdiff.files import read_jsonl
from emerdiff.cli import predict, sample_images, visualize
from emerdiff.cli.common.trainer import build_trainer, check_trainer_keys
from emerdiff.predict import OutputOptions, OutputStore

SMALL = ["segmentor.resolution=64", "segmentor.num_masks=3", "segmentor.keep_diff_maps=true"]
GOOD = ["animals/chelsea", "astronaut", "coffee", "gray/camera", "objects/rocket"]
BAD = ["animals/empty", "broken"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five real photos (one grayscale) in nested folders, plus a text file named .jpg and an empty .png."""
    root = tmp_path_factory.mktemp("photos")
    for name, image in [("astronaut.png", data.astronaut()), ("coffee.jpg", data.coffee()),
                        ("animals/chelsea.png", data.chelsea()), ("objects/rocket.jpg", data.rocket()),
                        ("gray/camera.png", data.camera())]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(image)
        small.thumbnail((120, 120))
        small.save(root / name)
    (root / "broken.jpg").write_text("this is not a JPEG")
    (root / "animals" / "empty.png").write_bytes(b"")
    return root


def _cli(photos: Path, out: Path, *extra: str) -> list:
    return ["--cfg", str(TINY), "--input", str(photos), "--output", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    """One in-process run over the photos with a DataLoader worker: the results other runs must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert predict.main(_cli(photos, out, "data.num_workers=1")) == 1  # some images failed: status 1
    return out


def _labels(out: Path, name: str) -> np.ndarray:
    with np.load(out / f"{name}.npz") as arrays:
        return arrays["labels"]


def _assert_same_results(out: Path, reference: Path, names) -> None:
    """Difference maps equal to float tolerance, labels equal wherever the maps are not tied (across processes)."""
    for name in names:
        with np.load(out / f"{name}.npz") as got, np.load(reference / f"{name}.npz") as want:
            assert_same_segmentation(*(SimpleNamespace(labels=torch.from_numpy(a["labels"]),
                                                       diff_maps=torch.from_numpy(a["diff_maps"]),
                                                       num_masks=len(a["lowres_masks"])) for a in (got, want)))


def _script(tool: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_folder_run_writes_every_output_keeping_folders_and_lists_unreadable_files(reference, photos):
    for name in GOOD:
        for ending in (".png", "_overlay.jpg", ".npz"):
            assert (reference / f"{name}{ending}").is_file(), name + ending
        with np.load(reference / f"{name}.npz") as arrays:
            assert {"labels", "labels_bilinear", "lowres_masks", "mask_embeddings"} <= set(arrays.files)
            assert arrays["diff_maps"].shape == (len(arrays["lowres_masks"]), *arrays["labels"].shape)
            assert 1 <= len(arrays["lowres_masks"]) <= 3
    manifest = read_jsonl(reference / "manifest.jsonl")
    assert [r["name"] for r in manifest] == GOOD
    with Image.open(photos / "coffee.jpg") as img:
        assert manifest[2]["size"] == [img.height, img.width] and manifest[2]["path"] == str(photos / "coffee.jpg")
    assert all(r["seconds"] > 0 and 1 <= r["num_masks"] <= 3 for r in manifest)
    failures = read_jsonl(reference / "failures.jsonl")
    assert [f["name"] for f in failures] == BAD
    assert "0 bytes" in failures[0]["error"] and "not a readable image" in failures[1]["error"]
    assert not list(reference.rglob("*.emerdiff-tmp")) and not (reference / ".parts").exists()
    saved = OmegaConf.load(reference / "config.yaml")
    assert saved.segmentor.resolution == 64 and saved.data.input == str(photos)


def test_label_png_at_the_input_size_equals_the_npz_labels(reference, photos):
    for name in GOOD:
        source = next(photos.glob(f"{name}.*"))
        with Image.open(reference / f"{name}.png") as png, Image.open(source) as photo:
            assert png.mode == "P" and png.size == photo.size
            np.testing.assert_array_equal(np.asarray(png), _labels(reference, name))
        with Image.open(reference / f"{name}_overlay.jpg") as overlay:
            assert overlay.size == photo.size


def test_rerun_skips_done_images_and_retries_failures(reference, photos, capsys):
    stamps = {name: (reference / f"{name}.npz").stat().st_mtime_ns for name in GOOD}
    assert predict.main(_cli(photos, reference, "data.num_workers=0")) == 1  # the unreadable ones fail again
    printed = capsys.readouterr().out
    assert "5 already done" in printed and "2 to segment" in printed and "0 segmented, 2 failed" in printed
    assert stamps == {name: (reference / f"{name}.npz").stat().st_mtime_ns for name in GOOD}
    assert [r["name"] for r in read_jsonl(reference / "manifest.jsonl")] == GOOD


def test_single_file_run_announces_the_random_model_and_overwrite_redoes_it(reference, photos, tmp_path, capsys):
    single, out = photos / "astronaut.png", tmp_path / "out"
    assert predict.main(_cli(single, out)) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "carry no meaning" in printed and "1 segmented" in printed
    before = (out / "astronaut.npz").stat().st_mtime_ns
    assert predict.main(_cli(single, out, "--overwrite")) == 0
    assert (out / "astronaut.npz").stat().st_mtime_ns > before
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == ["astronaut"]
    _assert_same_results(out, reference, ["astronaut"])


def test_later_cfg_files_then_overrides_and_flags_win_and_reach_the_results(photos, tmp_path: Path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("segmentor:\n  num_masks: 5\n  resolution: 64\noutput:\n  overlay: false\n")
    out = tmp_path / "out"
    args = ["--cfg", str(TINY), "--cfg", str(extra), "segmentor.num_masks=2", "--input",
            str(photos / "coffee.jpg"), "--output", str(out), "segmentor.keep_diff_maps=true", "--figure"]
    assert predict.main(args) == 0
    saved = OmegaConf.load(out / "config.yaml")
    assert (saved.model.pretrained, saved.segmentor.resolution, saved.segmentor.num_masks) == ("tiny", 64, 2)
    with np.load(out / "coffee.npz") as arrays:
        assert len(arrays["lowres_masks"]) <= 2 and arrays["diff_maps"].shape[1:] == arrays["labels"].shape
    assert not (out / "coffee_overlay.jpg").exists() and (out / "coffee_figure.png").is_file()


@pytest.mark.parametrize("override, named", [
    ("segmentor.num_mask=3", r"'segmentor\.num_mask'.*segmentor\.num_masks"),
    ("trainer.devicez=2", r"'trainer\.devicez'.*trainer\.devices"),
    ("trainer.callbacks=[]", r"trainer\.callbacks cannot be configured"),
])
def test_unknown_or_reserved_keys_stop_the_run_with_an_error_naming_them(photos, tmp_path, capsys, override, named):
    with pytest.raises(SystemExit) as stop:
        predict.main(_cli(photos, tmp_path / "out", override))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(named, err)
    assert not list((tmp_path / "out").rglob("*.npz"))


@pytest.mark.parametrize("override, named", [
    ("ovseg.templates=nope", "templates"), ("ovseg.encoder=nope", "encoder"),
    ("ovseg.background_threshold=0.2", "background"),  # cat,dog has no background class
])
def test_bad_naming_settings_stop_the_run_before_anything_is_written(photos, tmp_path, capsys, override, named):
    with pytest.raises(SystemExit) as stop:
        predict.main(_cli(photos, tmp_path / "out", "ovseg.vocab=cat,dog", override))
    assert stop.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_a_run_that_failed_before_any_result_leaves_the_folder_free_for_other_settings(photos, tmp_path, capsys):
    coffee, out = photos / "coffee.jpg", tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        predict.main(_cli(coffee, out, f"model.pretrained={tmp_path / 'missing.safetensors'}"))
    assert stop.value.code == 2 and "missing.safetensors" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()  # written only once the models are loaded
    assert predict.main(_cli(coffee, out)) == 0
    assert (out / "coffee.npz").is_file()


def test_results_folder_of_other_settings_is_refused_naming_what_changed(reference, photos, capsys):
    with pytest.raises(SystemExit):
        predict.main(_cli(photos, reference, "segmentor.lam=3"))
    assert "segmentor.lam: 10.0 -> 3.0" in capsys.readouterr().err


def test_missing_input_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict.main(_cli(tmp_path / "nowhere", tmp_path / "out"))
    assert "nowhere' does not exist" in capsys.readouterr().err


def test_killed_run_resumes_with_every_image_done_exactly_once(reference, photos, tmp_path: Path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tools" / "predict.py"), *_cli(photos, out, "data.num_workers=1")]
    store = OutputStore(out, OutputOptions())
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while not store.manifest():  # kill it as soon as the first image is recorded
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)  # the run and its DataLoader worker
        first.wait()
    done_before = store.manifest()
    assert 1 <= len(done_before) < len(GOOD)
    for path in out.rglob("*.npz"):  # whatever the kill left is complete, never truncated
        np.load(path)["labels"]
    stamps = {name: (out / f"{name}.npz").stat().st_mtime_ns for name in done_before}

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr  # the two unreadable images fail again
    assert f"{len(done_before)} already done" in second.stdout
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == GOOD
    assert stamps == {name: (out / f"{name}.npz").stat().st_mtime_ns for name in done_before}
    assert not list(out.rglob("*.emerdiff-tmp")) and not (out / ".parts").exists()
    _assert_same_results(out, reference, GOOD)


def test_two_ddp_processes_write_exactly_the_images_of_one_process(reference, photos, tmp_path: Path):
    out = tmp_path / "ddp"
    run = _script("predict.py", *_cli(photos, out, "trainer.accelerator=cpu", "trainer.devices=2",
                                      "trainer.strategy=ddp", "data.num_workers=0"))
    assert run.returncode == 1, run.stderr
    assert "5 segmented, 2 failed" in run.stdout
    assert run.stderr.count("skipped ") == len(BAD)  # each unreadable image met by one rank only
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file()
                      and "_figure" not in p.name)
    assert written == expected
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == GOOD
    assert [f["name"] for f in read_jsonl(out / "failures.jsonl")] == BAD
    _assert_same_results(out, reference, GOOD)


def test_visualize_draws_a_four_panel_figure_for_every_done_image(reference, capsys):
    assert visualize.main(["--output", str(reference)]) == 0
    assert "drew 5 figures" in capsys.readouterr().out
    for name in GOOD:
        with Image.open(reference / f"{name}_figure.png") as figure, Image.open(reference / f"{name}.png") as png:
            assert figure.width == 4 * png.width and figure.height > png.height


def test_sample_images_tool_writes_real_photos_in_subfolders(tmp_path: Path):
    assert sample_images.main([str(tmp_path)]) == 0
    photos = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert photos == ["animals/chelsea.jpg", "astronaut.png", "coffee.jpg", "objects/rocket.jpg"]


def test_trainer_keys_are_checked_against_the_trainer_signature():
    check_trainer_keys({"devices": 2, "strategy": "ddp", "num_nodes": 2, "precision": "16-mixed"})
    with pytest.raises(ConfigError, match=r"'trainer.devicez'.*trainer.devices"):
        check_trainer_keys({"devicez": 2})
    with pytest.raises(ConfigError, match="trainer.use_distributed_sampler cannot be configured"):
        build_trainer({"use_distributed_sampler": True}, use_distributed_sampler=False)


def test_trainer_logger_takes_csv_or_tensorboard_under_the_output_and_names_the_choices_otherwise(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    for choice, kind in (("csv", CSVLogger), ("tensorboard", TensorBoardLogger)):
        trainer = build_trainer({"logger": choice, "accelerator": "cpu"}, default_root_dir=str(tmp_path / choice))
        assert isinstance(trainer.logger, kind) and Path(trainer.logger.log_dir).parent == tmp_path / choice / "logs"
    assert build_trainer({"accelerator": "cpu"}, default_root_dir=str(tmp_path)).logger is None  # off by default
    with pytest.raises(ConfigError, match="trainer.logger: 'wandb' is not valid; choose from false, true, csv, "
                                          "tensorboard"):
        build_trainer({"logger": "wandb"}, default_root_dir=str(tmp_path))


def test_a_run_that_does_not_name_masks_never_imports_open_clip(reference, photos):
    run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tools" / "predict.py"),
                          *_cli(photos, reference, "data.num_workers=0")],  # retries the two unreadable files
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "2 to segment" in run.stdout, run.stderr[-2000:]
    assert {"emerdiff", "pytorch_lightning"} <= imported_packages(run.stderr)
    assert "open_clip" not in imported_packages(run.stderr) and "ovseg.outputs" not in run.stderr


def test_visualize_never_imports_open_clip_or_the_ovseg_pipeline(reference):
    run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tools" / "visualize.py"),
                          "--output", str(reference)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "drew 5 figures" in run.stdout, run.stderr[-2000:]
    assert "emerdiff" in imported_packages(run.stderr) and "open_clip" not in imported_packages(run.stderr)
    assert "ovseg.labeller" not in run.stderr and "ovseg.outputs" not in run.stderr
