"""Stage profiler and cost model on the miniature SD: the cost model runs the segmentor's own recipe."""

from contextlib import contextmanager

import torch

from conftest import tiny_segmentor
from emerdiff.memory import meta_model
from emerdiff.profiling import STAGES, StageProfiler, flop_counter, image_cost, profiled
from emerdiff.observers import observing

SMALL = dict(resolution=64, num_masks=2, denoise_steps=3)  # 3 denoising steps keep in-run FLOP counting quick


def test_cost_model_equals_flops_and_calls_counted_during_a_real_run(tiny_components, photo):
    model = tiny_segmentor(tiny_components, **SMALL)
    profiler = StageProfiler(torch.device("cpu"), count_flops=True)
    with profiled(model, profiler):
        out = model.segment(photo)
    assert set(profiler.stages) == set(STAGES) and model.observers == []  # the profiler is gone again
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



class StageLog:
    """A stage observer that notes, in a list it may share with others, each stage as it starts and ends."""

    def __init__(self, who: str, events: list) -> None:
        self.who, self.events = who, events

    @contextmanager
    def stage(self, name):
        self.events.append((self.who, "start", name))
        yield
        self.events.append((self.who, "end", name))


def test_a_profiler_and_progress_observers_watch_one_run_together_the_first_added_outermost(tiny_components, photo):
    model = tiny_segmentor(tiny_components, **SMALL)
    events = []
    outer, inner = StageLog("outer", events), StageLog("inner", events)
    with profiled(model, StageProfiler(torch.device("cpu"))) as profiler, observing(model, outer), \
            observing(model, inner):
        assert model.observers == [profiler, outer, inner]
        model.segment(photo)
    assert model.observers == []
    # `segment` opens "encode" before the recipe's own, and "assignment" again for the final argmax
    order = ["encode", "encode", "features", "kmeans", "inversion", "modulated", "decode", "assignment", "assignment"]
    assert events == [event for name in order for event in (("outer", "start", name), ("inner", "start", name),
                                                            ("inner", "end", name), ("outer", "end", name))]
    assert set(profiler.stages) == set(STAGES) and profiler.stages["modulated"].unet_calls > 0
