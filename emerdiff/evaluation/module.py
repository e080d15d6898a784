"""The evaluations under Lightning: a shared base module, the unsupervised evaluation, and its data module.

`CachedEvaluation` is the skeleton every evaluation stands on (``ovseg.evaluation`` included):
rank 0 drops the temporary files a killed run left in its caches, models are loaded on first
use, and EmerDiff's prediction of an image comes from the cache (``OUTPUT/cache/<image id>.npz``)
or, on a miss, from the segmentor, and is then cached. A rerun over a full cache never loads
Stable Diffusion, and a killed run resumes where it stopped.

`EvaluationModule` scores every protocol in one pass, on EmerDiff's labels and on the bilinear
upsampling of the same low-resolution masks (`emerdiff.evaluation.scoring`); after the test
epoch rank 0 holds the `EvaluationResults`. `EvaluationData` gives each rank its own images, none
twice; `run_and_report` runs a tool's ``Trainer.test`` and prints the table.
"""

from __future__ import annotations

import logging
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from ..config import PROTOCOLS, ConfigError, EvalConfig, UserError
from ..data import DatasetMetadata, build_dataset
from ..image import ImageLoadError
from ..stopping import RepeatedFailures, RunStopped
from .cache import CachedPrediction, PredictionCache, StaleCacheError
from .boundary import SegmentationWithBoundary
from .metrics import SegmentationScores
from .protocols import overlap_matrix
from .report import EvaluationResults
from .scoring import (METHODS, PER_IMAGE_PROTOCOLS, MaskRecords, check_settings, dataset_protocol_scores,
                      miou_convention, per_image_class_map)

log = logging.getLogger(__name__)
T = TypeVar("T")
SegmentorLoader = Callable[[pl.Trainer], nn.Module]
CROPS = ("center", "none")  # eval.crop


class CachedEvaluation(pl.LightningModule):
    """Base of the evaluation modules: caches cleaned at setup, models loaded on first use, masks cached.

    `load_segmentor(trainer)` builds the segmentor (anything with ``segment(image)``); it is called
    on the first image missing from `cache`, so a fully cached run never calls it. `caches` are
    every cache the subclass writes (`cache` first); their temporary files go at setup.
    """

    def __init__(self, load_segmentor: SegmentorLoader, cache: PredictionCache, *more_caches: PredictionCache,
                 max_repeated_failures: int = 0) -> None:
        super().__init__()
        self.load_segmentor = load_segmentor
        self.segmentor: Optional[nn.Module] = None
        self.cache = cache
        self.caches = (cache, *more_caches)
        self.skipped: List[Dict[str, str]] = []  # this rank's images whose prediction failed
        self.repeated = RepeatedFailures(max_repeated_failures)

    def guarded(self, image_id: str, compute: Callable[[], T]) -> Optional[T]:
        """`compute()`, or None when it fails for this image: the image is recorded as skipped and the run goes on.

        A user's mistake (a setting, missing weights) or a stale cache is no image's fault: it ends the run.
        """
        try:
            result = compute()
        except ImageLoadError as exc:  # an unreadable image is that image's fault
            return self._skip(image_id, exc)
        except (UserError, StaleCacheError):
            raise
        except Exception as exc:  # out of memory on one huge image, a NaN, a faiss error
            return self._skip(image_id, exc)
        self.repeated.record(None)
        return result

    def _skip(self, image_id: str, exc: Exception) -> None:
        log.warning("skipped %s: %s: %s", image_id, type(exc).__name__, exc)
        self.skipped.append({"id": image_id, "type": type(exc).__name__, "error": str(exc)})
        self.repeated.record((type(exc).__name__, str(exc)))

    def all_skipped(self) -> List[Dict[str, str]]:
        """Every rank's skipped images, sorted by id; every rank must call it (it gathers across processes)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: List[Any] = [None] * torch.distributed.get_world_size()
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

    def _segmentor(self) -> nn.Module:
        """The segmentor on this module's device, loaded on first use."""
        return self._loaded("segmentor", lambda: self.load_segmentor(self.trainer).eval().requires_grad_(False)
                            .to(self.device))

    def _loaded(self, name: str, build: Callable[[], nn.Module]) -> nn.Module:
        """``self.<name>``, built by `build` on first use (outside inference mode, so weights are normal tensors)."""
        if getattr(self, name) is None:
            with torch.inference_mode(False):
                setattr(self, name, build())
        return getattr(self, name)


