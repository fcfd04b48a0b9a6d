"""Atomic outputs: complete or absent, never half-written; an old output survives a failed replace."""
from __future__ import annotations

import pytest

from hclsm.errors import HclsmError
from hclsm.utils.atomic import atomic_output_dir, atomic_write_text


def test_success_renames_into_place(tmp_path):
    with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "f.txt").write_text("x")
        assert not (tmp_path / "a" / "b" / "out").exists()
    assert (tmp_path / "a" / "b" / "out" / "f.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing_not_even_created_parents(tmp_path, exc):
    with pytest.raises(exc):
        with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
            (tmp / "f.txt").write_text("x")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(HclsmError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    f = tmp_path / "r.json"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
