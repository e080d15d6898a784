"""MaskCLIP dense encoder on the tiny random open_clip model: shapes, norms, the value-path formula, windows;
loading CLIP weights from the cache, a file, or failing at once with the fix."""

import socket
import time

import huggingface_hub
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from emerdiff.config import UserError, WeightsNotFoundError
from ovseg import TINY_MODEL, DenseEncoder, MaskCLIPEncoder, load_clip


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, pretrained=None)


@pytest.fixture(scope="module")
def encoder(clip):
    return MaskCLIPEncoder(clip.model.visual)


def _hand_dense(visual, images, keep_residual):
    """MaskCLIP dense features written out from the tower's weights, independently of the module."""
    grid_h, grid_w = images.shape[-2] // 16, images.shape[-1] // 16
    patches = F.conv2d(images, visual.conv1.weight, stride=16).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    grid_pos = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.flatten(2)[0].T
    cls = visual.class_embedding + pos[0]
    x = torch.cat([cls.expand(len(images), 1, -1), patches + grid_pos], dim=1)
    x = F.layer_norm(x, (64,), visual.ln_pre.weight, visual.ln_pre.bias)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    _, _, w_v = last.attn.in_proj_weight.chunk(3)
    _, _, b_v = last.attn.in_proj_bias.chunk(3)
    h = F.layer_norm(x, (64,), last.ln_1.weight, last.ln_1.bias)
    out = (h @ w_v.T + b_v) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if keep_residual:
        out = x + out
        h2 = F.layer_norm(out, (64,), last.ln_2.weight, last.ln_2.bias)
        out = out + last.mlp.c_proj(F.gelu(last.mlp.c_fc(h2)))
    out = F.layer_norm(out[:, 1:], (64,), visual.ln_post.weight, visual.ln_post.bias) @ visual.proj
    out = F.normalize(out, dim=-1)
    return out.transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)


def test_tiny_model_is_selected_by_name_and_tokenizes_offline_with_clips_own_vocabulary(clip):
    tokens = clip.tokenizer(["a photo of a cat.", "grass"])
    # CLIP's BPE: start 49406, "a" 320, "photo" 1125, "of" 539, "cat" 2368, "." 269, end 49407, then zero padding
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407] and not tokens[0, 8:].any()
    assert clip.model_name == TINY_MODEL and clip.pretrained is None
    with torch.no_grad():
        embeddings = clip.model.encode_text(tokens)
    assert not torch.allclose(embeddings[0], embeddings[1])  # the prompts reach the text tower


def test_encoder_satisfies_the_dense_encoder_protocol(encoder):
    assert isinstance(encoder, DenseEncoder)
    assert encoder.stride == 16
    assert encoder.embed_dim == 32
    assert encoder.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert encoder.std == tuple(open_clip.OPENAI_DATASET_STD)


@pytest.mark.parametrize("size", [(64, 64), (32, 48), (96, 64), (64, 160), (144, 208)])
def test_dense_features_have_one_unit_vector_per_patch(encoder, size):
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, *size))
    assert features.shape == (2, 32, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, size[0] // 16, size[1] // 16))


@pytest.mark.parametrize("keep_residual", [True, False])
@pytest.mark.parametrize("size", [(64, 64), (32, 48)])
def test_dense_features_equal_the_value_path_formula(clip, keep_residual, size):
    encoder = MaskCLIPEncoder(clip.model.visual, keep_residual=keep_residual)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), _hand_dense(clip.model.visual, images, keep_residual))


def test_residual_switch_changes_the_features(clip):
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        kept = MaskCLIPEncoder(clip.model.visual, keep_residual=True)(images)
        bare = MaskCLIPEncoder(clip.model.visual, keep_residual=False)(images)
    assert not torch.allclose(kept, bare)


def test_sliding_window_averages_overlapping_windows(encoder):
    images = torch.randn(1, 3, 64, 128)  # windows of 64 px every 32 px: left = 0, 32, 64
    with torch.no_grad():
        features = encoder(images)
        windows = [F.normalize(encoder.dense_window(images[..., left : left + 64]), dim=1) for left in (0, 32, 64)]
    torch.testing.assert_close(features[..., :2], windows[0][..., :2])  # cells seen by one window only
    torch.testing.assert_close(features[..., 6:], windows[2][..., 2:])
    middle = F.normalize(windows[0][..., 2:4] + windows[1][..., :2], dim=1)
    torch.testing.assert_close(features[..., 2:4], middle)


