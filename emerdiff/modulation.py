"""SPEC step 8: modulated denoising of every (mask, sign) variant from x_{t_m} down to t = 1.

Two implementations give the same result up to float rounding:

- ``reference``: one variant at a time, full UNet passes, attention computed per variant;
- ``fast``: variants batched in chunks; at the first modulated step every variant is
  identical up to the block holding the modulated layer, so that prefix runs once at
  batch 1 and is broadcast; with injection, softmax(QK^T) is shared by all variants
  (see `processors.shared_attention`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from diffusers import UNet2DConditionModel

from .inversion import DDPMGrid, Inversion
from .processors import AttentionControl, AttentionRecord, Modulation, Observer, controlled

IMPLS = ("fast", "reference")


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
    impl: str = "fast"


def _block_of(layer: str) -> str:
    """The UNet block holding a layer: ``up_blocks.1`` for ``up_blocks.1.attentions.2...``."""
    parts = layer.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


@contextmanager
def shared_prefix(unet: UNet2DConditionModel, layer: str, batch: int) -> Iterator[None]:
    """Run the UNet at batch 1 up to the block holding `layer`, then broadcast to `batch`.

    Forward pre-hooks expand every batch-1 tensor argument of that block, and the skip
    connections that later up blocks concatenate, to the variant batch.
    """
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + \
             [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    start = blocks.index(_block_of(layer))
    targets = [blocks[start]] + [b for b in blocks[start + 1:] if b.startswith("up_blocks")]

    def expand(value):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:])
        if isinstance(value, tuple):
            return tuple(expand(v) for v in value)
        return value

    def hook(module, args, kwargs):
        return tuple(expand(a) for a in args), {k: expand(v) for k, v in kwargs.items()}

    handles = [unet.get_submodule(b).register_forward_pre_hook(hook, with_kwargs=True) for b in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_chunk(
    unet: UNet2DConditionModel, text: torch.Tensor, grid: DDPMGrid, inversion: Inversion,
    control: AttentionControl, offsets: torch.Tensor, settings: ModulationSettings, share_prefix: bool,
) -> torch.Tensor:
    """Denoise one chunk of variants ([B, 1, h, w] offsets) from x_{t_m}; returns predicted x_0 latents."""
    steps = inversion.timesteps
    first = grid.index(steps[0])
    control.modulation = Modulation(settings.layer, offsets.to(text.device), frozenset(steps[:settings.num_steps]),
                                    settings.placement)
    batch = offsets.shape[0]
    x = inversion.latents[:1]
    for j, t in enumerate(steps):
        control.timesteps = [t] * max(x.shape[0], 1)
        t_in = torch.tensor([t], device=x.device)
        if x.shape[0] == 1 and batch > 1 and share_prefix:
            with shared_prefix(unet, settings.layer, batch):
                out = unet(x.to(unet.dtype), t_in, text).sample.float()
        else:
            out = unet(x.expand(batch, -1, -1, -1).to(unet.dtype), t_in, text).sample.float()
        x = grid.step(x, out, first + j, inversion.noise[j])
    return x


@torch.no_grad()
def denoise_variants(
    unet: UNet2DConditionModel, text: torch.Tensor, grid: DDPMGrid, inversion: Inversion,
    record: Optional[AttentionRecord], offsets: torch.Tensor, settings: ModulationSettings,
    observer: Optional[Observer] = None,
) -> torch.Tensor:
    """All variants' final latents [V, 4, h, w]; `record` is injected when settings.injection.

    `observer(layer, t, Q, K)` sees the Q/K every attention call actually used (tests, debugging).
    """
    if settings.impl not in IMPLS:
        raise ValueError(f"segmentor.impl must be one of {IMPLS}, got '{settings.impl}'")
    if settings.injection and record is None:
        raise ValueError("attention injection needs the record of the unmodulated run")
    control = AttentionControl(inject=record if settings.injection else None, observer=observer)
    fast = settings.impl == "fast"
    size = (settings.chunk_size or len(offsets)) if fast else 1
    results: List[torch.Tensor] = []
    with controlled(unet, control):
        for s in range(0, len(offsets), size):
            chunk = offsets[s:s + size]
            results.append(_run_chunk(unet, text, grid, inversion, control, chunk, settings, share_prefix=fast))
    return torch.cat(results)
