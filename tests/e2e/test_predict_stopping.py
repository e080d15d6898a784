"""tools/predict.py stops between images without losing work: SIGTERM, a failing image, a broken setup."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from conftest import REPO, TINY, load_tool
from emerdiff.files import LOCK_FILE, read_jsonl
from emerdiff.predict import OutputOptions, OutputStore
from emerdiff.segmentor import EmerDiff

predict = load_tool("predict")

SMALL = ["segmentor.resolution=64", "segmentor.num_masks=2", "segmentor.num_inference_steps=10", "segmentor.t_modulate=201",
         "output.overlay=false", "data.num_workers=0", "trainer.enable_progress_bar=false"]


def photo_folder(root: Path, count: int) -> Path:
    """`count` real photos (crops of scikit-image's astronaut), each a different size so each is recognisable."""
    astronaut = data.astronaut()
    root.mkdir()
    for i in range(count):
        Image.fromarray(astronaut[: 48 + i, : 48 + i]).save(root / f"p{i}.png")
    return root


def _cli(photos: Path, out: Path, *extra: str) -> list:
    return ["--cfg", str(TINY), "--input", str(photos), "--output", str(out), *SMALL, *extra]


def wait_for(condition, process: subprocess.Popen, log: Path) -> None:
    """Until `condition()` holds; the test fails with the log if the process ends or 300 s pass first."""
    deadline = time.time() + 300
    while not condition():
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)


def run_until_the_first_image_then_signal(photos: Path, out: Path, log: Path, signum: int) -> subprocess.Popen:
    """tools/predict.py in a subprocess, sent `signum` as soon as its first image is recorded; returns it ended."""
    command = [sys.executable, str(REPO / "tools" / "predict.py"), *_cli(photos, out)]
    store = OutputStore(out, OutputOptions(overlay=False))
    with open(log, "w") as handle:
        run = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not store.manifest():
            assert run.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        run.send_signal(signum)
        run.wait(timeout=300)
    return run


