"""Every checkpoint format users keep loads offline (issue #12): diffusers folders, an fp16 variant,
single files in the original LDM/CompVis layout (.safetensors, .ckpt), hub ids from a local
Hugging Face cache; and each way loading can fail says what is wrong and how to fix it.

The miniature model is written in each format here. The original layout is written with the
inverse of diffusers' own conversion (its documented key names, `DIFFUSERS_TO_LDM_MAPPING` and the
block numbering of `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`); the first test
checks that diffusers' conversion maps it back onto exactly the miniature model's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from omegaconf import OmegaConf
from safetensors.torch import save_file

from emerdiff import WeightsNotFoundError, load_config
from emerdiff.config import ModelConfig
from emerdiff.models import SDComponents, build_random_sd, load_sd

REPO = Path(__file__).resolve().parents[1]
SD_CONFIGS = {  # shipped config -> (hub id it names, prediction type of that model)
    "emerdiff_sd14.yaml": "epsilon", "emerdiff_sd15.yaml": "epsilon",
    "emerdiff_sd21.yaml": "epsilon", "emerdiff_sd21_768.yaml": "v_prediction",
}

RAMP = np.linspace(0, 0.4, 64, dtype=np.float32)[:, None, None]  # a plain picture with some structure

# --- writing the miniature model in the original (LDM / CompVis) layout --------------------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(rest: str, table: dict) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _remap(state: dict, top: dict, blocks: dict) -> dict:
    """Keys in `top` map one to one; the others by their block prefix, then by the block's renaming table."""
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        prefix = next(p for p in blocks if key.startswith(p))
        ldm, table, indexed = blocks[prefix]
        rest = key[len(prefix):]
        if indexed:  # "J.conv_shortcut.weight": the resnet index stays, the name after it is renamed
            index, _, tail = rest.partition(".")
            rest = f"{index}.{_renamed(tail, table)}"
        else:
            rest = _renamed(rest, table)
        if table is VAE_ATTENTION and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention is 1x1 convolutions
        out[ldm + rest] = value
    return out


