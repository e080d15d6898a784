"""Loading a CLIP model through open_clip's factory: architecture, weights (tag, checkpoint file, random) and
activation.

The activation is part of the weights: OpenAI's CLIP (and what is fine-tuned from it: MaskCLIP, TCL) was
trained with QuickGELU, ``x * sigmoid(1.702 x)``, while open_clip builds its plain architectures
(``ViT-B-16``) with ``nn.GELU``. open_clip knows the right one only when it resolves a tag itself; we
hand it a resolved file, so `clip_activation` decides: ``ovseg.clip_quick_gelu`` when set, else the
tag's pretrained config, else QuickGELU for OpenAI's own TorchScript releases, else the architecture's
config (with a warning for checkpoint files, whose activation a file does not record).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import open_clip
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import Tensor, nn

from emerdiff.config import WeightsNotFoundError
from emerdiff.toy import shipped_clip

from .text import TextTower

TINY_MODEL = "ovseg-tiny"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


class ClipModel(TextTower, Protocol):
    """What ovseg uses of an open_clip model: its image tower beside the text encoder."""

    visual: nn.Module


@dataclass(frozen=True)
class LoadedClip:
    """An open_clip model with its tokenizer, the names it was built from (cache keys) and its activation."""

    model: ClipModel
    tokenizer: Callable[[list[str]], Tensor]
    model_name: str
    pretrained: str | None
    quick_gelu: bool = False  # both towers' MLPs use QuickGELU (OpenAI's CLIP) rather than GELU


@functools.cache
def register_model_configs() -> None:
    """Add ovseg's architecture JSONs (e.g. ``ovseg-tiny``) to open_clip's registry, once, on first use."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


@contextlib.contextmanager
def quiet_random_weights_notice() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded" warning: ovseg.clip_pretrained=null asks for random weights."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip warns through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_clip(
    model_name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> LoadedClip:
    """Build a CLIP model and tokenizer through open_clip's factory, in eval mode.

    ``pretrained`` is an open_clip tag (``"openai"``), a local checkpoint file, or None for
    random weights. ``model_name="ovseg-tiny"`` selects the tiny test architecture. Weights that
    cannot be found raise `WeightsNotFoundError` at once (see `pretrained_weights_file`).
    ``quick_gelu`` (``ovseg.clip_quick_gelu``) states the activation; None decides it from the
    weights (`clip_activation`).
    """
    register_model_configs()
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    config = None if has_schema else open_clip.get_model_config(model_name.replace("/", "-"))
    if not has_schema and config is None:
        raise ValueError(
            f"Unknown open_clip architecture {model_name!r}; e.g. 'ViT-B-16', or {TINY_MODEL!r} for the tiny "
            "random test model. open_clip.list_models() lists all."
        )
    if has_schema:  # the schema names its own weights and configuration (activation included)
        model = open_clip.create_model(model_name, device=device, cache_dir=cache_dir)
        return LoadedClip(
            model.eval(), open_clip.get_tokenizer(model_name), model_name, pretrained, built_with_quick_gelu(model)
        )
    path = None if pretrained is None else pretrained_weights_file(model_name, pretrained, cache_dir)
    activation = clip_activation(model_name, pretrained, path, quick_gelu)
    tag = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained) if pretrained else {}
    with quiet_random_weights_notice():
        model = open_clip.create_model(
            model_name, device=device, force_preprocess_cfg=tag or None, quick_gelu=activation
        )
    if pretrained is not None and path is not None:  # (a path exactly when weights are named)
        load_weights(model, model_name, pretrained, path)
    return LoadedClip(model.eval(), open_clip.get_tokenizer(model_name), model_name, pretrained, activation)


