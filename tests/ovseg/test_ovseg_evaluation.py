"""The open-vocabulary evaluation's parts (ovseg.evaluation) and the labeller steps it runs per image, without SD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from emerdiff.evaluation import SegmentationScores
from ovseg import UNLABELLED, read_vocabulary
from ovseg.config import OVSegConfig
from ovseg.evaluation import OpenVocabResults, open_vocab_settings
from ovseg.labeller import OpenVocabLabeller, build_labeller, patch_multiple


# --- the per-image step, without Stable Diffusion ---------------------------------------------------


class ColourEncoder(nn.Module):
    """A DenseEncoder whose embedding of a patch is its mean colour: red, green and blue are 'classes'."""

    stride, embed_dim, mean, std = 8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2] % self.stride == 0 and images.shape[-1] % self.stride == 0
        return nn.functional.normalize(nn.functional.avg_pool2d(images, self.stride), dim=1)


def test_labeller_names_each_mask_and_the_baseline_on_an_image_of_any_size():
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    image[:, :35, 0] = 255  # left half red
    image[:, 35:, 1] = 255  # right half green
    segments = np.zeros((50, 70), dtype=np.int64)
    segments[:, 35:] = 1
    labeller = OpenVocabLabeller(ColourEncoder(), torch.eye(3))  # classes: red, green, blue
    named = labeller(image, segments, num_masks=3)
    assert named.class_ids.tolist() == [0, 1, UNLABELLED]  # mask 2 has no pixel
    assert torch.equal(named.label_map, torch.from_numpy(segments))
    assert named.baseline.shape == (50, 70)
    assert (named.baseline[:, :30] == 0).all() and (named.baseline[:, 40:] == 1).all()


def test_image_sides_resize_to_the_nearest_multiple_of_the_patch_and_at_least_one_patch():
    assert patch_multiple(50, 8) == 48 and patch_multiple(70, 8) == 72 and patch_multiple(3, 8) == 8
    assert patch_multiple(53, 8) == 56 and patch_multiple(48, 8) == 48


def test_random_clip_is_the_same_in_every_build_so_ddp_ranks_agree(tmp_path):
    settings = OVSegConfig(vocab="voc", clip_model="ovseg-tiny", clip_pretrained=None)
    vocab = read_vocabulary("voc")
    first, second = (build_labeller(settings, vocab, tmp_path) for _ in range(2))
    image = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    assert torch.equal(first.text, second.text)
    assert torch.equal(first.dense_embeddings(image), second.dense_embeddings(image))
    assert first.dense_embeddings(image).shape == (32, 4, 6)


def test_labeller_of_a_random_clip_caches_the_class_texts_under_its_seed(tmp_path):
    settings = OVSegConfig(vocab="cat,dog", clip_model="ovseg-tiny", clip_pretrained=None, clip_init_seed=5)
    build_labeller(settings, read_vocabulary("cat,dog"), tmp_path)
    assert [p.name.split("__")[:2] for p in tmp_path.glob("*.pt")] == [["ovseg-tiny", "random-seed5"]]


def test_cached_labels_depend_on_the_vocabulary_content_and_clip_side_not_on_caches_or_paper_numbers():
    vocab = read_vocabulary("cat,dog")
    base = open_vocab_settings({}, OVSegConfig(vocab="cat,dog"), vocab)
    elsewhere = OVSegConfig(vocab="cat,dog", clip_cache_dir="/x", text_cache_dir="/y", paper_miou={"emerdiff": 1.0},
                            paper_note="n")
    assert open_vocab_settings({}, elsewhere, vocab) == base
    assert open_vocab_settings({}, OVSegConfig(vocab="cat,dog", window=112), vocab) != base
    assert open_vocab_settings({}, OVSegConfig(vocab="cat,dog"), read_vocabulary("cat,wolf")) != base


def test_threshold_needs_a_vocabulary_with_a_background_class(tmp_path):
    settings = OVSegConfig(vocab="cat,dog", clip_model="ovseg-tiny", clip_pretrained=None, background_threshold=0.2)
    with pytest.raises(ValueError, match="background"):
        build_labeller(settings, read_vocabulary("cat,dog"), tmp_path)


# --- results ------------------------------------------------------------------------------------------


def ov_results(model: dict, clip_pretrained) -> OpenVocabResults:
    iou = torch.tensor([0.5, float("nan")])
    return OpenVocabResults(
        dataset="toy", vocab="cat,dog", classes=["cat", "dog"], num_images=3,
        scores={"maskclip": SegmentationScores(0.25, 0.5, iou, "mmseg"),
                "emerdiff": SegmentationScores(0.5, 0.625, iou, "mmseg")},
        settings={"model": model, "ovseg": {"encoder": "maskclip", "clip_model": "ViT-B-16",
                                            "clip_pretrained": clip_pretrained}},
        paper_miou={"emerdiff": 30.1}, paper_reference={"TCL": 33.9}, paper_note=None)


def test_open_vocab_json_holds_both_methods_in_percent_and_the_paper_rows():
    out = ov_results({"pretrained": "sd", "random_init": False}, "openai").to_dict()
    assert list(out["results"]) == ["maskclip", "emerdiff"] and out["vocab"] == "cat,dog"
    assert out["results"]["emerdiff"] == {"miou": 50.0, "pixel_acc": 62.5, "miou_convention": "mmseg",
                                          "iou": {"cat": 50.0, "dog": None}}
    assert out["paper"]["miou"] == {"emerdiff": 30.1} and out["paper"]["reference"] == {"TCL": 33.9}
    json.dumps(out, allow_nan=False)


def test_open_vocab_table_lists_our_methods_then_paper_only_rows_and_flags_random_weights_only_when_random():
    real = ov_results({"pretrained": "sd", "random_init": False}, "openai").to_markdown().splitlines()
    assert real[0] == "# Open-vocabulary segmentation: toy, vocabulary cat,dog"
    assert real[4:8] == ["| method | mIoU | paper | pixel acc. |", "| --- | ---: | ---: | ---: |",
                         "| MaskCLIP (per patch, upsampled) | 25.0 | – | 50.0 |",
                         "| MaskCLIP + EmerDiff masks | 50.0 | 30.1 | 62.5 |"]
    assert "| TCL (paper only, not run here) | – | 33.9 | – |" in real
    assert not any("random weights" in line for line in real)
    assert any(line.startswith("- mIoU convention: mmseg.") for line in real)
    random_sd = ov_results({"pretrained": "sd", "random_init": True}, "openai").to_markdown()
    assert "miniature Stable Diffusion with random weights" in random_sd and "CLIP ViT-B-16" not in random_sd
    random_clip = ov_results({"pretrained": "sd", "random_init": False}, None).to_markdown()
    assert "CLIP ViT-B-16 with random weights" in random_clip and "say nothing about the quality" in random_clip
