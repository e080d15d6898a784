"""The `ovseg` section of the configuration: naming masks with dense CLIP, its defaults and rules.

The core (`emerdiff.config`) keeps this section as an opaque mapping, so emerdiff never depends
on ovseg; `ovseg_settings` checks it against `OVSegConfig` with the same strict merge and the
same field rules (`emerdiff.config.setting`) as the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from emerdiff.config import ConfigError, check_rules, merge, section, setting, strict

# ovseg.templates -> its prompt set, named lazily (emerdiff.lazy.resolve) so that this module stays light.
TEMPLATE_SETS: dict[str, str] = {
    "maskclip": "ovseg.text:MASKCLIP_TEMPLATES",
    "imagenet": "ovseg.text:IMAGENET_TEMPLATES",
    "tcl": "ovseg.tcl:TCL_TEMPLATES",
}
TEXT_AVERAGES = ("normalised", "raw")  # prompts' embeddings averaged after / before L2 normalisation
BASELINES = ("cells", "tcl")  # the baseline's decision: per-cell cosine argmax, or TCL's own (PAMR, KP, constant)
BACKGROUNDS = ("prompt", "constant", "ignore")  # what a vocabulary's background class is (docs/open_vocabulary.md)


@dataclass(frozen=True)
class EncoderConventions:
    """A dense encoder: how to build it, and what its reference evaluation does (the ovseg settings left null)."""

    title: str  # the encoder's name in tables and in the paper's rows
    builder: str  # "module:function" building it from a LoadedClip and OVSegConfig (ovseg.labeller.EncoderBuilder)
    templates: str  # its prompt set (TEMPLATE_SETS)
    text_average: str  # how its prompts' embeddings are averaged (TEXT_AVERAGES)
    baseline: str  # its own per-pixel decision (BASELINES)
    background: str  # how its evaluation treats a background class (BACKGROUNDS)


# ovseg.encoder -> the encoder. A third one plugs in here without touching the labeller.
# MaskCLIP: CLIP's zero-shot averaging; its public VOC evaluation is "w/o background" (background pixels not
# scored, no background prompt). TCL: raw prompt average normalised once; a constant background score.
ENCODERS: dict[str, EncoderConventions] = {
    "maskclip": EncoderConventions(
        "MaskCLIP", "ovseg.labeller:maskclip_encoder", "maskclip", "normalised", "cells", "ignore"
    ),
    "tcl": EncoderConventions("TCL", "ovseg.tcl_weights:tcl_encoder", "tcl", "raw", "tcl", "constant"),
}


@dataclass
class OVSegConfig:
    """Open-vocabulary naming of EmerDiff masks with dense CLIP (docs/open_vocabulary.md)."""

    vocab: str | None = None  # shipped name (coco, ade150, ...), a .txt file, or "cat,dog,grass"
    clip_model: str = "ViT-B-16"  # open_clip architecture; ovseg-tiny = tiny test model
    clip_pretrained: str | None = "openai"  # open_clip tag or checkpoint file; null = random weights
    clip_quick_gelu: bool | None = None  # activation of the CLIP weights; null = from the tag or file (see docs)
    clip_init_seed: int = 0  # seed of the random weights when clip_pretrained is null
    clip_cache_dir: str | None = setting(None, run_only=True)  # where open_clip looks for weights
    encoder: str = setting("maskclip", choices=tuple(ENCODERS))  # dense encoder: maskclip or tcl (ovseg/tcl.py)
    tcl_checkpoint: str | None = setting(None, before=None)  # TCL's tcl.pth; null = random masker (random CLIP only)
    window: int | None = setting(None, minimum=1)  # sliding-window size in pixels; null = the model's input size
    window_stride: int | None = setting(None, minimum=1)  # window step in pixels; null = half a window
    keep_residual: bool = True  # MaskCLIP's last block keeps residual + MLP; false = bare value path
    # prompt set: maskclip (85 prompts), imagenet (80), tcl (9); null = the encoder's
    templates: str | None = setting(None, choices=tuple(TEMPLATE_SETS))
    baseline: str | None = setting(None, choices=BASELINES, before="cells")  # the baseline row; null = encoder's own
    background: str | None = setting(None, choices=BACKGROUNDS, before="prompt")  # background; null = the encoder's
    background_threshold: float | None = None  # background=prompt: masks below this cosine become background
    tcl_pamr: bool = setting(True, before=True)  # baseline=tcl: PAMR refinement of TCL's masks (TCL's evaluation: on)
    tcl_kp_weight: float = setting(0.3, minimum=0.0, before=0.3)  # baseline=tcl: weight of TCL's KP branch
    # background=constant: the background's score; null = 0.4 with PAMR, else 0.5
    tcl_background_score: float | None = setting(None, before=None)
    text_cache_dir: str | None = setting(None, run_only=True)  # class text embeddings cache
    paper_miou: dict[str, float] = setting(factory=dict, run_only=True)  # method -> paper's mIoU
    paper_reference: dict[str, float] = setting(factory=dict, run_only=True)  # paper rows we do not run -> mIoU
    paper_note: str | None = setting(None, run_only=True)  # context printed under the results table


def ovseg_section(cfg: DictConfig) -> DictConfig:
    """`cfg.ovseg` merged onto the OVSegConfig defaults, checked (unknown keys and bad values name `ovseg.KEY`),
    and with the settings left null set to the encoder's conventions (`ENCODERS`)."""
    section = merge(strict(OVSegConfig), cfg.get("ovseg") or {}, "the 'ovseg' section", prefix="ovseg.")
    check_rules(section, "ovseg.")
    conventions = ENCODERS[section.encoder]
    for key in ("templates", "baseline", "background"):
        if section[key] is None:
            section[key] = getattr(conventions, key)
    check_encoder_choices(section)
    return section


def check_encoder_choices(section: DictConfig | OVSegConfig) -> None:
    """Refuse what only TCL can do (its decision, its constant background) with another encoder, and a threshold
    outside background=prompt."""
    needs_tcl = [
        key
        for key, used in (
            ("ovseg.baseline=tcl", section.baseline == "tcl"),
            ("ovseg.background=constant", section.background == "constant"),
        )
        if used
    ]
    if section.encoder != "tcl" and needs_tcl:
        raise ConfigError(
            f"{needs_tcl[0]} needs TCL's grounding masks: set ovseg.encoder=tcl, or leave it null for "
            f"ovseg.encoder={section.encoder}'s own"
        )
    if section.background_threshold is not None and section.background != "prompt":
        raise ConfigError(
            f"ovseg.background_threshold applies to ovseg.background=prompt (background named by its "
            f"prompts), not {section.background}: set ovseg.background=prompt or drop the threshold"
        )


def ovseg_settings(cfg: DictConfig) -> OVSegConfig:
    """The checked `ovseg` section as its dataclass."""
    return section(ovseg_section(cfg), OVSegConfig)


def with_ovseg_defaults(cfg: DictConfig) -> DictConfig:
    """`cfg` with its `ovseg` section completed by the defaults and checked (what the tools resolve and save)."""
    cfg.ovseg = OmegaConf.to_container(ovseg_section(cfg))
    return cfg
