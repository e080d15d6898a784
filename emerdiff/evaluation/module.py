"""The evaluations under Lightning: the caching module that drives evaluators, the results callback, the data.

`CachedEvaluation` is the skeleton every evaluation stands on (``ovseg.evaluation`` included):
rank 0 drops the temporary files a killed run left in its caches, models are loaded on first
use, and EmerDiff's prediction of an image comes from the cache (``OUTPUT/cache/<image id>.npz``)
or, on a miss, from the segmentor, and is then cached. A rerun over a full cache never loads
Stable Diffusion, and a killed run resumes where it stopped. Each image's prediction goes to a
list of evaluators (`emerdiff.evaluation.evaluator`: reset / process / evaluate, no Lightning
inside), e.g. the `UnsupervisedEvaluator` of tools/eval.py; after the test epoch rank 0 holds
their results, which `SaveResults` writes. `EvaluationData` gives each rank its own images, none
twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from ..choices import CROPS, INTERPOLATIONS
from ..config import UserError
from ..data import SegmentationDataset, build_dataset
from ..image import ImageLoadError
from ..stopping import RepeatedFailures
from .cache import CachedPrediction, PredictionCache, StaleCacheError
from .evaluator import Evaluator, ModuleSeq, ModuleT
from .report import ResultsTable, write_results

if TYPE_CHECKING:
    from ..segmentor import EmerDiff

log = logging.getLogger(__name__)
T = TypeVar("T")
SegmentorLoader = Callable[[pl.Trainer], "EmerDiff"]


class CachedEvaluation(pl.LightningModule):
    """`Trainer.test` gives each image's cached or fresh prediction to every evaluator; models load on first use.

    `load_segmentor(trainer)` builds the segmentor (anything with ``segment(image)``); it is called
    on the first image missing from `cache`, so a fully cached run never calls it. `caches` are
    every cache the module writes (`cache` first); their temporary files go at setup. What the
    evaluators get of an image is `evaluated` (EmerDiff's `prediction` here; a subclass may add to
    it, e.g. name the masks). After the test epoch, ``results`` holds one results table per
    evaluator on global rank 0 (empty elsewhere).
    """

    def __init__(
        self,
        load_segmentor: SegmentorLoader,
        cache: PredictionCache,
        *more_caches: PredictionCache,
        evaluators: Sequence[Evaluator] = (),
        max_repeated_failures: int = 0,
    ) -> None:
        super().__init__()
        self.load_segmentor = load_segmentor
        self.segmentor: EmerDiff | None = None
        self.cache = cache
        self.caches = (cache, *more_caches)
        self.evaluators = ModuleSeq(evaluators)
        self.results: list[ResultsTable] = []
        self.skipped: list[dict[str, str]] = []  # this rank's images whose prediction failed
        self.repeated = RepeatedFailures(max_repeated_failures)

    def on_test_epoch_start(self) -> None:
        """Every evaluator starts from empty metrics, and no image is skipped yet."""
        for evaluator in self.evaluators:
            evaluator.reset()
        self.skipped = []
        self.results = []

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Give one image's prediction to every evaluator (an image whose prediction fails is skipped)."""
        image_id, gt = batch["meta"]["id"], np.asarray(batch["label"], dtype=np.int64)
        evaluated = self.guarded(image_id, lambda: self.evaluated(batch["image"], image_id, gt))
        if evaluated is not None:
            for evaluator in self.evaluators:
                evaluator.process(batch["index"], evaluated)

    def on_test_epoch_end(self) -> None:
        """Every rank reduces its evaluators and skipped images; rank 0 keeps the results and logs their numbers."""
        tables = [evaluator.evaluate() for evaluator in self.evaluators]
        skipped = self.all_skipped()
        if not self.trainer.is_global_zero:
            return
        # rank 0 has every table
        self.results = [replace(table, skipped=skipped) for table in tables if table is not None]
        for table in self.results:
            for name, value in table.logged().items():
                self.log(name, value, rank_zero_only=True)

    def evaluated(self, image: Any, image_id: str, gt: np.ndarray) -> Any:
        """What the evaluators get of one image: EmerDiff's prediction."""
        return self.prediction(image, image_id, gt)

    def guarded(self, image_id: str, compute: Callable[[], T]) -> T | None:
        """`compute()`, or None when it fails for this image: the image is recorded as skipped and the run goes on.

        A user's mistake (a setting, missing weights) or a stale cache is no image's fault: it ends the run.
        """
        try:
            result = compute()
        except ImageLoadError as exc:  # an unreadable image is that image's fault
            self._skip(image_id, exc)
            return None
        except (UserError, StaleCacheError):
            raise
        except Exception as exc:  # out of memory on one huge image, a NaN, a faiss error
            self._skip(image_id, exc)
            return None
        self.repeated.record(None)
        return result

    def _skip(self, image_id: str, exc: Exception) -> None:
        log.warning("skipped %s: %s: %s", image_id, type(exc).__name__, exc)
        self.skipped.append({"id": image_id, "type": type(exc).__name__, "error": str(exc)})
        self.repeated.record((type(exc).__name__, str(exc)))

    def all_skipped(self) -> list[dict[str, str]]:
        """Every rank's skipped images, sorted by id; every rank must call it (it gathers across processes)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.skipped)
        else:
            parts = [self.skipped]
        return sorted((record for part in parts for record in part), key=lambda r: r["id"])

    def setup(self, stage: str) -> None:
        """Rank 0 drops temporary files a killed run left; Lightning's post-setup barrier holds the others."""
        if self.trainer.is_global_zero:
            for cache in self.caches:
                cache.remove_temporary_files()

    def prediction(self, image: Any, image_id: str, gt: np.ndarray) -> CachedPrediction:
        """EmerDiff's prediction of one image: from the cache, or segmented now and then cached."""
        prediction = self.cache.load(image_id, gt)
        if prediction is None:
            prediction = CachedPrediction.from_output(self._segmentor().segment(image), gt)
            self.cache.save(image_id, prediction)
        return prediction

    def _segmentor(self) -> EmerDiff:
        """The segmentor on this module's device, loaded on first use."""
        return self._loaded(
            "segmentor", lambda: self.load_segmentor(self.trainer).eval().requires_grad_(False).to(self.device)
        )

    def _loaded(self, name: str, build: Callable[[], ModuleT]) -> ModuleT:
        """``self.<name>``, built by `build` on first use (outside inference mode, so weights are normal tensors)."""
        if getattr(self, name) is None:
            with torch.inference_mode(False):
                setattr(self, name, build())
        return getattr(self, name)


