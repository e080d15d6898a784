"""steps 2 and 6: the grid, the reverse step, and exact reconstruction by the inversion."""

import torch
from diffusers import DDIMScheduler

from emerdiff.image import to_model_input, load_image
from emerdiff.inversion import DDPMGrid, ddpm_inversion
from emerdiff.vae import encode_image
from emerdiff.models import arch_config

SD_SCHEDULER = {k: v for k, v in arch_config("sd15")["scheduler"].items()}


def make_grid(prediction_type="epsilon") -> DDPMGrid:
    return DDPMGrid.from_scheduler(DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type}), 50)


def test_grid_is_981_down_to_1_and_t_m_281_leaves_15_steps():
    grid = make_grid()
    assert grid.timesteps[:3] == [981, 961, 941] and grid.timesteps[-1] == 1
    assert grid.tail(281) == list(range(281, 0, -20)) and len(grid.tail(281)) == 15


def test_reverse_step_equals_diffusers_ddim_step_with_eta_1():
    grid = make_grid()
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(50)
    gen = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3))
    for t in (981, 281, 1):
        ours = grid.step(x, eps, grid.index(t), z)
        theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_v_prediction_reverse_step_equals_diffusers():
    grid = make_grid("v_prediction")
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"})
    scheduler.set_timesteps(50)
    gen = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(grid.step(x, v, grid.index(281), z),
                               scheduler.step(v, 281, x, eta=1.0, variance_noise=z).prev_sample,
                               rtol=1e-5, atol=1e-5)


def test_unmodulated_replay_of_the_inversion_reproduces_the_input_latent(tiny_components, photo):
    c = tiny_components
    grid = DDPMGrid.from_scheduler(c.scheduler, 50)
    z0 = encode_image(c.vae, to_model_input(load_image(photo), 128))
    text = c.encode_prompt("").text

    def denoise(latents, t):
        return c.unet(latents, t, text.expand(len(latents), -1, -1)).sample

    inv = ddpm_inversion(denoise, grid, z0, 281, torch.Generator().manual_seed(0), chunk_size=4)
    assert inv.timesteps == grid.tail(281)
    x = inv.latents[:1]
    with torch.no_grad():
        for j, t in enumerate(inv.timesteps):  # one sample at a time, unlike the batched inversion
            x = grid.step(x, denoise(x, torch.tensor([t])), grid.index(t), inv.noise[j])
    assert ((x - z0).norm() / z0.norm()).item() < 1e-4
    # the replay really depends on the noise maps: dropping them does not reconstruct
    assert inv.noise.abs().mean() > 0.1


def test_a_thinned_grid_keeps_t_m_and_t_1_and_its_inversion_still_reconstructs(tiny_components, photo):
    c = tiny_components
    grid = DDPMGrid.from_scheduler(c.scheduler, 50).thinned(281, 5)
    assert grid.tail(281)[0] == 281 and grid.tail(281)[-1] == 1 and len(grid.tail(281)) == 5
    z0 = encode_image(c.vae, to_model_input(load_image(photo), 128))
    text = c.encode_prompt("").text

    def denoise(latents, t):
        return c.unet(latents, t, text.expand(len(latents), -1, -1)).sample

    inv = ddpm_inversion(denoise, grid, z0, 281, torch.Generator().manual_seed(0))
    x = inv.latents[:1]
    with torch.no_grad():
        for j, t in enumerate(inv.timesteps):
            x = grid.step(x, denoise(x, torch.tensor([t])), grid.index(t), inv.noise[j])
    assert ((x - z0).norm() / z0.norm()).item() < 1e-4
