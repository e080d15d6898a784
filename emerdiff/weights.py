"""Real Stable Diffusion weights: a hub id, a local diffusers folder or a single checkpoint file, read the
diffusers way, and every problem on the way explained (what was looked for, the ways to provide the weights).

A single-file checkpoint is checked before diffusers reads it (`check_sd_checkpoint`): SD 1.x, 2.x and SDXL
(SDXL base, SSD-1B, SDXL-Turbo) load; the SDXL refiner, SD3, FLUX, ControlNet, LoRA, inpainting and diffusers
component files are refused with what to use instead. A diffusers folder or hub id is read by the pipeline class
its model_index.json names (`pipeline_class`); transformer (DiT) backbones are refused with why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig, WeightsNotFoundError
from .toy import shipped_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

# Markers of the original (LDM / CompVis) single-file layout and of models EmerDiff cannot use.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_SECOND_ENCODER = "conditioner.embedders.1."  # SDXL base / SSD-1B / Turbo; the refiner has only embedders.0
TRANSFORMER_WHY = (
    "a transformer (DiT) backbone: it has no UNet, so none of the low-resolution up-block "
    "cross-attention layers EmerDiff reads its features from and modulates"
)
TRANSFORMER_MODELS = {"joint_blocks.": "Stable Diffusion 3", "double_blocks.": "FLUX"}  # key fragment -> model
OTHER_MODELS = {  # key fragment -> what the file is
    "control_model.": "a ControlNet",
    "lora_unet_": "a LoRA adapter",
    "motion_modules.": "an AnimateDiff motion module",
}
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_FOLDERS = PIPELINE_FOLDERS + ("text_encoder_2", "tokenizer_2")
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
    """A path on this machine (existing, absolute, ./ ../ ~, a checkpoint file name, or more than one '/'), not a
    hub id."""
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", "./", "../", "~", "."))
        or source.endswith(SINGLE_FILE_SUFFIXES)
        or source.count("/") > 1
        or "\\" in source
    )


def _download_advice(repo: str, what: str = "") -> str:
    return (
        f"  - on a machine with network access run `hf download {repo}{what}` (or let a first run with network "
        f"download it), copy the Hugging Face cache here and point HF_HUB_CACHE (or HF_HOME) at it;\n"
    )


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
        f"(cache: {hub_cache()}; HF_HUB_OFFLINE={'1' if _offline() else '0'}, "
        f"local_files_only={cfg.local_files_only}).\n"
        "To provide them, either:\n"
        + _download_advice(source)
        + "  - pass a local diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) as "
        "model.pretrained=/path/to/folder;\n"
        "  - or a single checkpoint file as model.pretrained=/path/to/model.safetensors "
        "(add model.config=<diffusers folder or hub id> when offline);\n" + TINY_HINT
    )


def read_checkpoint_keys(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint without reading their data (meta tensors / memory-mapped).

    An unreadable, empty or truncated file raises `WeightsNotFoundError` saying the file itself is invalid.
    """

    def invalid(why: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f"the checkpoint file '{path}' itself is invalid: {why}. It is empty, truncated or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} file: download or copy it again "
            "(compare its size and sha256 with the source's), or pass a diffusers folder as model.pretrained."
        )

    if path.stat().st_size == 0:
        raise invalid("it has 0 bytes")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                tensors: Any = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
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


