"""Unsupervised evaluation of EmerDiff on a labelled split, every protocol in one pass (SPEC "Evaluation protocols").

Per image, the prediction comes from the cache (``CACHE/<image id>.npz``) or, on a miss, from
the segmentor, which is loaded only when the first uncached image arrives: a rerun over a full
cache never loads Stable Diffusion, and a killed run resumes where it stopped. Each protocol is
scored twice, on EmerDiff's labels and on the bilinear upsampling of the same low-resolution
masks.

- Per-image protocols (``hungarian``, ``majority``, ``concept_image``) update confusion-matrix
  metrics, whose states are summed across DDP ranks.
- Dataset-wide protocols (``dataset``, ``concept_dataset``) need every mask of the split: each
  mask's embedding and class histogram go into `MaskRecords`, a metric whose states are
  concatenated across ranks. Its class histograms also give the dataset-wide confusion matrices
  exactly, since relabelling a mask moves all of its pixels to one predicted class.

The matching itself is `emerdiff.protocols`; the scores are `emerdiff.metrics`.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .config import EvalConfig, ModelConfig, SegmentorConfig, result_settings
from .data import DatasetMetadata, build_dataset, dataset_spec
from .inputs import ShardSampler
from .metrics import ConfusionMatrixMetric, SegmentationScores, scores_from_confusion
from .outputs import atomic_file, remove_temporary_files
from .protocols import (
    UNMATCHED, assign_to_concepts, cluster_masks, concept_sums, match_clusters, match_image, overlap_matrix, relabel,
)
from .segmentor import SegmentationOutput

METHODS = ("emerdiff", "bilinear")  # EmerDiff labels; bilinear upsampling of the same low-res masks
PER_IMAGE_PROTOCOLS = ("hungarian", "majority", "concept_image")
PROTOCOLS = ("hungarian", "majority", "dataset", "concept_image", "concept_dataset")  # table order
PROTOCOL_TITLES = {
    "hungarian": "per-image Hungarian",
    "majority": "per-image majority (many-to-one)",
    "dataset": "dataset-level k-means + Hungarian (Table 1)",
    "concept_image": "concept embedding, per-image concepts (Table 2)",
    "concept_dataset": "concept embedding, dataset concepts (Table 2)",
}
METHOD_TITLES = {"emerdiff": "EmerDiff", "bilinear": "bilinear"}
PAPER = "Namekata et al., EmerDiff, ICLR 2024"


class StaleCacheError(RuntimeError):
    """A cached prediction was made with other settings or another ground truth than this run's."""


def check_settings(settings: EvalConfig) -> None:
    """Raise a ValueError naming a bad `eval` setting before any image is predicted."""
    unknown = [p for p in settings.protocols if p not in PROTOCOLS]
    if unknown or not settings.protocols:
        raise ValueError(f"eval.protocols: unknown or empty {unknown or list(settings.protocols)}; "
                         f"valid: {', '.join(PROTOCOLS)}")
    if settings.match_criterion not in ("iou", "overlap"):
        raise ValueError(f"eval.match_criterion must be iou or overlap, got {settings.match_criterion!r}")
    if settings.dataset_clusters is not None and settings.dataset_clusters < 1:
        raise ValueError(f"eval.dataset_clusters must be null or positive, got {settings.dataset_clusters}")


def prediction_settings(model: ModelConfig, segmentor: SegmentorConfig, dataset: str, size: Optional[int]) -> dict:
    """The settings a cached prediction depends on; settings that cannot change the result are left out."""
    model_settings = result_settings("model", asdict(model))
    segmentor_settings = result_settings("segmentor", asdict(segmentor))
    del segmentor_settings["keep_diff_maps"]  # the cache keeps no difference maps
    return {"model": model_settings, "segmentor": segmentor_settings, "data": {"dataset": dataset, "size": size}}


# --- cache ---------------------------------------------------------------------------------------


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
    def from_output(cls, output: SegmentationOutput, gt: np.ndarray) -> "CachedPrediction":
        """Keep the fields the protocols need from a segmentor output."""
        if tuple(output.labels.shape) != gt.shape:
            raise ValueError(f"prediction {tuple(output.labels.shape)} and ground truth {gt.shape} differ in size")
        arrays = output.to_numpy()
        return cls(gt=gt.astype(np.int64), **{name: arrays[name] for name in
                   ("labels", "labels_bilinear", "lowres_labels", "lowres_masks", "mask_embeddings")})

    @property
    def num_masks(self) -> int:
        return len(self.mask_embeddings)

    def segments(self, method: str) -> np.ndarray:
        """The [H, W] mask-id map a method scores: EmerDiff's labels or the bilinear baseline's."""
        return {"emerdiff": self.labels, "bilinear": self.labels_bilinear}[method]


