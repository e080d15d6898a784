"""The unsupervised evaluation's results: results.json content and the results.md table."""

from __future__ import annotations

import json
import math

import torch

from emerdiff.evaluation import EvaluationResults, SegmentationScores, percent_cell, write_results

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
              "| mIoU convention |")
    hungarian = "| per-image Hungarian | 50.0 | – | 12.5 | – | 75.0 | 50.0 | detectron2 |"
    dataset = "| dataset-level k-means + Hungarian (Table 1) | 25.0 | 33.1 | – | – | 50.0 | 0.0 | stego |"
    assert lines[4:8] == [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", hungarian, dataset]
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
    assert (tmp_path / "results.json").read_text() == json.dumps(table.to_dict(), indent=2) + "\n"
    assert (tmp_path / "results.md").read_text() == table.to_markdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
