"""MaskCLIP dense encoder on the tiny random open_clip model: shapes, norms, the value-path formula, windows."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

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


def test_tiny_model_is_selected_by_name_and_tokenizes_offline(clip):
    tokens = clip.tokenizer(["a photo of a cat.", "grass"])
    assert tokens.shape == (2, 77)
    assert clip.model_name == TINY_MODEL and clip.pretrained is None
    assert clip.model.encode_text(tokens).shape == (2, 32)


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
        windows = [F.normalize(encoder.encode_window(images[..., left : left + 64]), dim=1) for left in (0, 32, 64)]
    torch.testing.assert_close(features[..., :2], windows[0][..., :2])  # cells seen by one window only
    torch.testing.assert_close(features[..., 6:], windows[2][..., 2:])
    middle = F.normalize(windows[0][..., 2:4] + windows[1][..., :2], dim=1)
    torch.testing.assert_close(features[..., 2:4], middle)


def test_window_larger_than_the_image_encodes_it_whole(clip):
    images = torch.randn(1, 3, 96, 128)
    whole = MaskCLIPEncoder(clip.model.visual, window=1024)
    with torch.no_grad():
        torch.testing.assert_close(whole(images), F.normalize(whole.encode_window(images), dim=1))
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


def test_missing_weights_error_says_what_was_looked_for_and_how_to_fix_it(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError) as error:
        load_clip("ViT-B-16", pretrained="openai")
    message = str(error.value)
    for expected in ["'ViT-B-16'", "'openai'", "looked in", "HF_HOME", "local checkpoint"]:
        assert expected in message


def test_missing_local_checkpoint_file_is_reported_with_the_path(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(RuntimeError, match="nope.pt.* neither a known open_clip tag .* nor an existing checkpoint"):
        load_clip(TINY_MODEL, pretrained=missing)


def test_unknown_architecture_is_a_value_error_naming_the_tiny_model():
    with pytest.raises(ValueError, match=TINY_MODEL):
        load_clip("ViT-Nope", pretrained=None)
