"""The demo's segmentation: one upload per call, with the visitor's K, lambda and vocabulary, on SD loaded once.

Each (K, lambda) gets a light `EmerDiff` of its own on the shared components (the last few are kept), so
no visitor changes what another one runs, and a lock runs one segmentation at a time (the UNet's attention
processors are swapped during a run). Masks are named through the prediction writer's extras contract: a
`Naming` gives, for a vocabulary text, the `ExtrasStep` that names masks from it. The downloads are a
one-image results folder written by the prediction outputs (`OutputStore`) and its COCO export.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emerdiff.config import SegmentorConfig
from emerdiff.models import SDComponents
from emerdiff.observers import observing
from emerdiff.predict.export import write_coco
from emerdiff.predict.names import MaskNames
from emerdiff.predict.outputs import ImageExtras, OutputOptions, OutputStore, PredictedImage
from emerdiff.profiling import STAGES
from emerdiff.segmentor import EmerDiff, SegmentationOutput

from .uploads import MAX_PIXELS, MAX_SIDE, DemoInputError, Upload, read_upload

if TYPE_CHECKING:  # Lightning is not needed to name a demo's masks
    from emerdiff.predict.lightning import ExtrasStep

MAX_MASKS = 40  # the K slider's upper end (or the config's K when larger)
KEEP_RESULTS_S = 3600  # downloads of older requests are deleted
DOWNLOADS = "downloads"  # WORKDIR/downloads/REQUEST/NAME.png, .npz, _coco.json
DOWNLOAD_FILES = OutputOptions(overlay=False)  # of a results folder, the downloads are NAME.png and NAME.npz
KEEP_SEGMENTORS = 8  # per-(K, lambda) segmentors kept, with their chunk plans

STAGE_TITLES = {
    "encode": "encoding the photo (VAE)",
    "features": "UNet features",
    "kmeans": "k-means",
    "inversion": "inversion",
    "modulated": "modulated denoising",
    "decode": "decoding the variants (VAE)",
    "assignment": "assigning every pixel",
    "naming": "naming the masks (CLIP)",
}

Naming = Callable[[str], "ExtrasStep"]  # vocabulary text -> the step naming masks from it (ovseg.any_vocab)
Progress = Callable[[float, str], None]  # (fraction done, what runs now)


class ProgressObserver:
    """A stage observer (`emerdiff.observers`) that reports each of `stages` to `report` as it starts.

    A stage entered again (the segmentor opens some twice) or an unknown one is not reported again: the
    bar only moves forward.
    """

    def __init__(self, report: Progress, stages: Sequence[str]) -> None:
        self.report = report
        self.stages = list(stages)
        self.last = -1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        step = self.stages.index(name) if name in self.stages else -1
        if step > self.last:
            self.last = step
            self.report(step / len(self.stages), f"{step + 1}/{len(self.stages)} {STAGE_TITLES.get(name, name)}")
        yield


@dataclass
class DemoResult:
    """One segmentation in the demo: the photo, the output, the names, the files to download."""

    upload: Upload
    output: SegmentationOutput
    names: MaskNames | None
    seconds: float
    files: list[Path]

    @property
    def num_masks(self) -> int:
        return self.output.num_masks

    def mask_table(self) -> list[dict[str, Any]]:
        """One row per mask: id, share of the photo's pixels, class and score when named."""
        labels = self.output.labels.numpy()
        share = np.bincount(labels.ravel(), minlength=self.num_masks) / labels.size
        rows = []
        for k in range(self.num_masks):
            row: dict[str, Any] = {"mask": k, "share": float(share[k])}
            if self.names is not None:
                score = float(self.names.mask_scores[k])
                row.update({"class": self.names.name(k), "score": None if np.isnan(score) else score})
            rows.append(row)
        return rows


