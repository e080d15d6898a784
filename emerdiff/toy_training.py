"""Training the toy world's miniature SD on the CPU: the VAE, then the UNet in the VAE's scaled latent space.

Both are LightningModules trained by a Lightning Trainer (``emerdiff-train-toy``, docs/toyworld.md). The
VAE learns on random 64 px crops of the training scenes (it is convolutional; a crop costs a quarter of a
scene); the UNet learns SD's objective: epsilon prediction on SD's scaled-linear 1000-step schedule, on
latents encoded once, with the caption dropped half of the time so the empty prompt EmerDiff uses is in
distribution, and most timesteps drawn below 500, where EmerDiff uses the model (`focused_timesteps`). The
text encoder keeps its random initial weights (frozen): a fixed function of the caption.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DDPMScheduler, StableDiffusionPipeline
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from emerdiff.data.toyworld import draw_arrays, train_seeds
from emerdiff.models import SDComponents, arch_config, build_random_sd

ARCH = "toyworld"
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
VAE_CROP = 64
KL_WEIGHT = 5e-4  # per latent value: keeps the latent channels near unit scale without blurring
CAPTION_DROP = 0.5
EMA_DECAY = 0.999
# Timesteps: FOCUS of the draws from [0, FOCUS_BELOW), the rest uniform over all 1000. EmerDiff only uses the
# UNet below t_m (281 by default; its features at t = 1), so CPU time goes there; the model still knows every t.
FOCUS = 0.85
FOCUS_BELOW = 500


@dataclass(frozen=True)
class SceneBank:
    """The training scenes as arrays (images [N, H, W, 3] uint8, labels [N, H, W] uint8) and their captions."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]

    @classmethod
    def load_or_draw(cls, count: int, cache: Path) -> SceneBank:
        """The first `count` training scenes, drawn once and kept in `cache` (an .npz file)."""
        if cache.is_file():
            data = np.load(cache)
            if len(data["images"]) == count:
                return cls(data["images"], data["labels"], json.loads(str(data["captions"])))
        images, labels, captions = draw_arrays(train_seeds(count))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels, captions=json.dumps(captions))
        return cls(images, labels, captions)


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1], SD's pixel range."""
    pixels = torch.as_tensor(images).float().div(127.5).sub(1.0)
    return pixels.movedim(-1, -3).contiguous()


class RandomCrops(Dataset):
    """Random square crops of the scenes, flipped left-right half of the time (torch's global random state)."""

    def __init__(self, images: np.ndarray, crop: int) -> None:
        self.images = images
        self.crop = crop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        size = self.images.shape[1]
        top, left = torch.randint(0, size - self.crop + 1, (2,)).tolist()
        crop = to_pixels(self.images[index, top : top + self.crop, left : left + self.crop])
        return crop.flip(-1) if torch.rand(()) < 0.5 else crop


