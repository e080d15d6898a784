"""Stage profiler and cost model for benchmarks: wall time, FLOPs, UNet/VAE calls and peak memory per stage.

`EmerDiff.segment` wraps each stage in ``self.stage(name)``, which only its observers see
(`emerdiff.observers`). A `StageProfiler` is one, attached with `profiled` beside any others
(a progress bar), so none of this runs unless a benchmark (or a test) asks for it. `image_cost` is the
machine-independent cost model: the segmentor's own recipe (`EmerDiff.mask_maps`) run on a meta-device
copy under the profiler.

Peak memory depends on the device: on CUDA the allocator's peak (weights included); on
the CPU the peak resident set size of the process (Linux VmHWM, reset before each
stage); on the meta device the peak bytes of the tensors the stage allocates
(`memory.LiveBytes`, activations only: meta weights hold no memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .clustering import Clusters, KMeans
from .memory import ChunkPlan, ChunkRunner, LiveBytes, Segmentor, meta_model
from .observers import StageObserver, observing

STAGES = ("encode", "features", "kmeans", "inversion", "modulated", "decode", "assignment")
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


class Profiled(Segmentor, Protocol):
    """The segmentor as profiled and cost-modelled (`EmerDiff`, which this module must not import): beside what the
    planner measures, its observers, its chunk plan, and the recipe with its two stand-ins (k-means, chunk runner)."""

    observers: list[StageObserver]
    chunks: ChunkPlan | None
    run_chunks: ChunkRunner
    kmeans: KMeans

    def chunk_plan(self) -> ChunkPlan: ...

    def mask_maps(self, rgb: torch.Tensor, seed: int) -> object: ...


@dataclass
class StageCost:
    """What one stage cost; `*_calls` count forward invocations, `*_samples` the batch entries they processed."""

    seconds: float = 0.0
    flops: int = 0
    unet_calls: int = 0
    unet_samples: int = 0
    vae_calls: int = 0
    vae_samples: int = 0
    peak_mem_bytes: int = 0

    def add(self, other: StageCost, repeat: int = 1) -> None:
        """Accumulate `other` run `repeat` times (sums scale, the memory peak does not)."""
        self.seconds += other.seconds * repeat
        self.flops += other.flops * repeat
        self.unet_calls += other.unet_calls * repeat
        self.unet_samples += other.unet_samples * repeat
        self.vae_calls += other.vae_calls * repeat
        self.vae_samples += other.vae_samples * repeat
        self.peak_mem_bytes = max(self.peak_mem_bytes, other.peak_mem_bytes)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def total(stages: dict[str, StageCost]) -> StageCost:
    """The sum over stages (memory: the largest stage peak)."""
    out = StageCost()
    for cost in stages.values():
        out.add(cost)
    return out


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(QK^T) V as two batched matmuls: 2 b h N M (d_qk + d_v)."""
    batch, heads, queries, dim_qk = query_shape
    keys, dim_v = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (dim_qk + dim_v)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel (torch counts only the GPU ones)."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    )