class PredictionCache:
    """One ``<image id>.npz`` per image in a folder, written atomically, tagged with its prediction settings.

    Entries are `record` dataclasses holding at least ``gt`` (CachedPrediction by default; ovseg keeps its
    own record type in its own folder).
    """

    def __init__(self, folder: Path, settings: Mapping[str, Any], overwrite: bool = False,
                 record: Callable[..., Any] = CachedPrediction) -> None:
        self.folder = Path(folder)
        self.settings = json.dumps(settings, sort_keys=True)
        self.overwrite = overwrite
        self.record = record

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def load(self, image_id: str, gt: np.ndarray) -> Optional[CachedPrediction]:
        """The cached prediction, or None if there is none (or output.overwrite asks to redo it)."""
        path = self.path(image_id)
        if self.overwrite or not path.is_file():
            return None
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        settings = str(arrays.pop("settings"))
        if settings != self.settings:
            changed = _settings_diff(settings, self.settings)
            raise StaleCacheError(f"{path} was predicted with other settings: {changed}. Use another output folder,"
                                  " or output.overwrite=true to predict again.")
        prediction = self.record(**arrays)
        if not np.array_equal(prediction.gt, gt):
            raise StaleCacheError(f"{path} holds another ground truth than the dataset's label of '{image_id}'."
                                  " Use another output folder, or output.overwrite=true to predict again.")
        return prediction

    def save(self, image_id: str, prediction: CachedPrediction) -> None:
        """Write temp file then rename, so a killed run never leaves a half-written entry."""
        with atomic_file(self.path(image_id)) as handle:
            np.savez_compressed(handle, settings=np.array(self.settings), **asdict(prediction))

    def remove_temporary_files(self) -> None:
        """Drop what a killed run was writing in the cache folder."""
        remove_temporary_files(self.folder)


def _settings_diff(old: str, new: str) -> str:
    """``section.key: cached -> now`` for every setting that differs."""
    before, after = json.loads(old), json.loads(new)
    changes = [f"{section}.{key}: {before.get(section, {}).get(key)!r} -> {value!r}"
               for section, values in after.items() for key, value in values.items()
               if before.get(section, {}).get(key) != value]
    return "; ".join(changes) or "unknown difference"


# --- protocols on one image and on gathered masks ------------------------------------------------


def per_image_class_map(protocol: str, segments: np.ndarray, gt: np.ndarray, embeddings: np.ndarray,
                        histogram: np.ndarray, num_classes: int, ignore_index: int, criterion: str) -> np.ndarray:
    """[H, W] class map (UNMATCHED where a mask got no class) of a per-image protocol, using this image's gt."""
    if protocol in ("hungarian", "majority"):
        return match_image(segments, gt, num_classes, ignore_index=ignore_index, assignment=protocol,
                           criterion=criterion).labels
    if protocol == "concept_image":
        return relabel(segments, assign_to_concepts(embeddings, concept_sums(embeddings, histogram)))
    raise ValueError(f"{protocol!r} is not a per-image protocol; those are {', '.join(PER_IMAGE_PROTOCOLS)}")


def confusion_from_histograms(histograms: np.ndarray, class_of_mask: np.ndarray, num_classes: int) -> torch.Tensor:
    """(C, C + 1) confusion matrix when every pixel of mask m is predicted as class_of_mask[m] (or no class).

    The layout of `emerdiff.metrics`: rows are ground truth, the last column counts pixels of masks
    that got no class.
    """
    confmat = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    column = np.where(class_of_mask == UNMATCHED, num_classes, class_of_mask)
    np.add.at(confmat.T, column, histograms)
    return torch.from_numpy(confmat)


@dataclass
class DatasetMasks:
    """Every mask of the split in (image index, mask id) order, whichever rank predicted it."""

    embeddings: np.ndarray  # [N, D] float32
    histograms: Dict[str, np.ndarray]  # method -> [N, C] int32 pixels of each class in each mask
    num_images: int


@dataclass
class DatasetScores:
    """Scores of the dataset-wide protocols and the number of k-means clusters actually used."""

    scores: Dict[str, Dict[str, SegmentationScores]]  # method -> protocol -> scores
    num_clusters: Optional[int]


