"""ovseg's part of the prediction results: every mask named from a vocabulary, as `emerdiff.predict` extras.

`MaskNamer` is the module-side step (``EmerDiffPredictor(segmentor, extras=MaskNamer(...))``); the
`NamedMasks` it returns per image add to the results folder::

    DIR/NAME.npz            + ov_labels, mask_classes, mask_scores, class_names (`emerdiff.predict.names`)
    DIR/NAME_ov.png         label map in vocabulary ids (8-bit palette, 16-bit if > 255 classes)
    DIR/NAME_ov_overlay.jpg class colours over the photo with a legend of the class names
    manifest.jsonl          + "masks": each mask's class name and score

The class of each mask is the labeller's `MaskLabels`, the one type for it across ovseg.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from emerdiff.predict import OutputStore, render
from emerdiff.predict.names import MaskNames
from emerdiff.segmentor import SegmentationOutput

from .config import OVSegConfig
from .naming import MaskLabels
from .vocab import Vocabulary

if TYPE_CHECKING:  # the labeller loads open_clip: only a run that names masks needs it, not a redraw
    from .labeller import OpenVocabLabeller

LABELS_FILE = "_ov.png"
OVERLAY_FILE = "_ov_overlay.jpg"
NAMED_FILES = (LABELS_FILE, OVERLAY_FILE)  # OutputOptions.extra_files of a run that names masks


@dataclass(frozen=True)
class NamedMasks:
    """One image's masks named from the vocabulary: `emerdiff.predict.ImageExtras` for the results folder."""

    class_names: Sequence[str]  # vocabulary display names, by id
    masks: MaskLabels  # class and score of each mask, vocabulary id of each pixel

    def names(self) -> MaskNames:
        """Each mask's class as the results folder keeps it."""
        masks = self.masks
        return MaskNames(
            self.class_names, masks.class_ids.numpy(), masks.scores.float().numpy(), masks.label_map.numpy()
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz entries of named masks (`emerdiff.predict.names`)."""
        return self.names().arrays()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> NamedMasks:
        """The names saved in an image's NAME.npz, to draw its pictures again (mask embeddings are not saved)."""
        names = MaskNames.from_arrays(arrays)
        if names is None:
            raise ValueError("the npz holds no mask names (ov_labels): its run did not name its masks")
        class_ids = torch.from_numpy(names.mask_classes)
        masks = MaskLabels(
            class_ids,
            torch.from_numpy(names.mask_scores),
            torch.from_numpy(names.pixel_classes),
            mask_embeddings=torch.zeros(len(class_ids), 0),
        )
        return cls(names.class_names, masks)

    def figure_classes(self) -> render.NamedLabels:
        """Every pixel's vocabulary id and the class names: the figure's class panel and legend."""
        return render.NamedLabels(self.masks.label_map.numpy(), self.class_names)

    def record(self) -> dict[str, Any]:
        """The manifest field "masks": each mask's class name (None: no pixel) and score."""
        masks = self.masks
        return {"masks": mask_records(self.class_names, masks.class_ids.tolist(), masks.scores.float().tolist())}

    def write(self, store: OutputStore, name: str, photo: np.ndarray) -> None:
        """NAME_ov.png (vocabulary ids) and NAME_ov_overlay.jpg (class colours with a legend of names)."""
        labels = self.masks.label_map.numpy()
        store.save_picture(name, LABELS_FILE, render.label_image(labels, len(self.class_names)))
        store.save_picture(
            name, OVERLAY_FILE, render.legend_overlay(photo, labels, self.class_names, store.options.overlay_alpha)
        )


def mask_records(class_names: Sequence[str], class_ids: Sequence[int], scores: Sequence[float]) -> list[dict]:
    """Per mask ``{"class": name or None, "score": rounded cosine or None}``, as in the manifest."""
    return [
        {"class": class_names[c] if c >= 0 else None, "score": None if np.isnan(s) else round(float(s), 4)}
        for c, s in zip(class_ids, scores, strict=True)
    ]


class MaskNamer(nn.Module):
    """Names a segmentation's masks for the prediction tool (`emerdiff.predict.ExtrasStep`)."""

    def __init__(self, labeller: OpenVocabLabeller, class_names: Sequence[str]) -> None:
        super().__init__()
        self.labeller = labeller
        self.class_names = list(class_names)

    @torch.no_grad()
    def forward(self, image: Tensor, output: SegmentationOutput) -> NamedMasks:
        """Vocabulary ids of every mask and pixel of `output`, for the [3, H, W] uint8 `image`."""
        return NamedMasks(self.class_names, self.labeller(image.permute(1, 2, 0), output.labels, output.num_masks))


def mask_namer(settings: OVSegConfig, vocab: Vocabulary, results_dir: str | os.PathLike) -> MaskNamer:
    """The CLIP labeller that names every mask (loads CLIP); text embeddings cached as `settings` say."""
    from .labeller import build_labeller, text_cache_folder

    return MaskNamer(build_labeller(settings, vocab, text_cache_folder(settings, Path(results_dir))), vocab.names)
