"""Dense CLIP image embeddings (one per patch) in CLIP's joint image-text space, MaskCLIP-style.

MaskCLIP (Zhou et al., ECCV 2022) reads dense features off a CLIP ViT by replacing the last
block's attention with its value path: every token attends only to itself, so the attention
output is ``out_proj(v_proj(ln_1(x)))`` (the q/k projections are never used). The official
implementation (chongzhou/MaskCLIP, ``mmseg/models/backbones/vit.py``, ``return_qkv``) then
keeps the block's residual and MLP on that value: ``v = x + out_proj(v_proj(ln_1(x)))``,
``v = v + mlp(ln_2(v))``, followed by ``ln_post`` and the visual projection ``proj``.
``keep_residual=True`` (default) reproduces that; ``keep_residual=False`` keeps only the bare
value path ``out_proj(v_proj(ln_1(x)))`` (no residual, no MLP), the variant ClearCLIP
(Lan et al., ECCV 2024) found less noisy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from emerdiff.config import WeightsNotFoundError
from emerdiff.toy import shipped_clip

TINY_MODEL = "ovseg-tiny"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@runtime_checkable
class DenseEncoder(Protocol):
    """Image batch [B,3,H,W] (normalised with ``mean``/``std``) -> L2-normalised [B,D,H/stride,W/stride]."""

    stride: int
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LoadedClip:
    """An open_clip model with its tokenizer and the names it was built from (used as cache keys)."""

    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    model_name: str
    pretrained: str | None


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
) -> LoadedClip:
    """Build a CLIP model and tokenizer through open_clip's factory, in eval mode.

    ``pretrained`` is an open_clip tag (``"openai"``), a local checkpoint file, or None for
    random weights. ``model_name="ovseg-tiny"`` selects the tiny test architecture. Weights that
    cannot be found raise `WeightsNotFoundError` at once (see `pretrained_weights_file`).
    """
    register_model_configs()
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(model_name.replace("/", "-")) is None:
        raise ValueError(
            f"Unknown open_clip architecture {model_name!r}; e.g. 'ViT-B-16', or {TINY_MODEL!r} for the tiny "
            "random test model. open_clip.list_models() lists all."
        )
    if pretrained is None or has_schema:  # random weights, or a schema that names its own weights
        with quiet_random_weights_notice():
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device, cache_dir=cache_dir)
    else:
        model = _create_pretrained(model_name, pretrained, device, cache_dir)
    return LoadedClip(model.eval(), open_clip.get_tokenizer(model_name), model_name, pretrained)


def _create_pretrained(model_name: str, pretrained: str, device: str | torch.device,
                       cache_dir: str | None) -> nn.Module:
    """open_clip's model loaded from the weights file resolved first, with the tag's preprocessing (mean, std)."""
    tag = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    path = pretrained_weights_file(model_name, pretrained, cache_dir)
    try:
        return open_clip.create_model(model_name, pretrained=path, device=device, force_preprocess_cfg=tag or None)
    except Exception as error:  # unpickling, safetensors or state-dict errors: a corrupt or foreign file
        raise WeightsNotFoundError(
            f"ovseg.clip_pretrained={pretrained!r}: the weights file {path} could not be loaded into open_clip model "
            f"ovseg.clip_model={model_name!r}: {type(error).__name__}: {error}"
        ) from None


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
        raise _missing_weights(model_name, pretrained, cache_dir, repo, files, "the Hugging Face hub is switched off "
                               "(HF_HUB_OFFLINE=1)")
    _reach_hub(model_name, pretrained, cache_dir, repo, files)
    try:
        return open_clip.download_pretrained(tag, cache_dir=cache_dir)
    except (RuntimeError, OSError) as error:  # open_clip's FileNotFoundError names the last hub error
        raise _missing_weights(model_name, pretrained, cache_dir, repo, files,
                               f"the download failed: {error}") from None


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
        raise _missing_weights(model_name, pretrained, cache_dir, repo, files,
                               f"the Hugging Face hub could not be reached ({type(error).__name__}: {error})") from None


def _missing_weights(model_name: str, pretrained: str, cache_dir: str | None, repo: str, files: list[str],
                     why: str) -> WeightsNotFoundError:
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


class MaskCLIPEncoder(nn.Module):
    """MaskCLIP dense embeddings from an open_clip ViT, with sliding-window inference for large images.

    Images larger than ``window`` (default: the model's input size) are covered by windows
    of that size every ``window_stride`` pixels (default: half a window); each window's
    normalised embeddings are averaged where windows overlap, then renormalised. Smaller
    images (or a ``window`` larger than the image) are encoded whole, with the positional
    embeddings resized bicubically to the patch grid. H and W must be multiples of the patch.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        window: int | tuple[int, int] | None = None,
        window_stride: int | tuple[int, int] | None = None,
        keep_residual: bool = True,
        windows_per_pass: int = 16,
    ) -> None:
        super().__init__()
        _check_supported(visual)
        self.visual = visual
        self.keep_residual = keep_residual
        self.windows_per_pass = windows_per_pass
        self.stride = visual.patch_size[0]
        self.embed_dim = visual.output_dim
        preprocess = open_clip.get_model_preprocess_cfg(visual)
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.window = _pair(window) if window is not None else tuple(visual.image_size)
        default_stride = tuple(max(self.stride, w // 2 // self.stride * self.stride) for w in self.window)
        self.window_stride = _pair(window_stride) if window_stride is not None else default_stride
        for size in (*self.window, *self.window_stride):
            if size <= 0 or size % self.stride:
                raise ValueError(f"window and window_stride must be positive multiples of the patch size {self.stride}")

    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] normalised images -> [B,D,H/stride,W/stride] L2-normalised embeddings."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the patch size {self.stride}; resize or pad first"
            )
        images = images.to(self.visual.conv1.weight.dtype)
        win_h, win_w = min(self.window[0], height), min(self.window[1], width)
        if (win_h, win_w) == (height, width):
            return F.normalize(self.encode_window(images), dim=1)
        return self._slide(images, win_h, win_w)

    def encode_window(self, images: Tensor) -> Tensor:
        """[N,3,h,w] -> [N,D,h/stride,w/stride] un-normalised dense embeddings for whole inputs."""
        x = self._embed_tokens(images)  # [N, 1 + gh * gw, width]
        grid_h, grid_w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        *blocks, last = self.visual.transformer.resblocks
        for block in blocks:
            x = block(x)
        tokens = self._value_path(last, x)[:, 1:]  # drop the class token
        tokens = self.visual.ln_post(tokens) @ self.visual.proj  # [N, gh * gw, D]
        return tokens.transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        """Patch tokens plus class token with positional embeddings for this grid, after ln_pre."""
        x = self.visual.conv1(images)  # [N, width, gh, gw]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        return self.visual.ln_pre(x)

    def _positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Learned positional embeddings, bicubically resized from the pretraining grid to ``grid``."""
        pos = self.visual.positional_embedding
        if tuple(grid) == tuple(self.visual.grid_size):
            return pos
        patch_pos = pos[1:].reshape(1, *self.visual.grid_size, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], patch_pos.flatten(2)[0].T], dim=0)

    def _value_path(self, block: ResidualAttentionBlock, x: Tensor) -> Tensor:
        """The last block with self-only attention: out_proj(v), plus residual and MLP if kept."""
        attn = block.attn
        width = x.shape[-1]
        value = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
        value = block.ls_1(attn.out_proj(value))
        if not self.keep_residual:
            return value
        x = x + value
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _slide(self, images: Tensor, win_h: int, win_w: int) -> Tensor:
        """Average the normalised embeddings of overlapping windows, then renormalise."""
        batch, _, height, width = images.shape
        p = self.stride
        origins = [
            (top, left)
            for top in _window_starts(height, win_h, self.window_stride[0])
            for left in _window_starts(width, win_w, self.window_stride[1])
        ]
        total = images.new_zeros(batch, self.embed_dim, height // p, width // p)
        count = images.new_zeros(1, 1, height // p, width // p)
        for start in range(0, len(origins), self.windows_per_pass):
            chunk = origins[start : start + self.windows_per_pass]
            crops = torch.cat([images[..., top : top + win_h, left : left + win_w] for top, left in chunk])
            features = F.normalize(self.encode_window(crops), dim=1).split(batch)
            for (top, left), feature in zip(chunk, features, strict=True):
                cells = (..., slice(top // p, (top + win_h) // p), slice(left // p, (left + win_w) // p))
                total[cells] += feature
                count[cells] += 1
        return F.normalize(total / count, dim=1)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels, plus a last window flush with the far edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_supported(visual: nn.Module) -> None:
    """Reject towers the value-path surgery does not apply to (timm, ResNet, attention pooling)."""
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"MaskCLIPEncoder needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise TypeError("MaskCLIPEncoder needs a class-token ViT without attention pooling")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise TypeError(f"MaskCLIPEncoder needs square patches, got {visual.patch_size}")
    blocks = visual.transformer.resblocks
    if not visual.transformer.batch_first or not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise TypeError("MaskCLIPEncoder needs batch-first ResidualAttentionBlocks (nn.MultiheadAttention)")
