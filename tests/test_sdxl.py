"""EmerDiff on SDXL-shaped backbones (issue #25): the invariants of the SD 1.x tests, on a miniature SDXL.

The miniature (`emerdiff/arch/tiny_sdxl.json`) has SDXL's shape where it matters: no attention at the
top latent level, transformer depth 2 and 3 below it, `addition_embed_type="text_time"` (pooled text
embedding and added time ids) and two text encoders. Its weights are random: every test states what
holds for any weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from conftest import assert_same_segmentation, tiny_segmentor
from emerdiff import load_config
from emerdiff.image import load_image, to_model_input, working_size
from emerdiff.models import build_random_sd
from emerdiff.modulation import variant_offsets
from emerdiff.observers import observing
from emerdiff.processors import AttentionControl, controlled, layer_names

SDXL = load_config("emerdiff_sdxl").segmentor
FAST = dict(num_inference_steps=5, t_modulate=201)  # 2 steps from t_m: the invariants hold on any grid


class StageNames:
    """A stage observer that knows which stage of the recipe is running."""

    current = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        yield


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_random_sd("tiny_sdxl", seed=0)


def sdxl_segmentor(components, **overrides):
    """An EmerDiff on the miniature SDXL with emerdiff_sdxl.yaml's layers at 128 px (4 x 4 feature grid)."""
    layers = dict(feature_layer=SDXL.feature_layer, modulated_layer=SDXL.modulated_layer)
    return tiny_segmentor(components, **{**layers, "resolution": 128, "num_masks": 3, **FAST, **overrides})


def test_the_miniature_has_sdxls_shape_no_top_level_attention_deeper_transformers_text_time(tiny_sdxl):
    unet = tiny_sdxl.unet
    names = layer_names(unet)
    assert not any(n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in names)  # the top latent level
    assert len(unet.get_submodule("up_blocks.0.attentions.2").transformer_blocks) == 3
    assert len(unet.get_submodule("up_blocks.1.attentions.0").transformer_blocks) == 2
    assert unet.config.addition_embed_type == "text_time" and tiny_sdxl.text_encoder_2 is not None


def test_the_full_size_sdxl_unet_has_the_configured_layers_with_32x32_queries_at_1024_px():
    components = build_random_sd("sdxl", device="meta")
    unet = components.unet
    assert len(unet.get_submodule("up_blocks.0.attentions.0").transformer_blocks) == 10
    layers = frozenset({SDXL.feature_layer, SDXL.modulated_layer})
    control = AttentionControl(timesteps=[1], record_layers=layers)
    latent = torch.zeros(1, 4, 128, 128, device="meta")
    pooled = torch.zeros(1, 1280, device="meta")
    ids = torch.zeros(1, 6, device="meta")
    with controlled(unet, control), torch.no_grad():
        unet(latent, torch.tensor([1], device="meta"), torch.zeros(1, 77, 2048, device="meta"),
             added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    for layer in layers:
        assert control.record.query[(layer, 1)].shape == (1, 32 * 32, 1280)


def test_the_pooled_embedding_and_time_ids_reach_every_unet_call_of_every_stage(tiny_sdxl, photo):
    model = sdxl_segmentor(tiny_sdxl)
    height, width = working_size(*photo.shape[:2], 128, "keep", None)
    ids = tiny_sdxl.tokenizer_2("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    pooled = tiny_sdxl.text_encoder_2(ids).text_embeds  # the second encoder's projected embedding of ""
    calls = []

    stages = StageNames()

    def check(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append(stages.current)
        assert set(added) == {"text_embeds", "time_ids"}, f"stage {stages.current} dropped the added conditioning"
        torch.testing.assert_close(added["text_embeds"], pooled.expand_as(added["text_embeds"]))
        assert added["time_ids"].tolist() == [[height, width, 0, 0, height, width]] * len(added["time_ids"])

    handle = tiny_sdxl.unet.register_forward_pre_hook(check, with_kwargs=True)
    try:
        with observing(model, stages):
            model.segment(photo)
    finally:
        handle.remove()
    assert set(calls) == {"features", "inversion", "modulated"}


def test_lambda_zero_gives_exactly_zero_difference_maps(tiny_sdxl, photo):
    out = sdxl_segmentor(tiny_sdxl, lam=0.0, keep_diff_maps=True).segment(photo)
    assert out.diff_maps.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_the_unmodulated_replay_reproduces_the_clean_latent(tiny_sdxl, photo, impl):
    model = sdxl_segmentor(tiny_sdxl, impl=impl)
    z0 = model.encode(to_model_input(load_image(photo), (128, 160)))
    inversion, record = model.invert(z0, torch.Generator().manual_seed(0))
    latents = model.denoise(inversion, record, variant_offsets(torch.ones(1, 4, 5, dtype=torch.bool), 0.0))
    for x in latents:
        assert ((x - z0[0]).norm() / z0.norm()).item() < 1e-4


def test_injection_reaches_every_attention_layer_of_every_transformer_block_at_every_step(tiny_sdxl, photo):
    model = sdxl_segmentor(tiny_sdxl)
    z0 = model.encode(to_model_input(load_image(photo), (128, 160)))
    inversion, record = model.invert(z0, torch.Generator().manual_seed(0))
    used = []

    def observe(layer, t, q, k):
        used.append((layer, t))
        assert torch.equal(q, record.query[(layer, t)]) and torch.equal(k, record.key[(layer, t)])

    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[0, 0, 3] = True
    model.denoise(inversion, record, variant_offsets(mask, 5.0), observer=observe)
    names = layer_names(model.unet)
    assert sum(".transformer_blocks.2." in n for n in names) == 2 * (3 + 2 + 1)  # depth 3: up, down and mid blocks
    assert sorted(used) == sorted((layer, t) for layer in names for t in inversion.timesteps)


@pytest.mark.parametrize("layer", ["up_blocks.0.attentions.2.transformer_blocks.0.attn2",
                                   "up_blocks.0.attentions.1.transformer_blocks.2.attn2"])
def test_fast_path_equals_reference_path_at_any_transformer_block(tiny_sdxl, photo, layer):
    common = dict(modulated_layer=layer, num_masks=2, keep_diff_maps=True)
    fast = sdxl_segmentor(tiny_sdxl, impl="fast", **common).segment(photo)
    reference = sdxl_segmentor(tiny_sdxl, impl="reference", **common).segment(photo)
    assert fast.lowres_labels.shape == (4, 6)  # 128 x 192 (the photo's 4:5, sides multiples of 64): not square
    assert_same_segmentation(fast, reference)


def test_out_of_memory_halves_the_failing_stage_and_keeps_the_result(tiny_sdxl, photo):
    reference = sdxl_segmentor(tiny_sdxl, keep_diff_maps=True).segment(photo)

    def fail_above_two(module, args):
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: batch {args[0].shape[0]} > 2)")

    model = sdxl_segmentor(tiny_sdxl, keep_diff_maps=True)
    handle = tiny_sdxl.unet.register_forward_pre_hook(fail_above_two)
    try:
        out = model.segment(photo)
    finally:
        handle.remove()
    assert_same_segmentation(out, reference)
    assert (model.chunks.inversion, model.chunks.variants) == (2, 1)  # 2 inversion steps fit; 6 -> 3 -> 1
