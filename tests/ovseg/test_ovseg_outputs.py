"""ovseg.outputs: masks named from a vocabulary, plugged into the prediction results as extras."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from emerdiff.files import read_jsonl
from emerdiff.predict import OutputOptions, OutputStore, PredictedImage
from emerdiff.predict.render import TITLE_HEIGHT
from emerdiff.segmentor import SegmentationOutput
from ovseg.naming import UNLABELLED, MaskLabels
from ovseg.outputs import NAMED_FILES, MaskNamer, NamedMasks
from ovseg.labeller import OpenVocabLabeller

CLASSES = ["red", "green", "blue"]


class ColourEncoder(nn.Module):
    """A DenseEncoder whose embedding of a patch is its mean colour: red, green and blue are 'classes'."""

    stride, embed_dim, mean, std = 8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(nn.functional.avg_pool2d(images, self.stride), dim=1)


def _red_green_photo() -> torch.Tensor:
    """[3, 32, 48] uint8: left half red, right half green."""
    image = torch.zeros(3, 32, 48, dtype=torch.uint8)
    image[0, :, :24] = 255
    image[1, :, 24:] = 255
    return image


def _segmentation(labels: torch.Tensor, k: int) -> SegmentationOutput:
    return SegmentationOutput(labels, labels, labels[:2, :2], torch.ones(k, 2, 2, dtype=torch.bool),
                              torch.zeros(k, 4), seed=0)


def test_namer_gives_each_mask_the_class_of_its_pixels_as_the_labellers_mask_labels():
    labels = torch.zeros(32, 48, dtype=torch.long)
    labels[:, 24:] = 1  # mask 0 red, mask 1 green, mask 2 empty
    namer = MaskNamer(OpenVocabLabeller(ColourEncoder(), torch.eye(3)), CLASSES)
    named = namer(_red_green_photo(), _segmentation(labels, 3))
    assert isinstance(named.masks, MaskLabels)
    assert named.masks.class_ids.tolist() == [0, 1, UNLABELLED]
    assert torch.equal(named.masks.label_map, labels)
    assert named.class_names == CLASSES


def test_named_masks_reach_the_npz_the_manifest_and_the_ov_files_of_the_results_folder(tmp_path: Path):
    labels = torch.zeros(32, 48, dtype=torch.long)
    labels[:, 24:] = 1
    masks = MaskLabels(class_ids=torch.tensor([2, 0, UNLABELLED]), scores=torch.tensor([0.91234, 0.5, float("nan")]),
                       label_map=torch.where(labels == 0, 2, 0), mask_embeddings=torch.zeros(3, 3))
    store = OutputStore(tmp_path, OutputOptions(extra_files=NAMED_FILES))
    photo = _red_green_photo()
    store.save(PredictedImage("a", "/in/a.png", photo, _segmentation(labels, 3), 0.1,
                              extras=NamedMasks(CLASSES, masks)), rank=0)
    store.finish_run()
    with np.load(tmp_path / "a.npz") as arrays:
        assert arrays["class_names"].tolist() == CLASSES
        assert arrays["mask_classes"].tolist() == [2, 0, -1] and arrays["mask_classes"].dtype == np.int64
        assert arrays["mask_scores"].dtype == np.float32 and np.isnan(arrays["mask_scores"][2])
        np.testing.assert_array_equal(arrays["ov_labels"], arrays["mask_classes"][arrays["labels"]])
    assert read_jsonl(tmp_path / "manifest.jsonl")[0]["masks"] == [
        {"class": "blue", "score": 0.9123}, {"class": "red", "score": 0.5}, {"class": None, "score": None}]
    with Image.open(tmp_path / "a_ov.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), masks.label_map.numpy())
    with Image.open(tmp_path / "a_ov_overlay.jpg") as overlay:
        assert overlay.size == (48, 32 + 2 * TITLE_HEIGHT)  # a legend row for blue and for red
    assert store.done() == {"a"}
    (tmp_path / "a_ov_overlay.jpg").unlink()
    assert store.done() == set()
