"""EmerDiff.from_pipeline: segmenting with the modules of a diffusers StableDiffusionPipeline the user already holds."""

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from omegaconf import OmegaConf

from conftest import TINY
from emerdiff import EmerDiff, load_config
from emerdiff.config import ConfigError, SegmentorConfig
from emerdiff.models import build_random_sd


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A real diffusers pipeline assembled from the miniature SD's modules, with SD's usual PNDM scheduler."""
    parts = build_random_sd("tiny", seed=seed)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=PNDMScheduler.from_config(parts.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def test_segmentor_from_a_pipeline_shares_its_modules_and_segments_like_one_loaded_from_the_same_weights(photo):
    cfg = load_config(TINY, overrides=["segmentor.resolution=128", "segmentor.num_masks=3"])
    pipe = tiny_pipeline(seed=cfg.model.init_seed)
    model = EmerDiff.from_pipeline(pipe, OmegaConf.to_object(cfg.segmentor))
    assert model.unet is pipe.unet and model.vae is pipe.vae and model.text_encoder is pipe.text_encoder
    assert model.components.tokenizer is pipe.tokenizer
    assert isinstance(model.components.scheduler, DDIMScheduler) and isinstance(pipe.scheduler, PNDMScheduler)
    labels = model.segment(photo).labels
    assert torch.equal(labels, EmerDiff.from_config(cfg).segment(photo).labels)
    assert labels.shape == photo.shape[:2] and labels.unique().numel() > 1


def test_pipeline_segmentor_runs_in_the_pipelines_dtype_with_its_modules_frozen_in_place():
    pipe = tiny_pipeline().to(torch.bfloat16)
    model = EmerDiff.from_pipeline(pipe, SegmentorConfig(resolution=128, num_masks=3))
    assert model.prompt.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def test_pipeline_segmentor_takes_the_default_settings_when_none_and_checks_given_ones_like_a_config():
    pipe = tiny_pipeline()
    assert EmerDiff.from_pipeline(pipe).params == SegmentorConfig()
    with pytest.raises(ConfigError, match="segmentor.num_masks"):
        EmerDiff.from_pipeline(pipe, SegmentorConfig(num_masks=0))


def test_a_pipeline_split_across_devices_is_refused_naming_where_each_module_is():
    pipe = tiny_pipeline()
    pipe.vae.to("meta")
    with pytest.raises(ValueError, match=r"unet: cpu, vae: meta, text_encoder: cpu.*pipe\.to\(device\)"):
        EmerDiff.from_pipeline(pipe)