def clip_activation(model_name: str, pretrained: str | None, path: str | None, quick_gelu: bool | None) -> bool:
    """Whether to build QuickGELU: as stated, else as the tag was trained, else OpenAI's TorchScript release
    (QuickGELU), else the architecture's config; a checkpoint file left to that last rule gets a warning."""
    if quick_gelu is not None:
        return quick_gelu
    name = model_name.replace("/", "-")
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if tag:
        return bool(tag.get("quick_gelu", False))
    if path is not None and is_torchscript_archive(path):
        return True  # OpenAI's released ViT-B-16.pt etc. are TorchScript archives of QuickGELU models
    default = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    if path is not None:
        warnings.warn(
            f"ovseg.clip_pretrained={pretrained!r} is a checkpoint file, which does not record its activation: "
            f"building {'QuickGELU' if default else 'GELU'} as the architecture {model_name!r} says. Weights trained "
            "from OpenAI's CLIP (OpenAI, MaskCLIP, TCL) need ovseg.clip_quick_gelu=true; set it (true or false) "
            "to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    return default


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether a file is a TorchScript archive (how OpenAI released CLIP), not a pickled state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def built_with_quick_gelu(model: nn.Module) -> bool:
    """Whether an open_clip model's MLPs use QuickGELU (checked on the modules, both towers)."""
    return any(type(module).__name__ == "QuickGELU" for module in model.modules())


def load_weights(model: nn.Module, model_name: str, pretrained: str, path: str) -> None:
    """Load a weights file into ``model`` strictly: open_clip's checkpoint loader, or a TorchScript archive's state."""
    try:
        if is_torchscript_archive(path):
            model.load_state_dict(torchscript_state_dict(path, model), strict=True)
        else:
            open_clip.load_checkpoint(model, path)
    except Exception as error:  # unpickling, safetensors or state-dict errors: a corrupt or foreign file
        raise WeightsNotFoundError(
            f"ovseg.clip_pretrained={pretrained!r}: the weights file {path} could not be loaded into open_clip model "
            f"ovseg.clip_model={model_name!r}: {type(error).__name__}: {error}"
        ) from None


def torchscript_state_dict(path: str, model: nn.Module) -> dict[str, Tensor]:
    """The weights of a TorchScript archive, less OpenAI's metadata entries and ``model``'s non-persistent buffers."""
    state = torch.jit.load(path, map_location="cpu").state_dict()
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    metadata = {"input_resolution", "context_length", "vocab_size"}  # OpenAI's archives carry these (open_clip too)
    return {name: value for name, value in state.items() if name not in metadata | transient}


def pretrained_weights_file(model_name: str, pretrained: str, cache_dir: str | None) -> str:
    """The local file of an open_clip tag's weights or a checkpoint path, without the network when it is there.

    A tag's weights come from the Hugging Face cache (``cache_dir``, else the default cache). Not
    there, offline (HF_HUB_OFFLINE) fails at once; online, one request without retries checks that
    the hub answers before open_clip downloads them. Every failure is a `WeightsNotFoundError`
    naming the ``ovseg.clip_*`` keys, what was tried and how to provide the weights.
    """
    tag = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if not tag:
        return str(shipped_clip(model_name, pretrained) or _existing_checkpoint(model_name, pretrained))
    repo, files = hub_weight_files(tag["hf_hub"])
    for name in files:
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached
    if hub_offline():
        raise _missing_weights(
            model_name, pretrained, cache_dir, repo, files, "the Hugging Face hub is switched off (HF_HUB_OFFLINE=1)"
        )
    _reach_hub(model_name, pretrained, cache_dir, repo, files)
    try:
        return open_clip.download_pretrained(tag, cache_dir=cache_dir)
    except (RuntimeError, OSError) as error:  # open_clip's FileNotFoundError names the last hub error
        raise _missing_weights(
            model_name, pretrained, cache_dir, repo, files, f"the download failed: {error}"
        ) from None


def _existing_checkpoint(model_name: str, pretrained: str) -> str:
    """``pretrained`` as an existing checkpoint file, else an error saying it is neither a tag nor a file."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))) or "none"
    raise WeightsNotFoundError(
        f"ovseg.clip_pretrained={pretrained!r} is not an open_clip tag of ovseg.clip_model={model_name!r} "
        f"(its tags: {tags}) and the checkpoint file {path.absolute()} does not exist. Set ovseg.clip_pretrained to "
        "one of the tags, to an existing open_clip checkpoint file, or to null for random weights."
    )


def hub_weight_files(hf_hub: str) -> tuple[str, list[str]]:
    """The hub repo of a tag's weights and the files open_clip takes from it, in its order (safetensors first)."""
    repo, name = os.path.split(hf_hub)  # "org/repo/" names no file: open_clip's default file name
    name = name or HF_WEIGHTS_NAME
    if name == HF_WEIGHTS_NAME:
        return repo, [HF_SAFE_WEIGHTS_NAME, name]
    if name.endswith((".bin", ".pth")):
        return repo, [str(Path(name).with_suffix(".safetensors")), name]
    return repo, [name]


def hub_offline() -> bool:
    """Whether the user switched the Hugging Face hub off: HF_HUB_OFFLINE now, or when huggingface_hub was imported."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or hub_constants.HF_HUB_OFFLINE


def _reach_hub(model_name: str, pretrained: str, cache_dir: str | None, repo: str, files: list[str]) -> None:
    """One request to the hub without retries (huggingface_hub retries for about a minute before failing)."""
    try:
        get_hf_file_metadata(hf_hub_url(repo, files[0]), retry_on_errors=False)
    except HfHubHTTPError:
        return  # the hub answered, e.g. that the safetensors copy does not exist: open_clip's download goes on
    except Exception as error:  # any transport failure (name lookup, refused, timeout): no answer at all
        raise _missing_weights(
            model_name,
            pretrained,
            cache_dir,
            repo,
            files,
            f"the Hugging Face hub could not be reached ({type(error).__name__}: {error})",
        ) from None


def _missing_weights(
    model_name: str, pretrained: str, cache_dir: str | None, repo: str, files: list[str], why: str
) -> WeightsNotFoundError:
    """The error for a tag whose weights are not in the cache: what was tried, why it failed, how to fix it."""
    cache = cache_dir or hub_constants.HF_HUB_CACHE
    setting = f"ovseg.clip_cache_dir={cache_dir!r}" if cache_dir else "ovseg.clip_cache_dir=null: the default"
    return WeightsNotFoundError(
        f"CLIP weights for ovseg.clip_model={model_name!r}, ovseg.clip_pretrained={pretrained!r} are not on this "
        f"machine: looked for {' or '.join(files)} of {repo} in the Hugging Face cache {cache} ({setting}), and "
        f"{why}.\nTo provide them, either:\n"
        f"  - with network, download them once: `hf download {repo} {files[0]}` (or in Python "
        f"open_clip.create_model({model_name!r}, pretrained={pretrained!r})); add --cache-dir DIR (cache_dir=DIR) and "
        "set ovseg.clip_cache_dir=DIR to keep them elsewhere;\n"
        "  - point ovseg.clip_cache_dir at a folder that holds them (a Hugging Face cache copied from a machine that "
        "downloaded them);\n"
        "  - or set ovseg.clip_pretrained=/path/to/checkpoint.pt, a local open_clip checkpoint file."
    )
