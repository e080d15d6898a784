"""Attention control (steps 4, 7, 8) through diffusers attention processors.

One `EmerDiffAttnProcessor` sits on every attention layer of the UNet and consults a
shared `AttentionControl`, keyed by layer name and by the timesteps that the caller
sets explicitly before each UNet call (never by counting calls). It can

- record the query/key projections (Q, K) of chosen layers (features, injection record);
- inject recorded Q/K, so attention probabilities are those of the unmodulated run and
  only V differs (the reference path still computes each layer's own Q/K first, as a
  stock pass does, and swaps them; the fast path skips those projections); when a batch of
  variants shares one recorded Q/K, softmax(QK^T) is computed once and applied to all
  variants' V stacked along the value dimension;
- add the modulation offset c * M_i at one layer and chosen steps, after the output
  projection (``output``) or before it (``value``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

Key = tuple[str, int]
Observer = Callable[[str, int, torch.Tensor, torch.Tensor], None]


@dataclass
class AttentionRecord:
    """Q and K projections ([n, tokens, channels], n samples at that step) by (layer, timestep)."""

    query: dict[Key, torch.Tensor] = field(default_factory=dict)
    key: dict[Key, torch.Tensor] = field(default_factory=dict)


@dataclass
class Modulation:
    """Offset c_i * M_i per variant ([B, 1, h, w]) added at `layer` during `timesteps`."""

    layer: str
    offsets: torch.Tensor
    timesteps: frozenset[int]
    placement: str = "output"  # segmentor.offset_placement (choices checked with the config)
    latent_size: tuple[int, int] = (0, 0)  # (h, w) of the latents; the layer's token grid has its aspect

    def tokens(self, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Offsets as [B, tokens, 1] on the layer's token grid (row-major, nearest resize)."""
        size = token_grid(num_tokens, self.latent_size, self.layer)
        grid = self.offsets
        if grid.shape[-2:] != size:
            grid = F.interpolate(grid, size=size, mode="nearest")
        return grid.flatten(2).transpose(1, 2).to(dtype)


