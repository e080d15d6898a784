"""Files that appear complete or not at all: one atomic-write helper for every results folder and cache.

A killed run leaves at most hidden ``*.emerdiff-tmp`` files, which `remove_temporary_files` drops
when the next run starts; JSON-lines readers skip a line cut short by a kill.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, List

TEMP_SUFFIX = ".emerdiff-tmp"


def remove_temporary_files(folder: Path) -> None:
    """Drop what a killed run was writing under `folder` (files of other live runs sharing it would go too)."""
    for stale in Path(folder).rglob(f"*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write a temporary file beside `path` and rename it onto `path` only once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: Path) -> List[dict]:
    """The records of a JSON-lines file; a line cut short by a killed process is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_jsonl(path: Path, records: List[dict]) -> None:
    """Replace `path` atomically with one JSON line per record."""
    with atomic_file(path) as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records).encode())
