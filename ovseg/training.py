"""The toy world's tiny CLIP (open_clip ``toyworld-clip``), trained contrastively on scene crops and captions.

A training pair is a random square crop of a training scene (a quarter to all of it, resized to the model's
input) with a caption of what the crop shows: the whole scene's caption when the crop is the scene, else one
of MaskCLIP's prompt templates filled with the classes covering at least `MIN_AREA` of the crop, largest
first. Small crops teach patches their class names, which MaskCLIP's dense read-out relies on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from emerdiff.data.toyworld import CLASSES
from emerdiff.toy_training import warmup
from ovseg.clip_model import register_model_configs
from ovseg.text import MASKCLIP_TEMPLATES

MODEL = "toyworld-clip"
MIN_AREA = 0.15


def crop_caption(label: np.ndarray, template: str) -> str:
    """`template` filled with the classes covering at least `MIN_AREA` of `label`, largest first."""
    counts = np.bincount(label.ravel(), minlength=len(CLASSES))[: len(CLASSES)]
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= MIN_AREA * label.size]
    names = [CLASSES[i] for i in order] or [CLASSES[int(counts.argmax())]]
    return template.format(" and ".join(names))


class CaptionedCrops(Dataset):
    """Random crops of the scenes with their captions, as (normalised image [3, S, S], caption)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        captions: Sequence[str],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.images, self.labels, self.captions, self.size = images, labels, captions, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        full = self.images.shape[1]
        side = full if torch.rand(()) < 0.25 else int(torch.randint(full // 4, full + 1, ()))
        top, left = torch.randint(0, full - side + 1, (2,)).tolist()
        image = torch.as_tensor(self.images[index, top : top + side, left : left + side]).permute(2, 0, 1).float()
        image = F.interpolate(
            image[None] / 255.0, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        if side == full:
            caption = self.captions[index]
        else:
            template = MASKCLIP_TEMPLATES[int(torch.randint(len(MASKCLIP_TEMPLATES), ()))]
            caption = crop_caption(self.labels[index, top : top + side, left : left + side], template)
        return (image - self.mean) / self.std, caption


def learning_rate_factor(warmup_steps: int, cosine_steps: int | None = None) -> Callable[[int], float]:
    """The toy UNet's warm-up (linear, then constant); with `cosine_steps` (the run's length), times a cosine
    decay from the warm-up's end to zero at that step (open_clip's cosine schedule)."""
    warm = warmup(warmup_steps)
    if cosine_steps is None:
        return warm

    def factor(step: int) -> float:
        progress = min(1.0, max(0, step - warmup_steps) / max(1, cosine_steps - warmup_steps))
        return warm(step) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class ClipTraining(pl.LightningModule):
    """CLIP's symmetric contrastive loss (open_clip's ClipLoss) on the crop-caption pairs of a batch."""

    def __init__(
        self, lr: float = 1e-3, warmup_steps: int = 100, seed: int = 0, cosine_steps: int | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        register_model_configs()
        torch.manual_seed(seed)
        self.model = open_clip.create_model(MODEL, output_dict=True)
        self.tokenizer = open_clip.get_tokenizer(MODEL)
        self.loss = open_clip.ClipLoss()

    def training_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int) -> torch.Tensor:
        images, captions = batch
        out = self.model(images, self.tokenizer(list(captions)))
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.log_dict({"clip/loss": loss, "clip/logit_scale": out["logit_scale"]}, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # CLIP clamps its temperature at 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.hparams["lr"], weight_decay=0.1)
        factor = learning_rate_factor(self.hparams["warmup_steps"], self.hparams["cosine_steps"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_toy_clip(
    scenes: Any,
    path: Path,
    make_trainer: Callable[[int, list], pl.Trainer],
    steps: int,
    batch_size: int = 64,
    cosine: bool = False,
) -> None:
    """Train `toyworld-clip` on the scenes (images, labels, captions) for `steps` steps; weights to `path`.
    `cosine` decays the learning rate to zero over the run instead of keeping it constant after the warm-up."""
    module = ClipTraining(cosine_steps=steps if cosine else None)
    preprocess = module.model.visual.preprocess_cfg
    crops = CaptionedCrops(
        scenes.images,
        scenes.labels,
        scenes.captions,
        module.model.visual.image_size[0],
        preprocess["mean"],
        preprocess["std"],
    )
    loader = DataLoader(crops, batch_size=batch_size, shuffle=True, drop_last=True)
    make_trainer(steps, []).fit(module, loader)
    save_file({k: v.half().contiguous() for k, v in module.model.state_dict().items()}, str(path))
