"""The EmerDiff segmentor: SPEC steps 1-11 as one numbered recipe over the stage modules."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from . import assignment
from .clustering import Clusters, cluster_grid, use_faiss_gpu
from .config import EmerDiffConfig, ModelConfig, SegmentorConfig, to_dataclass
from .features import extract_queries
from .image import ImageInput, image_seed, load_image, to_model_input
from .cost import ChunkPlan, plan_chunks
from .inversion import DDPMGrid, Inversion, ddpm_inversion, encode_image
from .models import SDComponents, check_compile_options, compile_regions, load_sd
from .modulation import IMPLS, ModulationSettings, denoise_variants, variant_offsets
from .processors import PLACEMENTS, AttentionControl, AttentionRecord, check_layer, controlled, layer_names


@dataclass
class SegmentationOutput:
    """One image's result; every tensor is on the CPU."""

    labels: torch.Tensor  # [H, W] int64 at the input size, values in 0..K-1
    labels_bilinear: torch.Tensor  # [H, W] int64, bilinear-upsampling baseline of the same masks
    lowres_labels: torch.Tensor  # [h, w] int64 k-means labels on the feature grid
    lowres_masks: torch.Tensor  # [K, h, w] bool
    mask_embeddings: torch.Tensor  # [K, C] mean k-means feature of each mask
    seed: int  # per-image seed (from segmentor.seed and the image content)
    diff_maps: Optional[torch.Tensor] = None  # [K, H, W] float, with segmentor.keep_diff_maps

    @property
    def num_masks(self) -> int:
        return self.lowres_masks.shape[0]

    def to_numpy(self) -> dict:
        """Plain arrays by field name (None fields left out), e.g. for ``np.savez``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.numpy() if isinstance(value, torch.Tensor) else value
        return out


StageContext = Callable[[str], ContextManager[object]]


def untimed(name: str) -> ContextManager[object]:
    """The default stage context: nothing (a benchmark's profiler replaces it to time and count stages)."""
    return nullcontext()


class EmerDiff(nn.Module):
    """Training-free segmentation with a frozen Stable Diffusion (Namekata et al., ICLR 2024).

    >>> model = EmerDiff.from_config(load_config("configs/tiny.yaml"))
    >>> out = model.segment("photo.jpg")  # out.labels: [H, W] mask ids
    """

    def __init__(self, components: SDComponents, params: SegmentorConfig) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.components = components
        self.params = params
        self.grid = DDPMGrid.from_scheduler(components.scheduler, params.num_inference_steps)
        self._check(params)
        self.grid = self.grid.thinned(params.t_modulate, params.denoise_steps)
        if params.channels_last:  # converts the shared UNet/VAE in place; results equal up to rounding
            for module in (self.unet, self.vae):
                module.to(memory_format=torch.channels_last)
        if params.compile:  # compiles the shared UNet/VAE regions in place, lazily at their first call
            compile_regions((self.unet, self.vae), params.compile_backend, params.compile_mode)
        self.register_buffer("prompt", components.encode_prompt(""), persistent=False)
        self.stage: StageContext = untimed

    def _check(self, p: SegmentorConfig) -> None:
        check_layer(self.unet, p.feature_layer, "segmentor.feature_layer")
        check_layer(self.unet, p.modulated_layer, "segmentor.modulated_layer")
        self.grid.index(p.t_modulate)
        if p.t_feature < 0 or p.t_feature >= self.components.scheduler.config.num_train_timesteps:
            raise ValueError(f"segmentor.t_feature={p.t_feature} is outside the scheduler's timesteps")
        for key in ("num_masks", "feature_noise_draws", "num_modulated_steps"):
            if getattr(p, key) < 1:
                raise ValueError(f"segmentor.{key} must be at least 1, got {getattr(p, key)}")
        for key, valid in (("impl", IMPLS), ("offset_placement", PLACEMENTS), ("interpolation", ("bicubic", "bilinear"))):
            if getattr(p, key) not in valid:
                raise ValueError(f"segmentor.{key} must be one of {', '.join(valid)}, got '{getattr(p, key)}'")
        check_compile_options(p.compile_backend, p.compile_mode)
        use_faiss_gpu(p.kmeans_device)  # rejects an unknown value, or gpu without faiss GPUs, before any image
        if p.decode_resolution % 8 or p.decode_resolution < 0:
            raise ValueError(f"segmentor.decode_resolution must be 0 or a positive multiple of 8, got {p.decode_resolution}")

    @classmethod
    def from_config(cls, cfg: DictConfig | EmerDiffConfig, device: Optional[str] = None) -> "EmerDiff":
        """Load SD as `cfg.model` says and build the segmentor with `cfg.segmentor`."""
        components = load_sd(to_dataclass(cfg.model, ModelConfig), device=device)
        return cls(components, to_dataclass(cfg.segmentor, SegmentorConfig))

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    @torch.no_grad()
    def segment(self, image: ImageInput) -> SegmentationOutput:
        """Segment one image (path, PIL image, HxWx3 array or CHW tensor in [0, 1])."""
        p = self.params
        with self.stage("encode"):
            # 1. Input: RGB at the working resolution; the per-image seed comes from its content.
            rgb = load_image(image)
            size: Tuple[int, int] = tuple(rgb.shape[1:])
            seed = image_seed(rgb, p.seed)
            generator = torch.Generator().manual_seed(seed)
            pixels = to_model_input(rgb, p.resolution, p.interpolation).to(self.device)
            # 2. Encode to the clean latent z0.
            z0 = encode_image(self.vae, pixels)
        with self.stage("features"):
            # 3-4. Queries of the feature layer at t_f (empty-prompt conditioning).
            features = extract_queries(self.unet, self.components.scheduler, z0, self.prompt, p.feature_layer,
                                       p.t_feature, p.feature_noise_draws, generator)
        with self.stage("kmeans"):
            # 5. k-means -> K low-resolution masks (empty clusters dropped).
            clusters = cluster_grid(features.queries, features.height, features.width, p.num_masks,
                                    seed, p.kmeans_restarts, p.kmeans_iters, use_faiss_gpu(p.kmeans_device))
        # 6-8. Exact inversion (recording Q/K), then modulated denoising of every (mask, sign) variant.
        modulated = modulated_masks(clusters.masks, p.min_mask_fraction)
        chunks = self.chunk_plan()
        latents = self._denoise(z0, clusters.masks[modulated], generator, chunks)
        with self.stage("decode"):
            # 9. Decode every variant (optionally from latents resized to decode_resolution).
            images = assignment.decode_latents(self.vae, self._decodable(latents), chunks.decode)
        with self.stage("assignment"):
            # 10-11. Per-pair RGB distance, Gaussian smoothing, per-pixel argmax at the input size.
            diffs = assignment.difference_maps(images)
            diffs = assignment.resize_maps(diffs, p.resolution)
            diffs = assignment.smooth(diffs, p.gaussian_sigma)
            diffs = torch.zeros(len(clusters.centroids), *diffs.shape[1:], device=diffs.device).index_copy_(
                0, modulated.to(diffs.device), diffs)  # masks left unmodulated (a trade-off switch) stay zero
            return self._output(clusters, diffs, size, seed)

    def segment_batch(self, images: Sequence[ImageInput]) -> List[SegmentationOutput]:
        """Segment several images; each result is what `segment` gives for that image alone."""
        return [self.segment(image) for image in images]

    def chunk_plan(self) -> ChunkPlan:
        """Batch sizes of the inversion, the variant chunks and the decodes (`segmentor.memory_budget_gb`)."""
        return plan_chunks(self, self.params.chunk_size, self.params.memory_budget_gb)

    def _denoise(self, z0: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, chunks: ChunkPlan
                 ) -> torch.Tensor:
        """SPEC 6-8: invert z0, then denoise every (mask, sign) variant; the record is freed on return."""
        with self.stage("inversion"):
            inversion, record = self._invert(z0, generator, chunks.inversion)
        with self.stage("modulated"):
            return denoise_variants(self.unet, self.prompt, self.grid, inversion, record,
                                    variant_offsets(masks, self.params.lam), self._modulation_settings(chunks.variants))

    def _invert(self, z0: torch.Tensor, generator: torch.Generator, chunk_size: int = 0
                ) -> Tuple[Inversion, Optional[AttentionRecord]]:
        p = self.params
        layers = frozenset(layer_names(self.unet)) if p.attention_injection else frozenset()
        control = AttentionControl(record_layers=layers)

        def denoise(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            control.timesteps = timesteps.tolist()
            text = self.prompt.expand(len(latents), -1, -1)
            return self.unet(latents.to(self.unet.dtype), timesteps.to(latents.device), text).sample.float()

        with controlled(self.unet, control):
            inversion = ddpm_inversion(denoise, self.grid, z0, p.t_modulate, generator, chunk_size)
        return inversion, (control.record if p.attention_injection else None)

    def _modulation_settings(self, chunk_size: int) -> ModulationSettings:
        p = self.params
        return ModulationSettings(p.modulated_layer, p.num_modulated_steps, p.offset_placement,
                                  p.attention_injection, chunk_size, p.impl)

    def _decodable(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents to decode: as they are, or resized for a lower decode resolution (a trade-off)."""
        side = self.params.decode_resolution
        return latents if side in (0, self.params.resolution) else assignment.resize_latents(latents, side)

    def _output(self, clusters: Clusters, diffs: torch.Tensor, size: Tuple[int, int], seed: int
                ) -> SegmentationOutput:
        labels, kept = assignment.argmax_at_size(diffs, size, keep=self.params.keep_diff_maps)
        bilinear = assignment.bilinear_labels(clusters.labels, len(clusters.centroids), size)
        return SegmentationOutput(
            labels=labels.cpu(), labels_bilinear=bilinear.cpu(), lowres_labels=clusters.labels,
            lowres_masks=clusters.masks, mask_embeddings=clusters.embeddings, seed=seed,
            diff_maps=None if kept is None else kept.cpu(),
        )


def modulated_masks(masks: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """Indices of the masks to modulate: all, or those covering at least `min_fraction` (largest always kept)."""
    share = masks.flatten(1).float().mean(1)
    keep = share >= min_fraction
    keep[share.argmax()] = True
    return keep.nonzero().flatten()
