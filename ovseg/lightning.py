"""Open-vocabulary evaluation under Lightning: plain MaskCLIP and MaskCLIP + EmerDiff masks, scored side by side.

Per image (one `test_step`):

1. the named label maps come from the labels cache (``OUTPUT/ov/cache/<image id>.npz``) if present;
2. otherwise EmerDiff's masks come from tools/eval.py's cache (``OUTPUT/cache/<image id>.npz``) or,
   on a miss there too, from the segmentor, and are saved in that cache for tools/eval.py to reuse;
3. the labeller names each mask and computes the per-patch baseline (`ovseg.pipeline`); the result
   is cached.

Stable Diffusion and CLIP are each loaded on their first cache miss, so a rerun over full caches
loads neither. Both methods are scored with `emerdiff.metrics.ConfusionMatrixMetric` in
vocabulary ids against the dataset's class ids; the matrices are summed across DDP ranks.
The cache format, data module and results writer are the ones of `emerdiff.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.aggregation import SumMetric

from emerdiff.config import OVSegConfig, result_settings
from emerdiff.data import DatasetMetadata
from emerdiff.evaluation import PAPER, CachedPrediction, PredictionCache, SegmentorLoader
from emerdiff.metrics import ConfusionMatrixMetric, SegmentationScores

from .pipeline import OpenVocabLabeller, check_threshold
from .vocab import Vocabulary

METHODS = ("maskclip", "emerdiff")  # table order: the baseline, then EmerDiff's masks named by it
METHOD_TITLES = {"maskclip": "MaskCLIP (per patch, upsampled)", "emerdiff": "MaskCLIP + EmerDiff masks"}

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
    ovseg = result_settings("ovseg", asdict(settings))
    classes = json.dumps([list(group) for group in vocab.synonyms])
    ovseg["vocab_sha256"] = hashlib.sha256(classes.encode("utf-8")).hexdigest()
    return {**prediction, "ovseg": ovseg}


def _cell(value: Optional[float]) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


@dataclass
class OpenVocabResults:
    """Scores of both methods on one split with one vocabulary, and how they were obtained."""

    dataset: str
    vocab: str
    classes: List[str]  # vocabulary display names in id order (= the dataset's class ids)
    num_images: int
    scores: Dict[str, SegmentationScores]  # method -> scores
    settings: Dict[str, Any]  # the labels cache's settings (EmerDiff, CLIP side, vocabulary)
    paper_miou: Dict[str, float]
    paper_reference: Dict[str, float]
    paper_note: Optional[str]

    def to_dict(self) -> dict:
        """JSON-ready: results[method] holds miou, pixel_acc and per-class iou, in percent (null = absent)."""
        results = {method: s.in_percent(self.classes) for method, s in self.scores.items()}
        return {
            "dataset": self.dataset, "vocab": self.vocab, "num_images": self.num_images,
            "num_classes": len(self.classes), "results": results,
            "paper": {"source": PAPER, "miou": self.paper_miou, "reference": self.paper_reference,
                      "note": self.paper_note},
            "settings": self.settings,
        }

    def to_markdown(self) -> str:
        """Our two methods beside the paper's numbers, then the paper's rows with other encoders as reference."""
        rows = [["method", "mIoU", "paper", "pixel acc."], ["---", "---:", "---:", "---:"]]
        for method, s in self.scores.items():
            percent = s.in_percent(self.classes)
            rows.append([METHOD_TITLES[method], _cell(percent["miou"]), _cell(self.paper_miou.get(method)),
                         _cell(percent["pixel_acc"])])
        for name, miou in self.paper_reference.items():
            rows.append([f"{name} (paper only, not run here)", "–", _cell(miou), "–"])
        lines = [f"# Open-vocabulary segmentation: {self.dataset}, vocabulary {self.vocab}", "",
                 f"{self.num_images} images, {len(self.classes)} classes; all numbers in percent. "
                 f"\"paper\": the mIoU reported by {PAPER}, where it reports one.", ""]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        notes = [self.paper_note] if self.paper_note else []
        notes += self.random_weight_notes()
        lines += [""] + [f"- {note}" for note in notes]
        return "\n".join(lines).rstrip() + "\n"

    def random_weight_notes(self) -> List[str]:
        """Warnings for numbers that come from random weights (miniature SD, random CLIP)."""
        model, ovseg = self.settings["model"], self.settings["ovseg"]
        notes = []
        if model["pretrained"] == "tiny" or model["random_init"]:
            notes.append("The masks come from a miniature Stable Diffusion with random weights.")
        if ovseg["clip_pretrained"] is None:
            notes.append(f"The class names come from CLIP {ovseg['clip_model']} with random weights.")
        if notes:
            notes.append("These numbers say nothing about the quality of MaskCLIP or EmerDiff.")
        return notes


class OpenVocabEvaluation(pl.LightningModule):
    """`Trainer.test` names cached or fresh EmerDiff masks with CLIP and scores them beside plain MaskCLIP.

    `load_segmentor(trainer)` and `load_labeller(device)` are called on the first image that needs
    them (see the module docstring). After the test epoch, ``results`` holds the OpenVocabResults
    on global rank 0 (None elsewhere).
    """

    def __init__(self, load_segmentor: SegmentorLoader, load_labeller: LabellerLoader, masks: PredictionCache,
                 labels: PredictionCache, dataset: str, metadata: DatasetMetadata, vocab: Vocabulary,
                 settings: OVSegConfig) -> None:
        super().__init__()
        if len(vocab) != metadata.num_classes:
            raise ValueError(f"vocabulary {settings.vocab!r} has {len(vocab)} classes but {dataset} has "
                             f"{metadata.num_classes}: scoring compares vocabulary ids with the dataset's class ids")
        check_threshold(vocab.background, settings.background_threshold)
        self.load_segmentor = load_segmentor
        self.load_labeller = load_labeller
        self.segmentor: Optional[nn.Module] = None
        self.labeller: Optional[OpenVocabLabeller] = None
        self.masks = masks
        self.labels = labels
        self.dataset = dataset
        self.vocab = vocab
        self.settings = settings
        self.metrics = nn.ModuleDict({m: ConfusionMatrixMetric(len(vocab), metadata.ignore_index) for m in METHODS})
        self.num_images = SumMetric()
        self.results: Optional[OpenVocabResults] = None

    def setup(self, stage: str) -> None:
        """Rank 0 drops temporary files a killed run left; Lightning's post-setup barrier holds the others."""
        if self.trainer.is_global_zero:
            self.masks.remove_temporary_files()
            self.labels.remove_temporary_files()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Fetch or compute one image's named label maps, then score both methods."""
        image_id, gt = batch["meta"]["id"], np.asarray(batch["label"], dtype=np.int64)
        named = self.labels.load(image_id, gt)
        if named is None:
            named = self.name_masks(batch["image"], image_id, gt)
            self.labels.save(image_id, named)
        target = torch.from_numpy(named.gt)
        for method in METHODS:
            self.metrics[method].update(torch.from_numpy(named.labels(method)), target)
        self.num_images.update(1.0)

    def name_masks(self, image: np.ndarray, image_id: str, gt: np.ndarray) -> OpenVocabPrediction:
        """EmerDiff's masks (cached or predicted, then cached) named by the labeller, and the baseline."""
        masks = self.masks.load(image_id, gt)
        if masks is None:
            masks = CachedPrediction.from_output(self._segmentor().segment(image), gt)
            self.masks.save(image_id, masks)
        named = self._labeller()(image, masks.labels, num_masks=masks.num_masks)
        return OpenVocabPrediction(gt=gt, ov_labels=named.labels.numpy(), ov_labels_baseline=named.baseline.numpy(),
                                   mask_classes=named.mask_classes.numpy(),
                                   mask_scores=named.mask_scores.numpy().astype(np.float32))

    def on_test_epoch_end(self) -> None:
        """Reduce across ranks (every rank takes part), then rank 0 assembles the results."""
        scores = {method: self.metrics[method].compute() for method in METHODS}
        num_images = int(self.num_images.compute())
        if not self.trainer.is_global_zero:
            return
        self.results = OpenVocabResults(
            dataset=self.dataset, vocab=str(self.settings.vocab), classes=list(self.vocab.names),
            num_images=num_images, scores=scores, settings=json.loads(self.labels.settings),
            paper_miou=dict(self.settings.paper_miou), paper_reference=dict(self.settings.paper_reference),
            paper_note=self.settings.paper_note,
        )
        for method, s in scores.items():
            self.log(f"{method}/miou", 100 * s.miou, rank_zero_only=True)

    def _segmentor(self) -> nn.Module:
        """The segmentor on this module's device, loaded on first use."""
        if self.segmentor is None:
            with torch.inference_mode(False):
                self.segmentor = self.load_segmentor(self.trainer).eval().requires_grad_(False).to(self.device)
        return self.segmentor

    def _labeller(self) -> OpenVocabLabeller:
        """The CLIP labeller on this module's device, loaded (text embedded) on first use."""
        if self.labeller is None:
            with torch.inference_mode(False):
                self.labeller = self.load_labeller(self.device).requires_grad_(False)
        return self.labeller
