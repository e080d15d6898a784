"""Lightning around the segmentor: a frozen module for `Trainer.predict`, the callback that saves results,
and a progress bar counting images.

>>> trainer = Trainer(callbacks=[PredictionWriter(store)], use_distributed_sampler=True, logger=False)
>>> trainer.predict(EmerDiffPredictor(EmerDiff.from_config(cfg)), datamodule=PredictImages(images),
...                 return_predictions=False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from torch import nn

from ..image import ImageLoadError
from ..segmentor import EmerDiff, SegmentationOutput
from ..stopping import RepeatedFailures
from .inputs import PredictSample
from .outputs import ImageExtras, PredictedImage

log = logging.getLogger(__name__)


class ExtrasStep(Protocol):
    """The module side of a plug-in: computes an image's extras from the photo and its segmentation.

    Usually an ``nn.Module`` (then Lightning moves it to the device with the segmentor), e.g.
    ``ovseg.outputs.MaskNamer``.
    """

    def __call__(self, image: torch.Tensor, output: SegmentationOutput) -> ImageExtras:
        """`image`: [3, H, W] uint8 as read; `output`: its segmentation."""


class EmerDiffPredictor(pl.LightningModule):
    """A frozen segmentor (an `EmerDiff`); `predict_step` returns one PredictedImage per image.

    An optional `extras` step adds a plug-in's results to every image (`PredictedImage.extras`).
    """

    def __init__(self, segmentor: EmerDiff, extras: ExtrasStep | None = None) -> None:
        super().__init__()
        self.segmentor = segmentor.eval().requires_grad_(False)
        self.extras = extras.eval().requires_grad_(False) if isinstance(extras, nn.Module) else extras
        self.allow_zero_length_dataloader_with_multiple_devices = True  # fewer images than ranks

    def predict_step(self, batch: Sequence[PredictSample], batch_idx: int) -> list[PredictedImage]:
        """Segment every image of the batch; samples that could not be read come back with their error."""
        return [self._segment(sample) for sample in batch]

    def _segment(self, sample: PredictSample) -> PredictedImage:
        """One image's result; any error inside its segmentation is recorded with it, and the run goes on."""
        if sample.image is None:  # it could not be read: sample.error says why
            return PredictedImage(sample.name, sample.path, error=sample.error, error_type=ImageLoadError.__name__)
        start = time.perf_counter()
        try:
            output = self.segmentor.segment(sample.image)
            extras = None if self.extras is None else self.extras(sample.image, output)
        except Exception as exc:  # one image's failure (out of memory, a NaN, a faiss error) must not end the run
            log.debug("segmenting %s failed", sample.path, exc_info=True)
            return PredictedImage(sample.name, sample.path, error=str(exc), error_type=type(exc).__name__)
        return PredictedImage(
            sample.name, sample.path, sample.image.cpu(), output, time.perf_counter() - start, extras=extras
        )


class ResultStore(Protocol):
    """Where a PredictionWriter puts results (emerdiff.predict.OutputStore)."""

    def begin_run(self) -> None: ...

    def save(self, result: PredictedImage, rank: int) -> None: ...

    def record_failure(self, result: PredictedImage, rank: int) -> None: ...

    def finish_run(self) -> None: ...


class PredictionWriter(BasePredictionWriter):
    """Lightning's prediction writer into a results folder: each rank saves its own images as their batches end;
    rank 0 prepares and finalises the store."""

    def __init__(self, store: ResultStore, max_repeated_failures: int = 0) -> None:
        super().__init__(write_interval="batch")
        self.store = store
        self.repeated = RepeatedFailures(max_repeated_failures)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning's own check of the module first; then rank 0 tidies up after an earlier run (Lightning's
        post-setup barrier holds the other ranks)."""
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            self.store.begin_run()

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Save each result, or record why its image failed."""
        for result in prediction:
            if result.error is None:
                self.store.save(result, trainer.global_rank)
            else:
                log.warning("skipped %s: %s: %s", result.path, result.error_type, result.error)
                self.store.record_failure(result, trainer.global_rank)
        for result in prediction:  # every result is saved before a run of equal failures stops the run
            self.repeated.record(None if result.error is None else (result.error_type, result.error))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A run stopped early (a signal, repeated failures, an error): rank 0 still merges what was saved."""
        if trainer.is_global_zero:
            self.store.finish_run()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Once every rank is done (also ranks that had no images), rank 0 merges their records."""
        trainer.strategy.barrier("emerdiff-results")
        if trainer.is_global_zero:
            self.store.finish_run()


class ImagesProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting images (one per step) and showing images/s, in prediction and evaluation."""

    def init_predict_tqdm(self) -> Tqdm:
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def init_test_tqdm(self) -> Tqdm:
        bar = super().init_test_tqdm()
        bar.unit = "img"
        return bar

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Close the bar where it stands (ending its line), so that the message a stopped run prints starts a line."""
        for bar in (self._predict_progress_bar, self._test_progress_bar):
            if bar is not None:
                bar.close()
