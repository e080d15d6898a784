"""Each dense encoder is evaluated as its reference code evaluates it: prompts, text averaging, the baseline's
decision and the background class (MaskCLIP: "w/o background"; TCL: raw prompt average, PAMR + KP, a constant
background score). Everything runs on the miniature random CLIP (`ovseg-tiny`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from emerdiff.config import ConfigError
from ovseg.clip_model import load_clip
from ovseg.config import ovseg_settings
from ovseg.labeller import NamingRules, OpenVocabLabeller
from ovseg.tcl import TCL_WINDOW, TCLEncoder
from ovseg.tcl_weights import random_tcl_masker
from ovseg.text import text_embeddings


@pytest.fixture(scope="module")
def clip():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_clip("ovseg-tiny", None)


@pytest.fixture(scope="module")
def tcl(clip) -> TCLEncoder:
    return TCLEncoder(clip.model.visual, random_tcl_masker(clip.model.visual, seed=1)).eval()


class ColourEncoder(nn.Module):
    """A DenseEncoder whose embedding of a patch is its mean colour: red, green and blue are 'classes'."""

    stride, embed_dim, mean, std = 8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.avg_pool2d(images, self.stride), dim=1)


def section(**values):
    return ovseg_settings(OmegaConf.create({"ovseg": values}))


@pytest.mark.parametrize("encoder, expected", [("maskclip", ("maskclip", "cells", "ignore")),
                                               ("tcl", ("tcl", "tcl", "constant"))])
def test_prompts_baseline_and_background_default_to_the_encoders_reference(encoder, expected):
    settings = section(encoder=encoder)
    assert (settings.templates, settings.baseline, settings.background) == expected
    chosen = section(encoder=encoder, templates="imagenet", baseline="cells", background="prompt")
    assert (chosen.templates, chosen.baseline, chosen.background) == ("imagenet", "cells", "prompt")


@pytest.mark.parametrize("values, key", [({"baseline": "tcl"}, "ovseg.baseline=tcl"),
                                         ({"background": "constant"}, "ovseg.background=constant"),
                                         ({"background_threshold": 0.2}, "ovseg.background_threshold")])
def test_what_only_tcl_or_a_prompted_background_can_do_is_refused_naming_the_setting(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section(encoder="maskclip", **values)


@torch.no_grad()
def test_tcl_averages_raw_prompt_embeddings_and_normalises_once_while_clip_normalises_each_prompt(clip):
    templates = ("a photo of a {}.", "art of the {}.", "a {} in a video game.")
    classes = [("cat",), ("grass", "lawn")]  # a class with a synonym: its prompts average over both names
    prompts = [[template.format(name) for name in names for template in templates] for names in classes]
    raw = [clip.model.encode_text(clip.tokenizer(group)) for group in prompts]
    expected_raw = F.normalize(torch.stack([e.mean(0) for e in raw]), dim=-1)
    expected_clip = F.normalize(torch.stack([F.normalize(e, dim=-1).mean(0) for e in raw]), dim=-1)
    ours_raw = text_embeddings(clip.model, clip.tokenizer, classes, templates, average="raw")
    ours_clip = text_embeddings(clip.model, clip.tokenizer, classes, templates)
    torch.testing.assert_close(ours_raw, expected_raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_clip, expected_clip, rtol=1e-5, atol=1e-6)
    assert (ours_raw - ours_clip).abs().max() > 1e-3  # the two conventions give different classifiers


def test_an_ignored_background_is_never_named_by_masks_or_baseline():
    """MaskCLIP's evaluation w/o background: class 0 (red) is background; a red mask takes its best other class."""
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, :24, 0] = 255
    image[:, :24, 2] = 60  # left: red with a little blue
    image[:, 24:, 1] = 255  # right: green
    segments = np.zeros((32, 48), dtype=np.int64)
    segments[:, 24:] = 1
    text = torch.eye(3)  # background (red), green, blue
    prompted = OpenVocabLabeller(ColourEncoder(), text, NamingRules(background_id=0))(image, segments)
    ignored = OpenVocabLabeller(ColourEncoder(), text, NamingRules(background_id=0, background="ignore"))(
        image, segments)
    assert prompted.class_ids.tolist() == [0, 1] and (prompted.baseline[:, :20] == 0).all()
    assert ignored.class_ids.tolist() == [2, 1] and not (ignored.baseline == 0).any()


@torch.no_grad()
def test_tcls_constant_names_a_mask_background_where_its_gated_cosine_is_below_it(tcl, photo):
    """A mask is background when sigmoid(w * s + b) of its best non-background cosine s is below 0.5 (TCL's
    constant without PAMR); the background class's own prompts never compete."""
    generator = torch.Generator().manual_seed(4)
    text = F.normalize(torch.randn(5, tcl.embed_dim, generator=generator), dim=-1)
    segments = np.repeat(np.arange(8), photo.shape[0] * photo.shape[1] // 8).reshape(photo.shape[:2])
    embeddings = OpenVocabLabeller(tcl, text)(photo, segments, num_masks=8).mask_embeddings
    gated = tcl.gate(embeddings @ text[1:].T)  # [K, 4] TCL's mask score of each non-background class
    best = gated.max(dim=1)
    middle = best.values.sort().values[3:5].mean()  # halfway between two masks' scores: splits them 4 / 4
    for score in (None, float(middle)):  # TCL's 0.5, and a constant that splits the masks
        rules = NamingRules(background_id=0, background="constant", baseline="cells", background_score=score)
        named = OpenVocabLabeller(tcl, text, rules)(photo, segments, num_masks=8)
        expected = torch.where(best.values < (score or 0.5), 0, best.indices + 1)
        assert torch.equal(named.class_ids, expected)
    assert 0 < (expected == 0).sum() < len(expected)  # both outcomes occur, so the rule is exercised


@torch.no_grad()
def test_tcls_baseline_is_its_own_decision_at_its_scale_with_pamr_kp_and_the_constant(tcl, photo):
    """TCL's evaluation: shorter side at 448, windowed masks with PAMR and the KP branch (0.3), scores resized to
    the image, a constant 0.4 for background, argmax."""
    generator = torch.Generator().manual_seed(5)
    text = F.normalize(torch.randn(4, tcl.embed_dim, generator=generator), dim=-1)
    labeller = OpenVocabLabeller(tcl, text, NamingRules(background_id=0, background="constant", baseline="tcl"))
    height, width = photo.shape[:2]
    size = (TCL_WINDOW, round(width * TCL_WINDOW / height / tcl.stride) * tcl.stride)
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    pixels = (pixels - torch.tensor(tcl.mean)[:, None, None]) / torch.tensor(tcl.std)[:, None, None]
    masks = F.interpolate(tcl.grounding_masks(pixels, text, pamr=True, kp_weight=0.3), size=(height, width),
                          mode="bilinear")
    masks[:, 0] = 0.4
    expected = masks.argmax(dim=1)[0]
    baseline = labeller(photo, np.zeros((height, width), dtype=np.int64)).baseline
    assert torch.equal(baseline, expected)
    cells = OpenVocabLabeller(tcl, text, NamingRules(background_id=0, background="constant", baseline="cells"))
    assert not torch.equal(cells(photo, np.zeros((height, width), dtype=np.int64)).baseline, baseline)
