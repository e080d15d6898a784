"""The EmerDiff segmentor: steps 1-11 as one numbered recipe over the stage modules.

Each step is a public method (`encode`, `features`, `cluster`, `invert`, `denoise`, `decode`,
`difference_maps`, `output`), and `mask_maps` runs them in order (steps 1-7 are `inverted`, which
the self-check runs too). The benchmark's cost model
(`emerdiff.profiling.image_cost`) and the memory planner (`emerdiff.memory`) run these same
methods on a meta-device copy, so a new switch cannot be forgotten in them.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from omegaconf import DictConfig
from torch import nn

from . import difference
from .clustering import Clusters, KMeans, cluster_grid, use_faiss_gpu
from .compiling import check_compile_options, compile_regions
from .config import ConfigError, EmerDiffConfig, ModelConfig, SegmentorConfig, check_rules, section
from .features import QueryFeatures, extract_queries
from .image import ImageInput, capped_aspect_note, image_seed, load_image, to_model_input, working_size
from .inversion import DDPMGrid, Inversion, ddpm_inversion
from .memory import ChunkPlan, ChunkRunner, plan_chunks, resolve_budget
from .models import Conditioning, SDComponents, at_least_float32, load_sd, pipeline_components
from .modulation import ModulationSettings, denoise_variants, variant_offsets
from .observers import StageObserver, observed_stage
from .processors import AttentionControl, AttentionRecord, Observer, check_layer, controlled, layer_names
from .vae import decode_latents, decode_size, encode_image, float32_vae, overflowed, resize_latents

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


@dataclass
class SegmentationOutput:
    """One image's result; every tensor is on the CPU."""

    labels: torch.Tensor  # [H, W] int64 at the input size, values in 0..K-1
    labels_bilinear: torch.Tensor  # [H, W] int64, bilinear-upsampling baseline of the same masks
    lowres_labels: torch.Tensor  # [h, w] int64 k-means labels on the feature grid
    lowres_masks: torch.Tensor  # [K, h, w] bool
    mask_embeddings: torch.Tensor  # [K, C] mean k-means feature of each mask
    seed: int  # per-image seed (from segmentor.seed and the image content)
    diff_maps: torch.Tensor | None = None  # [K, H, W] float, with segmentor.keep_diff_maps

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


@dataclass
class Inverted:
    """The recipe after step 7 (`EmerDiff.inverted`): the k-means masks and the inversion the variants start from."""

    size: tuple[int, int]  # SD's working size of the image
    features: QueryFeatures  # the feature layer's queries the masks were clustered from
    clusters: Clusters
    inversion: Inversion
    record: AttentionRecord | None  # the recorded Q/K, with segmentor.attention_injection


@dataclass
class MaskMaps:
    """The recipe's result before the final argmax: the k-means masks and one smoothed difference map per mask."""

    clusters: Clusters
    maps: torch.Tensor  # [K, h, w] float32 at SD's working size; masks left unmodulated stay zero
    size: tuple[int, int]  # the input image's (H, W)
    seed: int


logger = logging.getLogger(__name__)
T = TypeVar("T")


def run_chunks(fn: Callable[[torch.Tensor], torch.Tensor], items: torch.Tensor, size: int) -> torch.Tensor:
    """`fn` over consecutive chunks of `size` items (0 = all at once), results concatenated."""
    size = size if size > 0 else max(len(items), 1)
    return torch.cat([fn(items[s : s + size]) for s in range(0, len(items), size)])


