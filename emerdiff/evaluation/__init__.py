"""Evaluation of EmerDiff on labelled splits, every protocol in one pass (docs/evaluation.md).

Parts, each one module, every import pointing down this list:

- `protocols`: how class-agnostic masks get class ids (per image, per dataset, concept embedding);
- `metrics`: mIoU and pixel accuracy from a confusion matrix that sums across DDP ranks;
- `cache`: the ``OUTPUT/cache/<image id>.npz`` format and when an entry is stale;
- `scoring`: which protocol runs where, and the dataset-wide protocols on the gathered masks;
- `report`: the results (results.json, results.md) and the files they go to;
- `evaluator`: evaluators (reset / process / evaluate) over torchmetrics states, usable without Lightning;
- `module`: the Lightning side: the caching module that drives a list of evaluators, the results callback,
  the data module;
- `figure`: a finished evaluation's comparison figure (image, ground truth, the three methods' matched classes).

Names are imported on first use (PEP 562), so scoring from a plain interpreter never loads Lightning.
The choice tables (protocols, mIoU conventions, crops) are `emerdiff.choices`.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "CACHE_DIR": "cache",
    "CachedPrediction": "cache",
    "PredictionCache": "cache",
    "StaleCacheError": "cache",
    "prediction_settings": "cache",
    "ConfusionMatrixMetric": "metrics",
    "SegmentationScores": "metrics",
    "scores_from_confusion": "metrics",
    "UNMATCHED": "protocols",
    "CONVENTIONS_NOTE": "report",
    "PAPER": "report",
    "EvaluationResults": "report",
    "ResultsTable": "report",
    "percent_cell": "report",
    "write_results": "report",
    "METHODS": "scoring",
    "PER_IMAGE_PROTOCOLS": "scoring",
    "DatasetMasks": "scoring",
    "DatasetScores": "scoring",
    "MaskRecords": "scoring",
    "check_settings": "scoring",
    "confusion_from_histograms": "scoring",
    "dataset_protocol_scores": "scoring",
    "miou_convention": "scoring",
    "per_image_class_map": "scoring",
    "Evaluator": "evaluator",
    "ModuleMap": "evaluator",
    "UnsupervisedEvaluator": "evaluator",
    "evaluate_all": "evaluator",
    "is_main_process": "evaluator",
    "FIGURE": "figure",
    "SavedEvaluation": "figure",
    "evaluation_figure": "figure",
    "figure_ids": "figure",
    "CachedEvaluation": "module",
    "EvaluationData": "module",
    "IndexedDataset": "module",
    "SaveResults": "module",
    "SegmentorLoader": "module",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