class EvaluationModule(CachedEvaluation):
    """`Trainer.test` scores cached or fresh predictions of one split under every protocol.

    After the test epoch, ``results`` holds the EvaluationResults on global rank 0 (None elsewhere).
    """

    def __init__(self, load_segmentor: SegmentorLoader, cache: PredictionCache, dataset: str,
                 metadata: DatasetMetadata, settings: EvalConfig, max_repeated_failures: int = 0) -> None:
        check_settings(settings)
        super().__init__(load_segmentor, cache, max_repeated_failures=max_repeated_failures)
        self.dataset = dataset
        self.metadata = metadata
        self.settings = settings
        self.per_image = [p for p in settings.protocols if p in PER_IMAGE_PROTOCOLS]
        self.metrics = nn.ModuleDict({
            method: nn.ModuleDict({p: SegmentationWithBoundary(metadata.num_classes, metadata.ignore_index,
                                                            miou_convention(p, settings))
                                   for p in self.per_image})
            for method in METHODS
        })
        self.masks = MaskRecords(METHODS)
        self.results: Optional[EvaluationResults] = None

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Fetch or compute one image's prediction, then score it (an image whose prediction fails is skipped)."""
        image_id, gt = batch["meta"]["id"], np.asarray(batch["label"], dtype=np.int64)
        prediction = self.guarded(image_id, lambda: self.prediction(batch["image"], image_id, gt))
        if prediction is not None:
            self.score(batch["index"], prediction)

    def score(self, image_index: int, prediction: CachedPrediction) -> None:
        """Update the per-image metrics and record the masks for the dataset-wide protocols."""
        meta = self.metadata
        gt = torch.from_numpy(prediction.gt)
        histograms = {}
        for method in METHODS:
            segments = prediction.segments(method)
            histograms[method] = overlap_matrix(segments, prediction.gt, meta.num_classes,
                                                num_segments=prediction.num_masks, ignore_index=meta.ignore_index)
            for protocol in self.per_image:
                classes = per_image_class_map(protocol, segments, prediction.gt, prediction.mask_embeddings,
                                              histograms[method], meta.num_classes, meta.ignore_index,
                                              self.settings.match_criterion, miou_convention(protocol, self.settings))
                self.metrics[method][protocol].update(torch.from_numpy(classes), gt)
        self.masks.update(image_index, torch.from_numpy(prediction.mask_embeddings),
                          {m: torch.from_numpy(h) for m, h in histograms.items()})

    def on_test_epoch_end(self) -> None:
        """Reduce across ranks (every rank takes part), then rank 0 runs the dataset-wide protocols."""
        scores = {m: {p: metric.compute() for p, metric in by_protocol.items()}
                  for m, by_protocol in self.metrics.items()}
        masks = self.masks.compute()
        skipped = self.all_skipped()
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
        if not self.trainer.is_global_zero:
            return
        dataset_scores = dataset_protocol_scores(masks, self.settings.protocols, self.metadata.num_classes,
                                                 self.settings)
        for method in METHODS:
            scores[method].update(dataset_scores.scores[method])
        self.results = self._results(scores, masks.num_images, dataset_scores.num_clusters, skipped)
        for method, by_protocol in self.results.scores.items():
            for protocol, s in by_protocol.items():
                self.log(f"{method}/{protocol}/miou", 100 * s.miou, rank_zero_only=True)
        self.log("num_images", float(masks.num_images), rank_zero_only=True)

    def _results(self, scores: Dict[str, Dict[str, SegmentationScores]], num_images: int,
                 num_clusters: Optional[int], skipped: List[Dict[str, str]]) -> EvaluationResults:
        ordered = {m: {p: scores[m][p] for p in PROTOCOLS if p in scores[m]} for m in METHODS}
        protocol_settings = {k: v for k, v in asdict(self.settings).items() if not k.startswith("paper")}
        protocol_settings["dataset_clusters_used"] = num_clusters
        return EvaluationResults(
            dataset=self.dataset, classes=list(self.metadata.classes), num_images=num_images, scores=ordered,
            protocol_settings=protocol_settings, prediction_settings=json.loads(self.cache.settings),
            paper_miou=dict(self.settings.paper_miou), paper_note=self.settings.paper_note, skipped=skipped,
        )


