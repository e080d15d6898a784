"""Model loading: the Stable Diffusion parts (UNet, VAE, text encoder, tokenizer, scheduler).

Real weights load the standard diffusers way (hub id, local diffusers folder, or a
single .safetensors/.ckpt file). Architectures shipped in ``emerdiff/arch/*.json``
build random-weight models without any download: ``tiny`` for tests and offline
runs, ``sd15`` / ``sd21_base`` for benchmarks and layout checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import ModelConfig

ARCH_DIR = Path(__file__).parent / "arch"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
COMPILED_REGIONS = (ResnetBlock2D, FeedForward)
RECOMPILE_LIMIT = 128  # graphs per region class: one per distinct (channels, size, batch) of its instances
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class WeightsNotFoundError(FileNotFoundError):
    """Stable Diffusion weights could not be found or loaded; the message says how to provide them."""


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
        """SPEC step 3: the prompt's text-encoder states, [1, 77, D] (EmerDiff uses "")."""
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
    if dtype not in _DTYPES:
        raise ValueError(f"unknown model.dtype '{dtype}'; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


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


def _missing_weights_message(source: str, cfg: ModelConfig, exc: BaseException) -> str:
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    looked = (
        f"a local file '{source}'" if source.endswith(SINGLE_FILE_SUFFIXES)
        else f"a local diffusers folder '{source}' and the Hugging Face hub id '{source}'"
        f" (cache: {constants.HF_HUB_CACHE}; HF_HUB_OFFLINE={'1' if offline else '0'},"
        f" local_files_only={cfg.local_files_only})"
    )
    return (
        f"could not load Stable Diffusion weights from model.pretrained='{source}': {type(exc).__name__}: {exc}\n"
        f"Looked for {looked}.\n"
        "To provide them, either:\n"
        f"  - on a machine with network access run `huggingface-cli download {source}` (or let the first run "
        "download it), then copy the cache here and point HF_HOME or HF_HUB_CACHE at it;\n"
        "  - pass a local diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) as "
        "model.pretrained=/path/to/folder;\n"
        "  - or a single checkpoint file as model.pretrained=/path/to/model.safetensors "
        "(add model.config=<diffusers folder or hub id> when offline);\n"
        "  - for an offline smoke test without weights use --cfg configs/tiny.yaml (random miniature model)."
    )


def _load_pipeline(cfg: ModelConfig, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    source = cfg.pretrained
    no_safety = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if source.endswith(SINGLE_FILE_SUFFIXES):
        if not Path(source).is_file():
            raise WeightsNotFoundError(_missing_weights_message(source, cfg, FileNotFoundError("no such file")))
        return StableDiffusionPipeline.from_single_file(
            source, config=cfg.config, torch_dtype=dtype, local_files_only=cfg.local_files_only, **no_safety
        )
    return StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, revision=cfg.revision, variant=cfg.variant,
        local_files_only=cfg.local_files_only, **no_safety,
    )


def load_sd(cfg: ModelConfig, device: Optional[str] = None) -> SDComponents:
    """SPEC "Models": load SD from ``cfg`` (``tiny`` / ``random_init`` build random weights)."""
    target = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, target)
    if cfg.pretrained == "tiny" or cfg.random_init:
        components = build_random_sd("tiny" if cfg.pretrained == "tiny" else cfg.arch, seed=cfg.init_seed)
    else:
        try:
            pipe = _load_pipeline(cfg, dtype)
        except WeightsNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise WeightsNotFoundError(_missing_weights_message(cfg.pretrained, cfg, exc)) from exc
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        components = freeze(SDComponents(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, name=cfg.pretrained
        ))
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(target)
    return cast_components(components, dtype)


def check_compile_options(backend: str, mode: Optional[str]) -> None:
    """Refuse an unknown torch.compile backend or mode, naming the config key."""
    from torch._inductor import list_mode_options  # imported here: heavy, and only needed to check the mode

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"segmentor.compile_backend '{backend}' is not a torch.compile backend; "
                         f"use inductor (or one of {', '.join(backends)})")
    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"segmentor.compile_mode '{mode}' is not a torch.compile mode; use null or one of "
                         f"{', '.join(modes)}")


def compile_regions(modules: Iterable[torch.nn.Module], backend: str = "inductor", mode: Optional[str] = None) -> int:
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
