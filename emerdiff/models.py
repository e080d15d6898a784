"""Model loading: the Stable Diffusion parts (UNet, VAE, text encoder, tokenizer, scheduler).

Real weights load the standard diffusers way (hub id, local diffusers folder, or a
single .safetensors/.ckpt file). Architectures shipped in ``emerdiff/arch/*.json``
build random-weight models without any download: ``tiny`` for tests and offline
runs, ``sd15`` / ``sd21_base`` for benchmarks and layout checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import ModelConfig, WeightsNotFoundError
from .toy import shipped_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

ARCH_DIR = Path(__file__).parent / "arch"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
COMPILED_REGIONS = (ResnetBlock2D, FeedForward)
RECOMPILE_LIMIT = 128  # graphs per region class: one per distinct (channels, size, batch) of its instances
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


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


# Markers of the original (LDM / CompVis) single-file layout and of models EmerDiff cannot use.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model."
SDXL_PREFIX = "conditioner.embedders."
OTHER_MODELS = {  # key fragment -> what the file is
    "joint_blocks.": "Stable Diffusion 3", "double_blocks.": "FLUX", "control_model.": "a ControlNet",
    "lora_unet_": "a LoRA adapter", "motion_modules.": "an AnimateDiff motion module",
}
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_HINT = "  - for an offline smoke test without weights use --cfg configs/tiny.yaml (random miniature model)."


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off")


def hub_cache() -> str:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def is_local_path(source: str) -> bool:
    """A path on this machine (existing, absolute, ./ ../ ~, a checkpoint file name, or more than one '/'), not a hub id."""
    return (Path(source).expanduser().exists() or source.startswith(("/", "./", "../", "~", "."))
            or source.endswith(SINGLE_FILE_SUFFIXES) or source.count("/") > 1 or "\\" in source)


def _download_advice(repo: str, what: str = "") -> str:
    return (f"  - on a machine with network access run `hf download {repo}{what}` (or let a first run with network "
            f"download it), copy the Hugging Face cache here and point HF_HUB_CACHE (or HF_HOME) at it;\n")


def _missing_weights_message(source: str, cfg: ModelConfig, exc: BaseException) -> str:
    """What was looked for and every way to provide the weights; local paths get no download advice."""
    reason = f"{type(exc).__name__}: {exc}"
    head = f"could not load Stable Diffusion weights from model.pretrained='{source}': {reason}\n"
    if is_local_path(source):
        return (
            head + f"Looked for the local path '{Path(source).expanduser()}'"
            f"{'' if Path(source).expanduser().exists() else ' (it does not exist)'}.\n"
            "To provide them, either:\n"
            "  - pass a local diffusers folder (with model_index.json and unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/) as model.pretrained=/path/to/folder;\n"
            "  - or a single checkpoint file in the original SD layout as model.pretrained=/path/to/model.safetensors "
            "(add model.config=<diffusers folder or hub id> when offline);\n" + TINY_HINT
        )
    return (
        head + f"Looked for a local diffusers folder '{source}' (none here) and the Hugging Face hub id '{source}' "
        f"(cache: {hub_cache()}; HF_HUB_OFFLINE={'1' if _offline() else '0'}, local_files_only={cfg.local_files_only}).\n"
        "To provide them, either:\n" + _download_advice(source) +
        "  - pass a local diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) as "
        "model.pretrained=/path/to/folder;\n"
        "  - or a single checkpoint file as model.pretrained=/path/to/model.safetensors "
        "(add model.config=<diffusers folder or hub id> when offline);\n" + TINY_HINT
    )


def read_checkpoint_keys(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint without reading their data (meta tensors / memory-mapped).

    An unreadable, empty or truncated file raises `WeightsNotFoundError` saying the file itself is invalid.
    """
    def invalid(why: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f"the checkpoint file '{path}' itself is invalid: {why}. It is empty, truncated or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} file: download or copy it again "
            "(compare its size and sha256 with the source's), or pass a diffusers folder as model.pretrained.")

    if path.stat().st_size == 0:
        raise invalid("it has 0 bytes")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                tensors = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        else:
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                tensors = torch.load(path, map_location="cpu", weights_only=True)
            while isinstance(tensors, dict) and "state_dict" in tensors:
                tensors = tensors["state_dict"]
    except WeightsNotFoundError:
        raise
    except Exception as exc:  # safetensors' SafetensorError, pickle/zip errors, EOF
        raise invalid(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(tensors, dict) or not tensors:
        raise invalid("it holds no tensors")
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def check_sd_checkpoint(path: Path, tensors: Dict[str, torch.Tensor]) -> str:
    """'v1' or 'v2' for a full SD 1.x / 2.x checkpoint in the original layout; else an error naming the fix."""
    keys = list(tensors)
    sample = ", ".join(f"'{k}'" for k in keys[:3])
    use = ("EmerDiff needs Stable Diffusion 1.x or 2.x (UNet, VAE and text encoder in one file, the original "
           "LDM/CompVis layout), e.g. v1-5-pruned-emaonly.safetensors or v2-1_512-ema-pruned.safetensors, "
           "or a diffusers folder / hub id (configs/emerdiff_sd15.yaml, emerdiff_sd21.yaml)")
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        raise WeightsNotFoundError(f"'{path}' is a Stable Diffusion XL checkpoint (keys {SDXL_PREFIX}*), not SD 1.x/2.x: "
                                   f"SDXL's UNet has no 16x16 cross-attention layers EmerDiff uses. {use}.")
    for fragment, what in OTHER_MODELS.items():
        if any(fragment in k for k in keys):
            raise WeightsNotFoundError(f"'{path}' looks like {what} (keys containing '{fragment}'), not a Stable "
                                       f"Diffusion 1.x/2.x checkpoint. {use}.")
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "embeddings.")) for k in keys):
            raise WeightsNotFoundError(
                f"'{path}' is one component of a diffusers folder (keys like {sample}), not a whole checkpoint in the "
                "original layout: pass the folder that holds model_index.json (and unet/, vae/, ...) as "
                "model.pretrained instead of the file.")
        raise WeightsNotFoundError(f"'{path}' has none of the keys of an original-layout SD checkpoint "
                                   f"({LDM_UNET_PREFIX}*; found {sample}). {use}.")
    missing = [name for prefix, name in ((LDM_VAE_PREFIX, "VAE"), (LDM_TEXT_PREFIX, "text encoder"))
               if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise WeightsNotFoundError(f"'{path}' holds the UNet but no {' and no '.join(missing)} (no "
                                   f"{' / '.join(p for p, n in ((LDM_VAE_PREFIX, 'VAE'), (LDM_TEXT_PREFIX, 'text encoder')) if n in missing)}* "
                                   "keys): use the full checkpoint, or a diffusers folder as model.pretrained.")
    conv_in = tensors.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise WeightsNotFoundError(f"'{path}' is an inpainting or image-conditioned UNet ({conv_in.shape[1]} input "
                                   f"channels, EmerDiff needs 4). {use}.")
    v2 = tensors.get(LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight")
    return "v2" if v2 is not None and v2.shape[-1] == 1024 else "v1"


def _pipeline_folder_problem(folder: Path) -> Optional[str]:
    """Why `folder` is not a diffusers pipeline folder, or None."""
    if not (folder / "model_index.json").is_file():
        files = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        single = [f for f in files if f.endswith(SINGLE_FILE_SUFFIXES)]
        hint = (f" It holds {', '.join(single)}: pass that file as model.pretrained=" f"{folder / single[0]}"
                if single else "")
        return f"no model_index.json (found: {', '.join(files) or 'nothing'}).{hint}"
    absent = [name for name in PIPELINE_FOLDERS if not (folder / name).is_dir()]
    if absent:
        return f"model_index.json but no {', '.join(absent)}/ subfolder(s)"
    return None


def _single_file_config(cfg: ModelConfig, path: Path, version: str, local_only: bool) -> str:
    """The diffusers config (folder or hub id) for a single-file checkpoint; offline it must be on this machine."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cfg.config is not None:
        if is_local_path(cfg.config):
            folder = Path(cfg.config).expanduser()
            problem = "it does not exist" if not folder.exists() else _pipeline_folder_problem(folder)
            if problem:
                raise WeightsNotFoundError(
                    f"model.config='{cfg.config}' must be a diffusers pipeline folder of the checkpoint's SD version "
                    f"(model_index.json and the config files of {', '.join(PIPELINE_FOLDERS)}; weights not needed): "
                    f"{problem}.")
            return str(folder)
        repo = cfg.config
    else:
        repo = DEFAULT_CONFIG_REPOS[version]
    if not local_only:
        return repo
    try:  # offline: the config files must already be in the cache
        return snapshot_download(repo, cache_dir=hub_cache(), local_files_only=True, revision=cfg.revision)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        named = "model.config" if cfg.config is not None else "model.config is not set, so its default"
        raise WeightsNotFoundError(
            f"the single-file checkpoint '{path}' needs the diffusers config files of its base model; offline "
            f"(local_files_only={cfg.local_files_only}, HF_HUB_OFFLINE={'1' if _offline() else '0'}) and "
            f"{named} '{repo}' is not in the Hugging Face cache ({hub_cache()}): {type(exc).__name__}.\n"
            "To fix it, either:\n"
            f"  - set model.config=/path/to/diffusers/folder of the same SD version (model_index.json plus the "
            "config files; no weights needed);\n" + _download_advice(repo, " --include '*.json' '*.txt'")
        ) from None


DEFAULT_CONFIG_REPOS = {"v1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "v2": "stabilityai/stable-diffusion-2-1"}


def _load_pipeline(cfg: ModelConfig, dtype: torch.dtype):
    with warnings.catch_warnings():
        # diffusers >= 0.40 renames torch_dtype to dtype with a FutureWarning; earlier releases know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return _read_pipeline(cfg, dtype)


def _read_pipeline(cfg: ModelConfig, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    source = str(shipped_pipeline(cfg.pretrained) or cfg.pretrained)  # `toy`: the folder in the package
    local_only = cfg.local_files_only or _offline()
    # low_cpu_mem_usage needs accelerate: asking for it without accelerate only earns a warning
    no_safety = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                     low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    path = Path(source).expanduser()
    if source.endswith(SINGLE_FILE_SUFFIXES) or path.is_file():
        if not path.is_file():
            raise WeightsNotFoundError(_missing_weights_message(source, cfg, FileNotFoundError("no such file")))
        version = check_sd_checkpoint(path, read_checkpoint_keys(path))
        config = _single_file_config(cfg, path, version, local_only)
        return StableDiffusionPipeline.from_single_file(
            str(path), config=config, torch_dtype=dtype, local_files_only=local_only, cache_dir=hub_cache(),
            **no_safety)
    if is_local_path(source):
        if not path.is_dir():
            raise WeightsNotFoundError(_missing_weights_message(source, cfg, FileNotFoundError("no such folder")))
        problem = _pipeline_folder_problem(path)
        if problem:
            raise WeightsNotFoundError(
                f"model.pretrained='{source}' is not a diffusers pipeline folder: {problem}. Expected model_index.json "
                f"and {', '.join(f + '/' for f in PIPELINE_FOLDERS)} (as save_pretrained writes them); a single "
                "checkpoint file goes directly in model.pretrained=/path/to/model.safetensors.")
        source = str(path)
    return StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, revision=cfg.revision, variant=cfg.variant,
        local_files_only=local_only, cache_dir=hub_cache(), **no_safety,
    )


def _variant_hint(cfg: ModelConfig, exc: BaseException) -> str:
    if cfg.variant and "variant" in str(exc):
        return (f"\nmodel.variant='{cfg.variant}': the weights have no '{cfg.variant}' files (e.g. "
                f"unet/diffusion_pytorch_model.{cfg.variant}.safetensors); set model.variant=null to load the "
                "default files.")
    return ""


def load_sd(cfg: ModelConfig, device: Optional[str] = None) -> SDComponents:
    """Load SD from ``cfg`` (``tiny`` / ``random_init`` build random weights); ``cfg.cpu_threads`` sets torch's."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    target = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, target)
    if cfg.pretrained == "tiny" or cfg.random_init:
        components = build_random_sd("tiny" if cfg.pretrained == "tiny" else cfg.arch, seed=cfg.init_seed)
    else:
        try:
            pipe = _load_pipeline(cfg, dtype)
        except WeightsNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError, ImportError, KeyError) as exc:
            raise WeightsNotFoundError(_missing_weights_message(cfg.pretrained, cfg, exc) + _variant_hint(cfg, exc)
                                       ) from exc
        components = pipeline_components(pipe, name=cfg.pretrained)
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
