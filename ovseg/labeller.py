"""The open-vocabulary step for one image: dense CLIP embeddings, then name each mask and compute the baseline.

>>> labeller = build_labeller(OVSegConfig(vocab="voc"), read_vocabulary("voc"), cache_dir="text_cache")
>>> named = labeller(image, segments)  # image [H, W, 3] uint8; segments [H, W] mask ids (e.g. EmerDiff's labels)
>>> named.label_map, named.baseline   # [H, W] vocabulary ids: masks named / plain MaskCLIP
>>> named.class_ids, named.scores      # [K] each mask's class and cosine (a MaskLabels, as label_masks gives)

The image is resized (not padded) so that each side is the nearest multiple of the patch size:
the embedding grid then covers exactly the image's extent, which is what `label_masks` and
`maskclip_labels` assume, at a distortion below half a patch per side.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emerdiff.lazy import resolve

from .clip_model import LoadedClip, load_clip
from .config import ENCODERS, TEMPLATE_SETS, OVSegConfig
from .dense_encoder import DenseEncoder, MaskCLIPEncoder
from .naming import MaskLabels, label_masks, maskclip_labels
from .tcl import TCL_WINDOW, TCLEncoder, tcl_background_score, tcl_labels
from .text import cached_text_embeddings
from .vocab import Vocabulary

EncoderBuilder = Callable[[LoadedClip, OVSegConfig], DenseEncoder]


@dataclass(frozen=True)
class OpenVocabOutput(MaskLabels):
    """One image's masks named from the vocabulary (the labeller's MaskLabels, on the CPU) and the baseline's
    per-pixel decision beside them."""

    baseline: Tensor  # [H, W] int64 vocabulary ids of the baseline (plain MaskCLIP, or TCL's own decision)


@dataclass(frozen=True)
class NamingRules:
    """How masks and the baseline are named: background handling and the baseline's decision (`ovseg.config`)."""

    background_id: int | None = None  # the vocabulary's background class, if any
    background: str = "prompt"  # prompt: a class like any other; constant: TCL's constant score; ignore: never named
    threshold: float | None = None  # background=prompt: masks and pixels below this cosine become background
    baseline: str = "cells"  # cells: per-cell cosine argmax, upsampled; tcl: TCL's decision (PAMR, KP, constant)
    pamr: bool = True  # baseline=tcl: PAMR refinement
    kp_weight: float = 0.3  # baseline=tcl: weight of the KP branch
    background_score: float | None = None  # background=constant: TCL's constant; None = TCL's for the PAMR setting

    @classmethod
    def from_settings(cls, settings: OVSegConfig, background_id: int | None) -> NamingRules:
        """The rules of ovseg settings for a vocabulary; settings left null follow the encoder's conventions."""
        conventions = ENCODERS[settings.encoder]
        return cls(
            background_id,
            settings.background or conventions.background,
            settings.background_threshold,
            settings.baseline or conventions.baseline,
            settings.tcl_pamr,
            settings.tcl_kp_weight,
            settings.tcl_background_score,
        )

    @property
    def ignored(self) -> int | None:
        """The class whose ground-truth pixels are not scored: a background that is never named (background=ignore)."""
        return self.background_id if self.background == "ignore" else None

    @property
    def excluded(self) -> int | None:
        """The class similarity never picks: a background not named by its prompts."""
        return self.background_id if self.background != "prompt" else None

    def mask_threshold(self, encoder: DenseEncoder) -> float | None:
        """The cosine below which a mask is background: the prompt threshold, or TCL's constant (no PAMR) as a
        cosine."""
        if self.background_id is None or self.background == "ignore":
            return None
        if self.background == "prompt":
            return self.threshold
        score = tcl_background_score(pamr=False) if self.background_score is None else self.background_score
        return _tcl(encoder).cosine_threshold(score)

    def tcl_score(self) -> float | None:
        """The constant TCL's decision gives the background class: TCL's, -inf when ignored, None when prompted."""
        if self.background_id is None or self.background == "prompt":
            return None
        if self.background == "ignore":
            return float("-inf")
        return tcl_background_score(self.pamr) if self.background_score is None else self.background_score


