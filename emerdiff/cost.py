"""Machine-independent cost: peak tensor memory and FLOPs of EmerDiff's stages on the meta device.

The meta device runs every operator for its shapes only (no weights, no data, no time),
so a full-size model costs nothing to build. Two uses:

- `plan_chunks`: the batch sizes that keep the inversion, the variant chunks and the
  decodes within ``segmentor.memory_budget_gb`` (each stage's peak bytes measured at two
  batch sizes and extrapolated linearly, once per model configuration);
- `image_cost`: the per-stage cost model of one image (FLOPs, UNet/VAE calls, peak
  activation bytes) for a given number of masks, as the benchmark reports it.

Attention on the meta device takes the math path, which materialises softmax(QK^T);
memory figures are therefore upper bounds for fused SDPA kernels.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Dict, Hashable, List, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import assignment
from .features import extract_queries
from .inversion import encode_image
from .models import SDComponents, cast_components, freeze
from .modulation import denoise_variants
from .profiling import StageCost, StageProfiler, profiled

GIB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode and still alive; `peak` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._storages:  # a view of something that already exists
                continue
            self._storages.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._storages.discard(key)


def peak_bytes(fn: Callable[[], object]) -> Tuple[int, object]:
    """Peak bytes of the tensors `fn` allocates (meta tensors count by their size), and its result."""
    with LiveBytes() as live:
        result = fn()
    return live.peak, result


def meta_copy(components: SDComponents) -> SDComponents:
    """The same architectures on the meta device, in the same dtypes: costs nothing to build or run."""
    with torch.device("meta"):
        unet = type(components.unet).from_config(components.unet.config)
        vae = type(components.vae).from_config(components.vae.config)
        text = type(components.text_encoder)(components.text_encoder.config)
    scheduler = type(components.scheduler).from_config(components.scheduler.config)  # add_noise moves its tensors
    copies = freeze(SDComponents(unet, vae, text, components.tokenizer, scheduler, name=f"meta:{components.name}"))
    return cast_components(copies, components.unet.dtype)


def meta_model(model: nn.Module) -> nn.Module:
    """An `EmerDiff` of the same class and parameters on meta copies of its SD parts, never compiled."""
    return type(model)(meta_copy(model.components), replace(model.params, compile=False))


@dataclass(frozen=True)
class LinearBytes:
    """Peak bytes of a batched stage as fixed + per_item * batch."""

    fixed: int
    per_item: int

    @classmethod
    def through(cls, one: Tuple[int, int], two: Tuple[int, int]) -> "LinearBytes":
        """The line through two (batch, peak bytes) measurements."""
        (n1, b1), (n2, b2) = one, two
        per_item = max(0, (b2 - b1) // (n2 - n1))
        return cls(max(0, b1 - per_item * n1), per_item)

    def max_batch(self, available: int) -> int:
        """The largest batch that fits in `available` bytes (at least 1; a huge number when free of the batch)."""
        if self.per_item == 0:
            return 2 ** 31
        return max(1, (available - self.fixed) // self.per_item)


@dataclass(frozen=True)
class MemoryProfile:
    """Peak activation bytes of the batched stages of one image, measured on the meta device."""

    inversion: LinearBytes  # one recording UNet call over n grid steps
    record: int  # the injection record of the whole inversion, alive during the modulated denoising
    variants: LinearBytes  # modulated denoising of a chunk of n variants
    decode: LinearBytes  # VAE decode of n latents


@dataclass(frozen=True)
class ChunkPlan:
    """Batch sizes of the batched stages (0 = everything at once)."""

    inversion: int
    variants: int
    decode: int


def _latent(model: nn.Module, batch: int, resolution: int) -> torch.Tensor:
    channels = model.unet.config.in_channels
    return torch.zeros(batch, channels, resolution // 8, resolution // 8, device="meta")


def _offsets(batch: int, lam: float) -> torch.Tensor:
    """Synthetic variant offsets (one token grid cell; the layer's grid is reached by nearest resizing)."""
    return torch.full((batch, 1, 1, 1), lam)


def measure_memory(model: nn.Module) -> MemoryProfile:
    """Peak bytes of the inversion, variant chunks and decodes at two batch sizes each, on meta copies."""
    meta = meta_model(model)
    p = meta.params
    z0 = _latent(meta, 1, p.resolution)
    full = meta.grid
    steps = len(full.tail(p.t_modulate))
    inversion_peaks = []
    for n in (1, 2):  # the 2-step grid (t_m and the last step) stays for the variant probes
        meta.grid = full.thinned(p.t_modulate, n)
        peak, (inversion, record) = peak_bytes(lambda: meta._invert(z0, torch.Generator().manual_seed(0)))
        inversion_peaks.append((n, peak))
    record_bytes = 0 if record is None else sum(
        t.untyped_storage().nbytes() for d in (record.query, record.key) for t in d.values())
    settings = meta._modulation_settings(0)
    variant_peaks = [(b, peak_bytes(lambda: denoise_variants(meta.unet, meta.prompt, meta.grid, inversion, record,
                                                              _offsets(b, p.lam), settings))[0]) for b in (2, 4)]
    side = p.decode_resolution or p.resolution
    decode_peaks = [(n, peak_bytes(lambda: assignment.decode_latents(meta.vae, _latent(meta, n, side)))[0])
                    for n in (1, 2)]
    return MemoryProfile(LinearBytes.through(*inversion_peaks), record_bytes * steps // len(inversion.timesteps),
                         LinearBytes.through(*variant_peaks), LinearBytes.through(*decode_peaks))


def _memory_key(model: nn.Module) -> Hashable:
    """What the memory profile depends on: architectures, dtype, prompt, grid and the shape-relevant parameters."""
    p = model.params
    configs = json.dumps([dict(model.unet.config), dict(model.vae.config)], sort_keys=True, default=str)
    return (configs, str(model.unet.dtype), tuple(model.prompt.shape), tuple(model.grid.timesteps), p.resolution,
            p.decode_resolution, p.t_modulate, p.modulated_layer, p.num_modulated_steps, p.offset_placement,
            p.attention_injection, p.impl)


_PROFILES: Dict[Hashable, MemoryProfile] = {}


def memory_profile(model: nn.Module) -> MemoryProfile:
    """`measure_memory`, measured once per configuration (probing runs a few meta-device passes)."""
    key = _memory_key(model)
    if key not in _PROFILES:
        _PROFILES[key] = measure_memory(model)
    return _PROFILES[key]


def plan_chunks(model: nn.Module, chunk_size: int, budget_gib: float) -> ChunkPlan:
    """Batch sizes within `budget_gib` of activation memory, never above `chunk_size` (0 = no cap)."""
    if budget_gib <= 0:
        return ChunkPlan(chunk_size, chunk_size, chunk_size)
    usage = memory_profile(model)
    budget = int(budget_gib * GIB)

    def fit(line: LinearBytes, reserved: int) -> int:
        n = line.max_batch(budget - reserved)
        return n if chunk_size <= 0 else min(n, chunk_size)

    return ChunkPlan(fit(usage.inversion, usage.record), fit(usage.variants, usage.record), fit(usage.decode, 0))


def _chunks(count: int, size: int) -> List[Tuple[int, int]]:
    """(chunk size, how many chunks of it) covering `count` items in chunks of `size` (0 = one chunk)."""
    size = count if size <= 0 else min(size, count)
    full, rest = divmod(count, size)
    return [(size, full)] + ([(rest, 1)] if rest else [])


def image_cost(model: nn.Module, num_masks: int) -> Dict[str, StageCost]:
    """Per-stage cost of one image with `num_masks` modulated masks, counted on meta copies of `model`.

    Stages run as `EmerDiff.segment` runs them, except that k-means (faiss, no tensors) is
    skipped and equal chunks are counted once and multiplied: the reference path runs each
    variant alone, the fast path runs same-sized chunks, and both cost the same per chunk.
    """
    meta = meta_model(model)
    p = meta.params
    chunks = model.chunk_plan()
    profiler = StageProfiler(torch.device("meta"), count_flops=True)
    variants = 2 * num_masks
    with profiled(meta, profiler):
        with profiler.stage("encode"):
            z0 = encode_image(meta.vae, torch.zeros(1, 3, p.resolution, p.resolution, device="meta"))
        with profiler.stage("features"):
            extract_queries(meta.unet, meta.components.scheduler, z0, meta.prompt, p.feature_layer, p.t_feature,
                            p.feature_noise_draws, torch.Generator().manual_seed(0))
        with profiler.stage("kmeans"):
            pass
        with profiler.stage("inversion"):
            inversion, record = meta._invert(z0, torch.Generator().manual_seed(0), chunks.inversion)
        settings = meta._modulation_settings(chunks.variants)
        for size, repeat in _chunks(variants, settings.batch_size(variants)):
            with profiler.stage("modulated", repeat):
                denoise_variants(meta.unet, meta.prompt, meta.grid, inversion, record, _offsets(size, p.lam), settings)
        del record
        side = p.decode_resolution or p.resolution
        for size, repeat in _chunks(variants, chunks.decode):
            with profiler.stage("decode", repeat):
                assignment.decode_latents(meta.vae, _latent(meta, size, side))
        with profiler.stage("assignment"):
            maps = torch.zeros(num_masks, side, side, device="meta")
            assignment.smooth(assignment.resize_maps(maps, p.resolution), p.gaussian_sigma)
    return profiler.stages
