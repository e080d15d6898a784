"""The toy world's shipped miniature models and where to find them (training: emerdiff/toy_training.py).

``model.pretrained=toy`` loads `SD_FOLDER`, a diffusers folder of a miniature SD trained on the toy world's
scenes on a CPU; ``ovseg.clip_model=toyworld-clip ovseg.clip_pretrained=toy`` loads `CLIP_FILE`. Neither
is Stable Diffusion or OpenAI's CLIP: they only know the toy world (configs/toy.yaml).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
NAME = "toy"
SD_FOLDER = WEIGHTS / "sd"
CLIP_MODEL = "toyworld-clip"
CLIP_FILE = WEIGHTS / f"{CLIP_MODEL}.safetensors"


def shipped_pipeline(pretrained: str) -> Path | None:
    """The shipped diffusers folder `model.pretrained` names (``toy``), or None for any other value."""
    return SD_FOLDER if pretrained == NAME else None


def shipped_clip(model_name: str, pretrained: str | None) -> Path | None:
    """The shipped weights file of ``toyworld-clip`` when `pretrained` is ``toy``, else None."""
    return CLIP_FILE if (model_name, pretrained) == (CLIP_MODEL, NAME) else None
