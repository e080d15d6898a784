"""Results of an evaluation: the JSON-ready numbers, the markdown table, and the files they go to.

`ResultsTable` is what every evaluation's results share (the split, its classes, the image
count, the table layout); `EvaluationResults` is the unsupervised evaluation's (tools/eval.py),
``ovseg.evaluation.OpenVocabResults`` the open-vocabulary one's. `write_results` writes one as
results.json and results.md (after ``Trainer.test``, the `SaveResults` callback of
`emerdiff.evaluation.module` calls it). A rescore of some protocols keeps the other protocols'
numbers of the folder's results.json when they were computed with the same settings
(`ResultsTable.merged_with`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..choices import PROTOCOLS
from ..config import fingerprint, is_random_model, settings_diff
from ..files import atomic_file, version_record
from .metrics import SegmentationScores

PAPER = "Namekata et al., EmerDiff, ICLR 2024"
METHOD_TITLES = {"emerdiff": "EmerDiff", "bilinear": "bilinear", "nearest": "k-means nearest"}
CONVENTIONS_NOTE = (
    "mIoU conventions: detectron2 averages the classes present in the ground truth; mmseg every class "
    "with a non-empty union (a predicted but absent class scores 0); stego as mmseg, after a Hungarian "
    "matching that gives every cluster a class, zero-overlap pairs included (docs/evaluation.md)."
)

BOUNDARY_NOTE = (
    "Boundary IoU (Cheng et al., CVPR 2021): IoU of the bands within d = 2% of the image diagonal of each "
    "class's contour, averaged over classes as mIoU; per-image protocols only (docs/evaluation.md)."
)


def percent_cell(value: float | None) -> str:
    """A table cell of a number already in percent: one decimal, "–" for None or NaN (no score)."""
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


@dataclass
class ResultsTable:
    """What every evaluation's results hold and how their markdown page is laid out."""

    dataset: str
    classes: list[str]  # class names in id order
    num_images: int  # images scored
    skipped: list[dict[str, str]] = field(default_factory=list, kw_only=True)  # images whose prediction failed

    def to_dict(self) -> dict:
        """JSON-ready numbers (results.json)."""
        raise NotImplementedError

    def skipped_entry(self) -> dict:
        """``{"skipped": [...]}`` for results.json when an image failed, else nothing (results stay as they were)."""
        return {"skipped": self.skipped} if self.skipped else {}

    def to_markdown(self) -> str:
        """The results page (results.md)."""
        raise NotImplementedError

    def logged(self) -> dict[str, float]:
        """The numbers a Lightning logger records after the run (none by default)."""
        return {}

    def merged_with(self, previous: Mapping[str, Any]) -> tuple[ResultsTable, str | None]:
        """These results with what `previous` (the folder's results.json) holds that still stands, and a line
        saying what was dropped (None: nothing). By default nothing stands: a rerun replaces every number."""
        return self, None

    def page(self, title: str, rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
        """``# title``, the counts, the table (header row, alignment row, rows) and the notes as a list."""
        lines = [
            f"# {title}",
            "",
            f"{self.num_images} images, {len(self.classes)} classes; all numbers in percent. "
            f'"paper": the mIoU reported by {PAPER}, where it reports one.',
            "",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if self.skipped:
            notes = [
                *notes,
                f"Scored over {self.num_images} images: {len(self.skipped)} failed and are left out "
                f'(listed under "skipped" in results.json): '
                + ", ".join(f"{r['id']} ({r['type']})" for r in self.skipped[:10])
                + (", ..." if len(self.skipped) > 10 else ""),
            ]
        lines += [""] + [f"- {note}" for note in notes]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class EvaluationResults(ResultsTable):
    """Scores of every (method, protocol) on one split, and how they were obtained."""

    scores: dict[str, dict[str, SegmentationScores]]  # method -> protocol -> scores
    protocol_settings: dict[str, Any]
    prediction_settings: dict[str, Any]
    paper_miou: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_note: str | None = None
    kept: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> protocol -> entry of an earlier run

    def results_in_percent(self) -> dict[str, dict[str, dict]]:
        """method -> protocol -> miou, pixel_acc, convention and per-class iou in percent (None = absent): this run's
        scores and the `kept` entries of an earlier run, in protocol order."""
        results = {}
        for method, by_protocol in self.scores.items():
            entries = {**self.kept.get(method, {}), **{p: s.in_percent(self.classes) for p, s in by_protocol.items()}}
            results[method] = {p: entries[p] for p in PROTOCOLS if p in entries}
        return results

    def to_dict(self) -> dict:
        """JSON-ready: results[method][protocol] holds miou, pixel_acc and per-class iou, in percent (null = absent)."""
        return {
            "dataset": self.dataset,
            "num_images": self.num_images,
            "num_classes": len(self.classes),
            "results": self.results_in_percent(),
            "paper": {"source": PAPER, "miou": self.paper_miou, "note": self.paper_note},
            "protocol_settings": self.protocol_settings,
            "prediction_settings": self.prediction_settings,
            **self.skipped_entry(),
        }

    def logged(self) -> dict[str, float]:
        """Each method's mIoU under each protocol, in percent, and the number of images scored."""
        values = {
            f"{method}/{protocol}/miou": 100 * s.miou
            for method, by_protocol in self.scores.items()
            for protocol, s in by_protocol.items()
        }
        return {**values, "num_images": float(self.num_images)}

    def to_markdown(self) -> str:
        """The protocol x method grid (mIoU and pixel accuracy), the paper's mIoU beside ours."""
        results = self.results_in_percent()
        methods = list(results)
        protocols = [p for p in PROTOCOLS if any(p in results[m] for m in methods)]
        header = ["protocol"]
        for m in methods:
            header += [f"{METHOD_TITLES[m]} mIoU", "paper"]
        header += [f"{METHOD_TITLES[m]} pixel acc." for m in methods]
        header += [f"{METHOD_TITLES[m]} boundary IoU" for m in methods] + ["mIoU convention"]
        rows = [header, ["---"] + ["---:"] * (len(header) - 2) + ["---"]]
        for p in protocols:
            row = [PROTOCOLS[p].title]
            for m in methods:
                row += [percent_cell(results[m][p]["miou"]), percent_cell(self.paper_miou.get(p, {}).get(m))]
            row += [percent_cell(results[m][p]["pixel_acc"]) for m in methods]
            row += [percent_cell(results[m][p].get("boundary_miou")) for m in methods]
            row.append(" / ".join(dict.fromkeys(results[m][p]["miou_convention"] for m in methods)))
            rows.append(row)
        notes = [self.paper_note] if self.paper_note else []
        notes.append(CONVENTIONS_NOTE)
        notes.append(BOUNDARY_NOTE)
        clusters = self.protocol_settings.get("dataset_clusters_used")
        wanted = self.protocol_settings.get("dataset_clusters") or len(self.classes)
        if clusters is not None and clusters < wanted:
            notes.append(
                f"The split has only {clusters} masks: the dataset-level protocol used {clusters} "
                f"k-means clusters instead of {wanted}."
            )
        if is_random_model(self.prediction_settings["model"]):
            notes.append(
                "These numbers come from a miniature model with random weights: they say nothing about "
                "EmerDiff's quality."
            )
        return self.page(f"Unsupervised segmentation: {self.dataset}", rows, notes)

    def merged_with(self, previous: Mapping[str, Any]) -> tuple[EvaluationResults, str | None]:
        """These results plus the protocols `previous` scored and this run did not, when both were computed with the
        same settings (split, images, eval and prediction settings); otherwise those are dropped and the line says so.
        """
        scored = {p for by_protocol in self.scores.values() for p in by_protocol}
        earlier = {
            m: {p: entry for p, entry in by_protocol.items() if p in PROTOCOLS and p not in scored}
            for m, by_protocol in previous.get("results", {}).items()
            if m in self.scores
        }
        earlier_protocols = [p for p in PROTOCOLS if any(p in by_protocol for by_protocol in earlier.values())]
        if not earlier_protocols:
            return self, None
        before, now = fingerprint(scoring_context(previous)), fingerprint(scoring_context(self.to_dict()))
        if before != now:
            return self, (
                f"results.json: dropped the earlier scores of {', '.join(earlier_protocols)}, computed with "
                f"other settings ({settings_diff(before, now)})"
            )
        protocol_settings = {
            **self.protocol_settings,
            "protocols": [p for p in PROTOCOLS if p in scored or p in earlier_protocols],
        }
        if "dataset" in earlier_protocols:
            protocol_settings["dataset_clusters_used"] = previous["protocol_settings"].get("dataset_clusters_used")
        return replace(self, kept=earlier, protocol_settings=protocol_settings), None


def scoring_context(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What the numbers of a results.json depend on besides its protocols, as `fingerprint` sections: the split and
    the images scored, the eval settings and the prediction settings."""
    split = {
        "dataset": results.get("dataset"),
        "num_images": results.get("num_images"),
        "num_classes": results.get("num_classes"),
        "skipped": [r["id"] for r in results.get("skipped", [])],
    }
    protocol = {
        k: v for k, v in results.get("protocol_settings", {}).items() if k not in ("protocols", "dataset_clusters_used")
    }
    return {"split": split, "eval": protocol, **results.get("prediction_settings", {})}


def write_results(results: ResultsTable, folder: Path) -> None:
    """results.json (the release's version record, then the full numbers) and results.md (the table), each written
    atomically.

    What the folder's earlier results.json holds and this run did not score is kept when it still stands
    (`ResultsTable.merged_with`); a printed line says what was dropped instead.
    """
    previous = earlier_results(Path(folder) / "results.json")
    if previous is not None:
        results, dropped = results.merged_with(previous)
        if dropped:
            print(dropped)
    with atomic_file(Path(folder) / "results.json") as handle:
        handle.write((json.dumps(version_record("results") | results.to_dict(), indent=2) + "\n").encode())
    with atomic_file(Path(folder) / "results.md") as handle:
        handle.write(results.to_markdown().encode())


def earlier_results(path: Path) -> dict | None:
    """The results.json an earlier run left at `path`, or None when there is none or it cannot be read."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None
