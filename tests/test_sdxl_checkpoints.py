"""The miniature SDXL in every checkpoint layout users keep loads offline (issue #25), and so do the shipped
SDXL-family configs' hub ids from a local cache; transformer backbones and the refiner are refused in one line.

The original (LDM / CompVis) single-file layout is written with the inverse of diffusers' own conversion, as
in tests/test_checkpoints.py, plus SDXL's parts: the added embedding (`label_emb`), the first text encoder
under `conditioner.embedders.0.transformer.` and the second in OpenCLIP's layout under
`conditioner.embedders.1.model.` (fused q/k/v `in_proj`, transposed `text_projection`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from emerdiff import WeightsNotFoundError, load_config
from emerdiff.cli import predict
from emerdiff.config import ModelConfig
from emerdiff.models import SDComponents, build_random_sd, load_sd
from test_checkpoints import assert_same_weights, hub_cache, text_to_ldm, unet_to_ldm, vae_to_ldm

OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
SMALL = ["segmentor.resolution=128", "segmentor.num_masks=2", "segmentor.num_inference_steps=5",
         "segmentor.t_modulate=201", "segmentor.memory_budget_gb=0", "model.device=cpu", "model.dtype=float32",
         "model.local_files_only=true", "output.overlay=false", "segmentor.keep_diff_maps=true"]


def open_clip_layout(state: dict, prefix: str) -> dict:
    """CLIPTextModelWithProjection weights -> OpenCLIP's text tower (`prefix` + transformer.resblocks.N...)."""
    out = {prefix + ldm: state[key] for key, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    out[prefix + "text_projection"] = state["text_projection.weight"].T
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for n in layers:
        layer, block = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in OPEN_CLIP.items():
                out[f"{block}{old}.{kind}"] = state[f"{layer}{new}.{kind}"]
    return out


def sdxl_original_layout(c: SDComponents) -> dict:
    state = unet_to_ldm(c.unet.state_dict(), c.unet.config)
    state.update(vae_to_ldm(c.vae.state_dict(), c.vae.config))
    state.update({k.replace("cond_stage_model.", "conditioner.embedders.0."): v
                  for k, v in text_to_ldm(c.text_encoder.state_dict()).items()})
    state.update(open_clip_layout(c.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in state.items()}


def save_sdxl(c: SDComponents, folder: Path) -> Path:
    StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                              tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
                              add_watermarker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl():
    return build_random_sd("tiny_sdxl", seed=3)


@pytest.fixture(scope="module")
def sdxl_folder(sdxl, tmp_path_factory) -> Path:
    return save_sdxl(sdxl, tmp_path_factory.mktemp("diffusers") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_file(sdxl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    save_file(sdxl_original_layout(sdxl), path)
    return path


def model(**kwargs) -> ModelConfig:
    return ModelConfig(**{"device": "cpu", "dtype": "float32", "local_files_only": True, **kwargs})


def test_the_diffusers_folder_loads_offline_with_both_text_encoders_and_the_same_conditioning(sdxl, sdxl_folder,
                                                                                             offline):
    loaded = load_sd(model(pretrained=str(sdxl_folder)))
    assert_same_weights(loaded, sdxl)
    got, want = loaded.encode_prompt(""), sdxl.encode_prompt("")
    torch.testing.assert_close(got.text, want.text)  # the same weights (above); attention kernels may differ
    torch.testing.assert_close(got.pooled, want.pooled)
    assert got.text.shape == (1, 77, 32 + 48) and got.pooled.shape == (1, 48)  # both encoders' states side by side


def test_the_single_safetensors_file_loads_offline_with_a_local_config(sdxl, sdxl_folder, sdxl_file, offline):
    assert_same_weights(load_sd(model(pretrained=str(sdxl_file), config=str(sdxl_folder))), sdxl)


@pytest.mark.parametrize("config_file", ["emerdiff_sdxl", "emerdiff_ssd1b", "emerdiff_sdxl_turbo"])
def test_the_shipped_sdxl_family_hub_ids_resolve_from_a_local_cache_offline(sdxl, sdxl_folder, offline, config_file):
    cfg = load_config(config_file, overrides=["model.local_files_only=true", "model.device=cpu", "model.dtype=float32"])
    hub_cache(offline, cfg.model.pretrained, sdxl_folder)
    loaded = load_sd(OmegaConf.to_object(cfg.model))
    assert loaded.name == cfg.model.pretrained and loaded.is_sdxl
    assert_same_weights(loaded, sdxl)


def test_predict_runs_offline_on_the_folder_and_the_single_file_with_equal_results(sdxl_folder, sdxl_file, tmp_path,
                                                                                   offline):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).resize((96, 80)).save(photos / "astronaut.png")
    runs = {"folder": [f"model.pretrained={sdxl_folder}"],
            "file": [f"model.pretrained={sdxl_file}", f"model.config={sdxl_folder}"]}
    labels = {}
    for name, source in runs.items():
        out = tmp_path / name
        assert predict.main(["--cfg", "emerdiff_sdxl", "--input", str(photos), "--output", str(out), *SMALL,
                             *source]) == 0
        with np.load(out / "astronaut.npz") as arrays:
            labels[name] = arrays["labels"]
    assert labels["folder"].shape == (80, 96) and np.array_equal(labels["folder"], labels["file"])


def test_model_vae_replaces_the_checkpoints_vae(sdxl_folder, offline):
    other = build_random_sd("tiny_sdxl", seed=4)  # e.g. an fp16-fixed VAE of the same architecture
    vae_folder = sdxl_folder.parent / "other-vae"
    other.vae.save_pretrained(vae_folder)
    loaded = load_sd(model(pretrained=str(sdxl_folder), vae=str(vae_folder)))
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), other.vae.state_dict().values()))
    with pytest.raises(WeightsNotFoundError, match=r"model.vae=.*must be a diffusers AutoencoderKL"):
        load_sd(model(pretrained=str(sdxl_folder), vae=str(vae_folder.parent / "missing")))


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_a_transformer_backbone_folder_is_refused_in_one_line_saying_why(tmp_path, pipeline):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                         "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(WeightsNotFoundError, match=rf"{pipeline} pipeline, a transformer \(DiT\) backbone: it has no "
                                                   "UNet") as error:
        load_sd(model(pretrained=str(folder)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("keys,what", [
    (["joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.qkv.weight"], "FLUX"),
    (["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"],
     "Stable Diffusion XL refiner")])
def test_transformer_and_refiner_checkpoint_files_are_refused_naming_what_they_are(tmp_path, keys, what):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    with pytest.raises(WeightsNotFoundError, match=what):
        load_sd(model(pretrained=str(path)))