class EmerDiff(nn.Module):
    """Training-free segmentation with a frozen Stable Diffusion (Namekata et al., ICLR 2024).

    >>> model = EmerDiff.from_config(load_config("configs/tiny.yaml"))
    >>> out = model.segment("photo.jpg")  # out.labels: [H, W] mask ids
    """

    prompt: torch.Tensor  # [1, 77, D] the empty prompt's text-encoder states, a buffer (moves with the module)
    pooled_prompt: torch.Tensor | None  # SDXL's pooled text embedding, a buffer; None below SDXL

    def __init__(self, components: SDComponents, params: SegmentorConfig) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.components = components
        self.params = params
        self.grid = DDPMGrid.from_scheduler(components.scheduler, params.num_inference_steps, params.timestep_spacing)
        self._check(params)
        # the one-step estimate needs only t_m: the inversion then runs one step too
        self.grid = self.grid.thinned(params.t_modulate, 1 if params.one_step_estimate else params.denoise_steps)
        if params.channels_last:  # converts the shared UNet/VAE in place; results equal up to rounding
            for module in (self.unet, self.vae):
                module.to(memory_format=torch.channels_last)
        if params.compile:  # compiles the shared UNet/VAE regions in place, lazily at their first call
            compile_regions((self.unet, self.vae), params.compile_backend, params.compile_mode)
        conditioning = components.encode_prompt("")
        self.register_buffer("prompt", conditioning.text, persistent=False)
        self.register_buffer("pooled_prompt", conditioning.pooled, persistent=False)  # None below SDXL
        self.pixels_per_latent = conditioning.pixels_per_latent
        self.observers: list[StageObserver] = []  # what watches the stages (`emerdiff.observers.observing`)
        self.run_chunks: ChunkRunner = run_chunks
        self.kmeans: KMeans = cluster_grid  # step 5's k-means (the cost model's stand-in has no faiss)
        self.chunks: ChunkPlan | None = None  # planned once, on the first image (`chunk_plan`)

    def _check(self, p: SegmentorConfig) -> None:
        """The config's rules (also for settings built in Python), then what they cannot check alone: layer names,
        t_m on this scheduler's grid, compile options, a faiss GPU."""
        check_rules(p, "segmentor.")
        check_layer(self.unet, p.feature_layer, "segmentor.feature_layer")
        check_layer(self.unet, p.modulated_layer, "segmentor.modulated_layer")
        if p.t_modulate not in self.grid.timesteps:
            raise ConfigError(
                f"segmentor.t_modulate={p.t_modulate} is not on the scheduler grid of "
                f"segmentor.num_inference_steps={p.num_inference_steps}: choose one of "
                f"{', '.join(map(str, self.grid.timesteps))}"
            )
        if p.t_feature >= self.components.scheduler.config.num_train_timesteps:
            raise ConfigError(f"segmentor.t_feature={p.t_feature} is outside the scheduler's timesteps")
        if p.one_step_estimate and (p.denoise_steps or p.num_modulated_steps > 1):
            raise ConfigError(
                "segmentor.one_step_estimate=true stops after the modulated step: it replaces "
                "segmentor.denoise_steps and modulates one step; set segmentor.denoise_steps=0 and "
                "segmentor.num_modulated_steps=1"
            )
        check_compile_options(p.compile_backend, p.compile_mode)
        use_faiss_gpu(p.kmeans_device)  # gpu without faiss GPUs is refused before any image

    @classmethod
    def from_config(cls, cfg: DictConfig | EmerDiffConfig, device: str | None = None) -> EmerDiff:
        """Load SD as `cfg.model` says and build the segmentor with `cfg.segmentor`."""
        components = load_sd(section(cfg.model, ModelConfig), device=device)
        return cls(components, section(cfg.segmentor, SegmentorConfig))

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline, settings: SegmentorConfig | None = None) -> EmerDiff:
        """A segmentor on a loaded diffusers ``StableDiffusionPipeline``, sharing its modules instead of copying them.

        It runs the pipeline's own UNet, VAE, text encoder and tokenizer, on their device and in their dtype (move
        the pipeline first with ``pipe.to(device, dtype)``; CPU offload is not supported), frozen in place (eval
        mode, no gradients), with a ``DDIMScheduler`` made from the pipeline's scheduler config, because the
        inversion and denoising run on DDIM's grid (the pipeline keeps its own scheduler). ``settings`` (default
        ``SegmentorConfig()``) are checked like a loaded config's ``segmentor`` section.
        """
        components = pipeline_components(pipe, name=pipe.name_or_path or type(pipe).__name__)
        return cls(components, settings if settings is not None else SegmentorConfig())

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    def conditioning(self) -> Conditioning:
        """The empty prompt's conditioning that every UNet call of every stage receives (SDXL: with the pooled
        embedding; the added time ids follow each call's latent size)."""
        return Conditioning(self.prompt, self.pooled_prompt, self.pixels_per_latent)

    def stage(self, name: str) -> AbstractContextManager[None]:
        """The block of the recipe's stage `name`, seen by every observer (none by default: it costs nothing)."""
        return observed_stage(self.observers, name)

    @torch.no_grad()
    def segment(self, image: ImageInput) -> SegmentationOutput:
        """Segment one image (path, PIL image, HxWx3 array or CHW tensor in [0, 1])."""
        with self.stage("encode"):
            # 1. Input: RGB in [0, 1]; the per-image seed comes from its content.
            rgb = load_image(image)
            seed = image_seed(rgb, self.params.seed)
        return self.output(self.mask_maps(rgb, seed))

    def segment_batch(self, images: Sequence[ImageInput]) -> list[SegmentationOutput]:
        """Segment several images; each result is what `segment` gives for that image alone."""
        return [self.segment(image) for image in images]

    @torch.no_grad()
    def inverted(self, rgb: torch.Tensor, seed: int) -> Inverted:
        """Steps 1-7 of the recipe, from an RGB image [3, H, W] in [0, 1] to its k-means masks and exact inversion."""
        p = self.params
        generator = torch.Generator().manual_seed(seed)
        with self.stage("encode"):
            # 1-2. Resize to SD's working size (aspect kept unless square), encode to the clean latent z0.
            size = working_size(rgb.shape[1], rgb.shape[2], p.resolution, p.aspect, p.max_pixels)
            capped = capped_aspect_note(rgb.shape[1], rgb.shape[2], p.resolution, p.aspect, p.max_pixels)
            if capped:
                logger.warning(capped)
            z0 = self.encode(to_model_input(rgb, size, p.interpolation).to(self.device))
        with self.stage("features"):
            # 3-4. Queries of the feature layer at t_f (empty-prompt conditioning).
            features = self.features(z0, generator)
        with self.stage("kmeans"):
            # 5. k-means -> K low-resolution masks (empty clusters dropped).
            clusters = self.cluster(features, seed)
        steps = len(self.grid.tail(p.t_modulate))
        with self.stage("inversion"):
            # 6-7. Exact inversion, recording Q/K for the injection.
            inversion, record = self.halving_on_oom(
                "inversion", steps, lambda n: self.invert(z0, generator, n), generator
            )
        return Inverted(size, features, clusters, inversion, record)

    @torch.no_grad()
    def mask_maps(self, rgb: torch.Tensor, seed: int) -> MaskMaps:
        """The recipe from an RGB image [3, H, W] in [0, 1] to the K smoothed difference maps."""
        p = self.params
        inverted = self.inverted(rgb, seed)
        clusters, size = inverted.clusters, inverted.size
        modulated = modulated_masks(clusters.masks, p.min_mask_fraction)
        offsets = variant_offsets(clusters.masks[modulated], p.lam)
        with self.stage("modulated"):
            # 8. Modulated denoising of every (mask, sign) variant.
            latents = self.halving_on_oom(
                "variants", len(offsets), partial(self.denoise, inverted.inversion, inverted.record, offsets)
            )
        del inverted  # the injection record is the largest tensor of the run: free it before decoding
        maps = self.variant_maps(latents, modulated, len(clusters.centroids), size)
        return MaskMaps(clusters, maps, (rgb.shape[1], rgb.shape[2]), seed)

    def variant_maps(
        self, latents: torch.Tensor, modulated: torch.Tensor, num_masks: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """Steps 9-10 in `segmentor.difference_space`: decoded variants compared in RGB, or (an approximation, no
        decode) their final latents compared directly."""
        if self.params.difference_space == "pixel":
            return self.decoded_maps(latents, modulated, num_masks, size)
        with self.stage("assignment"):
            # 9-10. Per-pair latent distance (4 channels), upsampled to the working size, Gaussian smoothing.
            return self.difference_maps(latents, modulated, num_masks, size)

    def decoded_maps(
        self, latents: torch.Tensor, modulated: torch.Tensor, num_masks: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """Steps 9-10; a half-precision VAE that overflows (NaN or inf in the maps) decodes again in float32."""
        with self.stage("decode"):
            # 9. Decode every variant.
            images = self.halving_on_oom("decode", len(latents), lambda n: self.decode(latents, n))
        with self.stage("assignment"):
            # 10. Per-pair RGB distance and Gaussian smoothing (11, the argmax, is `output`).
            maps = self.difference_maps(images, modulated, num_masks, size)
        if not overflowed(self.vae, maps):
            return maps
        logger.warning(
            "non-finite difference maps from the %s VAE: decoding this image again in float32", self.vae.dtype
        )
        with float32_vae(self.vae):
            maps = self.difference_maps(self.decode(latents, self.chunk_plan().decode), modulated, num_masks, size)
        if not torch.isfinite(maps).all():
            raise FloatingPointError(
                "the difference maps are not finite even with a float32 VAE decode: the "
                "latents themselves overflowed; try model.dtype=float32 or bfloat16"
            )
        return maps

    def halving_on_oom(
        self, stage: str, count: int, run: Callable[[int], T], generator: torch.Generator | None = None
    ) -> T:
        """`run(batch size)` with this stage's planned batch; on out-of-memory, free what it held, halve the batch
        and try again, down to one item per call, with `generator` back where it was (the same noise, so the
        same result). The smaller batch is kept for the next images."""
        state = None if generator is None else generator.get_state()
        while True:
            size = getattr(self.chunk_plan(), stage)
            if generator is not None and state is not None:
                generator.set_state(state)
            try:
                return run(size)
            except RuntimeError as exc:
                smaller = (size if 0 < size < count else count) // 2
                if not is_out_of_memory(exc) or smaller < 1:
                    raise
            release_memory(self.device)
            logger.warning(
                "out of memory in the %s stage at batch %d: retrying at batch %d (kept for the next images)",
                stage,
                size if size > 0 else count,
                smaller,
            )
            smaller_batch: dict[str, Any] = {stage: smaller}
            self.chunks = replace(self.chunk_plan(), **smaller_batch)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Step 2: pixels [1, 3, h, w] in [-1, 1] -> z0 [1, 4, h/8, w/8] float32; a half-precision VAE that
        overflows (SDXL's in float16) encodes again in float32."""
        z0 = encode_image(self.vae, pixels)
        if not overflowed(self.vae, z0):
            return z0
        logger.warning("non-finite latents from the %s VAE: encoding this image again in float32", self.vae.dtype)
        with float32_vae(self.vae):
            return encode_image(self.vae, pixels)

    def features(self, z0: torch.Tensor, generator: torch.Generator) -> QueryFeatures:
        """Step 3-4: the feature layer's queries at t_f, averaged over the noise draws."""
        p = self.params
        return extract_queries(
            self.unet,
            self.components.scheduler,
            z0,
            self.conditioning(),
            p.feature_layer,
            p.t_feature,
            p.feature_noise_draws,
            generator,
        )

    def cluster(self, features: QueryFeatures, seed: int) -> Clusters:
        """Step 5: faiss k-means of the queries into at most K masks of the feature grid."""
        p = self.params
        return self.kmeans(
            features.queries,
            features.height,
            features.width,
            p.num_masks,
            seed,
            p.kmeans_restarts,
            p.kmeans_iters,
            use_faiss_gpu(p.kmeans_device),
        )

    def invert(
        self, z0: torch.Tensor, generator: torch.Generator, chunk_size: int = 0
    ) -> tuple[Inversion, AttentionRecord | None]:
        """Step 6-7: the inversion's latents and noise maps, and the Q/K record when injection is on."""
        p = self.params
        layers = frozenset(layer_names(self.unet)) if p.attention_injection else frozenset()
        control = AttentionControl(record_layers=layers)

        def denoise(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            control.timesteps = timesteps.tolist()
            conditioning = self.conditioning().expand(len(latents)).unet_kwargs(latents)
            return at_least_float32(
                self.unet(latents.to(self.unet.dtype), timesteps.to(latents.device), **conditioning).sample
            )

        with controlled(self.unet, control):
            inversion = ddpm_inversion(denoise, self.grid, z0, p.t_modulate, generator, chunk_size)
        return inversion, (control.record if p.attention_injection else None)

    def modulation_settings(self, chunk_size: int = 0) -> ModulationSettings:
        """Step 8's settings: layer, steps, placement, injection, variants per UNet call, implementation, one-step
        estimate."""
        p = self.params
        return ModulationSettings(
            p.modulated_layer,
            p.num_modulated_steps,
            p.offset_placement,
            p.attention_injection,
            chunk_size,
            p.impl,
            p.one_step_estimate,
        )

    def denoise(
        self,
        inversion: Inversion,
        record: AttentionRecord | None,
        offsets: torch.Tensor,
        chunk_size: int = 0,
        observer: Observer | None = None,
    ) -> torch.Tensor:
        """Step 8: final latents [V, 4, h, w] of the variants' offsets [V, 1, h, w], in chunks of UNet batches."""
        settings = self.modulation_settings(chunk_size)

        def chunk(part: torch.Tensor) -> torch.Tensor:
            return denoise_variants(
                self.unet, self.conditioning(), self.grid, inversion, record, part, settings, observer
            )

        return self.run_chunks(chunk, offsets, settings.batch_size(len(offsets)))

    def decode(self, latents: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        """Step 9: RGB images of the variants (from latents resized first for a lower `decode_resolution`)."""
        encoded = (8 * latents.shape[-2], 8 * latents.shape[-1])
        size = decode_size(encoded, self.params.resolution, self.params.decode_resolution)
        if size != encoded:
            latents = resize_latents(latents, size)
        return self.run_chunks(lambda part: decode_latents(self.vae, part), latents, chunk_size)

    def difference_maps(
        self, variants: torch.Tensor, modulated: torch.Tensor, num_masks: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """Step 9-10: [K, h, w] smoothed pair distances of the variants (decoded images, or latents) at the working
        `size`; masks not in `modulated` (a trade-off) stay zero."""
        p = self.params
        diffs = difference.difference_maps(variants)
        diffs = difference.resize_maps(diffs, size)
        diffs = difference.smooth(diffs, p.gaussian_sigma)
        return torch.zeros(num_masks, *diffs.shape[1:], dtype=diffs.dtype, device=diffs.device).index_copy_(
            0, modulated.to(diffs.device), diffs
        )

    def output(self, maps: MaskMaps) -> SegmentationOutput:
        """Step 11: every input pixel takes the mask with the largest difference; the bilinear baseline beside it."""
        with self.stage("assignment"):
            clusters = maps.clusters
            labels, kept = difference.argmax_at_size(maps.maps, maps.size, keep=self.params.keep_diff_maps)
            bilinear = difference.bilinear_labels(clusters.labels, len(clusters.centroids), maps.size)
            return SegmentationOutput(
                labels=labels.cpu(),
                labels_bilinear=bilinear.cpu(),
                lowres_labels=clusters.labels,
                lowres_masks=clusters.masks,
                mask_embeddings=clusters.embeddings,
                seed=maps.seed,
                diff_maps=None if kept is None else kept.cpu(),
            )

    def chunk_plan(self) -> ChunkPlan:
        """Batch sizes of the inversion, the variant chunks and the decodes, planned once for this model on its
        device (`segmentor.memory_budget_gb`, `auto` from the free memory; `segmentor.chunk_size`)."""
        if self.chunks is None:
            budget = resolve_budget(self.params.memory_budget_gb, self.device)
            self.chunks = plan_chunks(self, self.params.chunk_size, budget)
            if self.device.type != "meta":
                logger.info(
                    "memory budget %.2f GiB (segmentor.memory_budget_gb=%s): batches of %s inversion steps, "
                    "%s variants, %s decodes (0 = all)",
                    budget,
                    self.params.memory_budget_gb,
                    self.chunks.inversion,
                    self.chunks.variants,
                    self.chunks.decode,
                )
        return self.chunks


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's error."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def release_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so that a smaller batch can fit."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def modulated_masks(masks: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """Indices of the masks to modulate: all, or those covering at least `min_fraction` (largest always kept)."""
    share = masks.flatten(1).float().mean(1)
    keep = share >= min_fraction
    keep[share.argmax()] = True
    return keep.nonzero().flatten()