def dataset_protocol_scores(masks: DatasetMasks, protocols: Sequence[str], num_classes: int,
                            settings: EvalConfig) -> DatasetScores:
    """Score the dataset-wide protocols among `protocols` for every method from the gathered masks."""
    scores: Dict[str, Dict[str, SegmentationScores]] = {method: {} for method in masks.histograms}
    num_clusters = None
    if "dataset" in protocols:
        wanted = settings.dataset_clusters or num_classes
        num_clusters = min(wanted, len(masks.embeddings))
        if num_clusters < wanted:
            rank_zero_warn(f"only {num_clusters} masks in the split: the dataset-level protocol clusters them "
                           f"into {num_clusters} clusters instead of {wanted}")
        clusters = cluster_masks(masks.embeddings, num_clusters, seed=settings.kmeans_seed, niter=settings.kmeans_iters,
                                 nredo=settings.kmeans_restarts, l2_normalize=settings.kmeans_l2_normalize)
    for method, histograms in masks.histograms.items():  # one k-means, matched on each method's histograms
        if "dataset" in protocols:
            matching = match_clusters(clusters, histograms, num_clusters)
            confmat = confusion_from_histograms(histograms, matching.class_of_mask, num_classes)
            scores[method]["dataset"] = scores_from_confusion(confmat)
        if "concept_dataset" in protocols:
            classes = assign_to_concepts(masks.embeddings, concept_sums(masks.embeddings, histograms))
            scores[method]["concept_dataset"] = scores_from_confusion(
                confusion_from_histograms(histograms, classes, num_classes))
    return DatasetScores(scores, num_clusters)