def token_grid(num_tokens: int, latent_size: tuple[int, int], layer: str) -> tuple[int, int]:
    """(h, w) of a layer's `num_tokens` tokens: the latent grid downsampled by the UNet's integer factor."""
    height, width = latent_size
    factor = math.isqrt(height * width // num_tokens) if num_tokens else 0
    if factor < 1 or (height // factor) * (width // factor) != num_tokens:
        raise ValueError(
            f"layer '{layer}' has {num_tokens} tokens, which is no downsampling of a {height} x {width} latent grid"
        )
    return height // factor, width // factor


@dataclass
class AttentionControl:
    """State shared by all processors; the caller sets `timesteps` before every UNet call."""

    timesteps: Sequence[int] | None = None  # timestep of each sample of the current call
    record_layers: frozenset[str] = frozenset()  # layers whose Q/K are recorded
    record: AttentionRecord = field(default_factory=AttentionRecord)
    inject: AttentionRecord | None = None  # recorded Q/K to use instead of the layer's own
    stock_projections: bool = False  # compute the layer's own Q/K even when injection replaces them (reference path)
    modulation: Modulation | None = None
    observer: Observer | None = None  # sees (layer, t, Q, K) actually used; for tests and debugging

    def current_timestep(self, layer: str) -> int:
        """The single timestep of the current call (injection and modulation need one)."""
        if not self.timesteps or len(set(int(t) for t in self.timesteps)) != 1:
            raise RuntimeError(f"layer '{layer}': set AttentionControl.timesteps to one timestep before the call")
        return int(self.timesteps[0])

    def save(self, layer: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """Store each sample's Q/K under its own timestep (a batch may mix timesteps)."""
        if self.timesteps is None or len(self.timesteps) != query.shape[0]:
            raise RuntimeError(f"layer '{layer}': timesteps must give one timestep per sample to record")
        steps = torch.as_tensor([int(t) for t in self.timesteps])
        for t in steps.unique().tolist():
            index = (steps == t).nonzero().flatten().to(query.device)
            self.record.query[(layer, t)] = query.index_select(0, index)
            self.record.key[(layer, t)] = key.index_select(0, index)

    def injected(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Recorded Q/K of the unmodulated run at this layer and step, [1, tokens, channels]."""
        t = self.current_timestep(layer)
        inject = self.inject
        if inject is None or (layer, t) not in inject.query:
            raise KeyError(f"no recorded attention for layer '{layer}' at timestep {t}: record that step first")
        return inject.query[(layer, t)], inject.key[(layer, t)]

    def active_modulation(self, layer: str) -> Modulation | None:
        mod = self.modulation
        if mod is None or mod.layer != layer or self.current_timestep(layer) not in mod.timesteps:
            return None
        return mod


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, tokens, heads*d] -> [B, heads, tokens, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def shared_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(QK^T) from one Q/K ([1, h, N, d]) applied to B values ([B, h, M, d]) in one call.

    The variants' V are stacked along the value dimension, so the probabilities are
    computed once instead of B times; the result equals B separate attention calls.
    """
    batch, heads, tokens, dim = value.shape
    stacked = value.permute(1, 2, 0, 3).reshape(1, heads, tokens, batch * dim)
    out = F.scaled_dot_product_attention(query, key, stacked, scale=scale)
    return out.reshape(heads, -1, batch, dim).permute(2, 0, 1, 3)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over [b, heads, tokens, d] inputs whose batch sizes are 1 or a common B.

    Batch-1 inputs are shared: a shared Q/K with B values computes softmax(QK^T) once
    (`shared_attention`); all inputs at batch 1 give a batch-1 output.
    """
    batch = max(query.shape[0], key.shape[0], value.shape[0])
    if query.shape[0] == 1 and key.shape[0] == 1 and batch > 1:
        return shared_attention(query, key, value, scale)
    query, key, value = (x.expand(batch, -1, -1, -1) for x in (query, key, value))
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


class EmerDiffAttnProcessor:
    """The stock SDPA attention of an SD transformer layer plus record / inject / modulate."""

    def __init__(self, control: AttentionControl, layer: str) -> None:
        self.control = control
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"layer '{self.layer}': only SD transformer attention layers are supported")
        if attention_mask is not None:
            raise NotImplementedError(f"layer '{self.layer}': attention masks are not supported")
        control = self.control
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if control.inject is None or control.stock_projections:
            query, key = attn.to_q(hidden_states), attn.to_k(context)
            if self.layer in control.record_layers:
                control.save(self.layer, query, key)
        if control.inject is not None:
            query, key = control.injected(self.layer)
        value = attn.to_v(context)
        if control.observer is not None:
            control.observer(self.layer, control.current_timestep(self.layer), query, key)
        # batch-1 inputs are shared by all samples: with injection a cross-attention layer has
        # only batch-1 inputs (recorded Q/K, text V), so it runs once and is broadcast below
        out = attend(_heads(query, attn.heads), _heads(key, attn.heads), _heads(value, attn.heads), attn.scale)
        out = out.transpose(1, 2).flatten(2).to(value.dtype)
        modulation = control.active_modulation(self.layer)
        if modulation is not None and modulation.placement == "value":
            out = out + modulation.tokens(out.shape[1], out.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if modulation is not None and modulation.placement == "output":
            out = out + modulation.tokens(out.shape[1], out.dtype)
        out = out.expand(max(batch, out.shape[0]), -1, -1)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def layer_names(unet: UNet2DConditionModel) -> list[str]:
    """Attention layer names (module paths), in the UNet's order."""
    return [name.removesuffix(".processor") for name in unet.attn_processors]


def check_layer(unet: UNet2DConditionModel, layer: str, what: str) -> None:
    """Raise a clear error when a configured layer does not exist in this UNet."""
    names = layer_names(unet)
    if layer not in names:
        cross = [n for n in names if n.endswith("attn2")]
        raise ValueError(f"{what} '{layer}' is not an attention layer of this UNet; cross-attention layers: {cross}")


@contextmanager
def use_processors(unet: UNet2DConditionModel, mapping: Mapping[str, object]) -> Iterator[None]:
    """Install processors by layer name for the duration of the block, then restore the originals."""
    original = dict(unet.attn_processors)
    unknown = set(mapping) - set(original)
    if unknown:
        raise KeyError(f"unknown attention processor names: {sorted(unknown)}")
    unet.set_attn_processor({**original, **mapping})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


@contextmanager
def controlled(unet: UNet2DConditionModel, control: AttentionControl) -> Iterator[AttentionControl]:
    """Put an `EmerDiffAttnProcessor` sharing `control` on every attention layer."""
    mapping = {name: EmerDiffAttnProcessor(control, name.removesuffix(".processor")) for name in unet.attn_processors}
    with use_processors(unet, mapping):
        yield control
