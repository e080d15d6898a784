"""Cost accounting on the miniature SD: the meta-device cost model, the stage profiler, tools/benchmark.py."""

import json

import pytest
import torch

from conftest import TINY, load_tool, tiny_segmentor
from emerdiff.cost import LinearBytes, image_cost, memory_profile, meta_model, peak_bytes, plan_chunks
from emerdiff.profiling import STAGES, StageProfiler, flop_counter, profiled
from emerdiff.segmentor import untimed

benchmark = load_tool("benchmark")

SMALL = dict(resolution=64, num_masks=2, denoise_steps=3)  # 3 denoising steps keep in-run FLOP counting quick


def test_live_bytes_peak_counts_allocations_not_views_and_forgets_freed_tensors():
    def work():
        a = torch.empty(1000, device="meta")  # 4000 bytes
        view = a.view(10, 100).t()  # no new storage
        del a, view
        b = torch.empty(600, device="meta")  # 2400 bytes, after a was freed
        return b + 1  # 2400 more while b is alive: the peak, 4800, is of two live tensors, not of a

    peak, out = peak_bytes(work)
    assert peak == 4800 and out.shape == (600,)


def test_cost_model_equals_flops_and_calls_counted_during_a_real_run(tiny_components, photo):
    model = tiny_segmentor(tiny_components, **SMALL)
    profiler = StageProfiler(torch.device("cpu"), count_flops=True)
    with profiled(model, profiler):
        out = model.segment(photo)
    assert set(profiler.stages) == set(STAGES) and model.stage is untimed  # the no-op stage is back
    modelled = image_cost(model, out.num_masks)
    for stage in STAGES:
        run, cost = profiler.stages[stage], modelled[stage]
        assert (run.flops, run.unet_calls, run.unet_samples, run.vae_calls, run.vae_samples) == \
               (cost.flops, cost.unet_calls, cost.unet_samples, cost.vae_calls, cost.vae_samples), stage
    assert profiler.stages["modulated"].flops > 0 and profiler.stages["modulated"].seconds > 0


def test_reference_runs_15_plus_2k_times_15_unet_passes_and_fast_the_same_samples_in_fewer_calls(
        tiny_components, photo):
    stages = {}
    for impl in ("reference", "fast"):  # 4 masks = 8 variants: 2 chunks of 4 on the fast path
        model = tiny_segmentor(tiny_components, impl=impl, resolution=128, num_masks=4, chunk_size=4)
        with profiled(model, StageProfiler(torch.device("cpu"))) as profiler:
            assert model.segment(photo).num_masks == 4
        stages[impl] = profiler.stages
    ref, fast = stages["reference"], stages["fast"]
    assert ref["inversion"].unet_samples == fast["inversion"].unet_samples == 15
    assert ref["modulated"].unet_calls == ref["modulated"].unet_samples == 2 * 4 * 15
    assert fast["modulated"].unet_calls == 2 * 15 and fast["modulated"].unet_samples == 2 * 4 * 15
    assert ref["decode"].vae_samples == fast["decode"].vae_samples == 8


def test_reference_variants_cost_exactly_full_stock_unet_passes_and_fast_ones_less(tiny_components):
    meta = meta_model(tiny_segmentor(tiny_components, **SMALL))
    latent = torch.zeros(1, 4, 8, 8, device="meta")
    with flop_counter() as counter:  # a stock pass: the UNet's own processors, no EmerDiff control
        meta.unet(latent, torch.tensor([1], device="meta"), meta.prompt)
    costs = {impl: image_cost(tiny_segmentor(tiny_components, impl=impl, **SMALL), 2)["modulated"]
             for impl in ("reference", "fast")}
    assert costs["reference"].flops == costs["reference"].unet_samples * counter.get_total_flops()
    assert costs["fast"].unet_samples == costs["reference"].unet_samples
    assert costs["fast"].flops < 0.8 * costs["reference"].flops


def test_memory_profile_reserves_the_record_of_the_models_own_grid(tiny_components):
    default = tiny_segmentor(tiny_components, resolution=64)  # 15 steps from t_m = 281
    finer = tiny_segmentor(tiny_components, resolution=64, num_inference_steps=100)  # 29 steps from the same t_m
    assert len(finer.grid.tail(281)) == 29
    assert memory_profile(default).record * 29 == memory_profile(finer).record * 15


def test_chunk_plan_grows_with_the_budget_and_never_exceeds_chunk_size(tiny_components):
    model = tiny_segmentor(tiny_components, resolution=128)
    small, large = plan_chunks(model, 0, 0.01), plan_chunks(model, 0, 1.0)
    assert small.variants < large.variants and small.decode < large.decode and small.inversion < large.inversion
    capped = plan_chunks(model, 2, 1.0)
    assert (capped.inversion, capped.variants, capped.decode) == (2, 2, 2)
    assert plan_chunks(model, 3, 0) == type(capped)(3, 3, 3)  # no budget: chunk_size as configured
    assert LinearBytes(100, 10).max_batch(150) == 5 and LinearBytes(100, 10).max_batch(50) == 1


def test_benchmark_tool_writes_per_impl_figures_and_ratios(tmp_path, capsys):
    argv = ["--cfg", str(TINY), "segmentor.resolution=64", "segmentor.num_masks=2", "segmentor.denoise_steps=2",
            "--output", str(tmp_path), "--no-warmup"]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert record["command"].startswith("python tools/benchmark.py --cfg")
    for impl in ("fast", "reference"):
        figures = record["impls"][impl]
        assert {"flops", "seconds", "unet_calls", "vae_calls", "peak_mem_bytes"} <= figures.keys()
        assert set(figures["stages"]) == set(STAGES) and figures["flops"] > 0 and figures["seconds"] > 0
    assert 0 < record["ratios"]["modulated_flops"] < 1 and record["ratios"]["seconds"] > 0
    printed = capsys.readouterr().out
    assert "| modulated |" in printed and "fast/ref" in printed and "projected fast" in printed


def test_benchmark_cost_only_needs_no_run_and_rejects_real_weights(tmp_path):
    argv = ["--cfg", str(TINY), "segmentor.resolution=64", "segmentor.denoise_steps=2", "--cost-only",
            "--impl", "reference", "--output", str(tmp_path)]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert record["measured"] is False and record["impls"]["reference"]["seconds"] is None
    assert record["impls"]["reference"]["unet_samples"] == 1 + 2 + 2 * 6 * 2  # features, inversion, K = 6 masks
    with pytest.raises(SystemExit):
        benchmark.main(["model.pretrained=some/real-model", "--cost-only"])
