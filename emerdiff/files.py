"""Files that appear complete or not at all: one atomic-write helper for every results folder and cache, the
version record every results file carries, and the lock that keeps two runs from writing one folder at once.

A killed run leaves at most hidden ``*.emerdiff-tmp`` files, which `remove_temporary_files` drops
when the next run starts; JSON-lines readers skip a line cut short by a kill.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".emerdiff-tmp"
LOCK_FILE = ".emerdiff.lock"  # in a folder a run writes: who holds it (PID, host, since when)
# The layout of each results file; raised when a field changes meaning or goes, so readers can tell releases apart.
FORMAT_VERSIONS = {"results": 1, "manifest": 1, "selfcheck": 1, "benchmark": 1}


def version_record(kind: str) -> dict[str, str | int]:
    """The fields that say which release wrote a results file of `kind` (a FORMAT_VERSIONS key) and in which layout."""
    from emerdiff import __version__

    return {"emerdiff_version": __version__, "format_version": FORMAT_VERSIONS[kind]}


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


def read_jsonl(path: Path) -> list[dict]:
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


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace `path` atomically with one JSON line per record."""
    with atomic_file(path) as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records).encode())


@contextmanager
def folder_lock(folder: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold `folder`'s lock (an fcntl lock on FOLDER/.emerdiff.lock) for the block. While another process holds it,
    call `on_wait` with who holds it ("PID 123 on host, since ...") and wait. The system releases the lock when
    its process ends, even when killed, so a crashed run never leaves the folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            on_wait(handle.read().strip() or "another process")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
