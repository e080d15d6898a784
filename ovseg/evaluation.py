"""Open-vocabulary evaluation: plain MaskCLIP and MaskCLIP + EmerDiff masks, scored side by side.

It stands on `emerdiff.evaluation`: the scoring is an `Evaluator` (`OpenVocabEvaluator`, usable
without Lightning), the module a `CachedEvaluation` (cache clean-up, models loaded on first use,
EmerDiff's masks from ``OUTPUT/cache``, the evaluators driven and reset) that adds only the
naming, the results a `ResultsTable`, and the caches, data module and results callback are the
shared ones. What the evaluator gets of an image (`OpenVocabEvaluation.evaluated`):

1. the named label maps come from the labels cache (``OUTPUT/ov/cache/<image id>.npz``) if present;
2. otherwise EmerDiff's masks come from the shared masks cache (``OUTPUT/cache/<image id>.npz``,
   also tools/eval.py's) or, on a miss there too, from the segmentor, and are cached there;
3. the labeller names each mask and computes the per-patch baseline (`ovseg.labeller`); the result
   is cached.

Stable Diffusion and CLIP are each loaded on their first cache miss, so a rerun over full caches
loads neither. Both methods are scored with `emerdiff.evaluation.ConfusionMatrixMetric` in
vocabulary ids against the dataset's class ids; the matrices are summed across DDP ranks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics.aggregation import SumMetric

from emerdiff.config import fingerprint, is_random_model, result_settings
from emerdiff.data import DatasetMetadata
from emerdiff.evaluation import (
    CONVENTIONS_NOTE,
    PAPER,
    CachedEvaluation,
    ConfusionMatrixMetric,
    Evaluator,
    ModuleMap,
    PredictionCache,
    ResultsTable,
    SegmentationScores,
    SegmentorLoader,
    is_main_process,
    percent_cell,
)

from .config import ENCODERS, OVSegConfig
from .labeller import NamingRules, OpenVocabLabeller, check_threshold
from .vocab import Vocabulary

METHODS = ("maskclip", "emerdiff")  # table order: the baseline, then EmerDiff's masks named by it
CELLS = {"maskclip": "per patch", "tcl": "per 4x4 cell"}  # what one dense embedding covers, per encoder
BACKGROUND_NOTES = {
    "prompt": "the background class is named by its text prompts like any other class",
    "constant": "the background class is not embedded: a constant score (TCL's) decides it",
    "ignore": "the background class is neither named nor scored: its pixels are ignored (MaskCLIP's evaluation "
    '"w/o background")',
}


def encoder_title(encoder: str) -> str:
    """The name of dense encoder `encoder` (`ovseg.encoder`) in tables and paper rows."""
    return ENCODERS[encoder].title if encoder in ENCODERS else encoder


def method_titles(encoder: str, baseline: str = "cells") -> dict[str, str]:
    """Table titles of the two methods with dense encoder `encoder` and the baseline's decision `baseline`."""
    name = encoder_title(encoder)
    if baseline == "tcl":
        first = "TCL (its own decision: PAMR, KP branch, background constant)"
    else:
        first = f"{name} ({CELLS.get(encoder, 'per cell')}, upsampled)"
    return {"maskclip": first, "emerdiff": f"{name} + EmerDiff masks"}


METHOD_TITLES = method_titles("maskclip")
PAPER_CONVENTION = "mmseg"  # mIoU convention of the open-vocabulary papers compared with (MaskCLIP, TCL, GroupViT)
OV_DIR = "ov"  # OUTPUT/ov: results and caches of the open-vocabulary evaluation, apart from tools/eval.py's

LabellerLoader = Callable[[torch.device], OpenVocabLabeller]


