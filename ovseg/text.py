"""Class text embeddings: prompt-template ensembles through the CLIP text encoder, cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

from emerdiff.files import atomic_file

from .config import TEXT_AVERAGES

# CLIP's 80 ImageNet prompt templates (as shipped by open_clip), as "{}" format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
# MaskCLIP's prompt set: the 80 ImageNet templates plus five scene templates (85 in all).
MASKCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
FINGERPRINT_PROMPT = "a photo of a fingerprint."

Tokenizer = Callable[[list[str]], Tensor]
ClassNames = Sequence[str | Sequence[str]]  # per class: a name, or its synonyms (first = display name)


class TextTower(Protocol):
    """What class embeddings need of a CLIP model (open_clip's): its text encoder, and its weights' device."""

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@torch.no_grad()
def text_embeddings(
    model: TextTower,
    tokenizer: Tokenizer,
    classes: ClassNames,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 256,
    average: str = "normalised",
) -> Tensor:
    """[C, D] class embeddings: prompt embeddings averaged over templates and synonyms, then normalised.

    ``average="normalised"`` L2-normalises each prompt's embedding before averaging (CLIP's zero-shot
    classifier, MaskCLIP); ``"raw"`` averages the raw embeddings (TCL's ``build_text_embedding``).
    """
    if average not in TEXT_AVERAGES:
        raise ValueError(f"average={average!r} is unknown; valid: {', '.join(TEXT_AVERAGES)}")
    groups = synonym_groups(classes)
    prompts = [template.format(name) for group in groups for name in group for template in templates]
    owners = torch.tensor([c for c, group in enumerate(groups) for _ in range(len(group) * len(templates))])
    device = next(model.parameters()).device
    encoded = torch.cat(
        [
            model.encode_text(
                tokenizer(prompts[i : i + batch_size]).to(device), normalize=average == "normalised"
            ).float()
            for i in range(0, len(prompts), batch_size)
        ]
    )
    sums = encoded.new_zeros(len(groups), encoded.shape[1]).index_add_(0, owners.to(device), encoded)
    return F.normalize(sums, dim=-1)


def cached_text_embeddings(
    model: TextTower,
    tokenizer: Tokenizer,
    classes: ClassNames,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    cache_dir: str | os.PathLike,
    model_name: str,
    pretrained: str | None,
    init_seed: int | None = None,
    average: str = "normalised",
) -> Tensor:
    """``text_embeddings`` through a file cache keyed by model, weights, vocabulary and templates.

    The key holds the model name and pretrained tag, SHA-256 hashes of the synonym groups
    (content and order) and of the templates, and a fingerprint of the text tower (the hash
    of one probe prompt's embedding), so random or retrained weights never share entries.
    A file whose stored key differs from the expected one is recomputed and overwritten. The file
    is named after the model and its weights (`weights_label`; ``init_seed`` names random ones).
    """
    key = text_cache_key(model, tokenizer, classes, templates, model_name, pretrained) | {"average": average}
    digest = _sha256(json.dumps(key, sort_keys=True))
    path = Path(cache_dir) / f"{_slug(model_name)}__{_slug(weights_label(pretrained, init_seed))}__{digest[:16]}.pt"
    device = next(model.parameters()).device
    if path.is_file():
        stored = torch.load(path, map_location=device, weights_only=True)
        if stored.get("key") == key:
            return stored["embeddings"]
    embeddings = text_embeddings(model, tokenizer, classes, templates, average=average)
    with atomic_file(path) as handle:  # a killed run leaves a temporary file remove_temporary_files drops
        torch.save({"key": key, "embeddings": embeddings.cpu()}, handle)
    return embeddings


def text_cache_key(
    model: TextTower,
    tokenizer: Tokenizer,
    classes: ClassNames,
    templates: Sequence[str],
    model_name: str,
    pretrained: str | None,
) -> dict[str, str]:
    """Everything the class embeddings depend on, as strings."""
    return {
        "model_name": model_name,
        "pretrained": str(pretrained),
        "classes_sha256": _sha256(json.dumps([list(g) for g in synonym_groups(classes)])),
        "templates_sha256": _sha256(json.dumps(list(templates))),
        "text_tower_sha256": _text_tower_fingerprint(model, tokenizer),
    }


def weights_label(pretrained: str | None, init_seed: int | None = None) -> str:
    """What cache file names call CLIP's weights: the tag or file, else ``random-seed<N>`` (or ``random``)."""
    if pretrained is not None:
        return pretrained
    return "random" if init_seed is None else f"random-seed{init_seed}"


def synonym_groups(classes: ClassNames) -> list[tuple[str, ...]]:
    """Per class, the tuple of its names (a bare string is a class without synonyms)."""
    groups = [(c,) if isinstance(c, str) else tuple(c) for c in classes]
    if not groups or not all(groups):
        raise ValueError("every class needs at least one name")
    return groups


@torch.no_grad()
def _text_tower_fingerprint(model: TextTower, tokenizer: Tokenizer) -> str:
    """Hash of the text embedding of a fixed probe prompt: changes whenever the text tower does."""
    device = next(model.parameters()).device
    probe = model.encode_text(tokenizer([FINGERPRINT_PROMPT]).to(device)).float().cpu()
    return hashlib.sha256(probe.numpy().tobytes()).hexdigest()


def _sha256(text: str) -> str:
    """Hex SHA-256 of a string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _slug(text: str) -> str:
    """File-name-safe version of a model name or tag."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[-60:]
