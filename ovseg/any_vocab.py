"""Naming masks from any vocabulary a visitor types, on one loaded CLIP (the browser demo's naming).

>>> naming = AnyVocabulary(ovseg_settings(cfg), workdir, device)   # CLIP loads once
>>> named = naming("cat, dog, grass")(image, output)               # a MaskNamer: NamedMasks of the image

The text is a shipped vocabulary's name (coco, ade150, ...) or a comma-separated list of class names,
never a file path: a web page must not read the server's files.
"""

from __future__ import annotations

import functools
import os

import torch

from .config import OVSegConfig
from .labeller import VocabularyLabellers, text_cache_folder
from .outputs import MaskNamer
from .vocab import SHIPPED_VOCABS, read_vocabulary

KEEP_VOCABULARIES = 8  # vocabularies whose labellers (text embeddings) stay in memory


class AnyVocabulary:
    """CLIP loaded once as `settings` say; for each vocabulary text, the `MaskNamer` that names masks from it.

    Text embeddings are cached on disk (`ovseg.text_cache_dir`, else WORKDIR/text_embeddings), the last
    `keep` vocabularies' namers in memory.
    """

    def __init__(
        self,
        settings: OVSegConfig,
        workdir: str | os.PathLike,
        device: str | torch.device = "cpu",
        keep: int = KEEP_VOCABULARIES,
    ) -> None:
        self.labellers = VocabularyLabellers(settings, text_cache_folder(settings, workdir), device)
        self.namer = functools.lru_cache(maxsize=keep)(self.build)

    def __call__(self, text: str) -> MaskNamer:
        """The namer of `text` (spaces around the names do not count); a ValueError for an invalid vocabulary."""
        return self.namer(",".join(part.strip() for part in text.split(",")))

    def build(self, spec: str) -> MaskNamer:
        """A namer for a shipped vocabulary's name or a comma-separated list of names."""
        vocab = read_vocabulary(spec) if spec in SHIPPED_VOCABS else read_vocabulary(spec.split(","))
        return MaskNamer(self.labellers.labeller(vocab), vocab.names)