def _tcl(encoder: DenseEncoder) -> TCLEncoder:
    """The encoder as TCL's, for what only TCL's grounding masks can do."""
    if not isinstance(encoder, TCLEncoder):
        raise ValueError("TCL's decision and its constant background need ovseg.encoder=tcl")
    return encoder


def template_set(name: str) -> tuple[str, ...]:
    """The prompt templates called `name` (`ovseg.config.TEMPLATE_SETS`); a ValueError lists the valid names."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"ovseg.templates={name!r} is unknown; valid: {', '.join(TEMPLATE_SETS)}")
    return resolve(TEMPLATE_SETS[name])


def maskclip_encoder(clip: LoadedClip, settings: OVSegConfig) -> MaskCLIPEncoder:
    """MaskCLIP's dense embeddings from the CLIP image tower, with the window and residual settings."""
    return MaskCLIPEncoder(clip.model.visual, settings.window, settings.window_stride, settings.keep_residual)


def encoder_builder(name: str) -> EncoderBuilder:
    """The builder of dense encoder `name` (`ovseg.config.ENCODERS`): an nn.Module satisfying DenseEncoder, in the
    joint space of the CLIP text tower; a ValueError lists the valid names."""
    if name not in ENCODERS:
        raise ValueError(f"ovseg.encoder={name!r} is unknown; valid: {', '.join(ENCODERS)}")
    return resolve(ENCODERS[name].builder)


def patch_multiple(size: int, stride: int) -> int:
    """The multiple of `stride` nearest to `size` (at least one patch)."""
    return max(stride, int(round(size / stride)) * stride)


def check_threshold(background_id: int | None, threshold: float | None) -> None:
    """A background threshold needs a background class to give low-scoring masks."""
    if threshold is not None and background_id is None:
        raise ValueError("ovseg.background_threshold needs a vocabulary with a class named 'background'")


class OpenVocabLabeller(nn.Module):
    """Names the segments of an image with the classes whose text embeddings are closest (docs/open_vocabulary.md)."""

    text: Tensor  # [C, D] L2-normalised class embeddings, a buffer (moves with the module)

    def __init__(self, encoder: DenseEncoder, text: Tensor, rules: NamingRules = NamingRules()) -> None:
        super().__init__()
        check_threshold(rules.background_id, rules.threshold)
        if rules.baseline == "tcl" or (rules.background == "constant" and rules.background_id is not None):
            _tcl(encoder)
        self.encoder = encoder
        self.register_buffer("text", text.float(), persistent=False)  # [C, D] L2-normalised class embeddings
        self.rules = rules

    @torch.no_grad()
    def forward(
        self, image: np.ndarray | Tensor, segments: np.ndarray | Tensor, num_masks: int | None = None
    ) -> OpenVocabOutput:
        """Name the segments ([H, W] ids below `num_masks`) of an [H, W, 3] uint8 image; compute the baseline too."""
        segments = torch.as_tensor(segments, device=self.text.device).long()
        if tuple(segments.shape) != tuple(image.shape[:2]):
            raise ValueError(f"segments {tuple(segments.shape)} and image {tuple(image.shape[:2])} differ in size")
        rules = self.rules
        dense = self.dense_embeddings(image)  # [D, h, w]
        named = label_masks(
            dense,
            segments,
            self.text,
            num_masks=num_masks,
            background_id=rules.background_id,
            threshold=rules.mask_threshold(self.encoder),
            exclude=rules.excluded,
        )
        if rules.baseline == "tcl":
            baseline = self.tcl_decision(image)
        else:
            baseline = maskclip_labels(
                dense,
                self.text,
                (segments.shape[0], segments.shape[1]),
                background_id=rules.background_id,
                threshold=rules.mask_threshold(self.encoder),
                exclude=rules.excluded,
            )
        return OpenVocabOutput(
            class_ids=named.class_ids.cpu(),
            scores=named.scores.cpu(),
            label_map=named.label_map.cpu(),
            mask_embeddings=named.mask_embeddings.cpu(),
            baseline=baseline.cpu(),
        )

    def dense_embeddings(self, image: np.ndarray | Tensor) -> Tensor:
        """[D, h, w] dense embeddings of an [H, W, 3] uint8 image resized to multiples of the patch size."""
        size = tuple(patch_multiple(s, self.encoder.stride) for s in image.shape[:2])
        return self.encoder(self.normalised(image, size))[0]

    def tcl_decision(self, image: np.ndarray | Tensor) -> Tensor:
        """[H, W] TCL's own decision, as its evaluation makes it: shorter side at TCL's 448, slide windows, PAMR,
        KP branch, the background constant, scores resized to the image (mmseg's slide mode)."""
        rules, (height, width) = self.rules, image.shape[:2]
        scale = TCL_WINDOW / min(height, width)
        size = tuple(patch_multiple(round(s * scale), self.encoder.stride) for s in (height, width))
        return tcl_labels(
            _tcl(self.encoder),
            self.normalised(image, size),
            self.text,
            background_id=rules.background_id,
            background_score=rules.tcl_score(),
            pamr=rules.pamr,
            kp_weight=rules.kp_weight,
            size=(height, width),
        )[0]

    def normalised(self, image: np.ndarray | Tensor, size: tuple[int, ...]) -> Tensor:
        """[1, 3, *size] the uint8 image resized (bicubic, antialiased) and normalised with the encoder's statistics."""
        pixels = torch.as_tensor(image, device=self.text.device).permute(2, 0, 1)[None].float() / 255
        if tuple(size) != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(
                0, 1
            )
        mean = pixels.new_tensor(self.encoder.mean)[:, None, None]
        std = pixels.new_tensor(self.encoder.std)[:, None, None]
        return (pixels - mean) / std


