"""The VAE stage: encoding to z0 and decoding the variants, with the trade-off resize of latents."""

import torch

from emerdiff.image import load_image, to_model_input
from emerdiff.vae import decode_latents, encode_image, resize_latents


def test_encode_uses_the_posterior_mean_times_the_scaling_factor(tiny_components, photo):
    vae = tiny_components.vae
    pixels = to_model_input(load_image(photo), 128)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(encode_image(vae, pixels), expected)
    torch.testing.assert_close(encode_image(vae, pixels), expected)  # deterministic: no posterior sampling


def test_decode_divides_by_the_scaling_factor_and_returns_float32(tiny_components):
    vae = tiny_components.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample
    decoded = decode_latents(vae, latents)
    assert decoded.dtype == torch.float32 and decoded.shape == (2, 3, 64, 64)
    torch.testing.assert_close(decoded, expected)


def test_resized_latents_decode_at_the_requested_resolution():
    latents = torch.ones(3, 4, 16, 16)
    resized = resize_latents(latents, 64)
    assert resized.shape == (3, 4, 8, 8)
    torch.testing.assert_close(resized, torch.ones(3, 4, 8, 8))  # a constant latent stays constant
