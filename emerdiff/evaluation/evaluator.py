"""Evaluators apart from Lightning: detectron2's reset / process / evaluate, over torchmetrics states.

An evaluator is an `nn.Module` of torchmetrics `Metric`s: `reset` empties them, `process` adds one
image's prediction, and `evaluate` (called by every process) reduces them, summed or concatenated
across DDP processes by torchmetrics when a process group is up, and returns the results table on
the main process (None elsewhere). No Lightning is needed: `evaluate_all` scores a list of
predictions from a plain Python interpreter, and `emerdiff.evaluation.module.CachedEvaluation`
drives a list of evaluators under ``Trainer.test``.

`UnsupervisedEvaluator` scores every protocol of `eval.protocols` in one pass, on EmerDiff's
labels and on the bilinear upsampling of the same low-resolution masks (`emerdiff.evaluation.scoring`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any, Generic, TypeVar, cast

import torch
from torch import nn
from torchmetrics import Metric

from ..choices import PROTOCOLS
from ..config import EvalConfig, fingerprint
from ..data import DatasetMetadata
from .boundary import SegmentationWithBoundary
from .cache import CachedPrediction
from .metrics import SegmentationScores
from .report import EvaluationResults, ResultsTable
from .scoring import (
    METHODS,
    PER_IMAGE_PROTOCOLS,
    MaskRecords,
    check_settings,
    dataset_protocol_scores,
    image_class_maps,
    miou_convention,
)


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ModuleMap(nn.ModuleDict, Generic[ModuleT]):
    """A ModuleDict of one kind of module (metrics by method, by protocol), whose entries read as that kind."""

    def __init__(self, modules: Mapping[str, ModuleT]) -> None:
        super().__init__(modules)

    def __getitem__(self, key: str) -> ModuleT:
        return cast(ModuleT, super().__getitem__(key))  # torch types every entry nn.Module; __init__ took ModuleTs


class ModuleSeq(nn.ModuleList, Generic[ModuleT]):
    """A ModuleList of one kind of module (evaluators), whose entries read as that kind."""

    def __init__(self, modules: Iterable[ModuleT]) -> None:
        super().__init__(modules)

    def __iter__(self) -> Iterator[ModuleT]:
        return cast(Iterator[ModuleT], super().__iter__())  # torch types every entry nn.Module; __init__ took ModuleTs


class Evaluator(nn.Module):
    """Scores predictions image by image; its metrics are submodules, so they follow the module's device."""

    def reset(self) -> None:
        """Empty every metric state, so that a new pass starts from nothing."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def process(self, image_index: int, prediction: Any) -> None:
        """Add one image's prediction (`image_index`: its place in the split, so records can be put in order)."""
        raise NotImplementedError

    def evaluate(self) -> ResultsTable | None:
        """The results of everything processed since `reset`, on the main process (None elsewhere); every process
        must call it."""
        raise NotImplementedError


def evaluate_all(evaluator: Evaluator, predictions: Iterable[Any]) -> ResultsTable | None:
    """Score `predictions` (one per image, in split order) from a clean state: the evaluation loop without a model."""
    evaluator.reset()
    for index, prediction in enumerate(predictions):
        evaluator.process(index, prediction)
    return evaluator.evaluate()


class UnsupervisedEvaluator(Evaluator):
    """Every protocol of `settings.protocols`, for both methods, on one split; `process` takes a `CachedPrediction`.

    `prediction_settings` (what the predictions were made with) is recorded in the results as their canonical
    text reads back (`emerdiff.config.fingerprint`), as the prediction cache records it.
    """

    def __init__(
        self, dataset: str, metadata: DatasetMetadata, settings: EvalConfig, prediction_settings: Mapping[str, Any]
    ) -> None:
        check_settings(settings)
        super().__init__()
        self.dataset = dataset
        self.metadata = metadata
        self.settings = settings
        self.prediction_settings = json.loads(fingerprint(prediction_settings))
        self.per_image = [p for p in settings.protocols if p in PER_IMAGE_PROTOCOLS]
        self.metrics = ModuleMap(
            {
                method: ModuleMap(
                    {
                        p: SegmentationWithBoundary(
                            metadata.num_classes, metadata.ignore_index, miou_convention(p, settings)
                        )
                        for p in self.per_image
                    }
                )
                for method in METHODS
            }
        )
        self.masks = MaskRecords(METHODS)

    def process(self, image_index: int, prediction: CachedPrediction) -> None:
        """Update the per-image metrics and record the masks for the dataset-wide protocols."""
        gt = torch.from_numpy(prediction.gt)
        maps = image_class_maps(prediction, self.metadata, self.settings, self.per_image)
        for method in METHODS:
            for protocol in self.per_image:
                self.metrics[method][protocol].update(torch.from_numpy(maps.classes[method][protocol]), gt)
        self.masks.update(
            image_index,
            torch.from_numpy(prediction.mask_embeddings),
            {m: torch.from_numpy(h) for m, h in maps.histograms.items()},
        )

    def evaluate(self) -> EvaluationResults | None:
        """Reduce across processes (every process takes part), then the main one runs the dataset-wide protocols."""
        scores: dict[str, dict[str, SegmentationScores]] = {
            m: {p: self.metrics[m][p].compute() for p in self.metrics[m]} for m in self.metrics
        }
        masks = self.masks.compute()
        if not is_main_process():
            return None
        dataset_scores = dataset_protocol_scores(
            masks, self.settings.protocols, self.metadata.num_classes, self.settings
        )
        for method in METHODS:
            scores[method].update(dataset_scores.scores[method])
        ordered = {m: {p: scores[m][p] for p in PROTOCOLS if p in scores[m]} for m in METHODS}
        protocol_settings: dict[str, Any] = {
            k: v for k, v in asdict(self.settings).items() if not k.startswith("paper")
        }
        protocol_settings["dataset_clusters_used"] = dataset_scores.num_clusters
        return EvaluationResults(
            dataset=self.dataset,
            classes=list(self.metadata.classes),
            num_images=masks.num_images,
            scores=ordered,
            protocol_settings=protocol_settings,
            prediction_settings=self.prediction_settings,
            paper_miou=dict(self.settings.paper_miou),
            paper_note=self.settings.paper_note,
        )