def check_settings(settings: OVSegConfig, vocab: Vocabulary) -> None:
    """Refuse unknown templates or encoder, or a threshold without a background class, before anything loads."""
    check_threshold(vocab.background, settings.background_threshold)
    template_set(settings.templates or ENCODERS[settings.encoder].templates)
    encoder_builder(settings.encoder)


def text_cache_folder(settings: OVSegConfig, results_dir: str | os.PathLike) -> Path:
    """Where class text embeddings are cached: ovseg.text_cache_dir, or RESULTS/text_embeddings."""
    return Path(settings.text_cache_dir) if settings.text_cache_dir else Path(results_dir) / "text_embeddings"


class VocabularyLabellers:
    """CLIP loaded once as `settings` say, and a labeller on it for any vocabulary (text embeddings cached on disk)."""

    def __init__(self, settings: OVSegConfig, cache_dir: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.settings, self.cache_dir, self.device = settings, cache_dir, device
        conventions = ENCODERS[settings.encoder]
        self.templates = template_set(settings.templates or conventions.templates)
        self.text_average = conventions.text_average
        build_encoder = encoder_builder(settings.encoder)
        with torch.random.fork_rng(devices=[]):  # random weights (tests) are the same on every rank and run
            torch.manual_seed(settings.clip_init_seed)
            self.clip = load_clip(
                settings.clip_model, settings.clip_pretrained, device, settings.clip_cache_dir, settings.clip_quick_gelu
            )
        self.encoder = build_encoder(self.clip, settings)

    def labeller(self, vocab: Vocabulary) -> OpenVocabLabeller:
        """The labeller of `vocab`: its class texts embedded once (or read from the cache), the shared image encoder."""
        settings, clip = self.settings, self.clip
        check_threshold(vocab.background, settings.background_threshold)
        text = cached_text_embeddings(
            clip.model,
            clip.tokenizer,
            vocab.synonyms,
            self.templates,
            cache_dir=self.cache_dir,
            model_name=clip.model_name,
            pretrained=clip.pretrained,
            init_seed=settings.clip_init_seed,
            average=self.text_average,
        )
        labeller = OpenVocabLabeller(self.encoder, text, NamingRules.from_settings(settings, vocab.background))
        return labeller.to(self.device).eval()


def build_labeller(
    settings: OVSegConfig, vocab: Vocabulary, cache_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> OpenVocabLabeller:
    """Load CLIP as `settings` say, embed the vocabulary once (cached on disk), keep only the dense image encoder."""
    check_threshold(vocab.background, settings.background_threshold)  # before the slow part
    return VocabularyLabellers(settings, cache_dir, device).labeller(vocab)