def _rss_peak_reset() -> bool:
    """Reset the process' peak RSS (Linux clear_refs 5); False when the kernel does not allow it."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes (VmHWM), 0 where /proc is missing."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StageProfiler:
    """Accumulates a `StageCost` per stage name; FLOP counting is optional (it slows small models down)."""

    def __init__(self, device: torch.device, count_flops: bool = False) -> None:
        self.device = torch.device(device)
        self.count_flops = count_flops
        self.stages: dict[str, StageCost] = {}
        self._current: StageCost | None = None
        self._counter: FlopCounterMode | None = None

    @contextmanager
    def stage(self, name: str, repeat: int = 1) -> Iterator[StageCost]:
        """Measure the block as stage `name`; `repeat` scales it (cost models run one of n equal chunks)."""
        cost = StageCost()
        outer, self._current = self._current, cost
        with ExitStack() as stack:
            flops = stack.enter_context(flop_counter()) if self.count_flops else None
            outer_counter, self._counter = self._counter, flops
            live = stack.enter_context(self._memory_mode())
            self._sync()
            start = time.perf_counter()
            try:
                yield cost
            finally:
                self._sync()
                cost.seconds = time.perf_counter() - start
                cost.flops += flops.get_total_flops() if flops is not None else 0
                cost.peak_mem_bytes = self._peak(live)
                self._current, self._counter = outer, outer_counter
        self.stages.setdefault(name, StageCost()).add(cost, repeat)

    def run_equal_chunks_once(
        self, fn: Callable[[torch.Tensor], torch.Tensor], items: torch.Tensor, size: int
    ) -> torch.Tensor:
        """A `ChunkRunner` for meta-device cost models: of several equal-sized chunks only the first runs, and its
        calls and FLOPs are counted for all of them; the others' results are empty tensors of the same shape."""
        size = size if size > 0 else max(len(items), 1)
        starts = list(range(0, len(items), size))
        results: dict[int, torch.Tensor] = {}
        for s in starts:
            part = items[s : s + size]
            if len(part) not in results:
                repeats = sum(1 for t in starts if len(items[t : t + size]) == len(part))
                with self._repeated(repeats):
                    results[len(part)] = fn(part)
        return torch.cat([torch.empty_like(results[len(items[s : s + size])]) for s in starts])

    @contextmanager
    def _repeated(self, times: int) -> Iterator[None]:
        """Count the block's calls and FLOPs `times` times (its memory peak once)."""
        current = self._current
        if current is None:
            yield
            return
        before, flops_before = replace(current), self._flops()
        yield
        extra = times - 1
        current.unet_calls += (current.unet_calls - before.unet_calls) * extra
        current.unet_samples += (current.unet_samples - before.unet_samples) * extra
        current.vae_calls += (current.vae_calls - before.vae_calls) * extra
        current.vae_samples += (current.vae_samples - before.vae_samples) * extra
        current.flops += (self._flops() - flops_before) * extra

    def _flops(self) -> int:
        """FLOPs counted so far in the current stage (0 when not counting)."""
        return self._counter.get_total_flops() if self._counter is not None else 0

    def count_call(self, model: str, batch: int) -> None:
        """Called by the forward hooks of `profiled`: one UNet or VAE call over `batch` samples."""
        if self._current is None:
            return
        if model == "unet":
            self._current.unet_calls += 1
            self._current.unet_samples += batch
        else:
            self._current.vae_calls += 1
            self._current.vae_samples += batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _memory_mode(self) -> Iterator[LiveBytes | None]:
        if self.device.type == "meta":
            with LiveBytes() as live:
                yield live
        else:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                _rss_peak_reset()
            yield None

    def _peak(self, live: LiveBytes | None) -> int:
        if live is not None:  # the meta device's
            return live.peak
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _rss_peak()


def _batch_hook(profiler: StageProfiler, model: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        sample = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
        profiler.count_call(model, sample.shape[0])

    return hook


@contextmanager
def profiled(model: Profiled, profiler: StageProfiler) -> Iterator[StageProfiler]:
    """`profiler` observes `model`'s stages (an `EmerDiff`) and counts its UNet/VAE calls; removed on exit."""
    targets = [(model.unet, "unet"), (model.vae.encoder, "vae"), (model.vae.decoder, "vae")]
    handles: list = [m.register_forward_hook(_batch_hook(profiler, name), with_kwargs=True) for m, name in targets]
    try:
        with observing(model, profiler):
            yield profiler
    finally:
        for handle in handles:
            handle.remove()


def synthetic_clusters(num_masks: int, height: int, width: int, channels: int) -> Clusters:
    """`num_masks` non-empty masks of a height x width grid (row-major bands), for cost models without k-means."""
    labels = (torch.arange(height * width) * num_masks // (height * width)).reshape(height, width)
    return Clusters(labels, torch.zeros(num_masks, channels), torch.zeros(num_masks, channels))


def image_cost(model: Profiled, num_masks: int) -> dict[str, StageCost]:
    """Per-stage cost of one image with `num_masks` modulated masks: `model`'s recipe run on a meta copy.

    The recipe is `EmerDiff.mask_maps` itself, with two differences: k-means (faiss, no tensors) is
    replaced by `num_masks` synthetic masks, and of several equal-sized chunks only the first is
    run and counted for all (every such chunk costs the same). The final per-pixel argmax at the
    input size (`EmerDiff.output`) is left out.
    """
    meta = meta_model(model)
    meta.chunks = model.chunk_plan()
    meta.kmeans = lambda queries, height, width, *_: synthetic_clusters(num_masks, height, width, queries.shape[-1])
    profiler = StageProfiler(torch.device("meta"), count_flops=True)
    side = meta.params.resolution
    with profiled(meta, profiler):
        meta.run_chunks = profiler.run_equal_chunks_once
        meta.mask_maps(torch.zeros(3, side, side, device="meta"), seed=0)
    return profiler.stages