def test_window_larger_than_the_image_encodes_it_whole(clip):
    images = torch.randn(1, 3, 96, 128)
    whole = MaskCLIPEncoder(clip.model.visual, window=1024)
    with torch.no_grad():
        torch.testing.assert_close(whole(images), F.normalize(whole.dense_window(images), dim=1))
        assert not torch.allclose(whole(images), MaskCLIPEncoder(clip.model.visual)(images))


def test_image_size_must_be_a_multiple_of_the_patch(encoder):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        encoder(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        MaskCLIPEncoder(encoder.visual, window=40)


def test_local_checkpoint_file_loads_the_same_weights(clip, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(TINY_MODEL, pretrained=str(path))
    expected, got = clip.model.state_dict(), loaded.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


class NetworkGuard:
    """Replaces name lookups and socket connections with failures, counting every attempt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.attempts: list[str] = []
        monkeypatch.setattr(socket, "getaddrinfo", self.refuse)
        monkeypatch.setattr(socket.socket, "connect", self.refuse)

    def refuse(self, *args, **kwargs):
        self.attempts.append(repr(args[:2]))
        raise OSError("network is unreachable (test)")


def _hub_switched(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """HF_HUB_OFFLINE as a user sets it, whatever the environment running the tests says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


def test_offline_clip_weights_fail_at_once_naming_the_settings_and_the_fix(monkeypatch, tmp_path):
    _hub_switched(monkeypatch, offline=True)
    network = NetworkGuard(monkeypatch)
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    message = str(error.value)
    for expected in ["ovseg.clip_model='ViT-B-16'", "ovseg.clip_pretrained='openai'",
                     f"ovseg.clip_cache_dir='{tmp_path}'", "timm/vit_base_patch16_clip_224.openai", "HF_HUB_OFFLINE=1",
                     "hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors",
                     "ovseg.clip_pretrained=/path/to/checkpoint.pt"]:
        assert expected in message
    assert isinstance(error.value, UserError) and network.attempts == []


def test_unreachable_hub_is_asked_without_waiting_to_retry_and_reported_without_a_chained_traceback(
        monkeypatch, tmp_path):
    _hub_switched(monkeypatch, offline=False)
    network = NetworkGuard(monkeypatch)
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)  # huggingface_hub waits 1, 2, 4, 8, 8 s between retries
    with pytest.raises(WeightsNotFoundError, match=r"(?s)hub could not be reached.*ovseg\.clip_cache_dir") as error:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert network.attempts and waits == []
    assert error.value.__cause__ is None and error.value.__suppress_context__


@pytest.mark.parametrize("offline", [True, False])
def test_tag_weights_in_the_cache_load_without_the_network_with_the_tags_preprocessing(
        clip, monkeypatch, tmp_path, offline):
    snapshot = tmp_path / "models--someone--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-clip" / "refs" / "main").write_text("0" * 40)
    weights = {name: tensor.contiguous() for name, tensor in clip.model.state_dict().items()}
    safetensors.torch.save_file(weights, str(snapshot / "open_clip_model.safetensors"))
    tag = {"hf_hub": "someone/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, name: tag if name == "cached" else {})
    _hub_switched(monkeypatch, offline=offline)
    network = NetworkGuard(monkeypatch)
    loaded = load_clip(TINY_MODEL, pretrained="cached", cache_dir=str(tmp_path))
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, msg=name)
    encoder = MaskCLIPEncoder(loaded.model.visual)
    assert (encoder.mean, encoder.std) == (tag["mean"], tag["std"])
    assert loaded.pretrained == "cached" and network.attempts == []


def test_missing_local_checkpoint_file_is_reported_as_not_existing_with_the_setting(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsNotFoundError, match=rf"ovseg.clip_pretrained='{missing}' is not an open_clip tag .* "
                                                   rf"checkpoint file {missing} does not exist"):
        load_clip(TINY_MODEL, pretrained=str(missing))


def test_corrupt_checkpoint_file_is_reported_with_its_path_without_a_chained_traceback(tmp_path):
    corrupt = tmp_path / "tiny.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match=rf"weights file {corrupt} could not be loaded") as error:
        load_clip(TINY_MODEL, pretrained=str(corrupt))
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_unknown_architecture_is_a_value_error_naming_the_tiny_model():
    with pytest.raises(ValueError, match=TINY_MODEL):
        load_clip("ViT-Nope", pretrained=None)


def test_windows_further_apart_than_their_size_are_refused(clip):
    with pytest.raises(ValueError, match="leave pixels no window covers"):
        MaskCLIPEncoder(clip.model.visual, window=32, window_stride=48)
