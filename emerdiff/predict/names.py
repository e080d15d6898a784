"""The class of each mask in a vocabulary, as NAME.npz holds it: the one place its npz keys are written and read.

A plug-in that names masks (ovseg) saves its names through `MaskNames.arrays`; the exports and the
demo read them back with `MaskNames.from_arrays`::

    ov_labels       [H, W] vocabulary id of every pixel (its mask's class)
    mask_classes    [K] vocabulary id of each mask; negative: no class (a mask without pixels)
    mask_scores     [K] score of each mask's class; NaN where none
    class_names     [C] the vocabulary's display names, by id
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

KEYS = ("ov_labels", "mask_classes", "mask_scores", "class_names")


@dataclass(frozen=True)
class MaskNames:
    """Each mask's class and score in a vocabulary, and every pixel's class."""

    class_names: Sequence[str]  # vocabulary display names, by id
    mask_classes: np.ndarray  # [K] int64 vocabulary id per mask; negative: no class
    mask_scores: np.ndarray  # [K] float score of each mask's class; NaN where none
    pixel_classes: np.ndarray  # [H, W] int64 vocabulary id per pixel

    def name(self, mask: int) -> str | None:
        """The class name of `mask`, or None."""
        c = int(self.mask_classes[mask])
        return self.class_names[c] if c >= 0 else None

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz entries (KEYS, in this order)."""
        return dict(
            zip(
                KEYS,
                (self.pixel_classes, self.mask_classes, self.mask_scores, np.asarray(list(self.class_names))),
                strict=True,
            )
        )

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> MaskNames | None:
        """The names in an image's npz entries, or None when its masks were not named."""
        if KEYS[0] not in arrays:
            return None
        pixels, classes, scores, names = (np.asarray(arrays[key]) for key in KEYS)
        return cls([str(name) for name in names], classes, scores, pixels)
