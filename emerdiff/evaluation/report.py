"""Results of an evaluation: the JSON-ready numbers, the markdown table, and the files they go to.

`ResultsTable` is what every evaluation's results share (the split, its classes, the image
count, the table layout); `EvaluationResults` is the unsupervised evaluation's (tools/eval.py),
``ovseg.evaluation.OpenVocabResults`` the open-vocabulary one's. After ``Trainer.test``, the
`ResultsWriter` callback writes the module's ``results`` as results.json and results.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl

from ..config import PROTOCOLS, is_random_model
from ..files import atomic_file
from .metrics import SegmentationScores

PAPER = "Namekata et al., EmerDiff, ICLR 2024"
PROTOCOL_TITLES = {
    "hungarian": "per-image Hungarian",
    "majority": "per-image majority (many-to-one)",
    "dataset": "dataset-level k-means + Hungarian (Table 1)",
    "concept_image": "concept embedding, per-image concepts (Table 2)",
    "concept_dataset": "concept embedding, dataset concepts (Table 2)",
}
METHOD_TITLES = {"emerdiff": "EmerDiff", "bilinear": "bilinear"}
CONVENTIONS_NOTE = ("mIoU conventions: detectron2 averages the classes present in the ground truth; mmseg every class "
                    "with a non-empty union (a predicted but absent class scores 0); stego as mmseg, after a Hungarian "
                    "matching that gives every cluster a class, zero-overlap pairs included (docs/evaluation.md).")


def percent_cell(value: Optional[float]) -> str:
    """A table cell of a number already in percent: one decimal, "–" for None or NaN (no score)."""
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


@dataclass
class ResultsTable:
    """What every evaluation's results hold and how their markdown page is laid out."""

    dataset: str
    classes: List[str]  # class names in id order
    num_images: int  # images scored
    skipped: List[Dict[str, str]] = field(default_factory=list, kw_only=True)  # images whose prediction failed

    def to_dict(self) -> dict:
        """JSON-ready numbers (results.json)."""
        raise NotImplementedError

    def skipped_entry(self) -> dict:
        """``{"skipped": [...]}`` for results.json when an image failed, else nothing (results stay as they were)."""
        return {"skipped": self.skipped} if self.skipped else {}

    def to_markdown(self) -> str:
        """The results page (results.md)."""
        raise NotImplementedError

    def page(self, title: str, rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
        """``# title``, the counts, the table (header row, alignment row, rows) and the notes as a list."""
        lines = [f"# {title}", "",
                 f"{self.num_images} images, {len(self.classes)} classes; all numbers in percent. "
                 f"\"paper\": the mIoU reported by {PAPER}, where it reports one.", ""]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if self.skipped:
            notes = [*notes, f"Scored over {self.num_images} images: {len(self.skipped)} failed and are left out "
                             f"(listed under \"skipped\" in results.json): "
                             + ", ".join(f"{r['id']} ({r['type']})" for r in self.skipped[:10])
                             + (", ..." if len(self.skipped) > 10 else "")]
        lines += [""] + [f"- {note}" for note in notes]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class EvaluationResults(ResultsTable):
    """Scores of every (method, protocol) on one split, and how they were obtained."""

    scores: Dict[str, Dict[str, SegmentationScores]]  # method -> protocol -> scores
    protocol_settings: Dict[str, Any]
    prediction_settings: Dict[str, Any]
    paper_miou: Dict[str, Dict[str, float]] = field(default_factory=dict)
    paper_note: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready: results[method][protocol] holds miou, pixel_acc and per-class iou, in percent (null = absent)."""
        results = {
            method: {protocol: s.in_percent(self.classes) for protocol, s in by_protocol.items()}
            for method, by_protocol in self.scores.items()
        }
        return {
            "dataset": self.dataset, "num_images": self.num_images, "num_classes": len(self.classes),
            "results": results, "paper": {"source": PAPER, "miou": self.paper_miou, "note": self.paper_note},
            "protocol_settings": self.protocol_settings, "prediction_settings": self.prediction_settings,
            **self.skipped_entry(),
        }

    def to_markdown(self) -> str:
        """The protocol x method grid (mIoU and pixel accuracy), the paper's mIoU beside ours."""
        methods = list(self.scores)
        protocols = [p for p in PROTOCOLS if any(p in self.scores[m] for m in methods)]
        header = ["protocol"]
        for m in methods:
            header += [f"{METHOD_TITLES[m]} mIoU", "paper"]
        header += [f"{METHOD_TITLES[m]} pixel acc." for m in methods] + ["mIoU convention"]
        rows = [header, ["---"] + ["---:"] * (len(header) - 2) + ["---"]]
        for p in protocols:
            row = [PROTOCOL_TITLES[p]]
            for m in methods:
                row += [percent_cell(100 * self.scores[m][p].miou), percent_cell(self.paper_miou.get(p, {}).get(m))]
            row += [percent_cell(100 * self.scores[m][p].pixel_acc) for m in methods]
            row.append(" / ".join(dict.fromkeys(self.scores[m][p].convention for m in methods)))
            rows.append(row)
        notes = [self.paper_note] if self.paper_note else []
        notes.append(CONVENTIONS_NOTE)
        clusters = self.protocol_settings.get("dataset_clusters_used")
        wanted = self.protocol_settings.get("dataset_clusters") or len(self.classes)
        if clusters is not None and clusters < wanted:
            notes.append(f"The split has only {clusters} masks: the dataset-level protocol used {clusters} "
                         f"k-means clusters instead of {wanted}.")
        if is_random_model(self.prediction_settings["model"]):
            notes.append("These numbers come from a miniature model with random weights: they say nothing about "
                         "EmerDiff's quality.")
        return self.page(f"Unsupervised segmentation: {self.dataset}", rows, notes)


class ResultsWriter(pl.Callback):
    """After `Trainer.test`, global rank 0 writes the module's ``results`` as results.json and results.md."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the files on rank 0, which alone holds the results."""
        results = getattr(pl_module, "results", None)
        if trainer.is_global_zero and results is not None:
            write_results(results, self.folder)


def write_results(results: ResultsTable, folder: Path) -> None:
    """results.json (full numbers) and results.md (the table), each written atomically."""
    with atomic_file(Path(folder) / "results.json") as handle:
        handle.write((json.dumps(results.to_dict(), indent=2) + "\n").encode())
    with atomic_file(Path(folder) / "results.md") as handle:
        handle.write(results.to_markdown().encode())