def unet_to_ldm(state: dict, config) -> dict:
    """UNet2DConditionModel weights -> `model.diffusion_model.*` (input/middle/output blocks)."""
    per, n = config["layers_per_block"], len(config["down_block_types"])
    blocks = {}
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", RESNET, False)
            blocks[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", {}, False)
        blocks[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{1 + i * (per + 1) + per}.0.op.", {}, False)
        upsampler = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1  # after the attention, if any
        for j in range(per + 1):
            blocks[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * (per + 1) + j}.0.", RESNET, False)
            blocks[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{i * (per + 1) + j}.1.", {}, False)
        blocks[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{i * (per + 1) + per}.{upsampler}.conv.", {},
                                                       False)
    blocks.update({"mid_block.resnets.0.": ("middle_block.0.", RESNET, False),
                   "mid_block.attentions.0.": ("middle_block.1.", {}, False),
                   "mid_block.resnets.1.": ("middle_block.2.", RESNET, False)})
    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type"):  # SDXL's pooled-text and time-id embedding: label_emb
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    out = _remap(state, top, blocks)
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(state: dict, config) -> dict:
    """AutoencoderKL weights -> `first_stage_model.*` (encoder.down.i.block.j, decoder.up counted backwards)."""
    n = len(config["down_block_types"])
    blocks = {}
    for i in range(n):
        blocks[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", VAE_RESNET, True)
        blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {}, False)
        blocks[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{n - 1 - i}.block.", VAE_RESNET, True)
        blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{n - 1 - i}.upsample.conv.", {}, False)
    for part in ("encoder", "decoder"):
        for r in (0, 1):
            blocks[f"{part}.mid_block.resnets.{r}."] = (f"{part}.mid.block_{r + 1}.", VAE_RESNET, False)
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION, False)
    out = _remap(state, DIFFUSERS_TO_LDM_MAPPING["vae"], blocks)
    return {"first_stage_model." + k: v for k, v in out.items()}


def text_to_ldm(state: dict) -> dict:
    """CLIPTextModel weights -> `cond_stage_model.transformer.text_model.*` (SD 1.x; newer transformers flatten it)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def original_layout(c: SDComponents) -> dict:
    state = unet_to_ldm(c.unet.state_dict(), c.unet.config)
    state.update(vae_to_ldm(c.vae.state_dict(), c.vae.config))
    state.update(text_to_ldm(c.text_encoder.state_dict()))
    return {k: v.contiguous() for k, v in state.items()}


# --- fixtures: the miniature model in every format -------------------------------------------------------

def save_pipeline(c: SDComponents, folder: Path, **kwargs) -> Path:
    StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                            scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return build_random_sd("tiny", seed=3)


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory) -> Path:
    """The miniature model as a diffusers folder (float32 files and an fp16 variant)."""
    root = save_pipeline(tiny, tmp_path_factory.mktemp("diffusers") / "tiny-sd")
    half = build_random_sd("tiny", seed=3)
    for module in (half.unet, half.vae, half.text_encoder):
        module.to(torch.float16)
    save_pipeline(half, root, variant="fp16")
    return root


@pytest.fixture(scope="module")
def single_files(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    state = original_layout(tiny)
    save_file(state, root / "tiny-sd.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, root / "tiny-sd.ckpt")  # as the CompVis training saves it
    return {".safetensors": root / "tiny-sd.safetensors", ".ckpt": root / "tiny-sd.ckpt"}


def hub_cache(root: Path, repo: str, folder: Path, commit: str = "0" * 40, **scheduler) -> Path:
    """`folder` placed in a Hugging Face cache as `repo` (models--org--name/refs/main -> snapshots/<commit>)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    if scheduler:
        path = snapshot / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return root


def assert_same_weights(loaded: SDComponents, expected: SDComponents) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(expected, name) is None:
            continue
        got, want = getattr(loaded, name).state_dict(), getattr(expected, name).state_dict()
        assert got.keys() == want.keys(), name
        different = [k for k in want if not torch.equal(got[k].to(want[k].dtype), want[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def model(**kwargs) -> ModelConfig:
    return ModelConfig(**{"device": "cpu", "dtype": "float32", "local_files_only": True, **kwargs})


# --- formats that load ----------------------------------------------------------------------------------

def test_original_layout_writer_is_exactly_what_diffusers_converts_back(tiny):
    state = original_layout(tiny)
    unet = convert_ldm_unet_checkpoint(state, tiny.unet.config)
    vae = convert_ldm_vae_checkpoint(state, tiny.vae.config)
    for converted, module in ((unet, tiny.unet), (vae, tiny.vae)):
        want = module.state_dict()
        assert converted.keys() == want.keys()
        assert all(converted[k].shape == want[k].shape and torch.equal(converted[k], want[k]) for k in want)
    # and it is the SD 1.x layout diffusers recognises (the key it checks for v1 checkpoints is there)
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state


def test_diffusers_folder_loads_offline_with_its_weights_and_scheduler(tiny, folder, offline):
    loaded = load_sd(model(pretrained=str(folder)))
    assert_same_weights(loaded, tiny)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.tokenizer("a photo").input_ids == tiny.tokenizer("a photo").input_ids


def test_fp16_variant_loads_the_fp16_files_of_the_folder(tiny, folder, offline):
    loaded = load_sd(model(pretrained=str(folder), variant="fp16"))
    weight = loaded.unet.conv_in.weight
    assert weight.dtype == torch.float32  # upcast to model.dtype
    assert torch.equal(weight, tiny.unet.conv_in.weight.half().float())  # read from the fp16 files...
    assert not torch.equal(weight, tiny.unet.conv_in.weight)  # ... not from the float32 ones


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_in_the_original_layout_loads_offline_with_a_local_config(tiny, folder, single_files, offline,
                                                                             suffix):
    loaded = load_sd(model(pretrained=str(single_files[suffix]), config=str(folder)))
    assert_same_weights(loaded, tiny)
    assert loaded.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("config_file", sorted(SD_CONFIGS))
def test_shipped_hub_ids_resolve_from_a_local_cache_offline(tiny, folder, offline, config_file):
    cfg = load_config(REPO / "configs" / config_file, overrides=["model.local_files_only=true", "model.device=cpu",
                                                                  "model.dtype=float32"])
    prediction = SD_CONFIGS[config_file]
    hub_cache(offline, cfg.model.pretrained, folder, prediction_type=prediction)
    loaded = load_sd(OmegaConf.to_object(cfg.model))
    assert loaded.name == cfg.model.pretrained
    assert loaded.scheduler.config.prediction_type == prediction
    assert_same_weights(loaded, tiny)


# --- SD 2.1-768: v-prediction runs, and its inversion is still exact ---------------------------------------

def test_sd21_768_config_runs_v_prediction_with_an_exact_replay_and_a_24x24_grid_at_768(tiny, folder, offline):
    from emerdiff import EmerDiff
    from emerdiff.image import load_image, to_model_input

    cfg = load_config(REPO / "configs" / "emerdiff_sd21_768.yaml")
    assert cfg.segmentor.resolution == 768
    hub_cache(offline, cfg.model.pretrained, folder, prediction_type="v_prediction")
    # the miniature model at 128 px (its UNet has SD's block layout: the feature layer is 1/32 of the pixels)
    model = EmerDiff.from_config(load_config(REPO / "configs" / "emerdiff_sd21_768.yaml", overrides=[
        "model.local_files_only=true", "model.device=cpu", "model.dtype=float32", "segmentor.resolution=128",
        "segmentor.num_inference_steps=10", "segmentor.t_modulate=301", "segmentor.memory_budget_gb=0"]))
    assert model.grid.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    z0 = model.encode(to_model_input(load_image(np.full((64, 64, 3), 0.5, np.float32) + RAMP), 128))
    features = model.features(z0, generator)
    assert (features.height, features.width) == (4, 4)  # 128 / 32: 16 at 512 px, 24 at 768 px
    inversion, record = model.invert(z0, generator)
    replay = model.denoise(inversion, record, torch.zeros(1, 1, 4, 4))[0]
    assert ((replay - z0[0]).norm() / z0.norm()).item() < 1e-4
    # the same grid read as epsilon would not reconstruct: the v-prediction branch is really taken
    model.grid.prediction_type = "epsilon"
    wrong = model.denoise(inversion, record, torch.zeros(1, 1, 4, 4))[0]
    assert ((wrong - z0[0]).norm() / z0.norm()).item() > 1e-2


def test_sd21_layers_hold_24x24_queries_at_768_px():
    from emerdiff.processors import AttentionControl, controlled

    seg = load_config(REPO / "configs" / "emerdiff_sd21_768.yaml").segmentor
    unet = build_random_sd("sd21_base", device="meta").unet
    control = AttentionControl(timesteps=[1], record_layers=frozenset({seg.feature_layer, seg.modulated_layer}))
    side = seg.resolution // 8
    with controlled(unet, control), torch.no_grad():
        unet(torch.zeros(1, 4, side, side, device="meta"), torch.tensor([1], device="meta"),
             torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta"))
    for layer in (seg.feature_layer, seg.modulated_layer):
        assert control.record.query[(layer, 1)].shape == (1, 24 * 24, 1280)


# --- failures: each says what is wrong and how to fix it -----------------------------------------------------

def test_single_file_offline_without_model_config_names_model_config_and_the_download(single_files, offline):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)needs the diffusers config files.*not in the Hugging Face "
                                                   r"cache.*model.config=/path/to/diffusers/folder.*"
                                                   r"hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include"):
        load_sd(model(pretrained=str(single_files[".safetensors"])))


def test_single_file_offline_uses_the_default_config_when_it_is_in_the_cache(tiny, folder, single_files, offline):
    hub_cache(offline, "stable-diffusion-v1-5/stable-diffusion-v1-5", folder)
    assert_same_weights(load_sd(model(pretrained=str(single_files[".ckpt"]))), tiny)


def test_model_config_that_is_not_a_diffusers_folder_says_what_it_lacks(single_files, tmp_path, offline):
    (tmp_path / "cfg").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"(?s)model.config=.*must be a diffusers pipeline folder.*"
                                                   r"no model_index.json"):
        load_sd(model(pretrained=str(single_files[".safetensors"]), config=str(tmp_path / "cfg")))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_sd(model(pretrained=str(single_files[".safetensors"]), config=str(tmp_path / "missing")))


def test_a_variant_the_folder_does_not_have_names_model_variant(folder, offline):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)model.variant='bf16'.*model.variant=null") as error:
        load_sd(model(pretrained=str(folder), variant="bf16"))
    assert "hf download" not in str(error.value)
