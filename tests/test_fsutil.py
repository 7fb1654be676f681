"""The one write-beside-then-rename helper: complete or absent, nothing left behind."""

from __future__ import annotations

import pytest
from treegrpo.fsutil import atomic_directory, atomic_file


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "data.json"
    with atomic_file(path, suffix=".tmp", mode=0o644) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".data.json.")
        assert tmp.name.endswith(".tmp") and not path.exists()
        tmp.write_text("one")
    assert path.read_text() == "one" and path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_file(path, fsync=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "one"
    with atomic_file(path, fsync=True) as tmp:
        tmp.write_text("two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]


def test_a_directory_is_kept_or_replaced_as_asked(tmp_path):
    target = tmp_path / "index"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
    assert target.stat().st_mode & 0o777 == 0o755
    with atomic_directory(target) as tmp:  # another process got there first: its copy stays
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    with atomic_directory(target, replace=True) as tmp:  # a checkpoint written again
        (tmp / "b").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(ValueError), atomic_directory(target, replace=True) as tmp:
        (tmp / "c").write_text("never")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
