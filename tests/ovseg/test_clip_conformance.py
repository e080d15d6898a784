"""Our CLIP equals OpenAI's reference CLIP (the `clip-anytorch` package) built from the same random weights.

Conventions such as the MLP's activation are invisible to invariants: an embedding is an embedding either way.
Only a comparison with the reference implementation, on one shared state dict, shows that our loader builds
the network the weights were trained in. The architecture is a small ViT whose widths are multiples of 64,
because the reference infers one attention head per 64 channels from the weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from ovseg.clip_model import built_with_quick_gelu, load_clip
from ovseg.dense_encoder import MaskCLIPEncoder

clip_reference = pytest.importorskip("clip.model", reason="the reference needs the dev extra (clip-anytorch)")

ARCH = "conformance-vit"
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 64, "patch_size": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # fp32: the two implementations order a few sums differently


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A random CLIP state dict in our architecture, with fp16-exact values (the reference loads in fp16)."""
    folder = tmp_path_factory.mktemp("conformance")
    (folder / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, quick_gelu=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():  # widen the small init so that activations leave GELU's linear range
            tensor = (tensor * (1.0 if "ln" in name else 4.0) + (0.5 * torch.randn_like(tensor) if "bias" in name else 0))
        state[name] = tensor.half().float()
    path = folder / "weights.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def reference(weights_file):
    """OpenAI's CLIP (clip.model.build_model) on the same weights, in fp32."""
    state = torch.load(weights_file, weights_only=True)
    return clip_reference.build_model({k: v.clone() for k, v in state.items()}).float().eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised images at twice the pretraining size and three tokenised prompts."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat.", "grass", "a diagram"])
    return images, tokens


def reference_dense(model, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense features written on the reference model's own modules (sequence-first blocks):
    the last block's attention reduced to its value path, residual and MLP kept, then ln_post and proj."""
    visual = model.visual
    x = visual.conv1(images)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(len(x), 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    x = x.permute(1, 0, 2)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    width = x.shape[-1]
    attention = last.attn
    value = F.linear(last.ln_1(x), attention.in_proj_weight[2 * width:], attention.in_proj_bias[2 * width:])
    x = x + attention.out_proj(value)
    x = x + last.mlp(last.ln_2(x))
    tokens = visual.ln_post(x.permute(1, 0, 2)[:, 1:]) @ visual.proj
    return tokens.transpose(1, 2).reshape(len(images), -1, *grid)


@torch.no_grad()
def test_image_text_and_dense_embeddings_equal_openais_reference_clip(weights_file, reference):
    ours = load_clip(ARCH, str(weights_file), quick_gelu=True)
    images, tokens = inputs()
    torch.testing.assert_close(ours.model.encode_image(images), reference.encode_image(images), **TOLERANCE)
    torch.testing.assert_close(ours.model.encode_text(tokens), reference.encode_text(tokens), **TOLERANCE)
    dense = MaskCLIPEncoder(ours.model.visual).dense_window(images)
    torch.testing.assert_close(dense, reference_dense(reference, images), **TOLERANCE)
    assert ours.quick_gelu and built_with_quick_gelu(ours.model)


@torch.no_grad()
def test_the_comparison_fails_on_a_gelu_build_of_the_same_weights(weights_file, reference):
    """What open_clip built for the 'openai' tag before the fix: the comparison above must catch it."""
    gelu = load_clip(ARCH, str(weights_file), quick_gelu=False)
    images, tokens = inputs()
    assert not built_with_quick_gelu(gelu.model)
    for ours, theirs in ((gelu.model.encode_image(images), reference.encode_image(images)),
                         (gelu.model.encode_text(tokens), reference.encode_text(tokens)),
                         (MaskCLIPEncoder(gelu.model.visual).dense_window(images), reference_dense(reference, images))):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_a_checkpoint_file_whose_activation_is_not_stated_warns_and_names_the_setting(weights_file):
    with pytest.warns(UserWarning, match="ovseg.clip_quick_gelu=true"):
        loaded = load_clip(ARCH, str(weights_file))
    assert not loaded.quick_gelu  # the architecture's config says GELU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_clip(ARCH, str(weights_file), quick_gelu=True).quick_gelu  # stated: no warning


@torch.no_grad()
def test_openais_torchscript_release_format_loads_as_quick_gelu_without_being_told(weights_file, reference, tmp_path):
    """OpenAI released CLIP as TorchScript archives (ViT-B-16.pt); those weights are QuickGELU's."""
    model = open_clip.create_model(ARCH, quick_gelu=True)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    archive = tmp_path / "openai.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(archive))
    loaded = load_clip(ARCH, str(archive))
    images, tokens = inputs()
    assert loaded.quick_gelu
    torch.testing.assert_close(loaded.model.encode_image(images), reference.encode_image(images), **TOLERANCE)
    torch.testing.assert_close(loaded.model.encode_text(tokens), reference.encode_text(tokens), **TOLERANCE)


def test_the_openai_tag_builds_quick_gelu_in_both_towers_from_the_offline_hugging_face_cache(tmp_path, monkeypatch):
    """load_clip("ViT-B-16", "openai") with the weights in the cache and the hub switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    entry = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    model = open_clip.create_model("ViT-B-16", quick_gelu=True)
    state = {name: tensor.half().contiguous() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, str(snapshot / "open_clip_model.safetensors"))
    del model, state
    loaded = load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert loaded.quick_gelu
    for blocks in (loaded.model.visual.transformer.resblocks, loaded.model.transformer.resblocks):
        assert {type(block.mlp.gelu).__name__ for block in blocks} == {"QuickGELU"}
