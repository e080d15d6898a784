"""EmerDiff: training-free image segmentation with a frozen Stable Diffusion (ICLR 2024).

Names are imported on first use (PEP 562): `import emerdiff.config` stays light, so command-line
tools can parse their arguments and check a config before torch and diffusers load.
"""

from .lazy import lazy_exports

__version__ = "0.2.0"  # the one version: setup.cfg reads it, results and commands report it

_EXPORTS = {
    "ConfigError": "config",
    "EmerDiffConfig": "config",
    "load_config": "config",
    "WeightsNotFoundError": "config",
    "ImageLoadError": "image",
    "EmerDiff": "segmentor",
    "SegmentationOutput": "segmentor",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