@dataclass
class OpenVocabPrediction:
    """What the open-vocabulary evaluation keeps of one image, in vocabulary ids at the evaluated resolution."""

    gt: np.ndarray  # [H, W] int64 class ids, the ignore index elsewhere
    ov_labels: np.ndarray  # [H, W] int64 MaskCLIP + EmerDiff: each EmerDiff mask's class; -1 where none
    ov_labels_baseline: np.ndarray  # [H, W] int64 plain MaskCLIP
    mask_classes: np.ndarray  # [K] int64 class of each EmerDiff mask; -1 for masks with no pixel
    mask_scores: np.ndarray  # [K] float32 cosine of each mask to its class; NaN for masks with no pixel

    def labels(self, method: str) -> np.ndarray:
        """The [H, W] label map a method is scored on."""
        return {"emerdiff": self.ov_labels, "maskclip": self.ov_labels_baseline}[method]


def open_vocab_settings(prediction: Mapping[str, Any], settings: OVSegConfig, vocab: Vocabulary) -> dict:
    """What cached labels depend on: EmerDiff's prediction settings, the CLIP side, the vocabulary's content."""
    ovseg = result_settings(settings)
    classes = json.dumps([list(group) for group in vocab.synonyms])
    ovseg["vocab_sha256"] = hashlib.sha256(classes.encode("utf-8")).hexdigest()
    return {**prediction, "ovseg": ovseg}


