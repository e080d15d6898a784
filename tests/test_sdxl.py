"""EmerDiff on SDXL-shaped backbones (issue #25): the invariants of the SD 1.x tests, on a miniature SDXL.

The miniature (`emerdiff/arch/tiny_sdxl.json`) has SDXL's shape where it matters: no attention at the
top latent level, transformer depth 2 and 3 below it, `addition_embed_type="text_time"` (pooled text
embedding and added time ids) and two text encoders. Its weights are random: every test states what
holds for any weights.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import assert_same_segmentation, load_tool, tiny_segmentor
from emerdiff import EmerDiff, load_config
from emerdiff.image import load_image, to_model_input, working_size
from emerdiff.models import build_random_sd
from emerdiff.modulation import variant_offsets
from emerdiff.observers import observing
from emerdiff.processors import AttentionControl, controlled, layer_names
from emerdiff.profiling import StageProfiler, profiled

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


def test_fast_path_equals_reference_path_at_a_deeper_transformer_block_on_a_wide_image(tiny_sdxl, photo):
    """The default layer (block 0) is compared by the self-check test below; here the third block of a layer."""
    layer = "up_blocks.0.attentions.1.transformer_blocks.2.attn2"
    wide = torch.nn.functional.interpolate(load_image(photo)[None], size=(128, 192), mode="bilinear")[0]
    common = dict(modulated_layer=layer, num_masks=2, keep_diff_maps=True)
    fast = sdxl_segmentor(tiny_sdxl, impl="fast", **common).segment(wide)
    reference = sdxl_segmentor(tiny_sdxl, impl="reference", **common).segment(wide)
    assert fast.lowres_labels.shape == (4, 6)  # 128 x 192: a non-square grid
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
    variants = halved = 2 * out.num_masks  # the variants' batch: all (0), then halved until it is at most 2
    while halved > 2:
        halved //= 2
    assert model.chunks.inversion == 0  # its 2 grid steps always fit
    assert model.chunks.variants == (halved if variants > 2 else 0)


def test_a_half_precision_sdxl_vae_that_overflows_encodes_and_decodes_again_in_float32(caplog):
    components = build_random_sd("tiny_sdxl", seed=0)
    components.vae.to(torch.bfloat16)  # float16 convolutions are slow on CPUs; the fallback is the same
    model = sdxl_segmentor(components, num_masks=2)

    def overflow_below_float32(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    handles = [part.register_forward_hook(overflow_below_float32)
               for part in (components.vae.encoder, components.vae.decoder)]
    try:
        with caplog.at_level("WARNING", logger="emerdiff.segmentor"):
            maps = model.mask_maps(torch.rand(3, 128, 128), seed=0).maps
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(maps).all() and maps.abs().max() > 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "encoding this image again in float32" in messages and "decoding this image again in float32" in messages
    assert components.vae.dtype == torch.bfloat16  # put back


@pytest.mark.parametrize("config,arch", [("emerdiff_sdxl_turbo", "tiny_sdxl"), ("emerdiff_sd_turbo", "tiny")])
def test_turbo_configs_invert_and_denoise_on_the_trailing_four_step_grid_with_one_unet_call_each(config, arch, photo):
    cfg = load_config(config, overrides=["segmentor.resolution=128", "segmentor.num_masks=2",
                                         "segmentor.memory_budget_gb=0", "segmentor.keep_diff_maps=true"])
    model = EmerDiff(build_random_sd(arch, seed=0), OmegaConf.to_object(cfg.segmentor))
    assert model.grid.timesteps == [999, 749, 499, 249] and model.grid.tail(model.params.t_modulate) == [249]
    # each grid step goes to the next one: the last from 249 to the final alpha, not to 249 - 1000 / 4
    acp = model.components.scheduler.alphas_cumprod
    assert torch.allclose(model.grid.alpha_bar_prev[:3], acp[[749, 499, 249]].float())
    profiler = StageProfiler(torch.device("cpu"))
    with profiled(model, profiler):
        out = model.segment(photo)
    stages = profiler.stages
    assert stages["inversion"].unet_calls == 1 and stages["modulated"].unet_calls == 1  # all variants, one step
    z0 = model.encode(to_model_input(load_image(photo), (128, 128)))
    inversion, record = model.invert(z0, torch.Generator().manual_seed(0))
    replay = model.denoise(inversion, record, torch.zeros(1, 1, 4, 4))[0]
    assert ((replay - z0[0]).norm() / z0.norm()).item() < 1e-4
    assert out.diff_maps.abs().max() > 0


@pytest.mark.parametrize("config", ["emerdiff_sdxl", "emerdiff_sdxl_turbo"])
def test_the_selfcheck_passes_every_check_on_the_miniature_sdxl_and_turbo(config, tmp_path, photo, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(photo).save(image)
    steps = [] if "turbo" in config else [f"segmentor.{k}={v}" for k, v in FAST.items()]
    status = load_tool("selfcheck").main([
        "--cfg", config, "--image", str(image), "--output", str(tmp_path / "check"), "--small-k", "2",
        "model.random_init=true", "model.arch=tiny_sdxl", "model.device=cpu", "model.dtype=float32",
        "segmentor.resolution=128", "segmentor.num_masks=3", "segmentor.kmeans_restarts=1", *steps])
    assert status == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "check" / "selfcheck.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    ran = {name for name, check in checks.items() if check["status"] == "pass"}
    assert ran == {"replay", "injection", "fast_vs_reference", "fast_vs_reference_labels", "lambda_zero"}
    assert {checks[n]["status"] for n in ("faiss_gpu", "memory")} == {"skipped"}  # GPU only
    assert checks["replay"]["figure"] < 1e-4 and checks["injection"]["figure"] == 1.0
