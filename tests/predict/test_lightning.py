"""emerdiff.predict.lightning: the frozen predictor, its extras step, and the writer callback."""

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from conftest import tiny_segmentor
from emerdiff.files import read_jsonl
from emerdiff.predict import (EmerDiffPredictor, OutputOptions, OutputStore, PredictImages, PredictionWriter,
                              find_images)


class MeanColour(nn.Module):
    """An extras step: the photo's mean colour per mask, as an array and a manifest field."""

    def forward(self, image: torch.Tensor, output) -> "MaskColours":
        colours = [image[:, output.labels == k].float().mean(dim=1) if (output.labels == k).any()
                   else torch.zeros(3) for k in range(output.num_masks)]
        return MaskColours(torch.stack(colours))


class MaskColours:
    def __init__(self, colours: torch.Tensor) -> None:
        self.colours = colours

    def arrays(self):
        return {"mask_colours": self.colours.numpy()}

    def record(self):
        return {"brightest_mask": int(self.colours.sum(dim=1).argmax())}

    def write(self, store, name, photo):
        pass


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      use_distributed_sampler=True, **kwargs)


def test_predict_step_equals_segment_and_passes_read_errors_through(tiny_components, photo, tmp_path: Path):
    Image.fromarray(photo).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_text("no")
    segmentor = tiny_segmentor(tiny_components, resolution=128, num_masks=3)
    predictor = EmerDiffPredictor(segmentor)
    assert not any(p.requires_grad for p in predictor.parameters())
    batches = _trainer().predict(predictor, datamodule=PredictImages(find_images(str(tmp_path)), num_workers=0))
    results = {r.name: r for batch in batches for r in batch}
    assert results["broken"].output is None and "not a readable image" in results["broken"].error
    expected = segmentor.segment(photo)
    assert torch.equal(results["photo"].output.labels, expected.labels)
    assert torch.equal(results["photo"].image, torch.from_numpy(photo.copy()).permute(2, 0, 1))
    assert results["photo"].extras is None


def test_the_extras_step_sees_each_photo_with_its_segmentation_and_the_writer_saves_what_it_returns(
        tiny_components, photo, tmp_path: Path):
    photos, out = tmp_path / "in", tmp_path / "out"
    photos.mkdir()
    Image.fromarray(photo).save(photos / "photo.png")
    segmentor = tiny_segmentor(tiny_components, resolution=64, num_masks=3)
    predictor = EmerDiffPredictor(segmentor, extras=MeanColour().requires_grad_(True))
    assert predictor.extras.training is False  # frozen like the segmentor
    store = OutputStore(out, OutputOptions(overlay=False))
    _trainer(callbacks=[PredictionWriter(store)]).predict(
        predictor, datamodule=PredictImages(find_images(str(photos)), num_workers=0), return_predictions=False)
    with np.load(out / "photo.npz") as arrays:
        labels, colours = arrays["labels"], arrays["mask_colours"]
    for k in np.unique(labels):
        np.testing.assert_allclose(colours[k], photo[labels == k].mean(axis=0), rtol=1e-5)
    record = read_jsonl(out / "manifest.jsonl")[0]
    assert record["brightest_mask"] == int(colours.sum(axis=1).argmax())


class IteratorPredictor(EmerDiffPredictor):
    """A predictor whose step pulls its own batches (`dataloader_iter`), which a prediction writer cannot follow."""

    def predict_step(self, dataloader_iter):
        return next(dataloader_iter)[0]


def test_the_writer_keeps_lightnings_own_refusal_of_a_step_that_reads_the_dataloader_itself(tiny_components,
                                                                                          tmp_path: Path):
    store = OutputStore(tmp_path / "out", OutputOptions(overlay=False))
    with pytest.raises(NotImplementedError, match="dataloader_iter"):
        _trainer(callbacks=[PredictionWriter(store)]).predict(
            IteratorPredictor(tiny_segmentor(tiny_components, resolution=64, num_masks=2)),
            datamodule=PredictImages([], num_workers=0), return_predictions=False)
