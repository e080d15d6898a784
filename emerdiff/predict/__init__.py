"""Prediction on a user's images under Lightning: inputs, the frozen module, the results folder, pictures.

`inputs` finds and reads the images, `lightning` segments them (`EmerDiffPredictor`) and saves the
results through `PredictionWriter` into an `outputs.OutputStore`; `render` draws label maps; `export`
rebuilds COCO JSON and per-mask PNGs from a results folder. Plug-ins (ovseg's mask names) add to
each image's results through `ExtrasStep` / `ImageExtras`; nothing here imports them. Names are
imported on first use (PEP 562), so a tool's `--help` does not wait for torch and Lightning.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "InputError": "inputs",
    "PredictImages": "inputs",
    "PredictSample": "inputs",
    "SourceImage": "inputs",
    "SourceImages": "inputs",
    "find_images": "inputs",
    "EmerDiffPredictor": "lightning",
    "ExtrasStep": "lightning",
    "ImagesProgressBar": "lightning",
    "PredictionWriter": "lightning",
    "CONFIG": "layout",
    "FAILURES": "layout",
    "MANIFEST": "layout",
    "MaskNames": "names",
    "ImageExtras": "outputs",
    "OutputOptions": "outputs",
    "OutputStore": "outputs",
    "PredictedImage": "outputs",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
