"""The unsupervised evaluation's results: results.json content, the results.md table, and a rescore merging into them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from emerdiff.evaluation import PAPER, EvaluationResults, SegmentationScores, percent_cell, write_results
from emerdiff.files import version_record

CLASSES = ["sky", "road", "car"]


def scores(miou: float, pixel_acc: float, convention: str = "detectron2") -> SegmentationScores:
    return SegmentationScores(miou=miou, pixel_acc=pixel_acc, iou=torch.tensor([miou, float("nan"), miou]),
                              convention=convention)


def results(model: dict, clusters_used: int = 3, **extra) -> EvaluationResults:
    return EvaluationResults(
        dataset="toy", classes=CLASSES, num_images=2,
        scores={"emerdiff": {"hungarian": scores(0.5, 0.75), "dataset": scores(0.25, 0.5, "stego")},
                "bilinear": {"hungarian": scores(0.125, 0.5), "dataset": scores(float("nan"), 0.0, "stego")}},
        protocol_settings={"dataset_clusters": None, "dataset_clusters_used": clusters_used},
        prediction_settings={"model": model}, **extra)


REAL = {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "random_init": False}


def test_json_holds_percent_scores_per_method_and_protocol_with_their_convention_and_null_for_absent_classes():
    out = results(REAL, paper_miou={"dataset": {"emerdiff": 33.1}}).to_dict()
    assert out["num_classes"] == 3 and out["num_images"] == 2
    assert out["results"]["emerdiff"]["hungarian"] == {"miou": 50.0, "pixel_acc": 75.0, "miou_convention": "detectron2",
                                                       "iou": {"sky": 50.0, "road": None, "car": 50.0}}
    assert out["results"]["emerdiff"]["dataset"]["miou_convention"] == "stego"
    assert out["results"]["bilinear"]["dataset"]["miou"] is None
    assert out["paper"]["miou"] == {"dataset": {"emerdiff": 33.1}}
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN anywhere


def test_table_puts_the_paper_number_beside_ours_in_protocol_order_with_dashes_for_missing_numbers():
    table = results(REAL, paper_miou={"dataset": {"emerdiff": 33.1}}).to_markdown()
    lines = table.splitlines()
    assert lines[0] == "# Unsupervised segmentation: toy"
    assert lines[2].startswith("2 images, 3 classes; all numbers in percent.")
    header = ("| protocol | EmerDiff mIoU | paper | bilinear mIoU | paper | EmerDiff pixel acc. | bilinear pixel acc. "
              "| EmerDiff boundary IoU | bilinear boundary IoU | mIoU convention |")
    hungarian = "| per-image Hungarian | 50.0 | – | 12.5 | – | 75.0 | 50.0 | – | – | detectron2 |"
    dataset = "| dataset-level k-means + Hungarian (Table 1) | 25.0 | 33.1 | – | – | 50.0 | 0.0 | – | – | stego |"
    assert lines[4:8] == [header, "| --- |" + " ---: |" * 8 + " --- |", hungarian, dataset]
    assert any(line.startswith("- mIoU conventions: detectron2 averages the classes present") for line in lines)
    assert "random weights" not in table


def test_table_flags_random_weight_models_by_the_one_config_rule():
    for model in ({"pretrained": "tiny", "random_init": False}, {**REAL, "random_init": True}):
        assert "miniature model with random weights" in results(model).to_markdown()


def test_table_notes_fewer_dataset_clusters_than_classes_and_the_paper_note():
    table = results(REAL, clusters_used=2, paper_note="Table 1 of the paper.").to_markdown()
    assert "- Table 1 of the paper." in table
    assert "used 2 k-means clusters instead of 3" in table


def test_percent_cells_have_one_decimal_and_a_dash_for_no_number():
    assert [percent_cell(v) for v in (12.345, None, math.nan, 0.0)] == ["12.3", "–", "–", "0.0"]


def test_results_files_are_the_dict_as_indented_json_and_the_table(tmp_path):
    table = results(REAL)
    write_results(table, tmp_path)
    assert (tmp_path / "results.json").read_text() == json.dumps(version_record("results") | table.to_dict(), indent=2) + "\n"
    assert (tmp_path / "results.md").read_text() == table.to_markdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


# --- a rescore of some protocols merges into the folder's results.json ----------------------------

def evaluation(emerdiff_miou: dict, match_criterion: str = "iou", num_images: int = 2,
               clusters_used: int | None = None) -> EvaluationResults:
    """A run that scored the protocols of `emerdiff_miou` (protocol -> mIoU; bilinear scores half of it)."""
    conventions = {"dataset": "stego"}
    return EvaluationResults(
        dataset="toy", classes=CLASSES, num_images=num_images,
        scores={"emerdiff": {p: scores(m, 0.75, conventions.get(p, "detectron2")) for p, m in emerdiff_miou.items()},
                "bilinear": {p: scores(m / 2, 0.5, conventions.get(p, "detectron2")) for p, m in emerdiff_miou.items()}},
        protocol_settings={"protocols": list(emerdiff_miou), "match_criterion": match_criterion,
                           "dataset_clusters": None, "dataset_clusters_used": clusters_used},
        prediction_settings={"model": REAL})


def entry(miou: float, pixel_acc: float, convention: str = "detectron2") -> dict:
    """One protocol's scores as results.json holds them (the `scores` helper's iou: absent road)."""
    return {"miou": miou, "pixel_acc": pixel_acc, "miou_convention": convention,
            "iou": {"sky": miou, "road": None, "car": miou}}


def test_a_rescore_of_one_protocol_keeps_the_earlier_protocols_scored_with_the_same_settings(tmp_path, capsys):
    write_results(evaluation({"hungarian": 0.5, "dataset": 0.25}, clusters_used=3), tmp_path)
    write_results(evaluation({"majority": 0.125}), tmp_path)

    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged == version_record("results") | {
        "dataset": "toy", "num_images": 2, "num_classes": 3,
        "results": {
            "emerdiff": {"hungarian": entry(50.0, 75.0), "majority": entry(12.5, 75.0),
                         "dataset": entry(25.0, 75.0, "stego")},
            "bilinear": {"hungarian": entry(25.0, 50.0), "majority": entry(6.25, 50.0),
                         "dataset": entry(12.5, 50.0, "stego")},
        },
        "paper": {"source": PAPER, "miou": {}, "note": None},
        "protocol_settings": {"protocols": ["hungarian", "majority", "dataset"], "match_criterion": "iou",
                              "dataset_clusters": None, "dataset_clusters_used": 3},
        "prediction_settings": {"model": REAL},
    }
    assert list(merged["results"]["emerdiff"]) == ["hungarian", "majority", "dataset"]  # protocol order
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[6:9] == ["| per-image Hungarian | 50.0 | – | 25.0 | – | 75.0 | 50.0 | – | – | detectron2 |",
                          "| per-image majority (many-to-one) | 12.5 | – | 6.2 | – | 75.0 | 50.0 | – | – | detectron2 |",
                          "| dataset-level k-means + Hungarian (Table 1) | 25.0 | – | 12.5 | – | 75.0 | 50.0 | – | – "
                          "| stego |"]
    assert capsys.readouterr().out == ""


def test_a_rescore_replaces_the_entries_of_the_protocols_it_scores(tmp_path):
    write_results(evaluation({"hungarian": 0.5, "dataset": 0.25}), tmp_path)
    write_results(evaluation({"hungarian": 0.125}), tmp_path)

    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["emerdiff"] == {"hungarian": entry(12.5, 75.0), "dataset": entry(25.0, 75.0, "stego")}
    assert results["bilinear"] == {"hungarian": entry(6.25, 50.0), "dataset": entry(12.5, 50.0, "stego")}


@pytest.mark.parametrize(("change", "difference"), [
    ({"match_criterion": "overlap"}, "eval.match_criterion: 'iou' -> 'overlap'"),
    ({"num_images": 3}, "split.num_images: 2 -> 3"),
])
def test_a_rescore_with_other_settings_drops_the_earlier_protocols_and_says_so_in_one_line(
        tmp_path, capsys, change, difference):
    write_results(evaluation({"hungarian": 0.5, "dataset": 0.25}), tmp_path)
    capsys.readouterr()
    rescore = evaluation({"majority": 0.125}, **change)
    write_results(rescore, tmp_path)

    assert capsys.readouterr().out == (f"results.json: dropped the earlier scores of hungarian, dataset, computed with "
                                       f"other settings ({difference})\n")
    assert json.loads((tmp_path / "results.json").read_text()) == version_record("results") | rescore.to_dict()
    assert (tmp_path / "results.md").read_text() == rescore.to_markdown()
