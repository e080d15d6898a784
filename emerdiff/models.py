"""Model loading: the Stable Diffusion parts (UNet, VAE, text encoder, tokenizer, scheduler).

Real weights load the standard diffusers way (hub id, local diffusers folder, or a single
.safetensors/.ckpt file; `emerdiff.weights` finds them and explains what is missing).
Architectures shipped in ``emerdiff/arch/*.json`` build random-weight models without any
download: ``tiny`` for tests and offline runs, ``sd15`` / ``sd21_base`` for benchmarks and
layout checks. The dtype names of ``model.dtype`` are resolved here (`resolve_dtype`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import DTYPES, ModelConfig
from .weights import load_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

ARCH_DIR = Path(__file__).parent / "arch"


@dataclass
class SDComponents:
    """The frozen SD parts EmerDiff uses, already on their device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    name: str

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """step 3: the prompt's text-encoder states, [1, 77, D] (EmerDiff uses "")."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.unet.dtype)


def available_archs() -> list[str]:
    """Names of the shipped random-weight architectures."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def arch_config(name: str) -> Dict[str, Any]:
    """The shipped architecture description (unet, vae, text_encoder, scheduler configs)."""
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture '{name}'; available: {', '.join(available_archs())}")
    return json.loads(path.read_text())


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 elsewhere (diffusers' CPU advice)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, or kept in float64: half-precision model outputs are computed on in float32, and a
    float64 model (the precision reference of the fast == reference tests) stays float64 throughout."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes only (no merges): needs no download, fine for random models."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_random_sd(arch: str, seed: int = 0, device: str | torch.device = "cpu") -> SDComponents:
    """An SD-shaped model with random weights from a fixed seed (``device="meta"`` allocates nothing)."""
    spec = arch_config(arch)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**strip(spec["unet"]))
        vae = AutoencoderKL(**strip(spec["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig(**strip(spec["text_encoder"])))
    scheduler = DDIMScheduler(**strip(spec["scheduler"]))
    tokenizer = byte_level_tokenizer(spec["text_encoder"]["max_position_embeddings"])
    return freeze(SDComponents(unet, vae, text_encoder, tokenizer, scheduler, name=f"random:{arch}"))


def cast_components(components: SDComponents, dtype: torch.dtype) -> SDComponents:
    """UNet, VAE and text encoder in `dtype`, in place; diffusers' warning about fp32 modules is moot (SD has none)."""
    for module in (components.unet, components.vae, components.text_encoder):
        if module.dtype != dtype:
            torch.nn.Module.to(module, dtype)
    return components


def freeze(components: SDComponents) -> SDComponents:
    """UNet, VAE and text encoder in eval mode without gradients: EmerDiff never trains them."""
    for module in (components.unet, components.vae, components.text_encoder):
        module.eval().requires_grad_(False)
    return components


def cpu_threads(setting: Optional[int] = None, local_ranks: Optional[int] = None) -> Optional[int]:
    """torch's CPU threads for one process: `setting` (model.cpu_threads) if given; else None (torch's own) when
    OMP_NUM_THREADS says; else the cores this process may use (os.sched_getaffinity) shared among the processes of
    this machine (`local_ranks`, else LOCAL_WORLD_SIZE, else 1), at least one each, so ranks never oversubscribe."""
    if setting:
        return setting
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def load_sd(cfg: ModelConfig, device: Optional[str] = None, local_ranks: Optional[int] = None) -> SDComponents:
    """Load SD from ``cfg`` (``tiny`` / ``random_init`` build random weights) and set torch's CPU threads
    (`cpu_threads`: ``cfg.cpu_threads``, else the usable cores shared among the `local_ranks` processes)."""
    threads = cpu_threads(cfg.cpu_threads, local_ranks)
    if threads:
        torch.set_num_threads(threads)
    target = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, target)
    if cfg.pretrained == "tiny" or cfg.random_init:
        components = build_random_sd("tiny" if cfg.pretrained == "tiny" else cfg.arch, seed=cfg.init_seed)
    else:
        components = pipeline_components(load_pipeline(cfg, dtype), name=cfg.pretrained)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(target)
    return cast_components(components, dtype)


def pipeline_components(pipe: StableDiffusionPipeline, name: str) -> SDComponents:
    """A diffusers pipeline's own UNet, VAE, text encoder and tokenizer (the same objects, frozen in place) and a
    DDIM scheduler made from its scheduler's config: EmerDiff inverts and denoises on DDIM's timestep grid."""
    devices = {part: module.device for part, module in
               (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder))}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{part}: {device}" for part, device in devices.items())
        raise ValueError(f"the pipeline's modules are on different devices ({where}): move it to one with "
                         "pipe.to(device) (CPU offload is not supported)")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return freeze(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, name=name))