class MaskRecords(Metric):
    """Each mask's image index, embedding and per-method class histogram; states concatenated across ranks."""

    full_state_update = False

    def __init__(self, methods: Sequence[str] = METHODS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.methods = tuple(methods)
        self.add_state("images", default=[], dist_reduce_fx="cat")  # one entry per image
        self.add_state("image_of_mask", default=[], dist_reduce_fx="cat")
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        for method in self.methods:
            self.add_state(f"histograms_{method}", default=[], dist_reduce_fx="cat")

    def update(self, image_index: int, embeddings: torch.Tensor, histograms: Mapping[str, torch.Tensor]) -> None:
        """Record one image's K masks: embeddings [K, D], histograms method -> [K, C]."""
        device = self.device
        self.images.append(torch.tensor([image_index], device=device))
        self.image_of_mask.append(torch.full((len(embeddings),), image_index, device=device))
        self.embeddings.append(embeddings.to(device=device, dtype=torch.float32))
        for method in self.methods:
            # int32 halves the gathered volume; a mask's pixel count fits easily
            getattr(self, f"histograms_{method}").append(histograms[method].to(device=device, dtype=torch.int32))

    def compute(self) -> DatasetMasks:
        """All masks sorted by image index (stable, so each image keeps its mask order), on the CPU."""
        images = dim_zero_cat(self.images).cpu()
        if len(images.unique()) != len(images):
            raise RuntimeError("an image was scored more than once (a sampler repeated samples across ranks)")
        order = torch.argsort(dim_zero_cat(self.image_of_mask).cpu(), stable=True)
        return DatasetMasks(
            embeddings=dim_zero_cat(self.embeddings).cpu()[order].numpy(),
            histograms={m: dim_zero_cat(getattr(self, f"histograms_{m}")).cpu()[order].numpy() for m in self.methods},
            num_images=len(images),
        )


# --- results -------------------------------------------------------------------------------------


@dataclass
class EvaluationResults:
    """Scores of every (method, protocol) on one split, and how they were obtained."""

    dataset: str
    classes: List[str]
    num_images: int
    scores: Dict[str, Dict[str, SegmentationScores]]  # method -> protocol -> scores
    protocol_settings: Dict[str, Any]
    prediction_settings: Dict[str, Any]
    paper_miou: Dict[str, Dict[str, float]] = field(default_factory=dict)
    paper_note: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready: results[method][protocol] holds miou, pixel_acc and per-class iou, in percent (null = absent)."""
        results = {
            method: {protocol: s.in_percent(self.classes) for protocol, s in by_protocol.items()}
            for method, by_protocol in self.scores.items()
        }
        return {
            "dataset": self.dataset, "num_images": self.num_images, "num_classes": len(self.classes),
            "results": results, "paper": {"source": PAPER, "miou": self.paper_miou, "note": self.paper_note},
            "protocol_settings": self.protocol_settings, "prediction_settings": self.prediction_settings,
        }

    def to_markdown(self) -> str:
        """The protocol x method grid (mIoU and pixel accuracy), the paper's mIoU beside ours."""
        methods = list(self.scores)
        protocols = [p for p in PROTOCOLS if any(p in self.scores[m] for m in methods)]
        header = ["protocol"]
        for m in methods:
            header += [f"{METHOD_TITLES[m]} mIoU", "paper"]
        header += [f"{METHOD_TITLES[m]} pixel acc." for m in methods]
        rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
        for p in protocols:
            row = [PROTOCOL_TITLES[p]]
            for m in methods:
                row += [_cell(self.scores[m][p].miou), _paper_cell(self.paper_miou.get(p, {}).get(m))]
            row += [_cell(self.scores[m][p].pixel_acc) for m in methods]
            rows.append(row)
        lines = [f"# Unsupervised segmentation: {self.dataset}", "",
                 f"{self.num_images} images, {len(self.classes)} classes; all numbers in percent. "
                 f"\"paper\": the mIoU reported by {PAPER}, where it reports one.", ""]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        notes = [self.paper_note] if self.paper_note else []
        clusters = self.protocol_settings.get("dataset_clusters_used")
        wanted = self.protocol_settings.get("dataset_clusters") or len(self.classes)
        if clusters is not None and clusters < wanted:
            notes.append(f"The split has only {clusters} masks: the dataset-level protocol used {clusters} "
                         f"k-means clusters instead of {wanted}.")
        model = self.prediction_settings["model"]
        if model["pretrained"] == "tiny" or model["random_init"]:
            notes.append("These numbers come from a miniature model with random weights: they say nothing about "
                         "EmerDiff's quality.")
        lines += [""] + [f"- {note}" for note in notes]
        return "\n".join(lines).rstrip() + "\n"


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def _paper_cell(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


# --- Lightning ---------------------------------------------------------------------------------


SegmentorLoader = Callable[[pl.Trainer], nn.Module]


class EvaluationModule(pl.LightningModule):
    """`Trainer.test` scores cached or fresh predictions of one split under every protocol.

    `load_segmentor(trainer)` builds the segmentor (anything with ``segment(image)``); it is
    called on the first image missing from the cache, so a fully cached run never calls it.
    After the test epoch, ``results`` holds the EvaluationResults on global rank 0 (None elsewhere).
    """

    def __init__(self, load_segmentor: SegmentorLoader, cache: PredictionCache, dataset: str,
                 metadata: DatasetMetadata, settings: EvalConfig) -> None:
        super().__init__()
        check_settings(settings)
        self.load_segmentor = load_segmentor
        self.segmentor: Optional[nn.Module] = None
        self.cache = cache
        self.dataset = dataset
        self.metadata = metadata
        self.settings = settings
        self.per_image = [p for p in settings.protocols if p in PER_IMAGE_PROTOCOLS]
        self.metrics = nn.ModuleDict({
            method: nn.ModuleDict({p: ConfusionMatrixMetric(metadata.num_classes, metadata.ignore_index)
                                   for p in self.per_image})
            for method in METHODS
        })
        self.masks = MaskRecords(METHODS)
        self.results: Optional[EvaluationResults] = None

    def setup(self, stage: str) -> None:
        """Rank 0 drops temporary files a killed run left; Lightning's post-setup barrier holds the others."""
        if self.trainer.is_global_zero:
            self.cache.remove_temporary_files()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Fetch or compute one image's prediction, then score it."""
        image_id, gt = batch["meta"]["id"], np.asarray(batch["label"], dtype=np.int64)
        prediction = self.cache.load(image_id, gt)
        if prediction is None:
            prediction = CachedPrediction.from_output(self._segmentor().segment(batch["image"]), gt)
            self.cache.save(image_id, prediction)
        self.score(batch["index"], prediction)

    def score(self, image_index: int, prediction: CachedPrediction) -> None:
        """Update the per-image metrics and record the masks for the dataset-wide protocols."""
        meta = self.metadata
        gt = torch.from_numpy(prediction.gt)
        histograms = {}
        for method in METHODS:
            segments = prediction.segments(method)
            histograms[method] = overlap_matrix(segments, prediction.gt, meta.num_classes,
                                                num_segments=prediction.num_masks, ignore_index=meta.ignore_index)
            for protocol in self.per_image:
                classes = per_image_class_map(protocol, segments, prediction.gt, prediction.mask_embeddings,
                                              histograms[method], meta.num_classes, meta.ignore_index,
                                              self.settings.match_criterion)
                self.metrics[method][protocol].update(torch.from_numpy(classes), gt)
        self.masks.update(image_index, torch.from_numpy(prediction.mask_embeddings),
                          {m: torch.from_numpy(h) for m, h in histograms.items()})

    def on_test_epoch_end(self) -> None:
        """Reduce across ranks (every rank takes part), then rank 0 runs the dataset-wide protocols."""
        scores = {m: {p: metric.compute() for p, metric in by_protocol.items()}
                  for m, by_protocol in self.metrics.items()}
        masks = self.masks.compute()
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
        if not self.trainer.is_global_zero:
            return
        dataset_scores = dataset_protocol_scores(masks, self.settings.protocols, self.metadata.num_classes,
                                                 self.settings)
        for method in METHODS:
            scores[method].update(dataset_scores.scores[method])
        self.results = self._results(scores, masks.num_images, dataset_scores.num_clusters)
        for method, by_protocol in self.results.scores.items():
            for protocol, s in by_protocol.items():
                self.log(f"{method}/{protocol}/miou", 100 * s.miou, rank_zero_only=True)
        self.log("num_images", float(masks.num_images), rank_zero_only=True)

    def _results(self, scores: Dict[str, Dict[str, SegmentationScores]], num_images: int,
                 num_clusters: Optional[int]) -> EvaluationResults:
        ordered = {m: {p: scores[m][p] for p in PROTOCOLS if p in scores[m]} for m in METHODS}
        protocol_settings = {k: v for k, v in asdict(self.settings).items() if not k.startswith("paper")}
        protocol_settings["dataset_clusters_used"] = num_clusters
        return EvaluationResults(
            dataset=self.dataset, classes=list(self.metadata.classes), num_images=num_images, scores=ordered,
            protocol_settings=protocol_settings, prediction_settings=json.loads(self.cache.settings),
            paper_miou=dict(self.settings.paper_miou), paper_note=self.settings.paper_note,
        )

    def _segmentor(self) -> nn.Module:
        """The segmentor on this module's device, loaded on first use."""
        if self.segmentor is None:
            with torch.inference_mode(False):
                self.segmentor = self.load_segmentor(self.trainer).eval().requires_grad_(False).to(self.device)
        return self.segmentor


class Results(Protocol):
    """What ResultsWriter writes: a JSON-ready dict and a markdown table."""

    def to_dict(self) -> dict: ...

    def to_markdown(self) -> str: ...


class ResultsWriter(pl.Callback):
    """After `Trainer.test`, global rank 0 writes the module's ``results`` as results.json and results.md."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the files on rank 0, which alone holds the results."""
        results = getattr(pl_module, "results", None)
        if trainer.is_global_zero and results is not None:
            write_results(results, self.folder)


def write_results(results: Results, folder: Path) -> None:
    """results.json (full numbers) and results.md (the table), each written atomically."""
    with atomic_file(Path(folder) / "results.json") as handle:
        handle.write((json.dumps(results.to_dict(), indent=2) + "\n").encode())
    with atomic_file(Path(folder) / "results.md") as handle:
        handle.write(results.to_markdown().encode())


class IndexedDataset(Dataset):
    """A dataset's items with their index added, so every rank's records can be put back in order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}


def only_item(batch: List[dict]) -> dict:
    """Collate of batch size 1 that keeps numpy arrays (full-size images differ in shape)."""
    return batch[0]


class EvaluationData(pl.LightningDataModule):
    """One image per step from a registered split, each rank its own shard without repeats.

    Needs ``Trainer(use_distributed_sampler=False)``, else Lightning's sampler would pad with repeats.
    """

    def __init__(self, dataset: str, root: str, size: Optional[int] = None, image_list: Optional[str] = None,
                 num_workers: int = 2) -> None:
        super().__init__()
        options: Dict[str, Any] = {"size": size}
        if image_list is not None:
            if "image_list" not in inspect.signature(dataset_spec(dataset).dataset_cls).parameters:
                raise ValueError(f"data.image_list is not supported by {dataset}; only COCO-Stuff splits take one")
            options["image_list"] = image_list
        self.split = build_dataset(dataset, root, **options)
        self.num_workers = num_workers

    def image_ids(self) -> List[str]:
        """The split's image ids in dataset order (the cache file names)."""
        return [sample.id for sample in self.split.samples]

    def test_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > len(self.split):
            raise ValueError(f"{world} processes for {len(self.split)} images: use at most one process per image")
        return DataLoader(IndexedDataset(self.split), batch_size=1, sampler=ShardSampler(len(self.split), rank, world),
                          num_workers=self.num_workers, collate_fn=only_item)
