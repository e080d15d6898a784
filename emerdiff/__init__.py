"""EmerDiff: training-free image segmentation with a frozen Stable Diffusion (ICLR 2024).

Names are imported on first use (PEP 562): `import emerdiff.config` stays light, so command-line
tools can parse their arguments and check a config before torch and diffusers load.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ConfigError": "config", "EmerDiffConfig": "config", "load_config": "config",
    "ImageLoadError": "image",
    "WeightsNotFoundError": "models",
    "EmerDiff": "segmentor", "SegmentationOutput": "segmentor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emerdiff' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
