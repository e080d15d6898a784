"""The prediction cache of the evaluations: one ``<image id>.npz`` per image, tagged with its settings.

A cached entry is reused only if it was made with the same result-changing settings (its
`emerdiff.config.fingerprint`) and holds the same ground truth as the dataset's label; anything
else is a `StaleCacheError` that names what changed. Entries are written atomically, so a killed
run leaves no half-written entry, only temporary files the next run removes.

``OUTPUT/cache`` (`CACHE_DIR`) holds EmerDiff's predictions, shared by tools/eval.py and
tools/ov_eval.py when their model, segmentor and data settings agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import (
    EvalConfig,
    ModelConfig,
    SegmentorConfig,
    fingerprint,
    recorded_setting,
    result_settings,
    settings_diff,
)
from ..files import atomic_file, remove_temporary_files
from ..predict.render import resize_nearest

if TYPE_CHECKING:
    from ..segmentor import SegmentationOutput

CACHE_DIR = "cache"  # OUTPUT/cache: EmerDiff's predictions, one .npz per image


class StaleCacheError(RuntimeError):
    """A cached prediction was made with other settings or another ground truth than this run's."""


def prediction_settings(
    model: ModelConfig, segmentor: SegmentorConfig, dataset: str, size: int | None, crop: str = "center"
) -> dict:
    """The settings a cached prediction depends on; settings that cannot change the result are left out, and so is
    `crop` (`eval.crop`, a key added later) at the behaviour before it existed."""
    segmentor_settings = result_settings(segmentor)
    del segmentor_settings["keep_diff_maps"]  # the cache keeps no difference maps
    data = {"dataset": dataset, "size": size, **recorded_setting(EvalConfig, "crop", crop)}
    return {"model": result_settings(model), "segmentor": segmentor_settings, "data": data}


@dataclass
class CachedPrediction:
    """What the evaluation keeps of one image, all at the evaluated resolution."""

    gt: np.ndarray  # [H, W] int64 class ids, the ignore index elsewhere
    labels: np.ndarray  # [H, W] int64 EmerDiff mask ids in 0..K-1
    labels_bilinear: np.ndarray  # [H, W] int64 bilinear-baseline mask ids
    lowres_labels: np.ndarray  # [h, w] int64 k-means mask ids
    lowres_masks: np.ndarray  # [K, h, w] bool
    mask_embeddings: np.ndarray  # [K, C] float32

    @classmethod
    def from_output(cls, output: SegmentationOutput, gt: np.ndarray) -> CachedPrediction:
        """Keep the fields the protocols need from a segmentor output."""
        if tuple(output.labels.shape) != gt.shape:
            raise ValueError(f"prediction {tuple(output.labels.shape)} and ground truth {gt.shape} differ in size")
        arrays = output.to_numpy()
        return cls(
            gt=gt.astype(np.int64),
            **{
                name: arrays[name]
                for name in ("labels", "labels_bilinear", "lowres_labels", "lowres_masks", "mask_embeddings")
            },
        )

    @property
    def num_masks(self) -> int:
        return len(self.mask_embeddings)

    def segments(self, method: str) -> np.ndarray:
        """The [H, W] mask-id map a method scores: EmerDiff's labels, the bilinear baseline's, or the k-means masks
        upsampled nearest."""
        if method == "nearest":
            return resize_nearest(self.lowres_labels, self.labels.shape)
        return {"emerdiff": self.labels, "bilinear": self.labels_bilinear}[method]


class PredictionCache:
    """One ``<image id>.npz`` per image in a folder, written atomically, tagged with its prediction settings.

    Entries are `record` dataclasses holding at least ``gt`` (CachedPrediction by default; ovseg keeps its
    own record type in its own folder).
    """

    def __init__(
        self,
        folder: Path,
        settings: Mapping[str, Any],
        overwrite: bool = False,
        record: Callable[..., Any] = CachedPrediction,
    ) -> None:
        self.folder = Path(folder)
        self.settings = fingerprint(settings)
        self.overwrite = overwrite
        self.record = record

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def load(self, image_id: str, gt: np.ndarray) -> Any | None:
        """The cached prediction, or None if there is none (or output.overwrite asks to redo it)."""
        path = self.path(image_id)
        if self.overwrite or not path.is_file():
            return None
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        settings = str(arrays.pop("settings"))
        if settings != self.settings:
            raise StaleCacheError(
                f"{path} was predicted with other settings: {settings_diff(settings, self.settings)}."
                " Use another output folder, or output.overwrite=true to predict again."
            )
        prediction = self.record(**arrays)
        if not np.array_equal(prediction.gt, gt):
            raise StaleCacheError(
                f"{path} holds another ground truth than the dataset's label of '{image_id}'."
                " Use another output folder, or output.overwrite=true to predict again."
            )
        return prediction

    def save(self, image_id: str, prediction: Any) -> None:
        """Write temp file then rename, so a killed run never leaves a half-written entry."""
        with atomic_file(self.path(image_id)) as handle:
            np.savez_compressed(handle, settings=np.array(self.settings), **asdict(prediction))

    def other_settings(self) -> str | None:
        """``section.key: before -> now`` for the first entry made with other settings than this run's, or None when
        every entry agrees (or output.overwrite redoes them): a run can refuse a stale cache before it starts."""
        if self.overwrite:
            return None
        for path in sorted(self.folder.glob("*.npz")):
            with np.load(path) as stored:
                settings = str(stored["settings"])
            if settings != self.settings:
                return settings_diff(settings, self.settings)
        return None

    def count(self, image_ids: Sequence[str]) -> int:
        """How many of these images the cache would answer (0 when output.overwrite redoes them all)."""
        return 0 if self.overwrite else sum(self.path(i).is_file() for i in image_ids)

    def remove_temporary_files(self) -> None:
        """Drop what a killed run was writing in the cache folder."""
        remove_temporary_files(self.folder)