@dataclass
class OpenVocabResults(ResultsTable):
    """Scores of both methods on one split with one vocabulary, and how they were obtained.

    `classes` are the vocabulary's display names in id order (= the dataset's class ids).
    """

    vocab: str
    scores: dict[str, SegmentationScores]  # method -> scores
    settings: dict[str, Any]  # the labels cache's settings (EmerDiff, CLIP side, vocabulary)
    paper_miou: dict[str, float]
    paper_reference: dict[str, float]
    paper_note: str | None

    def to_dict(self) -> dict:
        """JSON-ready: results[method] holds miou, pixel_acc and per-class iou, in percent (null = absent)."""
        results = {method: s.in_percent(self.classes) for method, s in self.scores.items()}
        return {
            "dataset": self.dataset,
            "vocab": self.vocab,
            "num_images": self.num_images,
            "num_classes": len(self.classes),
            "results": results,
            "paper": {
                "source": PAPER,
                "miou": self.paper_miou,
                "reference": self.paper_reference,
                "note": self.paper_note,
            },
            "settings": self.settings,
            **self.skipped_entry(),
        }

    def logged(self) -> dict[str, float]:
        """Each method's mIoU in percent."""
        return {f"{method}/miou": 100 * s.miou for method, s in self.scores.items()}

    def to_markdown(self) -> str:
        """Our two methods beside the paper's numbers, then the paper's rows with other encoders as reference."""
        ovseg = self.settings["ovseg"]
        encoder = ovseg["encoder"]
        titles = method_titles(encoder, ovseg.get("baseline") or "cells")
        paper, reference = self.paper_rows(encoder)
        rows = [["method", "mIoU", "paper", "pixel acc."], ["---", "---:", "---:", "---:"]]
        for method, s in self.scores.items():
            percent = s.in_percent(self.classes)
            rows.append(
                [
                    titles[method],
                    percent_cell(percent["miou"]),
                    percent_cell(paper.get(method)),
                    percent_cell(percent["pixel_acc"]),
                ]
            )
        for name, miou in reference.items():
            rows.append([f"{name} (paper only, not run here)", "–", percent_cell(miou), "–"])
        notes = [self.paper_note] if self.paper_note else []
        conventions = ", ".join(dict.fromkeys(s.convention for s in self.scores.values()))
        notes.append(f"mIoU convention: {conventions}. {CONVENTIONS_NOTE}")
        notes.append(self.naming_note())
        notes += self.random_weight_notes()
        return self.page(f"Open-vocabulary segmentation: {self.dataset}, vocabulary {self.vocab}", rows, notes)

    def paper_rows(self, encoder: str) -> tuple[dict[str, float], dict[str, float]]:
        """The paper's numbers for our two rows, and its other rows (reference), for dense encoder `encoder`.

        `paper_miou` (method -> mIoU) holds the MaskCLIP rows; `paper_reference` names the rows of the
        other encoders "<encoder>" (plain) and "<encoder> + EmerDiff" (e.g. "TCL", "TCL + EmerDiff"). The rows
        of the encoder that ran go beside ours, every other row is listed as a reference.
        """
        maskclip = {"MaskCLIP": self.paper_miou.get("maskclip"), "MaskCLIP + EmerDiff": self.paper_miou.get("emerdiff")}
        rows = {**{k: v for k, v in maskclip.items() if v is not None}, **self.paper_reference}
        name = encoder_title(encoder)
        ours = {"maskclip": name, "emerdiff": f"{name} + EmerDiff"}
        paper = {method: rows[row] for method, row in ours.items() if row in rows}
        return paper, {row: miou for row, miou in rows.items() if row not in ours.values()}

    def naming_note(self) -> str:
        """Which decision the baseline row is, how the background was treated, and CLIP's activation."""
        ovseg = self.settings["ovseg"]
        baseline = ovseg.get("baseline") or "cells"
        decision = (
            "TCL's own decision (PAMR "
            + ("on" if ovseg.get("tcl_pamr", True) else "off")
            + f", KP weight {ovseg.get('tcl_kp_weight', 0.3)})"
            if baseline == "tcl"
            else "the argmax of per-cell cosines, upsampled bilinearly"
        )
        background = BACKGROUND_NOTES[ovseg.get("background") or "prompt"]
        quick_gelu = ovseg.get("clip_quick_gelu")
        activation = (
            "as the CLIP weights' tag or file says" if quick_gelu is None else "QuickGELU" if quick_gelu else "GELU"
        )
        return (
            f"Baseline row: {decision} (ovseg.baseline={baseline}). Background: {background} "
            f"(ovseg.background={ovseg.get('background') or 'prompt'}; only for vocabularies with a background "
            f"class). Prompts: {ovseg.get('templates')} templates. CLIP activation: {activation}."
        )

    def random_weight_notes(self) -> list[str]:
        """Warnings for numbers that come from random weights (miniature SD, random CLIP)."""
        model, ovseg = self.settings["model"], self.settings["ovseg"]
        notes = []
        if is_random_model(model):
            notes.append("The masks come from a miniature Stable Diffusion with random weights.")
        if ovseg["clip_pretrained"] is None:
            notes.append(f"The class names come from CLIP {ovseg['clip_model']} with random weights.")
        if notes:
            encoder = encoder_title(ovseg["encoder"])
            notes.append(f"These numbers say nothing about the quality of {encoder} or EmerDiff.")
        return notes


