"""Approximate modes: off by default, the exact path unchanged, each mode's cost as the cost model says, and the
one-step estimate and the latent difference equal to hand computations."""

import hashlib

import numpy as np
import pytest
import torch

from conftest import tiny_segmentor
from emerdiff.approximations import (BILINEAR, EXACT, ModeResult, cheapest_within_bounds, mode_models, parse_mode,
                                     run_sweep)
from emerdiff.config import ConfigError, SegmentorConfig, result_settings
from emerdiff.data import dataset_metadata
from emerdiff.difference import resize_maps
from emerdiff.difference import smooth as gaussian_blur
from emerdiff.image import image_seed, load_image
from emerdiff.modulation import variant_offsets
from emerdiff.profiling import StageProfiler, image_cost, profiled, total

SMALL = dict(resolution=128, num_masks=3)
# The tiny model (seed 0) on the photo at SMALL with the code before the approximations existed (main at 276d3d5):
# sha256 of its labels, which the exact path must keep giving byte for byte, and each difference map's sum and sum of
# squares, compared to 1e-5 relative: the maps' float bytes differ from one CPU to another (SIMD kernels round
# differently). The sums were measured on an AMD EPYC with code that gave main's map bytes (sha256 16224860...3da28)
# on the CPU that made them.
MAIN_LABELS = "3341d83ae4218f29a5494682855f446dca4ea6572db9e67f31f1198b69e95e1c"
MAIN_MAP_SUMS = ((9483.450051, 9642.606551, 9846.355640), (6158.393458, 6447.298931, 6895.147453))


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def test_approximations_are_off_by_default_and_leave_cached_settings_as_they_were():
    params = SegmentorConfig()
    assert params.difference_space == "pixel" and params.one_step_estimate is False
    assert not {"difference_space", "one_step_estimate"} & set(result_settings(params))


def test_the_exact_path_gives_the_same_labels_and_maps_as_before_the_approximations(tiny_components, photo):
    out = tiny_segmentor(tiny_components, keep_diff_maps=True, **SMALL).segment(photo)
    maps = out.diff_maps.double()
    sums = torch.stack([maps.sum(dim=(1, 2)), maps.square().sum(dim=(1, 2))])
    assert digest(out.labels) == MAIN_LABELS
    torch.testing.assert_close(sums, torch.tensor(MAIN_MAP_SUMS, dtype=torch.float64), rtol=1e-5, atol=0)


def test_one_step_estimate_is_the_ddim_x0_formula_on_the_modulated_steps_noise_estimate(tiny_components, photo):
    model = tiny_segmentor(tiny_components, one_step_estimate=True, **SMALL)
    rgb = load_image(photo)
    inverted = model.inverted(rgb, image_seed(rgb, 0))
    assert inverted.inversion.timesteps == [281]  # the inversion runs t_m only
    offsets = variant_offsets(inverted.clusters.masks, model.params.lam)
    outputs = []
    handle = model.unet.register_forward_hook(lambda module, args, out: outputs.append(out.sample.float()))
    try:
        latents = model.denoise(inverted.inversion, inverted.record, offsets)
    finally:
        handle.remove()
    assert len(outputs) == 1 and outputs[0].shape[0] == len(offsets)  # one UNet call for every variant
    a = model.components.scheduler.alphas_cumprod[281].double()
    x = inverted.inversion.latents[:1].double()
    by_hand = (x - (1 - a).sqrt() * outputs[0].double()) / a.sqrt()
    torch.testing.assert_close(latents.double(), by_hand, rtol=1e-5, atol=1e-5)


