"""tools/selfcheck.py: passes on the miniature model, and each deliberately broken component fails its own check."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, load_tool
import emerdiff
from emerdiff import EmerDiff, load_config
from emerdiff.config import preset_settings
from emerdiff.selfcheck import run_selfcheck
from emerdiff.selfcheck_report import PASS, SKIPPED, Check, SelfCheckReport

# Small and quick: 128 px (a 4 x 4 feature grid), a 10-step grid with t_m = 301 (4 steps), K = 3.
FAST = ["segmentor.resolution=128", "segmentor.num_inference_steps=10", "segmentor.t_modulate=301",
        "segmentor.num_masks=3", "segmentor.kmeans_restarts=1"]
CHECKS = {"replay", "injection", "fast_vs_reference", "fast_vs_reference_labels", "lambda_zero", "faiss_gpu", "memory"}


@pytest.fixture(scope="module")
def model(tiny_components) -> EmerDiff:
    return EmerDiff(tiny_components, OmegaConf.to_object(load_config(TINY, overrides=FAST).segmentor))


def failed(report) -> set:
    return {c.name for c in report.failed}


def test_selfcheck_tool_passes_on_the_miniature_model_and_writes_every_check(tmp_path, photo, capsys):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(photo).save(image)
    out = tmp_path / "check"
    status = load_tool("selfcheck").main(["--cfg", str(TINY), "--image", str(image), "--output", str(out), *FAST,
                                          "--small-k", "2", "segmentor.memory_budget_gb=auto"])
    assert status == 0, capsys.readouterr().out
    report = json.loads((out / "selfcheck.json").read_text())
    assert report["passed"] and report["failed"] == []
    assert (report["emerdiff_version"], report["format_version"]) == (emerdiff.__version__, 1)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == CHECKS
    for name in CHECKS - {"faiss_gpu", "memory"}:
        assert checks[name]["status"] == PASS and checks[name]["figure"] is not None, checks[name]
        assert checks[name]["threshold"] is not None
    assert checks["replay"]["figure"] < 1e-4  # float32: exact up to rounding
    assert checks["injection"]["figure"] == 1.0  # every layer at every step
    assert checks["lambda_zero"]["figure"] == 0.0  # identical +/- variants
    # no GPU here: the GPU-only checks say so instead of passing
    assert checks["faiss_gpu"]["status"] == SKIPPED and "no GPU" in checks["faiss_gpu"]["detail"]
    assert checks["memory"]["status"] == SKIPPED and "CUDA only" in checks["memory"]["detail"]
    env = report["environment"]
    for key in ("torch", "cuda (torch build)", "gpu", "diffusers", "faiss", "dtype"):
        assert key in env
    assert env["dtype"] == "float32"
    assert report["settings"]["memory_budget_gb"] == "auto" and report["settings"]["memory_budget_chosen_gib"] > 0
    timing = report["timing"]
    assert timing["default_masks"] == 3 and timing["images_per_second"] > 0
    assert set(timing["seconds"]) >= {"encode", "features", "kmeans", "inversion", "modulated", "decode"}
    markdown = (out / "selfcheck.md").read_text()
    assert "all checks passed" in markdown and all(name in markdown for name in CHECKS)
    preset = report["preset"]  # the shipped approximate preset against the exact path on this image
    assert preset["name"] == "fast" and preset["settings"] == preset_settings("fast")
    assert 0 <= preset["agreement"] <= 1 and preset["speedup"] > 0 and preset["holds"] == (preset["agreement"] >= 0.95)
    assert "Approximate preset (--cfg fast)" in markdown
    printed = capsys.readouterr().out
    assert "self-check passed" in printed and "preset fast: " in printed and "x faster" in printed


def test_a_preset_without_approximations_labels_every_pixel_as_the_exact_path(model, photo):
    from emerdiff.image import load_image
    from emerdiff.selfcheck import compare_preset

    preset = compare_preset(model, load_image(photo), {"chunk_size": 1}, "same")  # a run-only setting: same labels
    assert preset["agreement"] == 1.0 and preset["holds"]
    assert preset["exact_seconds"] > 0 and preset["preset_seconds"] > 0


def test_the_shipped_fast_preset_holds_only_segmentor_approximations_and_a_bad_preset_is_refused(tmp_path):
    from emerdiff.config import ConfigError, SegmentorConfig

    fast = preset_settings("fast")
    assert fast and all(value != getattr(SegmentorConfig(), key) for key, value in fast.items())
    bad = tmp_path / "bad.yaml"
    bad.write_text("segmentor:\n  one_step_estimate: true\nmodel:\n  dtype: float16\n")
    with pytest.raises(ConfigError, match="may only hold a segmentor section"):
        preset_settings(bad)


def test_a_replay_that_does_not_reconstruct_fails_the_replay_check(model, photo, monkeypatch):
    invert = EmerDiff.invert

    def corrupted_noise_maps(self, z0, generator, chunk_size=0):
        inversion, record = invert(self, z0, generator, chunk_size)
        inversion.noise[1] += 0.5  # one step's noise map no longer leads to the next latent
        return inversion, record

    monkeypatch.setattr(EmerDiff, "invert", corrupted_noise_maps)
    report = run_selfcheck(model, photo, small_k=2, timed=False)
    assert failed(report) == {"replay"}
    assert report.check("replay").figure > 10 * report.check("replay").threshold


def test_an_injection_that_never_runs_fails_the_injection_check(model, photo, monkeypatch):
    settings = EmerDiff.modulation_settings

    def without_injection(self, chunk_size=0):
        broken = settings(self, chunk_size)
        broken.injection = False  # the recorded Q/K are never used
        return broken

    monkeypatch.setattr(EmerDiff, "modulation_settings", without_injection)
    report = run_selfcheck(model, photo, small_k=2, timed=False)
    assert failed(report) == {"injection"}
    assert report.check("injection").figure == 0.0


def test_a_fast_path_that_drifts_from_the_reference_fails_the_fast_vs_reference_check(model, photo, monkeypatch):
    import emerdiff.processors as processors

    shared = processors.shared_attention
    # the fast path's shared softmax(QK^T) (used only when one Q/K serves several variants) is 1 % off
    monkeypatch.setattr(processors, "shared_attention", lambda *args: shared(*args) * 1.01)
    report = run_selfcheck(model, photo, small_k=2, timed=False)
    assert "fast_vs_reference" in failed(report)
    assert failed(report) <= {"fast_vs_reference", "fast_vs_reference_labels"}


def test_the_tool_exits_non_zero_naming_the_failed_check_and_what_to_report(tmp_path, monkeypatch, capsys):
    def one_failed_check(model, image=None, small_k=2, log=print, **preset):
        return SelfCheckReport({"torch": torch.__version__}, {}, [
            Check.measured("replay", "unmodulated replay reproduces z0", 0.5, 1e-4),
            Check.measured("lambda_zero", "lambda = 0 gives zero maps", 0.0, 1e-5)])

    tool = load_tool("selfcheck")
    monkeypatch.setattr("emerdiff.selfcheck.run_selfcheck", one_failed_check)  # the tool imports it after parsing
    status = tool.main(["--cfg", str(TINY), "--output", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 1
    assert "self-check FAILED: replay" in printed and "selfcheck.json" in printed and "pip list" in printed
    assert json.loads((tmp_path / "selfcheck.json").read_text())["failed"] == ["replay"]
    assert "FAILED: replay" in (tmp_path / "selfcheck.md").read_text()