def test_sigterm_after_the_first_image_stops_within_one_image_and_the_rerun_finishes(tmp_path: Path):
    photos, out = photo_folder(tmp_path / "photos", 10), tmp_path / "out"
    first = run_until_the_first_image_then_signal(photos, out, tmp_path / "first.log", signal.SIGTERM)
    assert first.returncode == 143
    printed = (tmp_path / "first.log").read_text()
    done = [r["name"] for r in read_jsonl(out / "manifest.jsonl")]
    assert 1 <= len(done) <= 3 and "terminated (SIGTERM)" in printed and "rerun the same command" in printed
    second = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), *_cli(photos, out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{len(done)} already done" in second.stdout
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == [f"p{i}" for i in range(10)]


def test_ctrl_c_after_the_first_image_stops_within_one_image_with_status_130_and_one_line(tmp_path: Path):
    photos, out = photo_folder(tmp_path / "photos", 10), tmp_path / "out"
    run = run_until_the_first_image_then_signal(photos, out, tmp_path / "run.log", signal.SIGINT)
    printed = (tmp_path / "run.log").read_text()
    assert run.returncode == 130, printed[-2000:]
    done = read_jsonl(out / "manifest.jsonl")
    assert 1 <= len(done) <= 3 and "Traceback" not in printed
    assert f"interrupted (Ctrl-C): {len(done)} of 10 images done; rerun the same command to continue" in printed


PATCHED_PREDICT = """import os, sys, time
from pathlib import Path
from emerdiff.cli.predict import main
from emerdiff.segmentor import EmerDiff
segment = EmerDiff.segment
delay, gate = float(os.environ.get("TEST_DELAY", 0)), os.environ.get("TEST_GATE")
failing = {int(w) for w in os.environ.get("TEST_FAIL_WIDTHS", "").split(",") if w}
def patched(self, image):  # slower by TEST_DELAY s, held until TEST_GATE exists, failing for TEST_FAIL_WIDTHS
    time.sleep(delay)
    while gate and not Path(gate).exists():
        time.sleep(0.05)
    if image.shape[-1] in failing:
        raise RuntimeError("CUDA driver version is insufficient")
    return segment(self, image)
EmerDiff.segment = patched
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_stops_inside_the_image_with_status_130_and_one_line_keeping_finished_images(tmp_path: Path):
    photos, out, log = photo_folder(tmp_path / "photos", 10), tmp_path / "out", tmp_path / "run.log"
    command = [sys.executable, "-c", PATCHED_PREDICT, *_cli(photos, out)]  # tools/predict.py, a second per image
    store = OutputStore(out, OutputOptions(overlay=False))
    with open(log, "w") as handle:
        run = subprocess.Popen(command, cwd=REPO, env={**os.environ, "TEST_DELAY": "1"}, stdout=handle,
                               stderr=subprocess.STDOUT)
        wait_for(store.manifest, run, log)
        run.send_signal(signal.SIGINT)
        wait_for(lambda: "Ctrl-C again to stop at once" in log.read_text(), run, log)
        run.send_signal(signal.SIGINT)  # within the second of sleep that starts every image
        run.wait(timeout=300)
    printed = log.read_text()
    assert run.returncode == 130, printed[-2000:]
    done = read_jsonl(out / "manifest.jsonl")
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed
    assert f"stopped at once (Ctrl-C twice): {len(done)} of 10 images done; rerun the same command" in printed
    assert 1 <= len(done) <= 3 and store.done() == {r["name"] for r in done}  # each recorded image has all its files


def test_a_second_run_into_the_same_folder_waits_naming_the_first_run_and_segments_nothing_twice(tmp_path: Path):
    photos, out, gate = photo_folder(tmp_path / "photos", 3), tmp_path / "out", tmp_path / "gate"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with open(first_log, "w") as first_out, open(second_log, "w") as second_out:
        first = subprocess.Popen([sys.executable, "-c", PATCHED_PREDICT, *_cli(photos, out)], cwd=REPO,
                                 env={**os.environ, "TEST_GATE": str(gate)}, stdout=first_out, stderr=subprocess.STDOUT)
        lock = out / LOCK_FILE
        wait_for(lambda: lock.is_file() and f"PID {first.pid} " in lock.read_text(), first, first_log)
        second = subprocess.Popen([sys.executable, str(REPO / "tools" / "predict.py"), *_cli(photos, out)], cwd=REPO,
                                  stdout=second_out, stderr=subprocess.STDOUT)
        wait_for(lambda: "waiting: another run" in second_log.read_text(), second, second_log)
        assert not OutputStore(out, OutputOptions(overlay=False)).manifest()  # the first run holds every image
        gate.touch()  # the first run segments its images
        assert first.wait(timeout=300) == 0, first_log.read_text()[-2000:]
        assert second.wait(timeout=300) == 0, second_log.read_text()[-2000:]
    waited = second_log.read_text()
    assert f"another run is writing to {out} (PID {first.pid} on " in waited
    assert "3 images in" in waited and "3 already done" in waited and "0 to segment" in waited  # nothing segmented twice
    assert "done: 3 segmented" in first_log.read_text() and "done:" not in waited
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == ["p0", "p1", "p2"]
    assert lock.read_text() == ""  # released: nobody holds the folder


def test_messages_during_a_run_start_lines_of_their_own_beside_the_progress_bar_and_a_3_to_1_photo_is_named_once(
        tmp_path: Path):
    """As on a terminal (bar on stdout, messages on stderr, one screen): a squeezed photo's warning mid-run and the
    stop after repeated failures each begin a line; the bar's text never runs into them."""
    photos, out, log = tmp_path / "photos", tmp_path / "out", tmp_path / "run.log"
    photos.mkdir()
    astronaut = data.astronaut()
    Image.fromarray(astronaut[:48, :48]).save(photos / "a.png")
    Image.fromarray(astronaut[:40, :120]).save(photos / "b_wide.png")  # 3:1, capped at 2:1 by the default max_pixels
    Image.fromarray(astronaut[:50, :50]).save(photos / "c.png")
    Image.fromarray(astronaut[:51, :51]).save(photos / "d.png")
    command = [sys.executable, "-c", PATCHED_PREDICT, *_cli(photos, out), "trainer.enable_progress_bar=true",
               "output.max_repeated_failures=2"]
    with open(log, "w") as handle:
        run = subprocess.run(command, cwd=REPO, env={**os.environ, "TEST_FAIL_WIDTHS": "50,51"}, stdout=handle,
                             stderr=subprocess.STDOUT, timeout=600)
    printed = log.read_text()
    assert run.returncode == 1, printed[-3000:]
    segments = re.split(r"[\r\n]", printed)  # what starts at the left edge of the screen
    squeezed = "a 120x40 image (3:1) is processed at 128x64 (2:1): segmentor.max_pixels"
    assert sum(squeezed in segment for segment in segments) == 1 and any(s.startswith(squeezed) for s in segments)
    stopped = "stopped: 2 images in a row failed with the same error"
    assert any(segment.startswith(stopped) for segment in segments), printed[-3000:]
    assert "img/s" in printed  # the bar was on screen


@pytest.fixture()
def failing_on(monkeypatch):
    """Make the segmentor raise for photos of the given widths (a stand-in for a bad image or a broken setup)."""
    segment = EmerDiff.segment

    def install(widths, error=lambda width: RuntimeError(f"faiss failed on width {width}")):
        def maybe_failing(self, image):  # the tool passes the photo as a [3, H, W] tensor
            if image.shape[-1] in widths:
                raise error(image.shape[-1])
            return segment(self, image)
        monkeypatch.setattr(EmerDiff, "segment", maybe_failing)
    return install


def test_an_exception_on_one_image_of_five_is_recorded_and_the_run_goes_on(tmp_path: Path, failing_on):
    photos, out = photo_folder(tmp_path / "photos", 5), tmp_path / "out"
    failing_on({50})  # p2
    assert predict.main(_cli(photos, out)) == 1  # some failed
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == ["p0", "p1", "p3", "p4"]
    assert read_jsonl(out / "failures.jsonl") == [{"name": "p2", "path": str(photos / "p2.png"),
                                                   "error": "faiss failed on width 50", "type": "RuntimeError"}]


def test_the_same_error_on_every_image_stops_the_run_after_the_configured_count(tmp_path: Path, failing_on, capsys):
    photos, out = photo_folder(tmp_path / "photos", 6), tmp_path / "out"
    failing_on(set(range(48, 54)), error=lambda width: RuntimeError("CUDA driver version is insufficient"))
    assert predict.main(_cli(photos, out, "output.max_repeated_failures=3")) == 1
    assert len(read_jsonl(out / "failures.jsonl")) == 3  # stopped at the third, the other three never tried
    printed = capsys.readouterr().err
    assert "3 images in a row failed with the same error" in printed and "CUDA driver version" in printed
