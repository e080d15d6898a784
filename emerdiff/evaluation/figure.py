"""The comparison figure of a finished evaluation (tools/visualize.py on a results folder of tools/eval.py).

One row per image: image | ground truth | k-means masks upsampled nearest | bilinear | EmerDiff, each mask
coloured by the class the per-image Hungarian matching gives it under the folder's own eval settings (the
class maps that protocol scored), black where a mask got no class or the ground truth is ignored. The split,
its evaluated size and the settings come from results.json, the masks and the ground truth from the
prediction cache; only the images are read from the split again. No model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..config import ConfigError, EvalConfig
from ..data import DatasetMetadata
from ..predict.render import NamedLabels, class_fill, palette, resize_nearest, titled_grid, with_legend
from .cache import CACHE_DIR, CachedPrediction, PredictionCache
from .protocols import UNMATCHED
from .report import earlier_results
from .scoring import image_class_maps

if TYPE_CHECKING:
    from .module import EvaluationData

FIGURE = "figure.png"  # EVAL_DIR/figure.png
PANEL_HEIGHT = 256  # every panel is scaled to this height (the toy world's 128 px scenes, doubled)
COLUMNS = {"nearest": "k-means masks, nearest", "bilinear": "bilinear", "emerdiff": "EmerDiff"}  # method -> title


@dataclass(frozen=True)
class SavedEvaluation:
    """What a results folder of tools/eval.py records of its run: the split, its evaluated size, the eval settings
    and the settings its cached predictions are tagged with."""

    folder: Path
    dataset: str
    size: int | None
    settings: EvalConfig
    prediction_settings: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> SavedEvaluation | None:
        """The folder's record, or None when it is no results folder of tools/eval.py (no results.json with its
        settings, or no cache folder)."""
        results = earlier_results(Path(folder) / "results.json")
        if results is None or not (Path(folder) / CACHE_DIR).is_dir():
            return None
        prediction, protocol = results.get("prediction_settings"), results.get("protocol_settings")
        if not isinstance(prediction, dict) or not isinstance(protocol, dict) or "data" not in prediction:
            return None
        known = {f.name for f in fields(EvalConfig)}
        settings = EvalConfig(**{k: v for k, v in protocol.items() if k in known})
        data = prediction["data"]
        return cls(Path(folder), data["dataset"], data.get("size"), settings, prediction)

    def cache(self) -> PredictionCache:
        """The folder's prediction cache, expecting entries made with the recorded settings."""
        return PredictionCache(self.folder / CACHE_DIR, self.prediction_settings)


def figure_ids(split_ids: Sequence[str], cache: PredictionCache, count: int, wanted: Sequence[str] = ()) -> list[str]:
    """`wanted`, else the first `count` images of the split that the cache holds; a ConfigError names an id the split
    lacks or the cache does not hold."""
    if wanted:
        known = set(split_ids)
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)}: no such image in the split (its first ids: {', '.join(split_ids[:3])}, ...)"
            )
        missing = [i for i in wanted if not cache.path(i).is_file()]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: not evaluated (no prediction in {cache.folder}); pick others")
        return list(wanted)
    cached = [i for i in split_ids if cache.path(i).is_file()]
    if not cached:
        raise ConfigError(f"{cache.folder} holds no prediction of the split's images; evaluate some first")
    return cached[:count]


@dataclass(frozen=True)
class FigureRow:
    """One image of the figure: the image as evaluated and its class maps (UNMATCHED: no class, or ignored)."""

    image: np.ndarray  # [H, W, 3] uint8
    gt: np.ndarray  # [H, W] int64 ground-truth classes, UNMATCHED where ignored
    classes: dict[str, np.ndarray]  # method -> [H, W] int64 classes of its masks after the per-image Hungarian matching


def figure_row(
    image: np.ndarray, prediction: CachedPrediction, metadata: DatasetMetadata, settings: EvalConfig
) -> FigureRow:
    """The class maps the per-image Hungarian protocol scores for each method, made as the evaluator makes them."""
    maps = image_class_maps(prediction, metadata, settings, ["hungarian"])
    classes = {method: maps.classes[method]["hungarian"] for method in COLUMNS}
    valid = (prediction.gt != metadata.ignore_index) & (prediction.gt >= 0) & (prediction.gt < metadata.num_classes)
    return FigureRow(image, np.where(valid, prediction.gt, UNMATCHED), classes)


def class_colours(metadata: DatasetMetadata) -> np.ndarray:
    """[C, 3] uint8 class colours: the split's own palette, or `palette`'s when the split's gives a class black, the
    colour of no class (PASCAL VOC's background, and every label set that uses VOC's colour map)."""
    colours = np.asarray(metadata.palette, dtype=np.uint8).reshape(-1, 3)[: metadata.num_classes]
    if len(colours) < metadata.num_classes or not colours.any(axis=1).all():
        return palette(metadata.num_classes)
    return colours


def comparison_figure(rows: Sequence[FigureRow], metadata: DatasetMetadata) -> Image.Image:
    """The rows under a title per column, every panel PANEL_HEIGHT high, with a legend of the classes shown."""
    colours = class_colours(metadata)
    grid = []
    for row in rows:
        height, width = row.gt.shape
        size = (PANEL_HEIGHT, max(1, round(width * PANEL_HEIGHT / height)))
        enlarged = size[0] >= row.image.shape[0]  # pixel for pixel when enlarged, smoothly when shrunk
        resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.BILINEAR
        photo = np.asarray(Image.fromarray(row.image).resize(size[::-1], resample))
        maps = [row.gt, *(row.classes[method] for method in COLUMNS)]
        grid.append([photo, *(class_fill(resize_nearest(m, size), colours) for m in maps)])
    picture = titled_grid(grid, ["image", "ground truth", *COLUMNS.values()])
    shown = np.concatenate([m.ravel() for row in rows for m in (row.gt, *row.classes.values())])
    return with_legend(picture, NamedLabels(shown, metadata.classes), colours, across=True)


def evaluation_figure(
    saved: SavedEvaluation, data: EvaluationData, metadata: DatasetMetadata, ids: Sequence[str]
) -> Image.Image:
    """The figure of the split's images `ids`, their masks and ground truth from the folder's cache; a
    StaleCacheError when an entry was made with other settings or holds another ground truth than the split."""
    cache = saved.cache()
    position = {image_id: n for n, image_id in enumerate(data.image_ids())}
    items = data.items()
    rows = []
    for image_id in ids:
        item = items[position[image_id]]
        prediction = cache.load(image_id, np.asarray(item["label"], dtype=np.int64))
        if prediction is None:
            raise ValueError(f"{cache.path(image_id)}: no cached prediction")
        rows.append(figure_row(item["image"], prediction, metadata, saved.settings))
    return comparison_figure(rows, metadata)