class OpenVocabEvaluator(Evaluator):
    """Both methods' named label maps against the dataset's classes, under the mIoU `convention`;
    `process` takes an `OpenVocabPrediction`, `evaluate` gives the `OpenVocabResults`."""

    def __init__(
        self,
        dataset: str,
        metadata: DatasetMetadata,
        vocab: Vocabulary,
        settings: OVSegConfig,
        labels_settings: Mapping[str, Any],
        convention: str = PAPER_CONVENTION,
    ) -> None:
        if len(vocab) != metadata.num_classes:
            raise ValueError(
                f"vocabulary {settings.vocab!r} has {len(vocab)} classes but {dataset} has "
                f"{metadata.num_classes}: scoring compares vocabulary ids with the dataset's class ids"
            )
        super().__init__()
        self.dataset = dataset
        self.vocab = vocab
        self.settings = settings
        self.labels_settings = json.loads(fingerprint(labels_settings))  # sorted keys, as the labels cache records them
        self.metrics = ModuleMap(
            {m: ConfusionMatrixMetric(len(vocab), metadata.ignore_index, convention) for m in METHODS}
        )
        self.num_images = SumMetric()

    def process(self, image_index: int, named: OpenVocabPrediction) -> None:
        """Score both methods' label maps of one image."""
        target = torch.from_numpy(self.scored_ground_truth(named.gt))
        for method in METHODS:
            self.metrics[method].update(torch.from_numpy(named.labels(method)), target)
        self.num_images.update(1.0)

    def scored_ground_truth(self, gt: np.ndarray) -> np.ndarray:
        """The ground truth as scored: background pixels ignored when the background is (ovseg.background=ignore)."""
        ignored = NamingRules.from_settings(self.settings, self.vocab.background).ignored
        return gt if ignored is None else np.where(gt == ignored, self.metrics[METHODS[0]].ignore_index, gt)

    def evaluate(self) -> OpenVocabResults | None:
        """Reduce across processes (every process takes part); the main one assembles the results."""
        scores = {method: self.metrics[method].compute() for method in METHODS}
        num_images = int(self.num_images.compute())
        if not is_main_process():
            return None
        return OpenVocabResults(
            dataset=self.dataset,
            vocab=str(self.settings.vocab),
            classes=list(self.vocab.names),
            num_images=num_images,
            scores=scores,
            settings=self.labels_settings,
            paper_miou=dict(self.settings.paper_miou),
            paper_reference=dict(self.settings.paper_reference),
            paper_note=self.settings.paper_note,
        )


class OpenVocabEvaluation(CachedEvaluation):
    """`Trainer.test` names cached or fresh EmerDiff masks with CLIP and scores them beside plain MaskCLIP.

    `load_segmentor(trainer)` and `load_labeller(device)` are called on the first image that needs
    them (see the module docstring); the `OpenVocabEvaluator` scores both methods under the mIoU
    `convention` (`emerdiff.evaluation.metrics`). After the test epoch, ``results`` holds the
    OpenVocabResults on global rank 0.
    """

    def __init__(
        self,
        load_segmentor: SegmentorLoader,
        load_labeller: LabellerLoader,
        masks: PredictionCache,
        labels: PredictionCache,
        dataset: str,
        metadata: DatasetMetadata,
        vocab: Vocabulary,
        settings: OVSegConfig,
        convention: str = PAPER_CONVENTION,
        max_repeated_failures: int = 0,
    ) -> None:
        evaluator = OpenVocabEvaluator(dataset, metadata, vocab, settings, json.loads(labels.settings), convention)
        check_threshold(vocab.background, settings.background_threshold)
        super().__init__(
            load_segmentor, masks, labels, evaluators=[evaluator], max_repeated_failures=max_repeated_failures
        )
        self.load_labeller = load_labeller
        self.labeller: OpenVocabLabeller | None = None
        self.labels = labels

    def evaluated(self, image: np.ndarray, image_id: str, gt: np.ndarray) -> OpenVocabPrediction:
        """The named label maps of one image: from the cache, or named now and then cached."""
        named = self.labels.load(image_id, gt)
        if named is None:
            named = self.name_masks(image, image_id, gt)
            self.labels.save(image_id, named)
        return named

    def name_masks(self, image: np.ndarray, image_id: str, gt: np.ndarray) -> OpenVocabPrediction:
        """EmerDiff's masks (cached or predicted, then cached) named by the labeller, and the baseline."""
        masks = self.prediction(image, image_id, gt)
        named = self._labeller()(image, masks.labels, num_masks=masks.num_masks)
        return OpenVocabPrediction(
            gt=gt,
            ov_labels=named.label_map.numpy(),
            ov_labels_baseline=named.baseline.numpy(),
            mask_classes=named.class_ids.numpy(),
            mask_scores=named.scores.numpy().astype(np.float32),
        )

    def _labeller(self) -> OpenVocabLabeller:
        """The CLIP labeller on this module's device, loaded (text embedded) on first use."""
        return self._loaded("labeller", lambda: self.load_labeller(self.device).requires_grad_(False))
