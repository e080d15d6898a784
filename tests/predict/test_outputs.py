"""emerdiff.predict.outputs: the results folder, its manifest and failures, and the extras plug-ins add."""

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from PIL import Image

import emerdiff
from emerdiff.files import read_jsonl
from emerdiff.predict import OutputOptions, OutputStore, PredictedImage
from emerdiff.segmentor import SegmentationOutput


def _result(name: str, k: int = 2, size=(6, 8), extras=None) -> PredictedImage:
    labels = torch.arange(size[0] * size[1]).reshape(size) % k
    output = SegmentationOutput(labels, labels, labels[:2, :2], torch.ones(k, 2, 2, dtype=torch.bool),
                                torch.zeros(k, 4), seed=7)
    return PredictedImage(name, f"/in/{name}.png", torch.zeros(3, *size, dtype=torch.uint8), output, 0.5,
                          extras=extras)


class Parity:
    """A plug-in's extras: an array, a manifest field and a file of its own, each derived from the photo."""

    def __init__(self, value: int) -> None:
        self.value = value

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"parity": np.array([self.value % 2])}

    def record(self) -> Dict[str, Any]:
        return {"parity": self.value % 2}

    def write(self, store: OutputStore, name: str, photo: np.ndarray) -> None:
        store.save_picture(name, "_parity.png", np.full_like(photo, self.value % 2))


def test_store_merges_rank_records_once_per_image_and_ignores_a_cut_line(tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions(figure=True))
    store.begin_run()
    store.save(_result("b"), rank=1)
    store.finish_run()
    store.begin_run()
    store.save(_result("sub/a"), rank=0)
    store.save(_result("b", k=3), rank=1)  # redone by a later run (--overwrite): its record wins
    store.record_failure(PredictedImage("bad", "/in/bad.jpg", error="broken", error_type="ImageLoadError"), rank=1)
    with open(tmp_path / ".parts" / "manifest.rank1.jsonl", "a") as handle:
        handle.write('{"name": "cut')  # a process killed mid-line
    assert store.done() == {"b", "sub/a"}
    store.finish_run()
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["name"] for r in manifest] == ["b", "sub/a"] and manifest[0]["num_masks"] == 3
    assert manifest[1] == {"name": "sub/a", "path": "/in/sub/a.png", "size": [6, 8], "num_masks": 2,
                           "seconds": 0.5, "seed": 7, "emerdiff_version": emerdiff.__version__, "format_version": 1}
    assert store.failures() == [{"name": "bad", "path": "/in/bad.jpg", "error": "broken", "type": "ImageLoadError"}]
    assert not (tmp_path / ".parts").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("sub/*")) == [
        "sub/a.npz", "sub/a.png", "sub/a_figure.png", "sub/a_overlay.jpg"]
    (tmp_path / "sub" / "a_overlay.jpg").unlink()
    assert store.done() == {"b"}  # an image missing one of its files is not done


def test_begin_run_keeps_records_of_a_killed_run_and_removes_its_temporary_files(tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions())
    store.save(_result("a"), rank=0)
    store.record_failure(PredictedImage("bad", "/in/bad.jpg", error="broken"), rank=0)
    stale = tmp_path / ".b.npz.123.emerdiff-tmp"
    stale.write_bytes(b"half")
    OutputStore(tmp_path, OutputOptions()).begin_run()
    assert not stale.exists() and [r["name"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["a"]
    assert not list((tmp_path / ".parts").glob("failures*"))


def test_extras_add_their_arrays_manifest_fields_and_files_and_an_image_is_done_only_with_its_extra_files(
        tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions(overlay=False, extra_files=("_parity.png",)))
    store.begin_run()
    store.save(_result("odd", extras=Parity(3)), rank=0)
    store.save(_result("plain"), rank=0)  # no extras: no parity file, so not done under these options
    store.finish_run()
    with np.load(tmp_path / "odd.npz") as arrays:
        assert arrays["parity"].tolist() == [1] and "labels" in arrays.files
    record = {r["name"]: r for r in read_jsonl(tmp_path / "manifest.jsonl")}
    assert record["odd"]["parity"] == 1 and list(record["odd"])[-1] == "parity"  # after the core fields
    assert "parity" not in record["plain"]
    with Image.open(tmp_path / "odd_parity.png") as picture:
        assert picture.size == (8, 6) and np.asarray(picture).max() == 1
    assert store.done() == {"odd"}



def test_a_store_whose_options_list_no_extra_files_keeps_the_extras_arrays_and_fields_but_writes_no_files(
        tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions(overlay=False))  # e.g. the demo's downloads
    store.save(_result("odd", extras=Parity(3)), rank=0)
    store.finish_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failures.jsonl", "manifest.jsonl", "odd.npz", "odd.png"]
    with np.load(tmp_path / "odd.npz") as arrays:
        assert arrays["parity"].tolist() == [1]
    assert read_jsonl(tmp_path / "manifest.jsonl")[0]["parity"] == 1 and store.done() == {"odd"}

def test_options_from_the_output_config_section_keep_its_picture_settings():
    from emerdiff.config import OutputConfig

    options = OutputOptions.from_config(OutputConfig(overlay=False, figure=True, overlay_alpha=0.3, jpeg_quality=70),
                                        extra_files=["_x.png"])
    assert options == OutputOptions(overlay=False, figure=True, overlay_alpha=0.3, jpeg_quality=70,
                                    extra_files=("_x.png",))
