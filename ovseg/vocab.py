"""Vocabularies: class names (with synonyms) in dataset id order, shipped or user-given.

File format (shipped files in ``ovseg/vocabs/*.txt`` and user files alike): one class per
line in dataset id order; a line ``tv;television;monitor`` gives a class with synonyms, the
first being its display name; blank lines and lines starting with ``#`` are skipped.
A class whose display name is ``background`` is the vocabulary's background class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SHIPPED_VOCABS: tuple[str, ...] = ("coco", "coco_object", "ade150", "pc59", "pc459", "city19", "voc", "toyworld")
SYNONYM_SEP = ";"
CLASS_SEP = ","
BACKGROUND = "background"

VocabSpec = str | os.PathLike | Sequence[str]


@dataclass(frozen=True)
class Vocabulary:
    """Class names in id order, each with its synonyms, and the background id if any."""

    synonyms: tuple[tuple[str, ...], ...]
    background: int | None

    @property
    def names(self) -> tuple[str, ...]:
        """Display names (first synonym of each class), in id order."""
        return tuple(group[0] for group in self.synonyms)

    def __len__(self) -> int:
        return len(self.synonyms)


def load_vocab(spec: VocabSpec) -> list[str]:
    """Display names of a shipped vocabulary, a ``.txt`` file or a user list, in id order."""
    return list(read_vocabulary(spec).names)


def read_vocabulary(spec: VocabSpec) -> Vocabulary:
    """Vocabulary from a shipped name, a path, a comma-separated string or a list of entries.

    Strings: a shipped name (``"ade150"``), an existing file or a name ending in ``.txt``,
    or a comma-separated list (``"cat,dog;puppy,grass"``; ``"cat,"`` for a single class).
    Lists: one entry per class, each entry may carry ``;``-separated synonyms.
    """
    if isinstance(spec, os.PathLike):
        return parse_entries(_read_lines(Path(spec)))
    if isinstance(spec, str):
        if spec in SHIPPED_VOCABS:
            return parse_entries(_shipped_lines(spec))
        if spec.endswith(".txt") or os.path.isfile(spec):
            return parse_entries(_read_lines(Path(spec)))
        if CLASS_SEP in spec:
            return parse_entries(spec.split(CLASS_SEP))
        raise ValueError(
            f"Unknown vocabulary {spec!r}. Use one of the shipped vocabularies {list(SHIPPED_VOCABS)}, "
            "a path to a .txt file (one class per line), or a comma-separated list such as 'cat,dog,grass'."
        )
    return parse_entries(list(spec))


def parse_entries(entries: Sequence[str]) -> Vocabulary:
    """Vocabulary from entries ``name;synonym;...``, skipping blanks and ``#`` comments."""
    groups = []
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        group = tuple(s.strip() for s in entry.split(SYNONYM_SEP) if s.strip())
        groups.append(group)
    if not groups:
        raise ValueError("Vocabulary is empty: give at least one class name.")
    names = [group[0] for group in groups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Vocabulary has duplicate class names {duplicates}; merge them as synonyms with ';'.")
    background = names.index(BACKGROUND) if BACKGROUND in names else None
    return Vocabulary(synonyms=tuple(groups), background=background)


def _shipped_lines(name: str) -> list[str]:
    """Lines of the shipped vocabulary file ``ovseg/vocabs/<name>.txt``."""
    return (resources.files("ovseg") / "vocabs" / f"{name}.txt").read_text(encoding="utf-8").splitlines()


def _read_lines(path: Path) -> list[str]:
    """Lines of a user vocabulary file, with an error that lists the alternatives."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Vocabulary file {str(path)!r} not found. Give an existing .txt file (one class per line) "
            f"or one of the shipped vocabularies {list(SHIPPED_VOCABS)}."
        )
    return path.read_text(encoding="utf-8").splitlines()
