"""The memory planner: live-byte accounting on the meta device, the per-model profile, the chunk plan."""

import torch

from conftest import tiny_segmentor
from emerdiff.memory import LinearBytes, measure_memory, peak_bytes, plan_chunks


def test_live_bytes_peak_counts_allocations_not_views_and_forgets_freed_tensors():
    def work():
        a = torch.empty(1000, device="meta")  # 4000 bytes
        view = a.view(10, 100).t()  # no new storage
        del a, view
        b = torch.empty(600, device="meta")  # 2400 bytes, after a was freed
        return b + 1  # 2400 more while b is alive: the peak, 4800, is of two live tensors, not of a

    peak, out = peak_bytes(work)
    assert peak == 4800 and out.shape == (600,)


def test_memory_profile_reserves_the_record_of_the_models_own_grid(tiny_components):
    default = tiny_segmentor(tiny_components, resolution=64)  # 15 steps from t_m = 281
    finer = tiny_segmentor(tiny_components, resolution=64, num_inference_steps=100)  # 29 steps from the same t_m
    assert len(finer.grid.tail(281)) == 29
    assert measure_memory(default).record * 29 == measure_memory(finer).record * 15


def test_chunk_plan_grows_with_the_budget_and_never_exceeds_chunk_size(tiny_components):
    model = tiny_segmentor(tiny_components, resolution=128)
    small, large = plan_chunks(model, 0, 0.01), plan_chunks(model, 0, 1.0)
    assert small.variants < large.variants and small.decode < large.decode and small.inversion < large.inversion
    capped = plan_chunks(model, 2, 1.0)
    assert (capped.inversion, capped.variants, capped.decode) == (2, 2, 2)
    assert plan_chunks(model, 3, 0) == type(capped)(3, 3, 3)  # no budget: chunk_size as configured
    assert LinearBytes(100, 10).max_batch(150) == 5 and LinearBytes(100, 10).max_batch(50) == 1


def test_an_auto_budget_from_the_free_memory_plans_like_the_equivalent_number(tiny_components, monkeypatch):
    from emerdiff import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: memory.GIB + int(0.0077 * memory.GIB))  # 1 GiB margin
    auto = tiny_segmentor(tiny_components, resolution=128, memory_budget_gb="auto").chunk_plan()
    number = tiny_segmentor(tiny_components, resolution=128, memory_budget_gb=0.0077).chunk_plan()
    assert auto == number and auto.variants < 6  # the small budget really chunks
    assert memory.resolve_budget(12, torch.device("cpu")) == 12.0


def test_an_auto_budget_keeps_a_tenth_of_large_free_memory_and_falls_back_where_unknown(monkeypatch):
    from emerdiff import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 40 * memory.GIB)
    assert memory.resolve_budget("auto", torch.device("cpu")) == 36.0
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)
    assert memory.resolve_budget("auto", torch.device("meta")) == memory.FALLBACK_BUDGET_GIB


def test_memory_is_planned_for_the_largest_working_size_an_image_can_get(tiny_components):
    square = measure_memory(tiny_segmentor(tiny_components, resolution=64, aspect="square"))
    keep = measure_memory(tiny_segmentor(tiny_components, resolution=64, aspect="keep"))  # up to 64 x 128
    assert keep.variants.per_item > square.variants.per_item and keep.decode.per_item > square.decode.per_item

