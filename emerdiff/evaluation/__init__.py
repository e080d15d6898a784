"""Evaluation of EmerDiff on labelled splits, every protocol in one pass (docs/evaluation.md).

Parts, each one module, every import pointing down this list:

- `protocols`: how class-agnostic masks get class ids (per image, per dataset, concept embedding);
- `metrics`: mIoU and pixel accuracy from a confusion matrix that sums across DDP ranks;
- `cache`: the ``OUTPUT/cache/<image id>.npz`` format and when an entry is stale;
- `scoring`: which protocol runs where, and the dataset-wide protocols on the gathered masks;
- `report`: the results (results.json, results.md) and the callback that writes them;
- `module`: the Lightning modules (a shared base, the unsupervised evaluation) and the data module.
"""

from ..config import PROTOCOLS
from .cache import CACHE_DIR, CachedPrediction, PredictionCache, StaleCacheError, prediction_settings
from .metrics import MIOU_CONVENTIONS, ConfusionMatrixMetric, SegmentationScores, scores_from_confusion
from .module import (CachedEvaluation, EvaluationData, EvaluationModule, IndexedDataset, SegmentorLoader,
                     run_and_report)
from .protocols import UNMATCHED
from .report import CONVENTIONS_NOTE, PAPER, EvaluationResults, ResultsTable, ResultsWriter, percent_cell, write_results
from .scoring import (DATASET_PROTOCOLS, METHODS, PAPER_CONVENTIONS, PER_IMAGE_PROTOCOLS, DatasetMasks, DatasetScores,
                      MaskRecords, check_settings, confusion_from_histograms, dataset_protocol_scores, miou_convention,
                      per_image_class_map)

__all__ = [
    "CACHE_DIR", "CONVENTIONS_NOTE", "CachedEvaluation", "CachedPrediction", "ConfusionMatrixMetric", "DATASET_PROTOCOLS", "DatasetMasks",
    "DatasetScores", "EvaluationData", "EvaluationModule", "EvaluationResults", "IndexedDataset", "METHODS",
    "MIOU_CONVENTIONS", "MaskRecords", "PAPER", "PAPER_CONVENTIONS", "PER_IMAGE_PROTOCOLS", "PROTOCOLS", "PredictionCache", "ResultsTable", "ResultsWriter",
    "SegmentationScores", "SegmentorLoader", "StaleCacheError", "UNMATCHED", "check_settings",
    "confusion_from_histograms", "dataset_protocol_scores", "miou_convention", "per_image_class_map", "percent_cell",
    "prediction_settings", "run_and_report", "scores_from_confusion", "write_results",
]
