"""Prediction building blocks: input discovery, sharding, the LightningModule, the results store, pictures."""

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from conftest import REPO, tiny_segmentor
from emerdiff import ConfigError
from emerdiff.inputs import ImageFiles, InputError, PredictImages, ShardSampler, find_images
from emerdiff.lightning_module import EmerDiffPredictor
from emerdiff.outputs import ImageResult, OutputOptions, OutputStore, atomic_file, read_jsonl
from emerdiff.render import boundaries, label_image

sys.path.insert(0, str(REPO / "tools"))
from _common import build_trainer, check_trainer_keys  # noqa: E402


def _touch_images(root: Path, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


@pytest.mark.parametrize("length", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_give_every_index_to_exactly_one_rank_without_padding(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]


def test_folder_input_is_recursive_names_keep_folders_and_skip_the_output_folder(tmp_path: Path):
    _touch_images(tmp_path, ["b.png", "trip/a.JPG", "trip/deep/c.webp", "out/old.png", "dup.jpg", "dup.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    images = find_images(str(tmp_path), exclude=tmp_path / "out")
    assert [i.name for i in images] == ["b", "dup.jpg", "dup.png", "trip/a", "trip/deep/c"]
    assert images[3].path == tmp_path / "trip" / "a.JPG"


def test_glob_list_file_and_single_file_inputs_are_named_relative_to_their_root(tmp_path: Path):
    _touch_images(tmp_path, ["x/one.png", "x/sub/two.png", "y/three.png"])
    assert [i.name for i in find_images(str(tmp_path / "x" / "**" / "*.png"))] == ["one", "sub/two"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\nx/sub/two.png\n\n{tmp_path / 'y' / 'three.png'}\nx/missing.png\n")
    listed = find_images(str(listing))
    assert [i.name for i in listed] == ["x/missing", "x/sub/two", "y/three"]  # missing files fail later, listed
    assert [i.name for i in find_images(str(tmp_path / "y" / "three.png"))] == ["three"]


def test_a_relative_input_gives_absolute_paths_so_the_manifest_works_from_any_folder(tmp_path: Path, monkeypatch):
    _touch_images(tmp_path, ["x/one.png"])
    monkeypatch.chdir(tmp_path)
    assert [i.path for i in find_images("x")] == [tmp_path / "x" / "one.png"]


def test_missing_input_and_a_folder_without_images_are_errors_saying_what_was_searched(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        find_images(str(tmp_path / "nope"))
    (tmp_path / "a.txt.bak").write_text("x")
    with pytest.raises(InputError, match="no images found.*\\.png"):
        find_images(str(tmp_path))


def test_unreadable_files_become_items_with_their_error(tmp_path: Path):
    _touch_images(tmp_path, ["good.png"])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    items = {item.name: item for item in ImageFiles(find_images(str(tmp_path)))}
    assert items["good"].error is None and items["good"].image.shape == (3, 6, 8)
    assert items["good"].image.dtype == torch.uint8
    assert "0 bytes" in items["empty"].error and items["empty"].image is None
    assert "not a readable image" in items["text"].error


def test_predict_step_equals_segment_and_passes_read_errors_through(tiny_components, photo, tmp_path: Path):
    Image.fromarray(photo).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_text("no")
    segmentor = tiny_segmentor(tiny_components, resolution=128, num_masks=3)
    predictor = EmerDiffPredictor(segmentor)
    assert not any(p.requires_grad for p in predictor.parameters())
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         use_distributed_sampler=False)
    batches = trainer.predict(predictor, datamodule=PredictImages(find_images(str(tmp_path)), num_workers=0))
    results = {r.name: r for batch in batches for r in batch}
    assert results["broken"].output is None and "not a readable image" in results["broken"].error
    expected = segmentor.segment(photo)
    assert torch.equal(results["photo"].output.labels, expected.labels)
    assert torch.equal(results["photo"].image, torch.from_numpy(photo.copy()).permute(2, 0, 1))


def test_trainer_keys_are_checked_against_the_trainer_signature():
    check_trainer_keys({"devices": 2, "strategy": "ddp", "num_nodes": 2, "precision": "16-mixed"})
    with pytest.raises(ConfigError, match=r"'trainer.devicez'.*trainer.devices"):
        check_trainer_keys({"devicez": 2})
    with pytest.raises(ConfigError, match="trainer.use_distributed_sampler cannot be configured"):
        build_trainer({"use_distributed_sampler": True}, use_distributed_sampler=False)


def _result(name: str, k: int = 2, size=(6, 8)) -> ImageResult:
    from emerdiff.segmentor import SegmentationOutput

    labels = torch.arange(size[0] * size[1]).reshape(size) % k
    output = SegmentationOutput(labels, labels, labels[:2, :2], torch.ones(k, 2, 2, dtype=torch.bool),
                                torch.zeros(k, 4), seed=7)
    return ImageResult(name, f"/in/{name}.png", torch.zeros(3, *size, dtype=torch.uint8), output, 0.5)


def test_store_merges_rank_records_once_per_image_and_ignores_a_cut_line(tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions(figure=True))
    store.begin_run()
    store.save(_result("b"), rank=1)
    store.finish_run()
    store.begin_run()
    store.save(_result("sub/a"), rank=0)
    store.save(_result("b", k=3), rank=1)  # redone by a later run (--overwrite): its record wins
    store.record_failure(ImageResult("bad", "/in/bad.jpg", error="broken"), rank=1)
    with open(tmp_path / ".parts" / "manifest.rank1.jsonl", "a") as handle:
        handle.write('{"name": "cut')  # a process killed mid-line
    assert store.done() == {"b", "sub/a"}
    store.finish_run()
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["name"] for r in manifest] == ["b", "sub/a"] and manifest[0]["num_masks"] == 3
    assert manifest[1] == {"name": "sub/a", "path": "/in/sub/a.png", "size": [6, 8], "num_masks": 2,
                           "seconds": 0.5, "seed": 7}
    assert store.failures() == [{"name": "bad", "path": "/in/bad.jpg", "error": "broken"}]
    assert not (tmp_path / ".parts").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("sub/*")) == [
        "sub/a.npz", "sub/a.png", "sub/a_figure.png", "sub/a_overlay.jpg"]
    (tmp_path / "sub" / "a_overlay.jpg").unlink()
    assert store.done() == {"b"}  # an image missing one of its files is not done


def test_begin_run_keeps_records_of_a_killed_run_and_removes_its_temporary_files(tmp_path: Path):
    store = OutputStore(tmp_path, OutputOptions())
    store.save(_result("a"), rank=0)
    store.record_failure(ImageResult("bad", "/in/bad.jpg", error="broken"), rank=0)
    stale = tmp_path / ".b.npz.123.emerdiff-tmp"
    stale.write_bytes(b"half")
    OutputStore(tmp_path, OutputOptions()).begin_run()
    assert not stale.exists() and [r["name"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["a"]
    assert not list((tmp_path / ".parts").glob("failures*"))


def test_atomic_file_leaves_neither_target_nor_temporary_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "deep" / "x.npz"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.rglob("*")) == [tmp_path / "deep"]
    with atomic_file(target) as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.rglob("*.emerdiff-tmp")) == []


@pytest.mark.parametrize("num_masks", [3, 255, 300])
def test_label_png_reads_back_as_the_labels_8_bit_palette_up_to_255_masks_else_16_bit(tmp_path, num_masks):
    labels = np.arange(20 * 16).reshape(20, 16) % num_masks
    label_image(labels, num_masks).save(tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as img:
        assert img.mode == ("P" if num_masks <= 255 else "I;16")
        np.testing.assert_array_equal(np.asarray(img), labels)


def test_boundaries_mark_exactly_where_labels_change():
    labels = np.zeros((4, 5), dtype=np.int64)
    labels[:, 3:] = 1
    edge = boundaries(labels)
    assert edge[:, 2].all() and edge.sum() == 4
