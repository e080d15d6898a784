"""steps 7-8: recording, injection and modulation through the attention processors."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import tiny_segmentor
from emerdiff.image import load_image, to_model_input
from emerdiff.vae import encode_image
from emerdiff.modulation import ModulationSettings, denoise_variants, variant_offsets
from emerdiff.processors import AttentionControl, controlled, layer_names, shared_attention, use_processors

LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
BLOCK = "up_blocks.1.attentions.2"  # the Transformer2DModel holding LAYER: output [B, C, h, w]


@pytest.fixture(scope="module")
def setup(tiny_components, photo):
    """Segmentor at 128 px (4x4 grid at the modulated layer), its inversion and injection record."""
    model = tiny_segmentor(tiny_components, resolution=128)
    z0 = encode_image(model.vae, to_model_input(load_image(photo), 128))
    inversion, record = model.invert(z0, torch.Generator().manual_seed(0))
    return model, z0, inversion, record


def corner_mask() -> torch.Tensor:
    """One token at row 0, column 3 of the 4x4 grid: a transposed h/w would land on row 3, column 0."""
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 3] = True
    return mask


def run(setup, offsets, hooks=(), observer=None, **settings):
    model, _, inversion, record = setup
    outputs = {name: [] for name in hooks}
    handles = [model.unet.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: outputs[name].append(out if torch.is_tensor(out) else out[0]))
        for name in hooks]
    params = dict(layer=LAYER, impl="reference", injection=True) | settings
    try:
        latents = denoise_variants(model.unet, model.conditioning(), model.grid, inversion,
                                   record if params["injection"] else None, offsets, ModulationSettings(**params), observer)
    finally:
        for h in handles:
            h.remove()
    return latents, outputs


def test_every_attention_layer_is_controlled_and_the_original_processors_come_back(tiny_components):
    unet = tiny_components.unet
    before = dict(unet.attn_processors)
    seen = []
    control = AttentionControl(timesteps=[1], observer=lambda layer, t, q, k: seen.append(layer))
    with controlled(unet, control):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 77, 32))
    assert sorted(seen) == sorted(layer_names(unet)) and len(seen) == 32
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_controlled_unet_without_record_or_modulation_equals_the_stock_unet(tiny_components):
    unet = tiny_components.unet
    args = (torch.randn(2, 4, 16, 16), torch.tensor([281, 1]), torch.randn(2, 77, 32))
    with use_processors(unet, {name: AttnProcessor2_0() for name in unet.attn_processors}), torch.no_grad():
        stock = unet(*args).sample
    with controlled(unet, AttentionControl(timesteps=[281, 1])), torch.no_grad():
        ours = unet(*args).sample
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_shared_attention_equals_one_attention_call_per_variant():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8, generator=gen), torch.randn(1, 2, 77, 8, generator=gen)
    v = torch.randn(5, 2, 77, 8, generator=gen)
    separate = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, v[i:i + 1], scale=0.3)
                          for i in range(5)])
    torch.testing.assert_close(shared_attention(q, k, v, 0.3), separate, rtol=1e-5, atol=1e-6)


def test_offset_changes_the_modulated_layer_exactly_at_the_mask_tokens(setup):
    offsets = variant_offsets(corner_mask(), lam=5.0)  # [-5 M, +5 M]
    _, plus = run(setup, offsets[1:], hooks=(LAYER, BLOCK))
    _, zero = run(setup, offsets[1:] * 0, hooks=(LAYER, BLOCK))
    layer_diff = plus[LAYER][0] - zero[LAYER][0]  # step t_m, [1, 16 tokens, C]
    expected = torch.zeros_like(layer_diff)
    expected[:, 3] = 5.0  # token index row * width + column = 0 * 4 + 3, every channel
    torch.testing.assert_close(layer_diff, expected, rtol=0, atol=1e-5)
    spatial = (plus[BLOCK][0] - zero[BLOCK][0]).abs().amax(dim=(0, 1))  # [h, w] after the block
    assert spatial[0, 3] > 1e-3
    spatial[0, 3] = 0
    assert spatial.max() == 0


def test_value_placement_adds_the_offset_before_the_output_projection(setup):
    model = setup[0]
    offsets = variant_offsets(corner_mask(), lam=5.0)[1:]
    _, plus = run(setup, offsets, hooks=(LAYER,), placement="value")
    _, zero = run(setup, offsets * 0, hooks=(LAYER,), placement="value")
    diff = plus[LAYER][0] - zero[LAYER][0]
    weight = model.unet.get_submodule(LAYER).to_out[0].weight  # to_out(PV + cM) - to_out(PV) = c W 1
    torch.testing.assert_close(diff[0, 3], 5.0 * weight.sum(1), rtol=1e-4, atol=1e-5)
    assert diff[0, :3].abs().max() == 0 and diff[0, 4:].abs().max() == 0


@pytest.mark.parametrize("num_steps", [1, 2])
def test_modulation_starts_at_t_m_and_lasts_the_configured_number_of_steps(setup, num_steps):
    offsets = variant_offsets(corner_mask(), lam=5.0)[1:]
    _, plus = run(setup, offsets, hooks=(LAYER,), num_steps=num_steps)
    _, zero = run(setup, offsets * 0, hooks=(LAYER,), num_steps=num_steps)
    for step, (a, b) in enumerate(zip(plus[LAYER], zero[LAYER])):
        # with injection the cross-attention output of a variant only moves by its own offset
        expected = torch.zeros_like(a)
        if step < num_steps:
            expected[:, 3] = 5.0
        torch.testing.assert_close(a - b, expected, rtol=0, atol=1e-5, msg=f"step {step}")


def test_injection_feeds_the_recorded_qk_to_every_layer_at_every_step(setup):
    model, _, inversion, record = setup
    offsets = variant_offsets(corner_mask(), lam=5.0)[1:]
    used = []

    def observe(layer, t, q, k):
        used.append((layer, t))
        assert torch.equal(q, record.query[(layer, t)]) and torch.equal(k, record.key[(layer, t)])

    injected, _ = run(setup, offsets, observer=observe)
    assert sorted(used) == sorted((layer, t) for layer in layer_names(model.unet) for t in inversion.timesteps)
    not_injected, _ = run(setup, offsets, injection=False)
    assert (injected - not_injected).abs().max() > 1e-4


@pytest.mark.parametrize("impl,injection", [("reference", True), ("fast", True), ("fast", False)])
def test_zero_offset_variants_reproduce_the_input_latent(setup, impl, injection):
    _, z0, _, _ = setup
    offsets = variant_offsets(torch.ones(2, 4, 4, dtype=torch.bool), lam=0.0)
    latents, _ = run(setup, offsets, impl=impl, injection=injection)
    for x in latents:
        assert ((x - z0[0]).norm() / z0.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.02), (torch.bfloat16, 0.1)])  # measured 0.007, 0.06
def test_half_precision_weights_keep_float32_latents_and_reconstruct_within_their_rounding(photo, dtype, bound):
    from emerdiff.models import build_random_sd, cast_components

    model = tiny_segmentor(cast_components(build_random_sd("tiny", seed=0), dtype), resolution=128)
    z0 = encode_image(model.vae, to_model_input(load_image(photo), 128))
    inversion, record = model.invert(z0, torch.Generator().manual_seed(0))
    assert model.unet.dtype == dtype and z0.dtype == inversion.latents.dtype == inversion.noise.dtype == torch.float32
    latents, _ = run((model, z0, inversion, record), variant_offsets(torch.ones(1, 4, 4, dtype=torch.bool), 0.0),
                     impl="fast")
    assert latents.dtype == torch.float32 and torch.equal(latents[0], latents[1])  # lambda = 0: the signs agree exactly
    assert ((latents[0] - z0[0]).norm() / z0.norm()).item() < bound


def test_token_grid_of_a_layer_follows_the_latents_aspect():
    from emerdiff.processors import token_grid

    assert token_grid(16 * 24, (64, 96), "layer") == (16, 24)  # a 512 x 768 image's 16x16-level layer
    assert token_grid(32 * 48, (64, 96), "layer") == (32, 48)
    assert token_grid(24 * 16, (96, 64), "layer") == (24, 16)  # tall: rows stay rows
    with pytest.raises(ValueError, match="no downsampling of a 64 x 96 latent grid"):
        token_grid(250, (64, 96), "layer")