def test_latent_difference_is_the_channel_distance_of_each_pair_upsampled_then_smoothed(tiny_components):
    model = tiny_segmentor(tiny_components, difference_space="latent", gaussian_sigma=0, **SMALL)
    latents = torch.zeros(4, 4, 2, 2)  # K = 2 masks: variants (-, +) of mask 0, then of mask 1
    latents[1, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # mask 0, pixel (0, 0): distance 5
    latents[2, :, 1, 1] = torch.tensor([1.0, 2.0, 2.0, 0.0])  # mask 1, pixel (1, 1): distance 3
    latents[3, :, 1, 1] = torch.tensor([1.0, 2.0, 2.0, 4.0])  # ... and its + variant: distance 4
    maps = model.variant_maps(latents, torch.tensor([0, 1]), 2, (2, 2))
    assert torch.equal(maps, torch.tensor([[[5.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]]))
    up = model.variant_maps(latents, torch.tensor([0, 1]), 2, (4, 4))  # bilinear, half-pixel centres
    assert up[0, 0, 0] == 5.0 and up[0, 1, 1] == pytest.approx(5.0 * 0.75 * 0.75)
    smooth = tiny_segmentor(tiny_components, difference_space="latent", gaussian_sigma=1.0, **SMALL)
    blurred = smooth.variant_maps(latents, torch.tensor([0, 1]), 2, (8, 8))
    torch.testing.assert_close(blurred, gaussian_blur(resize_maps(maps, (8, 8)), 1.0))


EXPECTED = {  # mode: (inversion UNet samples, modulated UNet calls, modulated samples per variant, decodes per variant)
    "exact": (15, 15, 15, 1),
    "latent": (15, 15, 15, 0),
    "one_step": (1, 1, 1, 1),
    "steps3": (3, 3, 3, 1),
    "decode64": (15, 15, 15, 1),
    "one_step+latent": (1, 1, 1, 0),
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_modes_unet_calls_and_decodes_counted_at_run_time_equal_the_cost_model(tiny_components, photo, mode):
    model = tiny_segmentor(tiny_components, **SMALL, **parse_mode(mode))
    with profiled(model, StageProfiler(torch.device("cpu"))) as profiler:
        out = model.segment(photo)
    variants = 2 * out.num_masks
    modelled = image_cost(model, out.num_masks)
    for stage in ("inversion", "modulated", "decode"):
        run, cost = profiler.stages[stage] if stage in profiler.stages else None, modelled.get(stage)
        counted = (run.unet_calls, run.unet_samples, run.vae_calls, run.vae_samples) if run else (0, 0, 0, 0)
        expected = (cost.unet_calls, cost.unet_samples, cost.vae_calls, cost.vae_samples) if cost else (0, 0, 0, 0)
        assert counted == expected, stage
    inversion, calls, per_variant, decodes = EXPECTED[mode]
    assert profiler.stages["inversion"].unet_samples == inversion
    assert profiler.stages["modulated"].unet_calls == calls
    assert profiler.stages["modulated"].unet_samples == per_variant * variants
    assert total(profiler.stages).vae_samples == 1 + decodes * variants  # the encode, then the variants


def test_fewer_flops_in_every_approximate_mode_and_none_at_all_for_decodes_in_latent_space(tiny_components):
    flops = {mode: total(image_cost(tiny_segmentor(tiny_components, **SMALL, **parse_mode(mode)), 3)).flops
             for mode in EXPECTED}
    assert all(flops[mode] < flops["exact"] for mode in EXPECTED if mode != "exact")
    latent = image_cost(tiny_segmentor(tiny_components, **SMALL, difference_space="latent"), 3)
    assert "decode" not in latent and flops["one_step+latent"] == min(flops.values())


def test_one_step_estimate_with_fewer_steps_or_more_modulated_steps_is_refused_naming_the_keys(tiny_components):
    for extra in (dict(denoise_steps=3), dict(num_modulated_steps=2)):
        with pytest.raises(ConfigError, match="denoise_steps=0 and segmentor.num_modulated_steps=1"):
            tiny_segmentor(tiny_components, one_step_estimate=True, **SMALL, **extra)


def test_a_mode_name_is_its_parts_settings_and_an_unknown_part_is_refused():
    assert parse_mode("exact") == {}
    assert parse_mode("one_step+latent+decode256+sigma2") == {
        "one_step_estimate": True, "difference_space": "latent", "decode_resolution": 256, "gaussian_sigma": 2.0}
    with pytest.raises(ConfigError, match="unknown mode part 'fast'"):
        parse_mode("latent+fast")


def result(name: str, flops: float, agreement: float, boundary: float) -> ModeResult:
    return ModeResult(name, {}, flops=flops, agreement=agreement, boundary_miou=boundary)


def test_the_preset_is_the_cheapest_mode_within_95_percent_agreement_and_one_boundary_point():
    results = [result(EXACT, 100, 1.0, 50.0), result(BILINEAR, 1, 0.5, 30.0), result("a", 10, 0.94, 50.0),
               result("b", 20, 0.96, 48.9), result("c", 30, 0.95, 49.0), result("d", 40, 0.99, 50.0)]
    assert cheapest_within_bounds(results) == "c"
    assert cheapest_within_bounds(results[:3]) is None


def test_a_sweep_scores_every_mode_against_the_exact_path_with_the_cost_models_calls(tiny_components, photo):
    base = tiny_segmentor(tiny_components, **SMALL)
    models = mode_models(base, [EXACT, "one_step+latent"])
    metadata = dataset_metadata("toyworld_val")
    gt = (np.arange(photo.shape[1])[None, :] * 3 // photo.shape[1]).repeat(photo.shape[0], 0).astype(np.uint8)
    from emerdiff.config import EvalConfig

    sweep = run_sweep(models, [{"image": photo, "label": gt}], metadata, EvalConfig(), "three bands")
    exact, fast = sweep.result(EXACT), sweep.result("one_step+latent")
    assert sweep.num_images == 1 and exact.agreement == 1.0 and 0 <= fast.agreement <= 1
    assert exact.cost_model_agrees and fast.cost_model_agrees
    assert fast.decodes == 0 and exact.decodes > 0
    assert fast.flops < exact.flops and sweep.result(BILINEAR).flops < fast.flops


def test_the_trade_off_figure_names_clustered_modes_without_overlapping_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emerdiff.approximations import place_labels

    fig, ax = plt.subplots(figsize=(4, 3))
    points = [("steps5+decode64", 20.0, 81.30), ("steps7+decode64", 21.0, 81.28), ("decode64", 22.0, 81.26)]
    ax.scatter([p[1] for p in points], [p[2] for p in points])
    ax.set_xscale("log")
    ax.set(xlim=(1, 100), ylim=(80, 100))  # the three points a few pixels apart
    place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert sorted(text.get_text() for text in ax.texts) == sorted(p[0] for p in points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)
