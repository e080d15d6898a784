"""Model loading: real layouts on the meta device, the miniature SD, and missing-weight errors."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from emerdiff import WeightsNotFoundError, load_config
from emerdiff.config import ModelConfig
from emerdiff.models import build_random_sd, cpu_threads, load_sd
from emerdiff.processors import AttentionControl, check_layer, controlled

SEG = load_config().segmentor


@pytest.mark.parametrize("arch,width", [("sd15", 1280), ("sd21_base", 1280)])
def test_configured_layers_exist_with_16x16_queries_in_full_size_unets(arch, width):
    unet = build_random_sd(arch, device="meta").unet
    for layer in (SEG.feature_layer, SEG.modulated_layer):
        check_layer(unet, layer, "layer")
    control = AttentionControl(timesteps=[1], record_layers=frozenset({SEG.feature_layer, SEG.modulated_layer}))
    text_dim = unet.config.cross_attention_dim
    with controlled(unet, control), torch.no_grad():
        unet(torch.zeros(1, 4, 64, 64, device="meta"), torch.tensor([1], device="meta"),
             torch.zeros(1, 77, text_dim, device="meta"))
    for layer in (SEG.feature_layer, SEG.modulated_layer):
        assert control.record.query[(layer, 1)].shape == (1, 16 * 16, width)


def test_unknown_layer_names_list_the_cross_attention_layers(tiny_components):
    with pytest.raises(ValueError, match="up_blocks.1.attentions.0.transformer_blocks.0.attn2"):
        check_layer(tiny_components.unet, "up_blocks.9.attn2", "segmentor.feature_layer")


def test_miniature_sd_is_reproducible_and_has_the_sd_layout(tiny_components):
    again = build_random_sd("tiny", seed=0)
    for a, b in zip(tiny_components.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    assert tiny_components.encode_prompt("").text.shape == (1, 77, 32)
    names = set(tiny_components.unet.attn_processors)
    full = set(build_random_sd("sd15", device="meta").unet.attn_processors)
    assert names == full


def test_missing_local_file_says_what_was_looked_for_and_how_to_fix_it_without_download_advice(tmp_path):
    cfg = ModelConfig(pretrained=str(tmp_path / "sd15.safetensors"), device="cpu")
    with pytest.raises(WeightsNotFoundError, match=r"(?s)sd15.safetensors.*does not exist.*model.pretrained=/path/to/folder"
                       ) as error:
        load_sd(cfg)
    assert "hf download" not in str(error.value)  # a local path is not a hub id: nothing to download


def test_missing_local_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    cfg = ModelConfig(pretrained=str(tmp_path / "weights" / "sd15"), device="cpu", local_files_only=True)
    with pytest.raises(WeightsNotFoundError, match="does not exist") as error:
        load_sd(cfg)
    assert "hf download" not in str(error.value) and "huggingface-cli" not in str(error.value)


def test_offline_hub_id_says_where_the_cache_is_and_how_to_download_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(pretrained="someone/not-a-model", device="cpu", local_files_only=True)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)someone/not-a-model.*cache: " + re.escape(str(tmp_path))
                       + r".*`hf download someone/not-a-model`"):
        load_sd(cfg)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_empty_or_corrupt_safetensors_says_the_file_itself_is_invalid(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)model.safetensors' itself is invalid.*download or copy it again"):
        load_sd(ModelConfig(pretrained=str(path), device="cpu", local_files_only=True))


def _single_file(tmp_path, keys, name="model.safetensors"):
    path = tmp_path / name
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    return ModelConfig(pretrained=str(path), device="cpu", local_files_only=True)


def test_an_sdxl_checkpoint_offline_without_model_config_names_sdxls_config_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = _single_file(tmp_path, ["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
                                  "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
                                  "model.diffusion_model.out.2.bias", "first_stage_model.quant_conv.bias"])
    with pytest.raises(WeightsNotFoundError, match=r"(?s)needs the diffusers config.*"
                                                   r"stabilityai/stable-diffusion-xl-base-1.0"):
        load_sd(cfg)


def test_a_diffusers_component_file_is_refused_pointing_at_its_folder(tmp_path):
    cfg = _single_file(tmp_path, ["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"],
                       "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsNotFoundError, match=r"(?s)one component of a diffusers folder.*model_index.json"):
        load_sd(cfg)


def test_a_unet_only_checkpoint_says_what_is_missing(tmp_path):
    cfg = _single_file(tmp_path, ["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(WeightsNotFoundError, match="no VAE and no text encoder"):
        load_sd(cfg)


def test_a_folder_without_model_index_names_the_checkpoint_inside_it(tmp_path):
    (tmp_path / "v1-5-pruned.safetensors").write_bytes(b"x")
    cfg = ModelConfig(pretrained=str(tmp_path), device="cpu", local_files_only=True)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)not a diffusers pipeline folder.*no model_index.json.*"
                                                   r"model.pretrained=.*v1-5-pruned.safetensors"):
        load_sd(cfg)


def test_tiny_config_loads_the_miniature_model_offline():
    components = load_sd(load_config("configs/tiny.yaml").model)
    assert components.name == "random:tiny" and components.unet.device.type == "cpu"


@pytest.mark.parametrize("cores, ranks, environment, expected", [
    (8, None, {}, 8),  # one process takes every core it may use
    (8, 4, {}, 2),  # four local ranks (trainer.devices=4) share them
    (8, None, {"LOCAL_WORLD_SIZE": "2"}, 4),  # torchrun's count when the caller knows none
    (3, 2, {}, 1),  # rounded down: 2 x 1 <= 3 cores, never 2 x 2
    (1, 4, {}, 1),  # at least one each
    (8, 4, {"OMP_NUM_THREADS": "3"}, None),  # the user's OMP_NUM_THREADS: torch's own default stands
])
def test_default_cpu_threads_share_the_usable_cores_among_local_ranks(cores, ranks, environment, expected,
                                                                      monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cores)))  # a taskset's cores
    for name in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert cpu_threads(None, ranks) == expected
    assert cpu_threads(5, ranks) == 5  # model.cpu_threads overrides every default


def test_cpu_threads_sets_torchs_thread_count_when_the_model_loads():
    before = torch.get_num_threads()
    try:
        load_sd(ModelConfig(pretrained="tiny", cpu_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