class IndexedDataset(Dataset):
    """A dataset's items with their index added, so every rank's records can be put back in order.

    With `shorter_side`, image and label are first resized so that their shorter side has that many
    pixels and the longer side keeps the aspect ratio (mmsegmentation's keep-ratio resize; image with
    `interpolation`, label with nearest neighbour).
    """

    def __init__(
        self, dataset: SegmentationDataset, shorter_side: int | None = None, interpolation: str = "bicubic"
    ) -> None:
        self.dataset = dataset
        self.shorter_side = shorter_side
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        """The items in order, as a plain loop over the split sees them."""
        return (self[index] for index in range(len(self)))

    def __getitem__(self, index: int) -> dict:
        item = {**self.dataset[index], "index": index}
        if self.shorter_side is not None:
            item["image"], item["label"] = resize_keeping_ratio(
                item["image"], item["label"], self.shorter_side, self.interpolation
            )
        return item


def resize_keeping_ratio(
    image: np.ndarray, label: np.ndarray, shorter_side: int, interpolation: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] image and [H, W] label resized to shorter side `shorter_side`, the longer one in proportion."""
    height, width = label.shape
    scale = shorter_side / min(height, width)
    size = (max(shorter_side, int(width * scale + 0.5)), max(shorter_side, int(height * scale + 0.5)))
    resized = np.asarray(Image.fromarray(image).resize(size, resample=INTERPOLATIONS[interpolation]))
    classes = Image.fromarray(label.astype(np.int32), mode="I").resize(size, resample=Image.Resampling.NEAREST)
    return resized, np.asarray(classes).astype(label.dtype)


def only_item(batch: list[dict]) -> dict:
    """Collate of batch size 1 that keeps numpy arrays (full-size images differ in shape)."""
    return batch[0]


class EvaluationData(pl.LightningDataModule):
    """One image per step from a registered split; rank r of w gets images r, r + w, ... (none twice, no padding).

    `size` resizes the shorter side; `crop` (``eval.crop``) then keeps the central size x size square
    (``center``) or the whole image (``none``). `image_list` (COCO-Stuff) and `reduce_zero_label`
    (``folder``) go to the datasets that take them; given to another split, they are a ValueError.
    Lightning's UnrepeatedDistributedSampler shards the split, so Lightning injects no sampler of its own.
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        size: int | None = None,
        image_list: str | None = None,
        num_workers: int = 2,
        crop: str = "center",
        reduce_zero_label: bool = False,
    ) -> None:
        super().__init__()
        if crop not in CROPS:
            raise ValueError(f"eval.crop must be one of {', '.join(CROPS)}, got {crop!r}")
        square = CROPS[crop].square
        self.shorter_side = None if square else size
        given = {"image_list": image_list, "reduce_zero_label": reduce_zero_label}
        options = {"size": size if square else None, **{k: v for k, v in given.items() if v}}
        self.split = build_dataset(dataset, root, **options)
        self.num_workers = num_workers

    def image_ids(self) -> list[str]:
        """The split's image ids in dataset order (the cache file names)."""
        return [sample.id for sample in self.split.samples]

    def items(self) -> IndexedDataset:
        """The split's images and labels as they are evaluated (resized, cropped), with their index."""
        return IndexedDataset(self.split, self.shorter_side, getattr(self.split, "interpolation", "bicubic"))

    def test_dataloader(self) -> DataLoader:
        if self.trainer is None:
            raise RuntimeError("EvaluationData gives its loader to a Trainer: use it through Trainer.test")
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > len(self.split):
            raise ValueError(f"{world} processes for {len(self.split)} images: use at most one process per image")
        images = self.items()
        sampler = UnrepeatedDistributedSampler(images, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(images, batch_size=1, sampler=sampler, num_workers=self.num_workers, collate_fn=only_item)


class SaveResults(pl.Callback):
    """After `Trainer.test`, global rank 0 writes the module's results as results.json and results.md, the table of
    each evaluator in its folder (`folders`, in the evaluators' order)."""

    def __init__(self, *folders: Path) -> None:
        self.folders = [Path(folder) for folder in folders]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the files on rank 0, which alone holds the results."""
        results = getattr(pl_module, "results", None)
        if not trainer.is_global_zero or not results:
            return
        if len(results) != len(self.folders):
            raise ValueError(f"{len(results)} results tables for {len(self.folders)} folders")
        for table, folder in zip(results, self.folders, strict=True):
            write_results(table, folder)
