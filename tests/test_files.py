"""emerdiff.files: files that appear complete or not at all."""

from pathlib import Path

import pytest

from emerdiff.files import atomic_file


def test_atomic_file_leaves_neither_target_nor_temporary_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "deep" / "x.npz"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.rglob("*")) == [tmp_path / "deep"]
    with atomic_file(target) as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.rglob("*.emerdiff-tmp")) == []
