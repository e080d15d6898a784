"""The named choices of the config that stand for something: one name -> object table per choice.

`emerdiff.config` offers exactly these names (a field's ``choices``) and the code that acts on a
choice looks its object up here, so a new choice is one new row (timm's and open_clip's registries
work the same way). Torch-free, so a command checks its config before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

# segmentor.interpolation: each name is torch's `F.interpolate` mode, the value PIL's filter of the same kind
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass(frozen=True)
class MiouConvention:
    """Which classes mIoU averages and how matchings treat empty pairs (docs/evaluation.md)."""

    union_classes: bool  # average every class with a non-empty union (a predicted but absent class scores 0);
    #                      otherwise only the classes present in the ground truth
    keep_empty_pairs: bool  # a Hungarian matching keeps pairings without a common pixel (STEGO's, PiCIE's code)
    stego_extra_clusters: bool = False  # more clusters than classes: STEGO's own computation (metrics.stego_scores)


MIOU_CONVENTIONS: dict[str, MiouConvention] = {  # eval.miou_convention
    "detectron2": MiouConvention(union_classes=False, keep_empty_pairs=False),
    "mmseg": MiouConvention(union_classes=True, keep_empty_pairs=False),  # MaskCLIP, TCL, GroupViT
    "stego": MiouConvention(union_classes=True, keep_empty_pairs=True, stego_extra_clusters=True),  # STEGO, PiCIE
}


@dataclass(frozen=True)
class Protocol:
    """An unsupervised evaluation protocol: its row in results.md, its papers' mIoU convention, where it matches."""

    title: str
    paper_convention: str  # the MIOU_CONVENTIONS name of the papers its numbers are compared with
    per_image: bool  # matched image by image (else over every mask of the split)


PROTOCOLS: dict[str, Protocol] = {  # eval.protocols, in table order
    "hungarian": Protocol("per-image Hungarian", "detectron2", per_image=True),
    "majority": Protocol("per-image majority (many-to-one)", "detectron2", per_image=True),
    "dataset": Protocol("dataset-level k-means + Hungarian (Table 1)", "stego", per_image=False),  # beside STEGO
    "concept_image": Protocol("concept embedding, per-image concepts (Table 2)", "detectron2", per_image=True),
    "concept_dataset": Protocol("concept embedding, dataset concepts (Table 2)", "detectron2", per_image=False),
}


@dataclass(frozen=True)
class Crop:
    """How an evaluated image is cut after its shorter side is resized to data.size."""

    square: bool  # keep the central data.size x data.size square (else the whole image)


CROPS: dict[str, Crop] = {"center": Crop(square=True), "none": Crop(square=False)}  # eval.crop
