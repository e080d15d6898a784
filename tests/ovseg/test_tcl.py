"""TCL as a dense encoder (ovseg/tcl.py): the released checkpoint's layout, and what TCL's architecture implies.

Everything runs on the miniature random CLIP (`ovseg-tiny`: 2 blocks, width 64, 32-d joint space,
16-pixel patches), where TCL's masker owns the last block (freeze 1, as freeze 11 of 12 in TCL).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ovseg.clip_model import LoadedClip, load_clip
from ovseg.dense_encoder import MaskCLIPEncoder
from ovseg.refine import pamr_refine
from ovseg.tcl import IMAGENET_MEAN, IMAGENET_STD, TCLEncoder, tcl_labels
from ovseg.tcl_weights import TCL_CHECKPOINT_URL, load_tcl_masker, random_tcl_masker, read_tcl_checkpoint, tcl_encoder

WIDTH, EMBED, FREEZE = 64, 32, 1  # ovseg-tiny: width 64, joint space 32, masker owns block 1 of 2


@pytest.fixture(scope="module")
def clip() -> LoadedClip:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_clip("ovseg-tiny", None)


@pytest.fixture(scope="module")
def encoder(clip) -> TCLEncoder:
    return TCLEncoder(clip.model.visual, random_tcl_masker(clip.model.visual, seed=1), window=512).eval()


def released_layout(width: int = WIDTH, embed: int = EMBED) -> dict[str, tuple[int, ...]]:
    """The `model` state dict of TCL's release, at miniature size, written out from TCL's module tree.

    TCL (models/tcl/tcl.py) holds `masker` = Masker(image_encoder = MaskerImageFeatureEncoder(backbone =
    MaskerBackbone: deep copy of CLIP's transformer sliced to resblocks[ie_freeze:], which keeps the
    block's index as its key; decoder = Sequential(decoder=GDecoder(net = 2 x ResConv(conv, conv2 =
    ConvBlock(norm=LayerNorm2d, conv=Conv2d, gate=Gate(gate)))), image_proj=LNProjLayer(ln, proj))),
    sim2mask = Sim2Mask(w, b)), plus the frozen CLIP copies (clip_image_encoder / clip_text_encoder).
    """
    block = "masker.image_encoder.backbone.transformer.resblocks.1."
    layout = {
        block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
        block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
        block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
        block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
        block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
        block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
        "masker.image_encoder.decoder.image_proj.ln.weight": (width,),
        "masker.image_encoder.decoder.image_proj.ln.bias": (width,),
        "masker.image_encoder.decoder.image_proj.proj": (width, embed),
        "masker.sim2mask.w": (),
        "masker.sim2mask.b": (),
        # frozen CLIP copies: TCL's own loader tolerates their absence; the frozen CLIP comes from open_clip
        "clip_image_encoder.clip_visual.conv1.weight": (width, 3, 16, 16),
        "clip_image_encoder.clip_proj.proj": (width, embed),
        "clip_text_encoder.token_embedding.weight": (49408, 64),
    }
    for layer in (0, 1):
        for unit in ("conv", "conv2"):
            prefix = f"masker.image_encoder.decoder.decoder.net.{layer}.{unit}."
            layout.update({prefix + "norm.weight": (width,), prefix + "norm.bias": (width,),
                           prefix + "conv.weight": (width, width, 3, 3), prefix + "conv.bias": (width,),
                           prefix + "gate.gate": ()})
    return layout


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in layout.items()}


def settings(**overrides):
    from ovseg.config import OVSegConfig

    base = dict(clip_model="ovseg-tiny", clip_pretrained=None, encoder="tcl")
    return OVSegConfig(**{**base, **overrides})


# ---- the released checkpoint -----------------------------------------------------------------------


def test_a_checkpoint_with_the_released_key_names_loads_strictly_and_its_values_are_used(clip, tmp_path):
    state = random_state(released_layout())
    state["masker.sim2mask.w"] = torch.tensor(7.5)
    path = tmp_path / "tcl.pth"
    torch.save({"model": state, "step": 50000}, path)

    encoder = tcl_encoder(clip, settings(tcl_checkpoint=str(path)))

    masker = encoder.masker.state_dict()
    assert len(masker) == sum(k.startswith("masker.") for k in state)  # every masker key used, nothing else
    for key, value in state.items():
        if key.startswith("masker."):
            assert torch.equal(masker[key.removeprefix("masker.")], value), key
    assert encoder.masker.freeze == FREEZE
    assert encoder.cosine_threshold(0.5) == pytest.approx(-float(state["masker.sim2mask.b"]) / 7.5, rel=1e-6)


@pytest.mark.parametrize("change", ["drop", "extra", "shape"])
def test_a_checkpoint_that_is_not_tcls_is_refused_naming_the_key(clip, change):
    state = {k: v for k, v in random_state(released_layout()).items() if k.startswith("masker.")}
    key = "masker.image_encoder.decoder.decoder.net.1.conv2.gate.gate"
    if change == "drop":
        del state[key]
    elif change == "extra":
        state["masker.image_encoder.decoder.decoder.net.2.conv.conv.bias"] = torch.zeros(WIDTH)
    else:
        state["masker.image_encoder.decoder.image_proj.proj"] = torch.zeros(WIDTH, EMBED + 1)
    with pytest.raises((RuntimeError, ValueError), match=r"net\.1\.conv2\.gate|net\.2\.conv|image_proj\.proj"):
        load_tcl_masker(clip.model.visual, {k.removeprefix("masker."): v for k, v in state.items()})


def test_a_missing_checkpoint_says_where_tcls_release_is_and_settings_tcl_cannot_honour_are_refused(clip, tmp_path):
    with pytest.raises(FileNotFoundError, match=TCL_CHECKPOINT_URL.replace(".", r"\.")):
        read_tcl_checkpoint(tmp_path / "tcl.pth")
    with pytest.raises(ValueError, match="keep_residual"):
        tcl_encoder(clip, settings(keep_residual=False))  # TCL was trained with the residual kept
    real_clip = dataclasses.replace(clip, pretrained="openai")  # real CLIP weights but no TCL checkpoint
    with pytest.raises(FileNotFoundError, match=r"ovseg\.tcl_checkpoint.*github\.com/kakaobrain/tcl/releases"):
        tcl_encoder(real_clip, settings(clip_pretrained="openai"))


def test_a_checkpoint_with_pickled_training_objects_is_not_unpickled_and_the_error_says_how_to_extract(tmp_path):
    import argparse

    path = tmp_path / "tcl.pth"
    torch.save({"model": random_state(released_layout()), "config": argparse.Namespace(tcl_w=0.1)}, path)
    with pytest.raises(RuntimeError, match=r"weights_only=False.*torch\.save\(\{'model'"):
        read_tcl_checkpoint(path)


# ---- what the architecture implies --------------------------------------------------------------------


def test_at_tcls_starting_point_its_embeddings_are_maskclips_upsampled_four_times(clip):
    """TCL starts its masker as a copy of CLIP's last block, ln_post and proj, with the decoder's gates at 0.

    Then the decoder only upsamples (nearest, x2 twice) and LayerNorm + projection act per location,
    so TCL's embedding of every 4 x 4 group of cells is MaskCLIP's embedding of that patch (frozen CLIP,
    last block attending to itself, residual and MLP kept), computed here by ovseg's MaskCLIP encoder.
    """
    visual = clip.model.visual
    masker = random_tcl_masker(visual, seed=3)
    for name, parameter in masker.named_parameters():
        if name.endswith("gate.gate"):
            parameter.data.zero_()
    tcl = TCLEncoder(visual, masker, window=512).eval()
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tcl(images)
        maskclip = MaskCLIPEncoder(visual, window=512, keep_residual=True)(images)
    expected = maskclip.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
    assert ours.shape == (2, EMBED, 12, 16)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_a_constant_image_gives_one_embedding_everywhere_but_near_the_zero_padded_border():
    """With the same positional embedding at every patch, a constant image gives identical tokens, so
    the backbone output is constant; only the decoder's zero-padded 3x3 convs see the border. Each conv
    reaches one cell further in: 2 convs at 1/8 (distance <= 1, i.e. <= 3 at 1/4 after the x2 upsampling),
    then 2 at 1/4, so cells 6 or more from the border are all equal and the ring at distance 5 is not."""
    visual = load_clip("ovseg-tiny", None).model.visual
    with torch.no_grad():
        visual.positional_embedding[1:] = visual.positional_embedding[1:].mean(dim=0)
    masker = random_tcl_masker(visual, seed=2)
    with torch.no_grad():  # strong convs, so that the border's reach is well above rounding
        for name, parameter in masker.named_parameters():
            if name.endswith("conv.weight"):
                parameter.mul_(8)
    encoder = TCLEncoder(visual, masker, window=512).eval()
    image = torch.full((1, 3, 96, 96), 0.7)
    with torch.no_grad():
        dense = encoder(image)[0]  # [D, 24, 24]
    interior = dense[:, 6:18, 6:18].flatten(1)
    torch.testing.assert_close(interior, interior[:, :1].expand_as(interior), atol=1e-6, rtol=0)
    ring = torch.cat([dense[:, 5, 5:19], dense[:, 18, 5:19], dense[:, 5:19, 5], dense[:, 5:19, 18]], dim=1)
    assert (ring - interior[:, :1]).norm(dim=0).min() > 1e-3


def test_masks_are_the_gated_cosines_in_0_1_ordered_like_the_cosines(encoder):
    """TCL's mask is sigmoid(w * cos + b) on the 1/4 grid, upsampled bilinearly: with w > 0 the class
    with the largest mask is the class with the largest cosine (the labeller's per-pixel baseline), and
    TCL's mask threshold t is the cosine (logit(t) - b) / w."""
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(1, 3, 64, 80, generator=generator)
    text = F.normalize(torch.randn(6, EMBED, generator=generator), dim=-1)
    with torch.no_grad():
        dense = encoder(images)
        masks = encoder.grounding_masks(images, text)
    cosine = torch.einsum("bdhw,cd->bchw", dense, text)
    w, b = float(encoder.masker.sim2mask.w.detach()), float(encoder.masker.sim2mask.b.detach())
    expected = F.interpolate(torch.sigmoid(w * cosine + b), size=(64, 80), mode="bilinear")
    torch.testing.assert_close(masks, expected, atol=1e-5, rtol=1e-4)
    assert masks.min() >= 0 and masks.max() <= 1
    lowres = torch.sigmoid(w * cosine + b)
    assert torch.equal(lowres.argmax(dim=1), cosine.argmax(dim=1))
    threshold = encoder.cosine_threshold(0.4)
    assert float(encoder.gate(torch.tensor(threshold))) == pytest.approx(0.4, abs=1e-6)
    assert torch.equal(lowres.max(dim=1).values >= 0.4, cosine.max(dim=1).values >= threshold - 1e-7)


def test_the_kp_branch_mixes_in_maskclips_cosines_through_tcls_fixed_sigmoid(clip, encoder):
    """KP branch: mask = kp_w * sigmoid(10 * (s_clip - 0.25)) + (1 - kp_w) * mask, s_clip the cosine of
    the frozen CLIP's MaskCLIP embedding (1/16 grid), upsampled bilinearly to 1/4, then to the image."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(1, 3, 48, 48, generator=generator)
    text = F.normalize(torch.randn(3, EMBED, generator=generator), dim=-1)
    with torch.no_grad():
        only_kp = encoder.grounding_masks(images, text, kp_weight=1.0)
        plain = encoder.grounding_masks(images, text)
        mixed = encoder.grounding_masks(images, text, kp_weight=0.3)
        s_clip = torch.einsum("bdhw,cd->bchw", MaskCLIPEncoder(clip.model.visual, window=512)(images), text)
    kp = F.interpolate(torch.sigmoid(10 * (s_clip - 0.25)), scale_factor=4, mode="bilinear")
    torch.testing.assert_close(only_kp, F.interpolate(kp, size=(48, 48), mode="bilinear"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed, 0.3 * only_kp + 0.7 * plain, atol=1e-5, rtol=1e-4)


def test_tcls_own_decision_is_the_largest_mask_with_a_constant_background_score(encoder):
    """TCL's evaluation: argmax over masks, the background class scored by a constant (bg_thresh)."""
    generator = torch.Generator().manual_seed(9)
    images = torch.randn(1, 3, 32, 48, generator=generator)
    text = F.normalize(torch.randn(4, EMBED, generator=generator), dim=-1)
    with torch.no_grad():
        masks = encoder.grounding_masks(images, text)
    assert torch.equal(tcl_labels(encoder, images, text), masks.argmax(dim=1))
    threshold = float(masks[:, 1:].amax(dim=1).median())  # half of the pixels fall below it
    labels = tcl_labels(encoder, images, text, background_id=0, background_score=threshold)
    best = masks[:, 1:].max(dim=1)
    assert torch.equal(labels == 0, best.values <= threshold)
    assert torch.equal(labels[labels > 0], best.indices[labels > 0] + 1)
    with pytest.raises(ValueError, match="background"):
        tcl_labels(encoder, images, text, background_score=0.4)


def test_pamr_keeps_masks_that_follow_the_image_and_pulls_overshoots_back():
    """PAMR averages each mask value over its neighbours with image-affinity weights that sum to one:
    constants are fixed points, a mask aligned with a flat two-region image is (numerically) unchanged,
    and a mask that spills over the image edge keeps 1 inside its region while the spill shrinks."""
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0  # left half black, right half white
    constant = torch.full((1, 2, 32, 32), 0.3)
    torch.testing.assert_close(pamr_refine(image, constant), constant)
    aligned = torch.zeros(1, 1, 32, 32)
    aligned[..., :16] = 1
    torch.testing.assert_close(pamr_refine(image, aligned), aligned, atol=1e-5, rtol=0)
    spilled = torch.zeros(1, 1, 32, 32)
    spilled[..., :19] = 1  # three columns into the white region
    refined = pamr_refine(image, spilled)
    torch.testing.assert_close(refined[..., :16], torch.ones(1, 1, 32, 16), atol=1e-5, rtol=0)
    assert refined[..., 16:19].mean() < 0.5 * spilled[..., 16:19].mean()


# ---- windows and sizes --------------------------------------------------------------------------------


def test_disjoint_windows_equal_the_crops_encoded_alone(clip):
    visual = clip.model.visual
    tcl = TCLEncoder(visual, random_tcl_masker(visual, seed=1), window=64, window_stride=64).eval()
    images = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = tcl(images)
        left, right = tcl(images[..., :64]), tcl(images[..., 64:])
    torch.testing.assert_close(whole, torch.cat([left, right], dim=-1), atol=1e-6, rtol=0)


def test_sides_not_multiple_of_the_patch_are_zero_padded_centred_and_cropped_back(encoder):
    images = torch.randn(1, 3, 72, 88, generator=torch.Generator().manual_seed(7))  # pads to 80 x 96
    with torch.no_grad():
        dense = encoder(images)
        padded = encoder(F.pad(images, (4, 4, 4, 4)))  # centred, in whole cells
    assert dense.shape == (1, EMBED, 18, 22)
    torch.testing.assert_close(dense, padded[..., 1:19, 1:23], atol=1e-6, rtol=0)
    assert torch.allclose(dense.norm(dim=1), torch.ones(1, 18, 22))


# ---- registration -------------------------------------------------------------------------------------


def test_ovseg_encoder_tcl_builds_tcl_with_its_preprocessing_and_names_masks(clip, photo):
    from ovseg.labeller import OpenVocabLabeller, encoder_builder

    encoder = encoder_builder("tcl")(clip, settings())
    assert isinstance(encoder, TCLEncoder)
    assert (encoder.stride, encoder.embed_dim) == (4, EMBED)
    assert (encoder.mean, encoder.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (encoder.window, encoder.window_stride) == ((448, 448), (224, 224))

    text = F.normalize(torch.randn(4, EMBED, generator=torch.Generator().manual_seed(8)), dim=-1)
    labeller = OpenVocabLabeller(encoder, text)
    segments = torch.zeros(photo.shape[:2], dtype=torch.long)
    segments[:, photo.shape[1] // 2 :] = 1
    named = labeller(photo.copy(), segments)
    pixels = torch.as_tensor(photo).permute(2, 0, 1)[None].float() / 255
    normalised = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        masks = encoder.grounding_masks(normalised, text)[0]  # photo is 128 x 160: no resizing
    # The baseline is TCL's own per-pixel decision (largest mask) up to bilinear interpolation of
    # sigmoids vs cosines between grid points, which can only flip near-ties.
    agree = (named.baseline == masks.argmax(dim=0)).float().mean()
    assert agree > 0.97
    # Each mask's class is the class closest to its mean TCL embedding (the halves are whole cells: 20 + 20).
    with torch.no_grad():
        dense = encoder(normalised)[0]  # [D, 32, 40]
    for k, half in enumerate((dense[..., :20], dense[..., 20:])):
        mean = F.normalize(half.flatten(1).mean(dim=1), dim=0)
        assert int(named.class_ids[k]) == int((text @ mean).argmax())


def test_ovseg_settings_accept_tcl_and_its_templates(tmp_path):
    from omegaconf import OmegaConf

    from ovseg.config import ovseg_settings
    from ovseg.labeller import template_set

    section = {"encoder": "tcl", "tcl_checkpoint": str(tmp_path / "tcl.pth"), "templates": "tcl"}
    config = ovseg_settings(OmegaConf.create({"ovseg": section}))
    assert (config.encoder, config.tcl_checkpoint, config.templates) == ("tcl", str(tmp_path / "tcl.pth"), "tcl")
    assert len(template_set("tcl")) == 9 and "a photo of many {}." in template_set("tcl")
    with pytest.raises(Exception, match="ovseg.encoder"):
        ovseg_settings(OmegaConf.create({"ovseg": {"encoder": "tcll"}}))


# ---- tools/ov_eval.py end to end ----------------------------------------------------------------------


def test_ov_eval_with_tcl_scores_tcls_labels_and_its_numbers_are_the_cached_maps(tmp_path):
    """tools/ov_eval.py ovseg.encoder=tcl on the miniature models: the cached baseline is TCL's own decision
    (PAMR, KP branch, background constant) on the evaluated image, and both reported mIoUs equal a hand
    computation from the cache."""
    import json

    import numpy as np

    from conftest import REPO, TINY, load_tool, voc_folder
    from emerdiff.data import build_dataset, dataset_metadata
    from ovseg.config import OVSegConfig
    from ovseg.labeller import build_labeller
    from ovseg.vocab import read_vocabulary

    root, out = voc_folder(tmp_path / "VOC2012", count=2), tmp_path / "out"
    fast = ["segmentor.resolution=128", "segmentor.num_masks=3", "segmentor.num_inference_steps=10",
            "segmentor.t_modulate=201", "data.size=96", "data.num_workers=0", "ovseg.clip_init_seed=3"]
    command = ["--vocab", "voc", "--cfg", str(REPO / "configs/ov/voc.yaml"), "--cfg", str(TINY),
               f"data.root={root}", "--output", str(out), *fast, "ovseg.encoder=tcl"]
    assert load_tool("ov_eval").main(command) == 0
    results = json.loads((out / "ov" / "results.json").read_text())
    assert results["settings"]["ovseg"]["encoder"] == "tcl"
    table = (out / "ov" / "results.md").read_text()
    assert "| TCL (its own decision: PAMR, KP branch, background constant) |" in table
    assert "| TCL + EmerDiff masks |" in table and "Baseline row: TCL's own decision (PAMR on, KP weight 0.3)" in table
    assert (results["settings"]["ovseg"]["templates"], results["settings"]["ovseg"]["baseline"]) == ("tcl", "tcl")

    # The cached baseline is what the TCL labeller gives on the evaluated (cropped, resized) image.
    settings = OVSegConfig(**{k: v for k, v in results["settings"]["ovseg"].items() if k != "vocab_sha256"})
    labeller = build_labeller(settings, read_vocabulary("voc"), out / "ov" / "text_embeddings")
    assert isinstance(labeller.encoder, TCLEncoder)
    voc = dataset_metadata("voc2012_val")
    confusion = {key: np.zeros((voc.num_classes, voc.num_classes)) for key in ("ov_labels", "ov_labels_baseline")}
    missed = {key: np.zeros(voc.num_classes) for key in confusion}
    for item in build_dataset("voc2012_val", root, size=96):
        with np.load(out / "ov" / "cache" / f"{item['meta']['id']}.npz") as cached:
            segments = np.zeros(item["image"].shape[:2], dtype=np.int64)
            named = labeller(item["image"].copy(), segments)
            assert np.array_equal(cached["ov_labels_baseline"], named.baseline.numpy())
            valid = cached["gt"] != voc.ignore_index
            for key in confusion:
                truth, predicted = cached["gt"][valid], cached[key][valid]
                known = (predicted >= 0) & (predicted < voc.num_classes)
                np.add.at(confusion[key], (truth[known], predicted[known]), 1)
                np.add.at(missed[key], truth[~known], 1)
    for method, key in (("maskclip", "ov_labels_baseline"), ("emerdiff", "ov_labels")):
        hits = np.diag(confusion[key])
        gt_pixels = confusion[key].sum(1) + missed[key]
        union = gt_pixels + confusion[key].sum(0) - hits
        miou = 100 * (hits[union > 0] / union[union > 0]).mean()  # mmseg: classes with a non-empty union
        assert results["results"][method]["miou"] == pytest.approx(miou, abs=1e-9)
        assert results["results"][method]["pixel_acc"] == pytest.approx(100 * hits.sum() / gt_pixels.sum(), abs=1e-9)


# ---- results table ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["tcl", "maskclip"])
def test_results_name_the_encoder_and_baseline_that_ran_and_put_its_paper_rows_beside_ours(encoder):
    """pc59.yaml-like paper numbers: MaskCLIP's by method, TCL's and CLIPpy's as named reference rows."""
    from emerdiff.evaluation import SegmentationScores

    from ovseg.evaluation import OpenVocabResults

    scores = {m: SegmentationScores(miou=0.25, pixel_acc=0.5, iou=torch.tensor([0.25])) for m in ("maskclip", "emerdiff")}
    results = OpenVocabResults(
        dataset="pascal_context59_val", classes=["cat"], num_images=1, vocab="pc59", scores=scores,
        settings={"model": {"pretrained": "sd15", "random_init": False},
                  "ovseg": {"encoder": encoder, "clip_pretrained": "openai", "clip_model": "ViT-B-16",
                            "baseline": {"tcl": "tcl", "maskclip": "cells"}[encoder]}},
        paper_miou={"emerdiff": 15.9}, paper_reference={"TCL": 28.9, "TCL + EmerDiff": 35.4, "CLIPpy": 12.0},
        paper_note=None)
    table = results.to_markdown()
    if encoder == "tcl":
        assert "| TCL (its own decision: PAMR, KP branch, background constant) | 25.0 | 28.9 |" in table
        assert "| TCL + EmerDiff masks | 25.0 | 35.4 |" in table
        assert "| MaskCLIP + EmerDiff (paper only, not run here) | – | 15.9 |" in table
        assert "TCL + EmerDiff (paper only" not in table and "MaskCLIP (per patch" not in table
    else:
        assert "| MaskCLIP (per patch, upsampled) | 25.0 | – |" in table
        assert "| MaskCLIP + EmerDiff masks | 25.0 | 15.9 |" in table
        assert "| TCL + EmerDiff (paper only, not run here) | – | 35.4 |" in table
    assert "| CLIPpy (paper only, not run here) | – | 12.0 |" in table
