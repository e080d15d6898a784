"""Model loading: the Stable Diffusion parts (UNet, VAE, text encoder(s), tokenizer(s), scheduler).

Real weights load the standard diffusers way (hub id, local diffusers folder, or a single
.safetensors/.ckpt file; `emerdiff.weights` finds them and explains what is missing).
Architectures shipped in ``emerdiff/arch/*.json`` build random-weight models without any
download: ``tiny`` for tests and offline runs, ``sd15`` / ``sd21_base`` / ``sdxl`` for benchmarks and
layout checks, ``tiny_sdxl`` for the SDXL-shaped tests. The dtype names of ``model.dtype`` are resolved
here (`resolve_dtype`).

SDXL-shaped UNets (``addition_embed_type="text_time"``: SDXL, SSD-1B, SDXL-Turbo) are conditioned on
two text encoders' states, the second encoder's pooled embedding and the added time ids (original
size, crop, target size); `Conditioning` carries all of it to every UNet call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import DTYPES, ModelConfig
from .weights import load_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

ARCH_DIR = Path(__file__).parent / "arch"


@dataclass
class Conditioning:
    """What every UNet call of a run is conditioned on: the prompt's text states and, for an SDXL-shaped UNet,
    the pooled text embedding and the added time ids, which the UNet refuses to run without."""

    text: torch.Tensor  # [n, 77, D] text-encoder states (SDXL: both encoders' penultimate states, concatenated)
    pooled: torch.Tensor | None = None  # [n, P] the second encoder's projected embedding; None below SDXL
    pixels_per_latent: int = 8  # the VAE's downsampling: the time ids are in pixels

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning for `batch` samples (views, no copies)."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return replace(self, text=self.text.expand(batch, -1, -1), pooled=pooled)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's added time ids of an image the size of `latents`, uncropped: (H, W, 0, 0, H, W) per sample, as
        the SDXL pipelines pass them by default (original size = target size, crop at the top left)."""
        pooled = self.pooled
        if pooled is None:
            raise ValueError("time ids condition an SDXL-shaped UNet: this conditioning has no pooled embedding")
        height, width = (self.pixels_per_latent * s for s in latents.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return ids.expand(pooled.shape[0], -1)

    def unet_kwargs(self, latents: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of a ``UNet2DConditionModel`` call on `latents` (batch 1 or the latents')."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.text}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids(latents)}
        return kwargs


@dataclass
class SDComponents:
    """The frozen SD parts EmerDiff uses, already on their device and dtype (SDXL: with its second text encoder)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    name: str
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL, SSD-1B, SDXL-Turbo
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def modules(self) -> list[torch.nn.Module]:
        """UNet, VAE and every text encoder: the modules that hold weights."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def is_sdxl(self) -> bool:
        """An SDXL-shaped UNet, conditioned on a pooled text embedding and added time ids."""
        return self.unet.config.addition_embed_type == "text_time"

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "") -> Conditioning:
        """step 3: the prompt's conditioning (EmerDiff uses ""); SDXL's as its pipelines compute it: each
        encoder's penultimate hidden states concatenated, and the second encoder's projected embedding."""
        if self.text_encoder_2 is None:
            if self.is_sdxl:
                raise ValueError(
                    f"'{self.name}' has an SDXL UNet (added text/time conditioning) but no second text "
                    "encoder: load it as an SDXL pipeline (text_encoder_2/, tokenizer_2/)"
                )
            return Conditioning(_tokens_through(self.tokenizer, self.text_encoder, prompt)[0].to(self.unet.dtype))
        if self.tokenizer_2 is None:
            raise ValueError(f"'{self.name}' has a second text encoder but no second tokenizer (tokenizer_2/)")
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = _tokens_through(tokenizer, encoder, prompt, output_hidden_states=True)
            states.append(output.hidden_states[-2])
        pooled = output[0]  # CLIPTextModelWithProjection's text_embeds
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return Conditioning(torch.cat(states, dim=-1).to(self.unet.dtype), pooled.to(self.unet.dtype), scale)


def _tokens_through(tokenizer: CLIPTokenizer, encoder: torch.nn.Module, prompt: str, **kwargs: Any) -> Any:
    """The text encoder's output on the prompt padded to the tokenizer's length."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(encoder.device)
    return encoder(ids, **kwargs)


def available_archs() -> list[str]:
    """Names of the shipped random-weight architectures."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@cache
def arch_config(name: str) -> dict[str, Any]:
    """The shipped architecture description (unet, vae, text_encoder(_2), scheduler configs)."""
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
        second = spec.get("text_encoder_2")
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**strip(second))) if second else None
    scheduler = DDIMScheduler(**strip(spec["scheduler"]))
    tokenizer = byte_level_tokenizer(spec["text_encoder"]["max_position_embeddings"])
    tokenizer_2 = byte_level_tokenizer(second["max_position_embeddings"]) if second else None
    return freeze(
        SDComponents(
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            name=f"random:{arch}",
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
    )


def cast_components(components: SDComponents, dtype: torch.dtype) -> SDComponents:
    """UNet, VAE and text encoders in `dtype`, in place; diffusers' warning about fp32 modules is moot (SD has none)."""
    for module in components.modules:
        if module.dtype != dtype:
            torch.nn.Module.to(module, dtype)
    return components


def freeze(components: SDComponents) -> SDComponents:
    """UNet, VAE and text encoders in eval mode without gradients: EmerDiff never trains them."""
    for module in components.modules:
        module.eval().requires_grad_(False)
    return components


def cpu_threads(setting: int | None = None, local_ranks: int | None = None) -> int | None:
    """torch's CPU threads for one process: `setting` (model.cpu_threads) if given; else None (torch's own) when
    OMP_NUM_THREADS says; else the cores this process may use (os.sched_getaffinity) shared among the processes of
    this machine (`local_ranks`, else LOCAL_WORLD_SIZE, else 1), at least one each, so ranks never oversubscribe."""
    if setting:
        return setting
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def load_sd(cfg: ModelConfig, device: str | None = None, local_ranks: int | None = None) -> SDComponents:
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
    for module in components.modules:
        module.to(target)
    return cast_components(components, dtype)


def pipeline_components(pipe: StableDiffusionPipeline, name: str) -> SDComponents:
    """A diffusers pipeline's own UNet, VAE, text encoder(s) and tokenizer(s) (the same objects, frozen in place) and
    a DDIM scheduler made from its scheduler's config: EmerDiff inverts and denoises on DDIM's timestep grid."""
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    devices = {part: getattr(pipe, part).device for part in parts if getattr(pipe, part, None) is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{part}: {device}" for part, device in devices.items())
        raise ValueError(
            f"the pipeline's modules are on different devices ({where}): move it to one with "
            "pipe.to(device) (CPU offload is not supported)"
        )
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return freeze(
        SDComponents(
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
            scheduler,
            name=name,
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
        )
    )
