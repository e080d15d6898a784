"""Prediction inputs: find a user's images and read them in DataLoader workers.

An input is an image file, a folder (searched recursively), a glob pattern, or a text file
listing one path per line. Every image gets a *name*: its path relative to the input root
without the suffix (``trip/cat.jpg`` -> ``trip/cat``), which is where its outputs go.

Sharding over ranks is Lightning's: with ``Trainer(use_distributed_sampler=True)`` a predict
DataLoader gets its ``UnrepeatedDistributedSamplerWrapper`` (image i on rank i mod N, no image twice).
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import UserError
from ..image import IMAGE_SUFFIXES, ImageLoadError, read_image

LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
GLOB_CHARS = frozenset("*?[")


class InputError(UserError, ValueError):
    """The prediction input does not exist or holds no images; the message says what was searched."""


@dataclass(frozen=True)
class SourceImage:
    """One image file to segment and the name its outputs get."""

    path: Path
    name: str


@dataclass
class PredictSample:
    """What the DataLoader yields per image: the pixels, or why they could not be read."""

    name: str
    path: str
    image: torch.Tensor | None = None  # [3, H, W] uint8 at the original size
    error: str | None = None


def find_images(spec: str, exclude: Path | None = None) -> list[SourceImage]:
    """Resolve a file, folder, glob or list file to named images, sorted by name.

    Files under ``exclude`` (the output folder) are left out.
    """
    path = Path(spec).expanduser()
    if any(ch in spec for ch in GLOB_CHARS) and not path.exists():
        files, root = _glob_files(spec), _glob_root(spec)
    elif path.is_dir():
        files, root = _folder_files(path), path
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = _listed_files(path)
        root = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files])) if files else path.parent
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise InputError(f"input '{spec}' does not exist (looked in {path.resolve()})")
    if exclude is not None:
        folder = exclude.resolve()
        files = [f for f in files if not f.resolve().is_relative_to(folder)]
    if not files:
        raise InputError(f"no images found for input '{spec}' (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(_named(files, root), key=lambda image: image.name)


def _folder_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]


def _glob_files(pattern: str) -> list[Path]:
    return [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file()]


def _glob_root(pattern: str) -> Path:
    """The folders of a pattern before its first wildcard: ``data/**/*.jpg`` -> ``data``."""
    parts = Path(os.path.expanduser(pattern)).parts
    first_wild = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    return Path(*parts[:first_wild]) if first_wild else Path(".")


def _listed_files(list_file: Path) -> list[Path]:
    """Paths in a list file, one per line; blank lines and ``#`` comments skipped; relative to the file."""
    lines = [line.strip() for line in list_file.read_text().splitlines()]
    paths = [Path(line).expanduser() for line in lines if line and not line.startswith("#")]
    return [p if p.is_absolute() else list_file.parent / p for p in paths]


def _named(files: Sequence[Path], root: Path) -> list[SourceImage]:
    """Each file with its absolute path (the manifest then works from any folder) and its name: the path
    relative to root without suffix, with the suffix kept where two files would share a name."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    rel = [Path(os.path.relpath(f, os.path.abspath(root))).as_posix() for f in absolute]
    stems = [str(Path(r).with_suffix("")) for r in rel]
    taken = Counter(stems)
    return [SourceImage(f, s if taken[s] == 1 else r) for f, r, s in zip(absolute, rel, stems, strict=True)]


class SourceImages(Dataset):
    """Reads each image at its original size; an unreadable file becomes a sample with `error` set."""

    def __init__(self, images: Sequence[SourceImage]) -> None:
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> PredictSample:
        image = self.images[index]
        sample = PredictSample(name=image.name, path=str(image.path))
        try:
            sample.image = torch.from_numpy(np.array(read_image(image.path))).permute(2, 0, 1).contiguous()
        except (ImageLoadError, OSError) as exc:
            sample.error = str(exc)
        return sample


def as_list(samples: list[PredictSample]) -> list[PredictSample]:
    """Collate that keeps the samples as they are (images differ in size)."""
    return samples


class PredictImages(pl.LightningDataModule):
    """One image per step; needs ``Trainer(use_distributed_sampler=True)`` so that Lightning shards the images."""

    def __init__(self, images: Sequence[SourceImage], num_workers: int = 2) -> None:
        super().__init__()
        self.images = list(images)
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        """All images in order; Lightning's unrepeated sampler then keeps this rank's share.

        That sampler refuses a rank without images from a non-empty list, so with fewer images
        than ranks the ranks past the last image get an empty list (predict runs no DDP sync).
        """
        if self.trainer is None:
            raise RuntimeError("PredictImages gives its loader to a Trainer: use it through Trainer.predict")
        images = self.images if self.trainer.global_rank < len(self.images) else []
        return DataLoader(
            SourceImages(images), batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=as_list
        )
