"""Prediction on a user's images under Lightning: inputs, the frozen module, the results folder, pictures.

`inputs` finds and reads the images, `lightning` segments them (`EmerDiffPredictor`) and saves the
results through `ResultWriter` into an `outputs.OutputStore`; `render` draws label maps; `export`
rebuilds COCO JSON and per-mask PNGs from a results folder. Plug-ins (ovseg's mask names) add to
each image's results through `ExtrasStep` / `ImageExtras`; nothing here imports them.
"""

from .inputs import InputError, PredictImages, PredictSample, SourceImage, SourceImages, find_images
from .lightning import EmerDiffPredictor, ExtrasStep, ImagesProgressBar, ResultWriter
from .outputs import CONFIG, FAILURES, MANIFEST, ImageExtras, OutputOptions, OutputStore, PredictedImage

__all__ = [
    "CONFIG", "FAILURES", "MANIFEST", "EmerDiffPredictor", "ExtrasStep", "ImageExtras", "ImagesProgressBar",
    "InputError", "OutputOptions", "OutputStore", "PredictImages", "PredictSample", "PredictedImage",
    "ResultWriter", "SourceImage", "SourceImages", "find_images",
]
