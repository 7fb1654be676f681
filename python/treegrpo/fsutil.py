"""Files that are either complete or absent: write to a temporary sibling, rename into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on a clean exit rename it to ``target``.

    An exception (or a kill) leaves no ``target``: only a hidden ``.{name}.*`` temporary that
    is removed here on an exception. If another process created ``target`` first, its copy is
    kept and ours is dropped (both were built from the same inputs)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
