"""step 4: the query vectors of one UNet attention layer, recorded by a processor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel

from .models import Conditioning
from .processors import AttentionControl, controlled, token_grid


@dataclass
class QueryFeatures:
    """Queries (to_q outputs) of one layer on its height x width token grid, row-major."""

    queries: torch.Tensor  # [tokens, channels], float32
    height: int
    width: int
    layer: str
    timestep: int


@torch.no_grad()
def extract_queries(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    conditioning: Conditioning,
    layer: str,
    timestep: int,
    draws: int,
    generator: torch.Generator,
) -> QueryFeatures:
    """Noise the clean latent [1, 4, h, w] to `timestep` `draws` times, run the UNet once, average the queries."""
    noise = torch.randn((draws, *latents.shape[1:]), generator=generator).to(latents)
    t = torch.full((draws,), timestep, dtype=torch.long)
    noisy = scheduler.add_noise(latents.expand(draws, -1, -1, -1), noise, t)
    control = AttentionControl(timesteps=[timestep] * draws, record_layers=frozenset({layer}))
    with controlled(unet, control):
        unet(noisy.to(unet.dtype), t.to(latents.device), **conditioning.expand(draws).unet_kwargs(noisy))
    queries = control.record.query[(layer, timestep)].float().mean(0)  # [tokens, channels]
    height, width = token_grid(queries.shape[0], (latents.shape[-2], latents.shape[-1]), layer)
    return QueryFeatures(queries, height, width, layer, timestep)
