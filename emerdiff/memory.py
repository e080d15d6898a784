"""The memory planner: batch sizes that keep one image's stages within ``segmentor.memory_budget_gb``.

It measures the segmentor, never the reverse: a meta-device copy of the model (same classes,
same settings, no weights, no data, no time) runs the segmentor's own stage methods at two batch
sizes each, and each stage's peak bytes is extrapolated linearly. The segmentor asks for a plan
once (`EmerDiff.chunk_plan`) and keeps it.

Attention on the meta device takes the math path, which materialises softmax(QK^T); the
figures are therefore upper bounds for fused SDPA kernels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import SegmentorConfig
from .image import largest_working_size
from .inversion import DDPMGrid, Inversion
from .models import SDComponents, cast_components, freeze
from .processors import AttentionRecord
from .vae import decode_latents, decode_size

GIB = 2**30
FALLBACK_BUDGET_GIB = 16.0  # `auto` where the device cannot say how much memory is free (meta, unknown)
_MEMINFO = Path("/proc/meminfo")
T = TypeVar("T")
# (one chunk's function, all items, chunk size; 0 = all) -> the chunk results concatenated
ChunkRunner = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int], torch.Tensor]


class Segmentor(Protocol):
    """The segmentor as the planner measures it (`EmerDiff`, which imports this module): its SD parts and settings,
    its step grid, and the stage methods the probes run."""

    components: SDComponents
    params: SegmentorConfig
    grid: DDPMGrid
    unet: UNet2DConditionModel
    vae: AutoencoderKL

    def __init__(self, components: SDComponents, params: SegmentorConfig) -> None: ...

    def invert(
        self, z0: torch.Tensor, generator: torch.Generator, chunk_size: int = 0
    ) -> tuple[Inversion, AttentionRecord | None]: ...

    def denoise(self, inversion: Inversion, record: AttentionRecord | None, offsets: torch.Tensor) -> torch.Tensor: ...


SegmentorT = TypeVar("SegmentorT", bound=Segmentor)


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


def peak_bytes(fn: Callable[[], T]) -> tuple[int, T]:
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
        second = components.text_encoder_2
        text_2 = None if second is None else type(second)(second.config)
    scheduler = type(components.scheduler).from_config(components.scheduler.config)  # add_noise moves its tensors
    copies = freeze(
        SDComponents(
            unet,
            vae,
            text,
            components.tokenizer,
            scheduler,
            name=f"meta:{components.name}",
            text_encoder_2=text_2,
            tokenizer_2=components.tokenizer_2,
        )
    )
    return cast_components(copies, components.unet.dtype)


def meta_model(model: SegmentorT) -> SegmentorT:
    """A segmentor of the same class and parameters on meta copies of its SD parts, never compiled."""
    return type(model)(meta_copy(model.components), replace(model.params, compile=False))


@dataclass(frozen=True)
class LinearBytes:
    """Peak bytes of a batched stage as fixed + per_item * batch."""

    fixed: int
    per_item: int

    @classmethod
    def through(cls, one: tuple[int, int], two: tuple[int, int]) -> LinearBytes:
        """The line through two (batch, peak bytes) measurements."""
        (n1, b1), (n2, b2) = one, two
        per_item = max(0, (b2 - b1) // (n2 - n1))
        return cls(max(0, b1 - per_item * n1), per_item)

    def max_batch(self, available: int) -> int:
        """The largest batch that fits in `available` bytes (at least 1; a huge number when free of the batch)."""
        if self.per_item == 0:
            return 2**31
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
    """Batch sizes of the batched stages (0 = everything at once), and the profile they were fitted to."""

    inversion: int
    variants: int
    decode: int
    profile: MemoryProfile | None = field(default=None, compare=False)  # None without a budget
    budget_gib: float = field(default=0.0, compare=False)  # the activation budget it was planned for; 0 = none


def _latent(model: Segmentor, batch: int, size: tuple[int, int]) -> torch.Tensor:
    channels = model.unet.config.in_channels
    return torch.zeros(batch, channels, size[0] // 8, size[1] // 8, device="meta")


def synthetic_offsets(batch: int, lam: float) -> torch.Tensor:
    """Variant offsets for probes (one token grid cell; the layer's grid is reached by nearest resizing)."""
    return torch.full((batch, 1, 1, 1), lam)


def measure_memory(model: Segmentor) -> MemoryProfile:
    """Peak bytes of the inversion, variant chunks and decodes at two batch sizes each, on a meta copy of `model`."""
    meta = meta_model(model)
    p = meta.params
    size = largest_working_size(p.resolution, p.aspect, p.max_pixels)  # the plan must fit every image
    z0 = _latent(meta, 1, size)
    full = meta.grid
    steps = len(full.tail(p.t_modulate))
    inversion_peaks = []
    for n in (1, 2):  # the 2-step grid (t_m and the last step) stays for the variant probes
        meta.grid = full.thinned(p.t_modulate, n)
        peak, (inversion, record) = peak_bytes(lambda: meta.invert(z0, torch.Generator().manual_seed(0)))
        inversion_peaks.append((n, peak))
    record_bytes = (
        0
        if record is None
        else sum(t.untyped_storage().nbytes() for d in (record.query, record.key) for t in d.values())
    )
    side = decode_size(size, p.resolution, p.decode_resolution)

    def variants(batch: int) -> torch.Tensor:
        return meta.denoise(inversion, record, synthetic_offsets(batch, p.lam))

    def decoded(batch: int) -> torch.Tensor:
        return decode_latents(meta.vae, _latent(meta, batch, side))

    variant_peaks = [(b, peak_bytes(partial(variants, b))[0]) for b in (2, 4)]
    decode_peaks = [(n, peak_bytes(partial(decoded, n))[0]) for n in (1, 2)]
    return MemoryProfile(
        LinearBytes.through(*inversion_peaks),
        record_bytes * steps // len(inversion.timesteps),
        LinearBytes.through(*variant_peaks),
        LinearBytes.through(*decode_peaks),
    )


def plan_chunks(model: Segmentor, chunk_size: int, budget_gib: float) -> ChunkPlan:
    """Batch sizes within `budget_gib` of activation memory, never above `chunk_size` (0 = no cap)."""
    if budget_gib <= 0:
        return ChunkPlan(chunk_size, chunk_size, chunk_size)
    usage = measure_memory(model)
    budget = int(budget_gib * GIB)

    def fit(line: LinearBytes, reserved: int) -> int:
        n = line.max_batch(budget - reserved)
        return n if chunk_size <= 0 else min(n, chunk_size)

    return ChunkPlan(
        fit(usage.inversion, usage.record),
        fit(usage.variants, usage.record),
        fit(usage.decode, 0),
        profile=usage,
        budget_gib=budget_gib,
    )


def free_bytes(device: torch.device) -> int | None:
    """Memory this process could still use on `device`: CUDA's free memory (weights already loaded are not free),
    the CPU's MemAvailable; None where the device cannot say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in _MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def resolve_budget(budget: float | str, device: torch.device) -> float:
    """The activation budget in GiB: a number as given; `auto` = free memory less a margin of 10 % (at least
    1 GiB) for the allocator's fragmentation and other processes, or FALLBACK_BUDGET_GIB where unknown. A budget
    below one item's need still runs, one item per call."""
    if budget != "auto":
        return float(budget)
    free = free_bytes(torch.device(device))
    if free is None:
        return FALLBACK_BUDGET_GIB
    return max(free - max(GIB, free // 10), 1) / GIB  # at least a byte: 0 would mean no limit at all
