"""Lightning around the segmentor: a frozen module for `Trainer.predict` and the callback that saves results.

>>> trainer = Trainer(callbacks=[ResultWriter(store)], use_distributed_sampler=False, logger=False)
>>> trainer.predict(EmerDiffPredictor(EmerDiff.from_config(cfg)), datamodule=PredictImages(images),
...                 return_predictions=False)
"""

from __future__ import annotations

import logging
import time
from typing import Any, List, Optional, Protocol, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from torch import nn

from .image import ImageLoadError
from .inputs import ImageItem
from .outputs import ImageResult

log = logging.getLogger(__name__)


class EmerDiffPredictor(pl.LightningModule):
    """A frozen segmentor (anything with ``segment(image)``); `predict_step` returns one ImageResult per image.

    An optional `namer` (a module called as ``namer(image [3, H, W] uint8, output) -> MaskNames``, e.g.
    ``ovseg.pipeline.MaskNamer``) names every mask from a vocabulary.
    """

    def __init__(self, segmentor: nn.Module, namer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.segmentor = segmentor.eval().requires_grad_(False)
        self.namer = None if namer is None else namer.eval().requires_grad_(False)
        self.allow_zero_length_dataloader_with_multiple_devices = True  # fewer images than ranks

    def predict_step(self, batch: Sequence[ImageItem], batch_idx: int) -> List[ImageResult]:
        """Segment every image of the batch; items that could not be read come back with their error."""
        return [self._segment(item) for item in batch]

    def _segment(self, item: ImageItem) -> ImageResult:
        if item.error is not None:
            return ImageResult(item.name, item.path, error=item.error)
        start = time.perf_counter()
        try:
            output = self.segmentor.segment(item.image)
        except ImageLoadError as exc:
            return ImageResult(item.name, item.path, error=str(exc))
        names = None if self.namer is None else self.namer(item.image, output)
        return ImageResult(item.name, item.path, item.image.cpu(), output, time.perf_counter() - start, names=names)


class ResultStore(Protocol):
    """Where a ResultWriter puts results (emerdiff.outputs.OutputStore)."""

    def begin_run(self) -> None: ...

    def save(self, result: ImageResult, rank: int) -> None: ...

    def record_failure(self, result: ImageResult, rank: int) -> None: ...

    def finish_run(self) -> None: ...


class ResultWriter(BasePredictionWriter):
    """Each rank saves its own images as their batches end; rank 0 prepares and finalises the store."""

    def __init__(self, store: ResultStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0 tidies up after an earlier run; Lightning's post-setup barrier holds the other ranks."""
        if trainer.is_global_zero:
            self.store.begin_run()

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Save each result, or record why its image failed."""
        for result in prediction:
            if result.error is None:
                self.store.save(result, trainer.global_rank)
            else:
                log.warning("skipped %s: %s", result.path, result.error)
                self.store.record_failure(result, trainer.global_rank)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Once every rank is done (also ranks that had no images), rank 0 merges their records."""
        trainer.strategy.barrier("emerdiff-results")
        if trainer.is_global_zero:
            self.store.finish_run()


class ImagesProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting images (one per step) and showing images/s."""

    def init_predict_tqdm(self) -> Tqdm:
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar
