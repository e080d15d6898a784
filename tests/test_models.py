"""Model loading: real layouts on the meta device, the miniature SD, and missing-weight errors."""

import pytest
import torch

from emerdiff import WeightsNotFoundError, load_config
from emerdiff.config import ModelConfig
from emerdiff.models import build_random_sd, load_sd
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
    assert tiny_components.encode_prompt("").shape == (1, 77, 32)
    names = set(tiny_components.unet.attn_processors)
    full = set(build_random_sd("sd15", device="meta").unet.attn_processors)
    assert names == full


def test_missing_local_file_says_what_was_looked_for_and_how_to_fix_it(tmp_path):
    cfg = ModelConfig(pretrained=str(tmp_path / "sd15.safetensors"), device="cpu")
    with pytest.raises(WeightsNotFoundError, match=r"(?s)sd15.safetensors.*model.pretrained=/path/to/folder"):
        load_sd(cfg)


def test_offline_hub_id_says_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(pretrained="someone/not-a-model", device="cpu", local_files_only=True)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)someone/not-a-model.*cache.*huggingface-cli download"):
        load_sd(cfg)


def test_tiny_config_loads_the_miniature_model_offline():
    components = load_sd(load_config("configs/tiny.yaml").model)
    assert components.name == "random:tiny" and components.unet.device.type == "cpu"
