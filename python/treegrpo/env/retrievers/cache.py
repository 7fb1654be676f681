"""Where retriever indexes are cached on disk, and the keys that name them.

An index is a pure function of the corpus bytes and the index settings, so its folder is named by
both: ``<root>/<kind>/<corpus sha256[:16]>-<settings sha256[:8]>``, e.g.
``~/.cache/treegrpo/bm25/3f2a...-9c01...``. Renaming or moving a corpus file reuses its index;
editing it builds a new one.

Hashing a large corpus (wiki-18 is 14 GB) takes a while, so the digest of each file is remembered
in ``<root>/fingerprints.json`` under its path, size, modification time and inode, and is
computed again only when one of those changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treegrpo.fsutil import atomic_file

__all__ = ["cache_root", "corpus_fingerprint", "index_dir"]

_CHUNK = 1 << 20
_MEMO = "fingerprints.json"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The root of treegrpo's cache: ``cache_dir`` if given, else ``$TREEGRPO_CACHE``, else
    ``$XDG_CACHE_HOME/treegrpo``, else ``~/.cache/treegrpo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("TREEGRPO_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "treegrpo"


def corpus_fingerprint(path: str | os.PathLike[str], *, root: Path | None = None) -> str:
    """The SHA-256 of the file's bytes (hex). With ``root``, reuse the digest remembered there
    while the file's size, mtime and inode are unchanged, and remember a new one."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo_path = root / _MEMO if root is not None else None
    memo = _read_json(memo_path) if memo_path is not None else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    if memo_path is not None:
        # Read again just before writing, to lose as little as possible of what a concurrent
        # process remembered meanwhile; a lost entry only costs one more hash later.
        memo = _read_json(memo_path)
        memo[key] = {**stamp, "sha256": digest}
        with contextlib.suppress(OSError):
            _write_json_atomic(memo_path, memo)
    return digest


def index_dir(root: Path, kind: str, fingerprint: str, settings: Mapping[str, Any]) -> Path:
    """The folder of the ``kind`` index (``"bm25"``, ``"dense"``) of a corpus and settings."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return root / kind / f"{fingerprint[:16]}-{hashlib.sha256(blob).hexdigest()[:8]}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_file(path, mode=0o644) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