class IndexedDataset(Dataset):
    """A dataset's items with their index added, so every rank's records can be put back in order.

    With `shorter_side`, image and label are first resized so that their shorter side has that many
    pixels and the longer side keeps the aspect ratio (mmsegmentation's keep-ratio resize; image with
    `interpolation`, label with nearest neighbour).
    """

    def __init__(self, dataset: Dataset, shorter_side: Optional[int] = None, interpolation: str = "bicubic") -> None:
        self.dataset = dataset
        self.shorter_side = shorter_side
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = {**self.dataset[index], "index": index}
        if self.shorter_side is not None:
            item["image"], item["label"] = resize_keeping_ratio(item["image"], item["label"], self.shorter_side,
                                                                self.interpolation)
        return item


def resize_keeping_ratio(image: np.ndarray, label: np.ndarray, shorter_side: int,
                         interpolation: str = "bicubic") -> Tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] image and [H, W] label resized to shorter side `shorter_side`, the longer one in proportion."""
    height, width = label.shape
    scale = shorter_side / min(height, width)
    size = (max(shorter_side, int(width * scale + 0.5)), max(shorter_side, int(height * scale + 0.5)))
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
    resized = np.asarray(Image.fromarray(image).resize(size, resample=resample))
    classes = Image.fromarray(label.astype(np.int32), mode="I").resize(size, resample=Image.Resampling.NEAREST)
    return resized, np.asarray(classes).astype(label.dtype)


def only_item(batch: List[dict]) -> dict:
    """Collate of batch size 1 that keeps numpy arrays (full-size images differ in shape)."""
    return batch[0]


class EvaluationData(pl.LightningDataModule):
    """One image per step from a registered split; rank r of w gets images r, r + w, ... (none twice, no padding).

    `size` resizes the shorter side; `crop` (``eval.crop``) then keeps the central size x size square
    (``center``) or the whole image (``none``). `image_list` (COCO-Stuff) and `reduce_zero_label`
    (``folder``) go to the datasets that take them; given to another split, they are a ValueError.
    Lightning's UnrepeatedDistributedSampler shards the split, so Lightning injects no sampler of its own.
    """

    def __init__(self, dataset: str, root: str, size: Optional[int] = None, image_list: Optional[str] = None,
                 num_workers: int = 2, crop: str = "center", reduce_zero_label: bool = False) -> None:
        super().__init__()
        if crop not in CROPS:
            raise ValueError(f"eval.crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.shorter_side = size if crop == "none" else None
        given = {"image_list": image_list, "reduce_zero_label": reduce_zero_label}
        options = {"size": None if crop == "none" else size, **{k: v for k, v in given.items() if v}}
        self.split = build_dataset(dataset, root, **options)
        self.num_workers = num_workers

    def image_ids(self) -> List[str]:
        """The split's image ids in dataset order (the cache file names)."""
        return [sample.id for sample in self.split.samples]

    def test_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > len(self.split):
            raise ValueError(f"{world} processes for {len(self.split)} images: use at most one process per image")
        images = IndexedDataset(self.split, self.shorter_side, getattr(self.split, "interpolation", "bicubic"))
        sampler = UnrepeatedDistributedSampler(images, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(images, batch_size=1, sampler=sampler, num_workers=self.num_workers, collate_fn=only_item)


def run_and_report(trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule,
                   results_dir: Path) -> int:
    """Run `trainer.test` (a stale cache becomes a config error); rank 0 then prints the results table.

    A run stopped by a signal (`emerdiff.stopping`) keeps its cached predictions and returns its exit code.
    """
    try:
        trainer.test(module, datamodule=data, verbose=False)
    except StaleCacheError as exc:
        raise ConfigError(str(exc)) from None
    except RunStopped as stop:
        print(f"{stop}: the predictions made so far are cached; rerun the same command to continue", file=sys.stderr)
        return stop.exit_code
    if trainer.is_global_zero:
        print((Path(results_dir) / "results.md").read_text())
        print(f"results: {Path(results_dir) / 'results.json'} and {Path(results_dir) / 'results.md'}")
    return 0
