"""torch.compile of the SD modules, by region: every ResNet block and feed-forward layer (`segmentor.compile`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D

COMPILED_REGIONS = (ResnetBlock2D, FeedForward)
RECOMPILE_LIMIT = 128  # graphs per region class: one per distinct (channels, size, batch) of its instances


def check_compile_options(backend: str, mode: str | None) -> None:
    """Refuse an unknown torch.compile backend or mode, naming the config key."""
    from torch._inductor import list_mode_options  # imported here: heavy, and only needed to check the mode

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(
            f"segmentor.compile_backend '{backend}' is not a torch.compile backend; "
            f"use inductor (or one of {', '.join(backends)})"
        )
    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(
            f"segmentor.compile_mode '{mode}' is not a torch.compile mode; use null or one of {', '.join(modes)}"
        )


def compile_regions(modules: Iterable[torch.nn.Module], backend: str = "inductor", mode: str | None = None) -> int:
    """torch.compile every ResNet block and feed-forward layer in `modules`, in place; returns how many.

    Regional compilation, as diffusers' ``compile_repeated_blocks``, but attention stays eager:
    EmerDiff's processors look up the recorded Q/K by timestep in Python, which a compiled
    region would guard on and recompile at every step. All instances of a region class share
    one code object, so dynamo's recompile limit is raised to hold a graph per distinct shape.
    """
    check_compile_options(backend, mode)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6 name
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    regions = [m for root in modules for m in root.modules() if isinstance(m, COMPILED_REGIONS)]
    for region in regions:
        region.compile(backend=backend, mode=mode)
    return len(regions)
