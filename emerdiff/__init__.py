"""EmerDiff: training-free image segmentation with a frozen Stable Diffusion (ICLR 2024)."""

from .config import ConfigError, EmerDiffConfig, load_config
from .image import ImageLoadError
from .models import WeightsNotFoundError
from .segmentor import EmerDiff, SegmentationOutput

__all__ = [
    "ConfigError", "EmerDiff", "EmerDiffConfig", "ImageLoadError", "SegmentationOutput",
    "WeightsNotFoundError", "load_config",
]