class DemoSegmenter:
    """Segments uploads for the demo with the SD components of `model`, loaded once; safe from several threads.

    `model` (e.g. ``EmerDiff.from_config(cfg)``) gives the components and the settings; each request's K and
    lambda run on a light copy of it (`segmentor`), and `model` itself is never changed. Without `naming`
    the page has no vocabulary field.
    """

    def __init__(
        self,
        model: EmerDiff,
        naming: Naming | None = None,
        workdir: str | Path | None = None,
        max_pixels: int = MAX_PIXELS,
        max_side: int = MAX_SIDE,
    ) -> None:
        self.base = model
        self.components: SDComponents = model.components
        self.params: SegmentorConfig = model.params
        self.naming = naming
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="emerdiff-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = 0
        self._segmentors: OrderedDict[tuple[int, float], EmerDiff] = OrderedDict()

    @property
    def max_masks(self) -> int:
        return max(MAX_MASKS, self.params.num_masks)

    def segmentor(self, num_masks: int, lam: float) -> EmerDiff:
        """A light EmerDiff with this request's K and lambda on the shared components (the last few are kept)."""
        try:
            k, lam = float(num_masks), float(lam)
        except (TypeError, ValueError):
            raise DemoInputError(f"K and lambda must be numbers, got {num_masks!r} and {lam!r}") from None
        if int(k) != k or not 1 <= k <= self.max_masks:
            raise DemoInputError(
                f"K (segmentor.num_masks) must be a whole number from 1 to {self.max_masks}, got {num_masks}"
            )
        if not np.isfinite(lam) or lam <= 0:
            raise DemoInputError(f"lambda (segmentor.lam) must be a positive number, got {lam}")
        key = (int(k), lam)
        with self._lock:
            if key not in self._segmentors:
                # The shared modules were converted/compiled by `self.base` already: the copy must not redo it.
                params = replace(self.params, num_masks=key[0], lam=lam, channels_last=False, compile=False)
                self._segmentors[key] = EmerDiff(self.components, params).to(self.base.device)
                while len(self._segmentors) > KEEP_SEGMENTORS:
                    self._segmentors.popitem(last=False)
            self._segmentors.move_to_end(key)
            return self._segmentors[key]

    def run(
        self, path: str | Path, num_masks: int, lam: float, vocabulary: str = "", progress: Progress | None = None
    ) -> DemoResult:
        """Check the upload, segment it with K and lambda, name the masks with `vocabulary`, write the downloads."""
        upload = read_upload(path, self.max_pixels, self.max_side)
        vocabulary = (vocabulary or "").strip()
        naming = self.naming if vocabulary else None
        if vocabulary and naming is None:
            raise DemoInputError("this demo was started without mask naming; leave the vocabulary empty")
        report = progress or (lambda fraction, text: None)
        stages = list(STAGES) + (["naming"] if vocabulary else [])
        model = self.segmentor(num_masks, lam)
        image = torch.from_numpy(upload.photo).permute(2, 0, 1)  # [3, H, W] uint8, as the prediction tool reads
        # one run at a time: a run swaps the shared UNet's attention processors
        with self._lock, observing(model, ProgressObserver(report, stages)):
            start = time.perf_counter()
            output = model.segment(upload.photo)
            extras = self._named(model, naming, vocabulary, image, output) if naming is not None else None
            seconds = time.perf_counter() - start
        report(1.0, "writing the downloads")
        result = PredictedImage(upload.name, upload.file_name, image, output, seconds, extras=extras)
        names = MaskNames.from_arrays(extras.arrays()) if extras is not None else None
        return DemoResult(upload=upload, output=output, names=names, seconds=seconds, files=self.write_files(result))

    def _named(
        self, model: EmerDiff, naming: Naming, vocabulary: str, image: torch.Tensor, output: SegmentationOutput
    ) -> ImageExtras:
        """The masks named from `vocabulary` (the "naming" stage); a vocabulary the naming refuses is DemoInputError."""
        with model.stage("naming"):
            try:
                return naming(vocabulary)(image, output)
            except (ValueError, FileNotFoundError) as exc:  # unknown vocabulary, duplicate names, ...
                raise DemoInputError(f"vocabulary: {exc}") from None

    def write_files(self, result: PredictedImage) -> list[Path]:
        """A results folder of the one image: NAME.png (label map, palette = mask colours), NAME.npz (every array)
        and its COCO export NAME_coco.json (RLE masks); the three files to download."""
        self._prune()
        with self._lock:
            self._counter += 1
            folder = self.workdir / DOWNLOADS / f"{time.time():.0f}-{self._counter}"
        store = OutputStore(folder, DOWNLOAD_FILES)
        store.save(result, rank=0)
        store.finish_run()
        coco = write_coco(folder, f"{result.name}_coco.json")
        return [store.path(result.name, ".png"), store.path(result.name, ".npz"), coco]

    def _prune(self) -> None:
        """Delete the downloads of requests older than KEEP_RESULTS_S."""
        cutoff = time.time() - KEEP_RESULTS_S
        for folder in (self.workdir / DOWNLOADS).glob("*"):
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
