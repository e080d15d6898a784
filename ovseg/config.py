"""The `ovseg` section of the configuration: naming masks with dense CLIP, its defaults and rules.

The core (`emerdiff.config`) keeps this section as an opaque mapping, so emerdiff never depends
on ovseg; `ovseg_settings` checks it against `OVSegConfig` with the same strict merge and the
same field rules (`emerdiff.config.setting`) as the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf

from emerdiff.config import check_rules, merge, setting, strict

ENCODER_NAMES = ("maskclip", "tcl")  # ovseg.encoder (built by ovseg.pipeline.ENCODERS)
TEMPLATE_NAMES = ("maskclip", "imagenet", "tcl")  # ovseg.templates (ovseg.pipeline.TEMPLATE_SETS)


@dataclass
class OVSegConfig:
    """Open-vocabulary naming of EmerDiff masks with dense CLIP (docs/open_vocabulary.md)."""

    vocab: Optional[str] = None  # shipped name (coco, ade150, ...), a .txt file, or "cat,dog,grass"
    clip_model: str = "ViT-B-16"  # open_clip architecture; ovseg-tiny = tiny test model
    clip_pretrained: Optional[str] = "openai"  # open_clip tag or checkpoint file; null = random weights
    clip_init_seed: int = 0  # seed of the random weights when clip_pretrained is null
    clip_cache_dir: Optional[str] = setting(None, run_only=True)  # where open_clip looks for weights
    encoder: str = setting("maskclip", choices=ENCODER_NAMES)  # dense encoder: maskclip or tcl (ovseg/tcl.py)
    tcl_checkpoint: Optional[str] = setting(None, before=None)  # TCL's tcl.pth; null = random masker (random CLIP only)
    window: Optional[int] = setting(None, minimum=1)  # sliding-window size in pixels; null = the model's input size
    window_stride: Optional[int] = setting(None, minimum=1)  # window step in pixels; null = half a window
    keep_residual: bool = True  # MaskCLIP's last block keeps residual + MLP; false = bare value path
    templates: str = setting("maskclip", choices=TEMPLATE_NAMES)  # prompts: maskclip (85), imagenet (80), tcl (9)
    background_threshold: Optional[float] = None  # masks below this cosine become background; null = off
    text_cache_dir: Optional[str] = setting(None, run_only=True)  # class text embeddings cache
    paper_miou: Dict[str, float] = setting(factory=dict, run_only=True)  # method -> paper's mIoU
    paper_reference: Dict[str, float] = setting(factory=dict, run_only=True)  # paper rows we do not run -> mIoU
    paper_note: Optional[str] = setting(None, run_only=True)  # context printed under the results table


def ovseg_section(cfg: DictConfig) -> DictConfig:
    """`cfg.ovseg` merged onto the OVSegConfig defaults and checked: unknown keys and bad values name `ovseg.KEY`."""
    section = merge(strict(OVSegConfig), cfg.get("ovseg") or {}, "the 'ovseg' section", prefix="ovseg.")
    check_rules(section, "ovseg.")
    return section


def ovseg_settings(cfg: DictConfig) -> OVSegConfig:
    """The checked `ovseg` section as its dataclass."""
    return OmegaConf.to_object(ovseg_section(cfg))


def with_ovseg_defaults(cfg: DictConfig) -> DictConfig:
    """`cfg` with its `ovseg` section completed by the defaults and checked (what the tools resolve and save)."""
    cfg.ovseg = OmegaConf.to_container(ovseg_section(cfg))
    return cfg