def check_sd_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """'v1', 'v2' or 'xl' for a full SD 1.x / 2.x / SDXL checkpoint in the original layout; else an error naming
    the fix."""
    keys = list(tensors)
    sample = ", ".join(f"'{k}'" for k in keys[:3])
    use = (
        "EmerDiff needs Stable Diffusion 1.x, 2.x or XL (UNet, VAE and text encoder(s) in one file, the original "
        "LDM/CompVis layout), e.g. v1-5-pruned-emaonly.safetensors, v2-1_512-ema-pruned.safetensors or "
        "sd_xl_base_1.0.safetensors, or a diffusers folder / hub id (configs/emerdiff_sd15.yaml, emerdiff_sdxl.yaml)"
    )
    for fragment, what in TRANSFORMER_MODELS.items():
        if any(fragment in k for k in keys):
            raise WeightsNotFoundError(
                f"'{path}' looks like {what} (keys containing '{fragment}'), {TRANSFORMER_WHY}. {use}."
            )
    if any(k.startswith(SDXL_PREFIX) for k in keys) and not any(k.startswith(SDXL_SECOND_ENCODER) for k in keys):
        raise WeightsNotFoundError(
            f"'{path}' is the Stable Diffusion XL refiner (one text encoder, "
            f"{SDXL_PREFIX}0 only), which refines latents and conditions on an aesthetic "
            f"score: use the SDXL base model (or SSD-1B, SDXL-Turbo). {use}."
        )
    for fragment, what in OTHER_MODELS.items():
        if any(fragment in k for k in keys):
            raise WeightsNotFoundError(
                f"'{path}' looks like {what} (keys containing '{fragment}'), not a Stable "
                f"Diffusion 1.x/2.x checkpoint. {use}."
            )
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "embeddings.")) for k in keys):
            raise WeightsNotFoundError(
                f"'{path}' is one component of a diffusers folder (keys like {sample}), not a whole checkpoint in the "
                "original layout: pass the folder that holds model_index.json (and unet/, vae/, ...) as "
                "model.pretrained instead of the file."
            )
        raise WeightsNotFoundError(
            f"'{path}' has none of the keys of an original-layout SD checkpoint "
            f"({LDM_UNET_PREFIX}*; found {sample}). {use}."
        )
    xl = any(k.startswith(SDXL_PREFIX) for k in keys)
    parts = ((LDM_VAE_PREFIX, "VAE"), (SDXL_PREFIX if xl else LDM_TEXT_PREFIX, "text encoder"))
    missing = [(prefix, name) for prefix, name in parts if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise WeightsNotFoundError(
            f"'{path}' holds the UNet but no {' and no '.join(n for _, n in missing)} (no "
            f"{' / '.join(p for p, _ in missing)}* keys): use the full checkpoint, or a "
            "diffusers folder as model.pretrained."
        )
    conv_in = tensors.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise WeightsNotFoundError(
            f"'{path}' is an inpainting or image-conditioned UNet ({conv_in.shape[1]} input "
            f"channels, EmerDiff needs 4). {use}."
        )
    if xl:
        return "xl"
    v2 = tensors.get(LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight")
    return "v2" if v2 is not None and v2.shape[-1] == 1024 else "v1"


def pipeline_class(index: dict[str, Any], source: str) -> tuple[str, tuple[str, ...]]:
    """The diffusers pipeline class to read a model_index.json with and the component folders it needs:
    SDXL-shaped pipelines (SDXL, SSD-1B, SDXL-Turbo) take two text encoders; transformer backbones are refused."""
    name = str(index.get("_class_name", ""))
    if "transformer" in index and "unet" not in index:
        raise WeightsNotFoundError(
            f"model.pretrained='{source}' is a {name or 'transformer'} pipeline, "
            f"{TRANSFORMER_WHY}: use an SD 1.x/2.x/XL model (configs/emerdiff_sd15.yaml, "
            "emerdiff_sdxl.yaml, emerdiff_sd_turbo.yaml, ...)"
        )
    if "text_encoder_2" in index:
        if index.get("text_encoder") in (None, [None, None]):
            raise WeightsNotFoundError(
                f"model.pretrained='{source}' is an SDXL refiner ({name}: no first text "
                "encoder), which refines latents: use the SDXL base model (or SSD-1B, "
                "SDXL-Turbo)"
            )
        return "StableDiffusionXLPipeline", SDXL_FOLDERS
    return "StableDiffusionPipeline", PIPELINE_FOLDERS


def _pipeline_folder_problem(folder: Path, needed: tuple[str, ...] = PIPELINE_FOLDERS) -> str | None:
    """Why `folder` is not a diffusers pipeline folder (with the subfolders `needed`), or None."""
    if not (folder / "model_index.json").is_file():
        files = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        single = [f for f in files if f.endswith(SINGLE_FILE_SUFFIXES)]
        hint = (
            f" It holds {', '.join(single)}: pass that file as model.pretrained={folder / single[0]}" if single else ""
        )
        return f"no model_index.json (found: {', '.join(files) or 'nothing'}).{hint}"
    absent = [name for name in needed if not (folder / name).is_dir()]
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
            needed = SDXL_FOLDERS if version == "xl" else PIPELINE_FOLDERS
            problem = "it does not exist" if not folder.exists() else _pipeline_folder_problem(folder, needed)
            if problem:
                raise WeightsNotFoundError(
                    f"model.config='{cfg.config}' must be a diffusers pipeline folder of the checkpoint's SD version "
                    f"(model_index.json and the config files of {', '.join(needed)}; weights not needed): "
                    f"{problem}."
                )
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


DEFAULT_CONFIG_REPOS = {
    "v1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v2": "stabilityai/stable-diffusion-2-1",
    "xl": "stabilityai/stable-diffusion-xl-base-1.0",
}


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The diffusers pipeline of `cfg.pretrained` in `dtype`; any failure is a WeightsNotFoundError saying why and
    how to provide the weights."""
    try:
        pipe = _load_pipeline(cfg, dtype)
        if cfg.vae is not None:
            pipe.vae = load_vae(cfg.vae, cfg, dtype)
        return pipe
    except WeightsNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as exc:
        raise WeightsNotFoundError(
            _missing_weights_message(cfg.pretrained, cfg, exc) + _variant_hint(cfg, exc)
        ) from exc


def _load_pipeline(cfg: ModelConfig, dtype: torch.dtype) -> StableDiffusionPipeline:
    with warnings.catch_warnings():
        # diffusers >= 0.40 renames torch_dtype to dtype with a FutureWarning; earlier releases know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return _read_pipeline(cfg, dtype)


def _read_pipeline(cfg: ModelConfig, dtype: torch.dtype) -> StableDiffusionPipeline:
    import diffusers

    source = str(shipped_pipeline(cfg.pretrained) or cfg.pretrained)  # `toy`: the folder in the package
    local_only = cfg.local_files_only or _offline()
    # low_cpu_mem_usage needs accelerate: asking for it without accelerate only earns a warning
    common = dict(
        torch_dtype=dtype,
        local_files_only=local_only,
        cache_dir=hub_cache(),
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
    )
    path = Path(source).expanduser()
    if source.endswith(SINGLE_FILE_SUFFIXES) or path.is_file():
        if not path.is_file():
            raise WeightsNotFoundError(_missing_weights_message(source, cfg, FileNotFoundError("no such file")))
        version = check_sd_checkpoint(path, read_checkpoint_keys(path))
        name = "StableDiffusionXLPipeline" if version == "xl" else "StableDiffusionPipeline"
        config = _single_file_config(cfg, path, version, local_only)
        return getattr(diffusers, name).from_single_file(str(path), config=config, **common, **_extras(name))
    if is_local_path(source):
        if not path.is_dir():
            raise WeightsNotFoundError(_missing_weights_message(source, cfg, FileNotFoundError("no such folder")))
        problem = _pipeline_folder_problem(path, needed=())  # model_index.json first: it names the pipeline
        if problem is None:
            name, needed = pipeline_class(json.loads((path / "model_index.json").read_text()), source)
            problem = _pipeline_folder_problem(path, needed)
        if problem:
            raise WeightsNotFoundError(
                f"model.pretrained='{source}' is not a diffusers pipeline folder: {problem}. Expected model_index.json "
                f"and {', '.join(f + '/' for f in PIPELINE_FOLDERS)} (SDXL: also text_encoder_2/, tokenizer_2/; as "
                "save_pretrained writes them); a single checkpoint file goes directly in "
                "model.pretrained=/path/to/model.safetensors."
            )
        source = str(path)
    else:  # a hub id: its model_index.json (a small file) says which pipeline it is before any weights download
        index = diffusers.DiffusionPipeline.load_config(
            source, revision=cfg.revision, local_files_only=local_only, cache_dir=hub_cache()
        )
        name, _ = pipeline_class(index, source)
    return getattr(diffusers, name).from_pretrained(
        source, revision=cfg.revision, variant=cfg.variant, **common, **_extras(name)
    )


def _extras(pipeline: str) -> dict[str, Any]:
    """Pipeline arguments EmerDiff sets: no safety checker (SD) and no watermarker (SDXL): it never makes images."""
    if pipeline == "StableDiffusionXLPipeline":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def load_vae(name: str, cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """`model.vae`: a VAE (hub id or diffusers folder, its own or a pipeline's vae/) replacing the checkpoint's,
    e.g. madebyollin/sdxl-vae-fp16-fix, which does not overflow in float16 as SDXL's own VAE does."""
    from diffusers import AutoencoderKL

    folder = Path(name).expanduser()
    subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(
            name,
            subfolder=subfolder,
            torch_dtype=dtype,
            local_files_only=cfg.local_files_only or _offline(),
            cache_dir=hub_cache(),
        )
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"could not load model.vae='{name}' ({type(exc).__name__}): it must be a diffusers AutoencoderKL "
            "(a folder with config.json and diffusion_pytorch_model.safetensors, a pipeline folder with vae/, or a "
            "hub id in the local cache); set model.vae=null to keep the checkpoint's VAE"
        ) from None


def _variant_hint(cfg: ModelConfig, exc: BaseException) -> str:
    if cfg.variant and "variant" in str(exc):
        return (
            f"\nmodel.variant='{cfg.variant}': the weights have no '{cfg.variant}' files (e.g. "
            f"unet/diffusion_pytorch_model.{cfg.variant}.safetensors); set model.variant=null to load the "
            "default files."
        )
    return ""
