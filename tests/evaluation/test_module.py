"""The Lightning side: the shared evaluation base (cache clean-up, lazy segmentor, cache-or-predict), the data module."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conftest import voc_folder
from emerdiff.evaluation import CachedEvaluation, EvaluationData, PredictionCache
from emerdiff.evaluation.module import resize_keeping_ratio
from emerdiff.files import TEMP_SUFFIX


class StripesSegmentor(nn.Module):
    """A stand-in segmentor: mask m is column stripe m; counts its calls."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def segment(self, image: np.ndarray) -> SimpleNamespace:
        self.calls.append("segment")
        h, w = image.shape[:2]
        labels = torch.from_numpy(np.repeat((np.arange(w) * 2 // w)[None], h, axis=0))
        arrays = {"labels": labels.numpy(), "labels_bilinear": labels.numpy(), "lowres_labels": np.zeros((2, 2)),
                  "lowres_masks": np.ones((2, 2, 2), bool), "mask_embeddings": np.eye(2, dtype=np.float32)}
        return SimpleNamespace(labels=labels, to_numpy=lambda: arrays)


class Images(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"image": np.zeros((4, 6, 3), np.uint8), "label": np.full((4, 6), index), "meta": {"id": f"im{index}"}}


class MasksOnly(CachedEvaluation):
    """The smallest evaluation on the base: it only fetches each image's prediction."""

    def __init__(self, loads: list, calls: list, *caches: PredictionCache) -> None:
        super().__init__(lambda trainer: loads.append("load") or StripesSegmentor(calls), *caches)
        self.seen = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        gt = np.asarray(batch["label"], dtype=np.int64)
        self.seen.append(self.prediction(batch["image"], batch["meta"]["id"], gt))


def run(module: pl.LightningModule, root: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.test(module, DataLoader(Images(), batch_size=None), verbose=False)


def test_base_loads_the_segmentor_once_on_the_first_miss_caches_and_never_loads_it_over_a_full_cache(tmp_path):
    loads, calls = [], []
    first = MasksOnly(loads, calls, PredictionCache(tmp_path / "cache", {"s": {}}))
    run(first, tmp_path)
    assert loads == ["load"] and calls == ["segment", "segment"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["im0.npz", "im1.npz"]

    again = MasksOnly(loads, calls, PredictionCache(tmp_path / "cache", {"s": {}}))
    run(again, tmp_path)
    assert loads == ["load"] and len(calls) == 2  # nothing loaded or segmented the second time
    for fresh, cached in zip(first.seen, again.seen):
        assert np.array_equal(fresh.labels, cached.labels) and np.array_equal(fresh.gt, cached.gt)


def test_base_drops_temporary_files_of_a_killed_run_from_every_cache_at_setup(tmp_path):
    caches = [PredictionCache(tmp_path / name, {}) for name in ("masks", "labels")]
    for cache in caches:
        cache.folder.mkdir()
        (cache.folder / f".im0.npz.77{TEMP_SUFFIX}").write_bytes(b"cut short")
    run(MasksOnly([], [], *caches), tmp_path)
    for cache in caches:
        assert not list(cache.folder.glob(f"*{TEMP_SUFFIX}"))


@pytest.fixture(scope="module")
def voc_split(tmp_path_factory) -> EvaluationData:
    return EvaluationData("voc2012_val", str(voc_folder(tmp_path_factory.mktemp("voc") / "VOC2012", count=3)),
                          size=32, num_workers=0)


def test_data_module_gives_rank_r_of_w_images_r_r_plus_w_and_so_on_each_image_once(voc_split):
    def indices(rank: int, world: int) -> list:
        voc_split.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        return [item["index"] for item in voc_split.test_dataloader()]

    assert indices(0, 1) == [0, 1, 2]
    assert indices(0, 2) == [0, 2] and indices(1, 2) == [1]  # no padding repeat on the short rank
    assert sorted(indices(0, 3) + indices(1, 3) + indices(2, 3)) == [0, 1, 2]


def test_data_module_refuses_more_processes_than_images(voc_split):
    voc_split.trainer = SimpleNamespace(world_size=4, global_rank=0)
    with pytest.raises(ValueError, match="4 processes for 3 images"):
        voc_split.test_dataloader()


def test_image_list_on_a_split_that_takes_none_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image_list is not supported by voc2012_val"):
        EvaluationData("voc2012_val", str(tmp_path), image_list="ids.txt")


def test_reduce_zero_label_goes_to_the_dataset_and_a_split_that_takes_none_refuses_it(voc_split):
    with pytest.raises(ValueError, match="reduce_zero_label is not supported by voc2012_val; it is an option of folder"):
        EvaluationData("voc2012_val", str(voc_split.split.root), reduce_zero_label=True)


def test_whole_image_crop_resizes_the_shorter_side_and_keeps_the_aspect_ratio(voc_split):
    whole = EvaluationData("voc2012_val", str(voc_split.split.root), size=32, num_workers=0, crop="none")
    whole.trainer = SimpleNamespace(world_size=1, global_rank=0)
    voc_split.trainer = SimpleNamespace(world_size=1, global_rank=0)
    for full, square in zip(whole.test_dataloader(), voc_split.test_dataloader()):
        height, width = full["label"].shape
        original = np.asarray(Image.open(voc_split.split.samples[full["index"]].image_path)).shape
        assert min(height, width) == 32 and full["image"].shape == (height, width, 3)
        assert width / height == pytest.approx(original[1] / original[0], rel=0.03)  # 500 x 375 -> 43 x 32
        assert square["label"].shape == (32, 32)
        assert set(np.unique(full["label"])) <= set(np.unique(whole.split[full["index"]]["label"]))  # nearest


def test_keep_ratio_resize_of_a_label_repeats_each_class_id_without_mixing_them():
    label = np.array([[0, 1, 2, 255], [4, 5, 65535, 7]], dtype=np.int64)
    image = np.zeros((2, 4, 3), np.uint8)
    resized_image, resized = resize_keeping_ratio(image, label, 4)
    assert resized_image.shape == (4, 8, 3) and resized.dtype == np.int64
    assert np.array_equal(resized, np.repeat(np.repeat(label, 2, axis=0), 2, axis=1))


def test_unknown_crop_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="eval.crop"):
        EvaluationData("voc2012_val", str(tmp_path), crop="sliding")