def warmup(steps: int, restarts: Sequence[int] = ()) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over `steps` from the start and from each restart step, then constant
    (a run stopped early stays usable)."""

    def factor(step: int) -> float:
        since = step - max((r for r in restarts if r <= step), default=0)
        return min(1.0, (since + 1) / steps)

    return factor


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of [B, C, H, W] images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAETraining(pl.LightningModule):
    """AutoencoderKL on L1 + L1 of image gradients (sharp region edges) + a small KL term. Given a trained `vae`
    and `decoder_only`, only its decoder learns: the encoder, so the latent space a UNet was trained in, stays."""

    def __init__(
        self, lr: float = 1e-3, warmup_steps: int = 100, vae: AutoencoderKL | None = None, decoder_only: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vae"])
        torch.manual_seed(0)
        self.vae = vae if vae is not None else AutoencoderKL(**_strip(arch_config(ARCH)["vae"]))
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        posterior = self.vae.encode(batch).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(rec, batch)
        edges = sum(F.l1_loss(a, b) for a, b in zip(image_gradients(rec), image_gradients(batch), strict=True))
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + edges + KL_WEIGHT * kl
        self.log_dict({"vae/loss": loss, "vae/l1": l1, "vae/edges": edges, "vae/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        learning = [p for p in self.vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(learning, lr=self.hparams["lr"], weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(self.hparams["warmup_steps"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of every scene, [N, 4, h, w] each (unscaled)."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(to_pixels(images[start : start + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class LatentScenes(Dataset):
    """Encoded scenes (posterior mean, std) and their captions' token ids."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, token_ids: torch.Tensor) -> None:
        self.mean, self.std, self.token_ids = mean, std, token_ids

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mean[index], self.std[index], self.token_ids[index]


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [N, 77] of the captions, padded as SD pads its prompt."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class UNetTraining(pl.LightningModule):
    """The UNet on SD's epsilon objective; an exponential moving average of its weights is what gets saved.

    At each step in `restarts` the run restarts warm from that average, as a run continued with --unet-from does:
    the UNet takes the averaged weights, and the optimizer's moments, the warm-up and the average start afresh.
    """

    def __init__(
        self,
        scaling_factor: float,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        seed: int = 0,
        restarts: Sequence[int] = (),
        init_unet: torch.nn.Module | None = None,
        init_text_encoder: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["init_unet", "init_text_encoder"])
        parts = build_random_sd(ARCH, seed=seed)  # UNet, the frozen random text encoder, tokenizer, scheduler
        if init_unet is not None:  # continue a run from its saved (moving-average) UNet
            parts.unet.load_state_dict({k: v.float() for k, v in init_unet.state_dict().items()})
        if init_text_encoder is not None:  # ... and the text encoder it was trained with, whatever the seed
            parts.text_encoder.load_state_dict({k: v.float() for k, v in init_text_encoder.state_dict().items()})
        self.unet = parts.unet.train().requires_grad_(True)
        self.text_encoder = parts.text_encoder
        self.noise = DDPMScheduler.from_config(parts.scheduler.config)  # SD's training schedule
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
        self.empty_ids = tokenize(parts.tokenizer, [""])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mean, std, ids = batch
        latents = (mean + std * torch.randn_like(std)) * self.hparams["scaling_factor"]
        dropped = torch.rand(len(ids), device=ids.device) < CAPTION_DROP
        ids = torch.where(dropped[:, None], self.empty_ids.to(ids.device), ids)
        with torch.no_grad():
            states = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = focused_timesteps(len(latents), self.noise.config.num_train_timesteps, latents.device)
        pred = self.unet(self.noise.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(pred, noise)
        self.log("unet/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step in self.hparams["restarts"]:
            self.restart()

    def restart(self) -> None:
        """Continue from the moving average with fresh optimizer moments; the average restarts at the next update
        (the warm-up's restart is in the learning-rate schedule)."""
        self.unet.load_state_dict(self.ema.module.state_dict())
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self.ema.n_averaged.zero_()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.unet)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams["lr"], weight_decay=0.01)
        factor = warmup(self.hparams["warmup_steps"], self.hparams["restarts"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def focused_timesteps(count: int, total: int, device: torch.device) -> torch.Tensor:
    """`count` training timesteps: with probability FOCUS uniform below FOCUS_BELOW, else uniform below `total`."""
    low = torch.randint(0, FOCUS_BELOW, (count,), device=device)
    anywhere = torch.randint(0, total, (count,), device=device)
    return torch.where(torch.rand(count, device=device) < FOCUS, low, anywhere)


def _strip(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def save_pipeline(parts: SDComponents, folder: Path) -> None:
    """`parts` as a diffusers folder (model_index.json, unet/, vae/, ...), fp16 safetensors; replaced whole."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half = {name: half_copy(getattr(parts, name)) for name in ("unet", "vae", "text_encoder")}
    pipe = StableDiffusionPipeline(
        **half,
        tokenizer=parts.tokenizer,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def half_copy(module: ModuleT) -> ModuleT:
    """An fp16 copy of a diffusers or transformers model in eval mode (what the shipped folders hold)."""
    copy = type(module).from_config(module.config) if isinstance(module, ConfigMixin) else type(module)(module.config)
    copy.load_state_dict(module.state_dict())
    return copy.half().eval()


class SavePipeline(pl.Callback):
    """Every `every_n_steps` and at the end, the UNet's moving average with the trained VAE as a diffusers folder."""

    def __init__(self, parts: SDComponents, folder: Path, every_n_steps: int) -> None:
        self.parts, self.folder, self.every_n_steps = parts, folder, every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.save(module)

    def save(self, module: pl.LightningModule) -> None:
        """Write the folder with the current moving-average UNet of a `UNetTraining`."""
        if not isinstance(module, UNetTraining):
            raise TypeError(f"SavePipeline saves a UNetTraining's moving-average UNet, not a {type(module).__name__}")
        parts = SDComponents(
            module.ema.module,
            self.parts.vae,
            self.parts.text_encoder,
            self.parts.tokenizer,
            self.parts.scheduler,
            name="toy",
        )
        save_pipeline(parts, self.folder)
