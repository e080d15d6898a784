"""step 8: modulated denoising of every (mask, sign) variant from x_{t_m} down to t = 1.

Two implementations give the same result up to float rounding:

- ``reference``: the straightforward algorithm, one variant at a time in full UNet passes:
  every layer computes its own Q/K projections and softmax(QK^T), and injection swaps the
  recorded Q/K in for the computed ones;
- ``fast``: variants batched in chunks; at the first modulated step every variant is
  identical up to the transformer holding the modulated layer, so that prefix runs once
  at batch 1 and is broadcast (`shared_prefix`); with injection, softmax(QK^T) is shared
  by all variants and a cross-attention layer, whose inputs are all shared, runs once
  (see `processors.attend`). Cost figures: docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from .inversion import DDPMGrid, Inversion
from .models import Conditioning, at_least_float32
from .processors import AttentionControl, AttentionRecord, Modulation, Observer, controlled


def variant_offsets(masks: torch.Tensor, lam: float) -> torch.Tensor:
    """[K, h, w] bool -> [2K, 1, h, w] offsets: variant 2i is -lam * M_i, variant 2i+1 is +lam * M_i."""
    signs = torch.tensor([-lam, lam], dtype=torch.float32)
    offsets = masks.float()[:, None] * signs[None, :, None, None]  # [K, 2, h, w]
    return offsets.flatten(0, 1)[:, None]


@dataclass
class ModulationSettings:
    """Where, when and how the offsets are applied."""

    layer: str
    num_steps: int = 1  # modulated steps from t_m on
    placement: str = "output"
    injection: bool = True
    chunk_size: int = 0  # variants per UNet batch; 0 = all
    impl: str = "fast"  # segmentor.impl (choices checked with the config)
    one_step: bool = False  # segmentor.one_step_estimate: return the first step's x0 estimate (DDIM's formula)

    def batch_size(self, count: int) -> int:
        """Variants per UNet call among `count`: one on the reference path, else a chunk (0 = all)."""
        if self.impl == "reference":
            return 1
        return min(self.chunk_size, count) if self.chunk_size > 0 else count


def _expand(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch-1 tensor as a [batch, ...] view; other tensors unchanged."""
    return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value


@dataclass(frozen=True)
class LayerPlace:
    """Where a transformer attention layer sits: its UNet block and its attention module's index there."""

    block: str  # e.g. up_blocks.1 (or mid_block)
    attention: int  # index j of ``<block>.attentions.j``

    @classmethod
    def of(cls, layer: str) -> LayerPlace:
        parts = layer.split(".")
        block = parts[:1] if parts[0] == "mid_block" else parts[:2]
        rest = parts[len(block) :]
        if len(rest) < 2 or rest[0] != "attentions":
            raise ValueError(f"'{layer}' is not inside a UNet block's transformer (<block>.attentions.<j>...)")
        return cls(".".join(block), int(rest[1]))

    @property
    def transformer(self) -> str:
        return f"{self.block}.attentions.{self.attention}"


@contextmanager
def shared_prefix(unet: UNet2DConditionModel, layer: str, batch: int) -> Iterator[None]:
    """Run the UNet at batch 1 up to the transformer holding `layer`, then continue at `batch`.

    Forward pre-hooks expand the transformer's input to the variant batch, and every skip
    connection that an up block concatenates after that point. An up block pops its skip
    tuple from the end, one entry per resnet, so in the layer's own block only the entries
    of the resnets after attention j are expanded; later up blocks get all of them.
    """
    place = LayerPlace.of(layer)
    ups = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    after = ups[ups.index(place.block) :] if place.block in ups else ups

    def expand_input(module, args, kwargs):
        if args:
            return (_expand(args[0], batch), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _expand(kwargs["hidden_states"], batch)}

    def expand_skips(name: str):
        def hook(module, args, kwargs):
            skips = kwargs["res_hidden_states_tuple"]
            shared = len(skips) - 1 - place.attention if name == place.block else len(skips)
            expanded = tuple(_expand(s, batch) if i < shared else s for i, s in enumerate(skips))
            return args, {**kwargs, "res_hidden_states_tuple": expanded}

        return hook

    handles = [unet.get_submodule(place.transformer).register_forward_pre_hook(expand_input, with_kwargs=True)]
    handles += [unet.get_submodule(b).register_forward_pre_hook(expand_skips(b), with_kwargs=True) for b in after]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_chunk(
    unet: UNet2DConditionModel,
    conditioning: Conditioning,
    grid: DDPMGrid,
    inversion: Inversion,
    control: AttentionControl,
    offsets: torch.Tensor,
    settings: ModulationSettings,
    share_prefix: bool,
) -> torch.Tensor:
    """Denoise one chunk of variants ([B, 1, h, w] offsets) from x_{t_m}; returns predicted x_0 latents (with
    `settings.one_step`, the x0 estimate of the modulated step, with no further steps)."""
    steps = inversion.timesteps
    first = grid.index(steps[0])
    control.modulation = Modulation(
        settings.layer,
        offsets.to(conditioning.text.device),
        frozenset(steps[: settings.num_steps]),
        settings.placement,
        (inversion.latents.shape[-2], inversion.latents.shape[-1]),
    )
    batch = offsets.shape[0]
    x = inversion.latents[:1]
    for j, t in enumerate(steps):
        control.timesteps = [t] * max(x.shape[0], 1)
        t_in = torch.tensor([t], device=x.device)
        if x.shape[0] == 1 and batch > 1 and share_prefix:
            with shared_prefix(unet, settings.layer, batch):
                out = at_least_float32(unet(x.to(unet.dtype), t_in, **conditioning.unet_kwargs(x)).sample)
        else:  # batch-1 conditioning: a cross-attention layer with injection then runs once (processors.attend)
            out = at_least_float32(
                unet(x.expand(batch, -1, -1, -1).to(unet.dtype), t_in, **conditioning.unet_kwargs(x)).sample
            )
        if settings.one_step:
            return grid.estimate(x, out, first + j)[0].expand(batch, -1, -1, -1)
        x = grid.step(x, out, first + j, inversion.noise[j])
    return x


@torch.no_grad()
def denoise_variants(
    unet: UNet2DConditionModel,
    conditioning: Conditioning,
    grid: DDPMGrid,
    inversion: Inversion,
    record: AttentionRecord | None,
    offsets: torch.Tensor,
    settings: ModulationSettings,
    observer: Observer | None = None,
) -> torch.Tensor:
    """All variants' final latents [V, 4, h, w]; `record` is injected when settings.injection.

    `observer(layer, t, Q, K)` sees the Q/K every attention call actually used (tests, debugging).
    """
    if settings.injection and record is None:
        raise ValueError("attention injection needs the record of the unmodulated run")
    fast = settings.impl == "fast"
    control = AttentionControl(
        inject=record if settings.injection else None, observer=observer, stock_projections=not fast
    )
    size = settings.batch_size(len(offsets))
    results: list[torch.Tensor] = []
    with controlled(unet, control):
        for s in range(0, len(offsets), size):
            chunk = offsets[s : s + size]
            results.append(_run_chunk(unet, conditioning, grid, inversion, control, chunk, settings, share_prefix=fast))
    return torch.cat(results)
