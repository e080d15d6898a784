"""step 6: edit-friendly DDPM inversion, so that an unmodulated replay reproduces the image.

Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., 2023): every grid latent
x_t, t <= t_m, is drawn independently from q(x_t | z0); the UNet runs on all of them
in one batch, and the per-step noise maps z_t are solved so that the eta = 1 DDIM
reverse step maps x_t exactly onto the next grid latent (z0 after the last step).
Replaying the reverse steps with these z_t and no modulation reproduces z0.
All scheduler arithmetic is float32 whatever the UNet's dtype (float64 for a float64 model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

# (latents [B, 4, h, w], timesteps [B] on the CPU, readable without a device sync) -> UNet output, float32
# (float64 for a float64 UNet)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DDPMGrid:
    """The reverse-step grid (descending timesteps) and its eta = 1 DDIM coefficients."""

    timesteps: list[int]  # e.g. 981, 961, ..., 1
    alpha_bar: torch.Tensor  # [S] cumulative alpha at each grid step
    alpha_bar_prev: torch.Tensor  # [S] at the next (smaller) step; final_alpha_cumprod after the last
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_inference_steps: int, spacing: str | None = None) -> DDPMGrid:
        """DDIM's grid of `num_inference_steps` with `spacing` (None: the scheduler config's); each step goes to
        the next grid step (on the evenly spaced "leading" grid that is t - 1000 / steps, as DDIM steps)."""
        if spacing is not None and spacing != scheduler.config.get("timestep_spacing"):
            scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing=spacing)
        scheduler.set_timesteps(num_inference_steps)
        steps = [int(t) for t in scheduler.timesteps]
        acp = scheduler.alphas_cumprod.double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod).double()
        prev = [acp[t] for t in steps[1:]] + [final]
        return cls(steps, acp[steps].float(), torch.stack(prev).float(), scheduler.config.prediction_type)

    def index(self, timestep: int) -> int:
        if timestep not in self.timesteps:
            raise ValueError(
                f"timestep {timestep} is not on the scheduler grid {self.timesteps}; "
                "choose segmentor.t_modulate from it"
            )
        return self.timesteps.index(timestep)

    def thinned(self, timestep: int, num_steps: int) -> DDPMGrid:
        """Keep `num_steps` evenly spaced grid steps from `timestep` to the last one (0 or more = all).

        Each kept step then jumps to the next kept one, so the reverse process (and the
        inversion solved on this grid) takes fewer, larger steps: fewer UNet passes,
        different results. Steps before `timestep` are unchanged.
        """
        first, last = self.index(timestep), len(self.timesteps) - 1
        if num_steps <= 0 or num_steps >= last - first + 1:
            return self
        kept = sorted({round(first + k * (last - first) / max(num_steps - 1, 1)) for k in range(num_steps)})
        keep = list(range(first)) + kept
        prev = torch.cat([self.alpha_bar[keep[1:]], self.alpha_bar_prev[-1:]])  # each step jumps to the next kept
        return DDPMGrid([self.timesteps[j] for j in keep], self.alpha_bar[keep], prev, self.prediction_type)

    def tail(self, timestep: int) -> list[int]:
        """Grid steps from `timestep` down to the last one."""
        return self.timesteps[self.index(timestep) :]

    def sigma(self, i: int) -> torch.Tensor:
        """Std of the eta = 1 reverse step (the DDPM posterior's)."""
        a, a_prev = self.alpha_bar[i], self.alpha_bar_prev[i]
        return ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()

    def estimate(self, x: torch.Tensor, model_output: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) predicted from x_t and the UNet output at grid step i (DDIM's x0 formula, Song et al. eq. 12)."""
        a = self.alpha_bar[i]
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * model_output
            eps = a.sqrt() * model_output + (1 - a).sqrt() * x
        else:
            raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")
        return x0, eps

    def mean(self, x: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        """Deterministic part of the eta = 1 DDIM step (Song et al. eq. 12)."""
        a_prev = self.alpha_bar_prev[i]
        x0, eps = self.estimate(x, model_output, i)
        return a_prev.sqrt() * x0 + (1 - a_prev - self.sigma(i) ** 2).clamp_min(0).sqrt() * eps

    def step(self, x: torch.Tensor, model_output: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1} with the given noise map."""
        return self.mean(x, model_output, i) + self.sigma(i) * noise


@dataclass
class Inversion:
    """The grid latents from t_m down (x_t, first is x_{t_m}) and the noise maps that reproduce them."""

    timesteps: list[int]  # t_m, ..., 1
    latents: torch.Tensor  # [S, 4, h, w] float32, sampled x_t
    noise: torch.Tensor  # [S, 4, h, w] float32, z_t
    clean: torch.Tensor  # [1, 4, h, w] z0


@torch.no_grad()
def ddpm_inversion(
    denoise: Denoiser,
    grid: DDPMGrid,
    z0: torch.Tensor,
    t_max: int,
    generator: torch.Generator,
    chunk_size: int = 0,
) -> Inversion:
    """step 6: edit-friendly DDPM inversion of z0 [1, 4, h, w] over the grid steps <= t_max."""
    steps = grid.tail(t_max)
    first = grid.index(t_max)
    if any(grid.sigma(i) <= 0 for i in range(first, len(grid.timesteps))):
        raise ValueError(
            "exact inversion needs a noisy reverse step everywhere: use a scheduler with "
            "set_alpha_to_one=False (SD's own configuration)"
        )
    a = grid.alpha_bar[first:].to(z0.device)[:, None, None, None]
    eps = torch.randn((len(steps), *z0.shape[1:]), generator=generator).to(z0)
    latents = a.sqrt() * z0 + (1 - a).sqrt() * eps  # x_t ~ q(x_t | z0), independent per step
    t = torch.as_tensor(steps)
    size = chunk_size if chunk_size > 0 else len(steps)
    outputs = torch.cat([denoise(latents[s : s + size], t[s : s + size]) for s in range(0, len(steps), size)])
    targets = torch.cat([latents[1:], z0])  # x_{t-1} for each step: the next grid latent, then z0
    noise = torch.stack(
        [(targets[j] - grid.mean(latents[j], outputs[j], first + j)) / grid.sigma(first + j) for j in range(len(steps))]
    )
    return Inversion(steps, latents, noise, z0)
