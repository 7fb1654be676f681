"""Files and directories that are either complete or absent: write to a temporary sibling,
rename into place. The one implementation for checkpoints, converted models, retriever indexes
and their memo, rollout-log parts and the run directory's text files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file"]


@contextmanager
def atomic_directory(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on a clean exit rename it to ``target``.

    An exception (or a kill) leaves no ``target``: only a hidden ``.{name}.*`` temporary that
    is removed here on an exception. If ``target`` exists at the rename: with ``replace`` it is
    deleted first (a checkpoint written again); without, the existing copy is kept and ours is
    dropped (another process built it first, from the same inputs)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(
    path: Path, *, suffix: str = "", fsync: bool = False, mode: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.{name}.{random}{suffix}``, created empty);
    on a clean exit replace ``path`` by it in one rename, so a reader (or a process killed
    mid-write) sees the old file whole or the new one. ``fsync``: flush it to disk first;
    ``mode``: its permissions (mkstemp makes it private). On an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            tmp.chmod(mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
