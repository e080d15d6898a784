"""TCL's released weights: reading its checkpoint strictly, a random masker for tests, and the ovseg encoder builder.

The checkpoint's key names are TCL's module tree's (``masker.*``), which `ovseg.tcl.TCLMasker` reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from .tcl import TCL_WINDOW, TanhGate, TCLEncoder, TCLMasker

TCL_CHECKPOINT_URL = "https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth"
TCL_REPOSITORY = "https://github.com/kakaobrain/tcl"


def read_tcl_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ``masker.*`` tensors of a TCL checkpoint (``{"model": state_dict, ...}`` as TCL saves, or a bare state dict).

    Frozen CLIP copies (``clip_image_encoder.*``, ``clip_text_encoder.*``), which TCL's own loader
    allows to be absent, are dropped: the frozen CLIP comes from open_clip; so are PAMR's fixed shift
    kernels (``pamr.*``, present if a checkpoint was saved after an evaluation with PAMR). Any other
    key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint_help(f"ovseg.tcl_checkpoint={str(path)!r} is not a file."))
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled non-tensor objects (e.g. the training config) are refused
        raise RuntimeError(
            f"Could not read {path} with torch.load(weights_only=True) ({error.__class__.__name__}). If it is the "
            "TCL release, it may hold pickled training objects; extract its weights once on a trusted machine: "
            f"python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'model': c['model']}}, '{path.with_suffix('.weights.pth')}')\" and pass that file."
        ) from error
    state = stored.get("model", stored) if isinstance(stored, dict) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no TCL state dict (expected {{'model': {{'masker.…': tensor, …}}}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    known = ("masker.", "clip_image_encoder.", "clip_text_encoder.", "pamr.")
    other = sorted(k for k in state if not k.startswith(known))
    if other:
        raise ValueError(f"{path} has keys that are not TCL's (masker.*, clip_*_encoder.*, pamr.*): {other[:5]}")
    masker = {k.removeprefix("masker."): v for k, v in state.items() if k.startswith("masker.")}
    if not masker:
        raise ValueError(f"{path} has no masker.* weights: not a TCL checkpoint")
    return masker


def checkpoint_freeze(masker_state: Mapping[str, Tensor]) -> int:
    """TCL's ie_freeze read off a masker state dict: the first CLIP block index the masker holds."""
    prefix = "image_encoder.backbone.transformer.resblocks."
    indices = {int(k[len(prefix) :].split(".")[0]) for k in masker_state if k.startswith(prefix)}
    if not indices:
        raise ValueError("the TCL checkpoint has no masker backbone blocks (masker.image_encoder.backbone.…)")
    return min(indices)


def load_tcl_masker(visual: VisionTransformer, masker_state: Mapping[str, Tensor]) -> TCLMasker:
    """A TCLMasker for ``visual`` with ``masker_state`` loaded strictly (missing / unexpected / misshapen keys fail)."""
    masker = TCLMasker(visual, checkpoint_freeze(masker_state))
    expected = {k: tuple(v.shape) for k, v in masker.state_dict().items()}
    wrong = [
        f"{k}: {tuple(v.shape)} vs {expected[k]}"
        for k, v in masker_state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if wrong:
        raise ValueError(
            f"TCL checkpoint shapes do not fit this CLIP ({visual.output_dim}-d, "
            f"width {visual.conv1.out_channels}): {wrong[:4]}"
        )
    dtype = visual.conv1.weight.dtype
    masker.load_state_dict({k: v.to(dtype) for k, v in masker_state.items()}, strict=True)
    return masker.to(visual.conv1.weight.device)


def random_tcl_masker(visual: VisionTransformer, freeze: int | None = None, seed: int = 0) -> TCLMasker:
    """A masker with random weights for the miniature TCL (tests, offline tools): TCL's initialisation
    (copies of CLIP's last blocks, ln_post and proj; sim2mask w=10, b=-2.5), except that the decoder's
    gates, zero at TCL's start (decoder = upsampling only), are random so the decoder takes part."""
    freeze = len(visual.transformer.resblocks) - 1 if freeze is None else freeze
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        masker = TCLMasker(visual, freeze)
        for module in masker.modules():
            if isinstance(module, TanhGate):
                nn.init.uniform_(module.gate, 0.3, 1.0)
    return masker.to(visual.conv1.weight.device, visual.conv1.weight.dtype)


def missing_checkpoint_help(reason: str) -> str:
    """Where TCL's weights come from."""
    return (
        f"{reason} TCL needs its released checkpoint (the trained masker): download "
        f"{TCL_CHECKPOINT_URL} (the official release of {TCL_REPOSITORY}, README 'Evaluation') and pass "
        "ovseg.tcl_checkpoint=/path/to/tcl.pth, with the OpenAI CLIP ViT-B/16 weights for the frozen encoder "
        "(ovseg.clip_model=ViT-B-16 ovseg.clip_pretrained=openai). The miniature random TCL (tests) needs "
        "random CLIP weights too: ovseg.clip_pretrained=null (configs/tiny.yaml)."
    )


def tcl_encoder(clip, settings) -> TCLEncoder:
    """The `tcl` encoder's builder (ovseg.config.ENCODERS): the frozen CLIP image tower of ``clip`` + TCL's masker
    from ``settings.tcl_checkpoint``.

    Without a checkpoint, the random CLIP of ``ovseg.clip_pretrained: null`` gets a random masker
    (seed ``ovseg.clip_init_seed``); real CLIP weights without a checkpoint are an error saying where
    to get it. ``ovseg.window`` / ``window_stride`` default to TCL's 448 / half a window.
    """
    if not settings.keep_residual:
        raise ValueError(
            "ovseg.keep_residual=false is MaskCLIP's variant; TCL's masker was trained with the residual "
            "and MLP of its last block kept (leave ovseg.keep_residual: true with ovseg.encoder=tcl)"
        )
    path = settings.tcl_checkpoint
    visual = clip.model.visual
    if path:
        masker = load_tcl_masker(visual, read_tcl_checkpoint(path))
    elif clip.pretrained is None:
        masker = random_tcl_masker(visual, seed=settings.clip_init_seed)
    else:
        raise FileNotFoundError(missing_checkpoint_help("ovseg.encoder=tcl needs ovseg.tcl_checkpoint."))
    return TCLEncoder(visual, masker, settings.window or TCL_WINDOW, settings.window_stride).eval()
