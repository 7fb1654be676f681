"""JSONL corpora in Search-R1's (wiki-18) format.

One JSON object a line, ``{"id": "12", "contents": "\\"Title\\"\\ntext..."}``: ``contents`` holds
the quoted title on its first line, then the text. Other fields are ignored; an integer ``id`` is
read as its decimal string; blank lines are skipped. Anything else is a
:class:`~treegrpo.env.retrievers.errors.CorpusFormatError` naming the file and line.

Files are read as a stream (:func:`iter_corpus`, :func:`scan_corpus`), never whole. A
:class:`Corpus` gives random access by row through a memory map and the byte offset of each
line, so a retriever holds one integer per document, not the text (wiki-18 has 21 M documents,
14 GB of text).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from treegrpo.env.retrievers.errors import CorpusFormatError
from treegrpo.env.types import Document

__all__ = ["Corpus", "iter_corpus", "read_corpus", "scan_corpus"]

_EXPECTED = 'each line must be a JSON object {"id": str, "contents": str}'


def scan_corpus(path: str | os.PathLike[str]) -> Iterator[tuple[int, Document]]:
    """Yield ``(byte offset of the line, document)`` for every document of a JSONL corpus, in
    file order, validating each line as it goes."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {path}") from None
    with f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if line.strip():
                yield start, _parse(line, f"{path}:{lineno}")


def iter_corpus(path: str | os.PathLike[str]) -> Iterator[Document]:
    """Yield the documents of a JSONL corpus one at a time (constant memory)."""
    for _, doc in scan_corpus(path):
        yield doc


def read_corpus(path: str | os.PathLike[str]) -> list[Document]:
    """All documents of a (small) JSONL corpus, in file order."""
    return list(iter_corpus(path))


def _parse(line: bytes, where: str) -> Document:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise CorpusFormatError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CorpusFormatError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); {_EXPECTED}"
        ) from None
    if not isinstance(obj, dict):
        raise CorpusFormatError(f"{where}: found a JSON {type(obj).__name__}; {_EXPECTED}")
    missing = [k for k in ("id", "contents") if k not in obj]
    if missing:
        found = ", ".join(map(repr, obj)) or "none"
        raise CorpusFormatError(
            f"{where}: missing field {' and '.join(map(repr, missing))} (found: {found}); "
            f"{_EXPECTED}"
        )
    doc_id, contents = obj["id"], obj["contents"]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str):
        raise CorpusFormatError(f"{where}: 'id' must be a string, got {_json_type(doc_id)}")
    if not isinstance(contents, str):
        raise CorpusFormatError(f"{where}: 'contents' must be a string, got {_json_type(contents)}")
    return Document(id=doc_id, contents=contents)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    names |= {dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class Corpus:
    """Random access to the documents of a JSONL corpus by row (0-based, file order).

    Holds the file memory-mapped and one byte offset per document; a document is parsed when
    it is read. Reading is thread-safe. Build one with :meth:`scan` (reads and validates the
    whole file once) or, with offsets saved from an earlier scan, :meth:`from_offsets`.
    """

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        # offsets: (n + 1,) int64; document i is the JSON in bytes [offsets[i], offsets[i + 1]),
        # which may end with blank lines (JSON whitespace). offsets[n] is the file size.
        self.path = path
        self.offsets = offsets
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != int(offsets[-1]):
                raise CorpusFormatError(
                    f"{path} is {size} bytes but its saved offsets end at {int(offsets[-1])}: "
                    "the file changed since it was indexed; delete the index to rebuild it"
                )
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @classmethod
    def scan(cls, path: str | os.PathLike[str]) -> Corpus:
        """Read and validate every line of ``path`` once, recording where each document starts."""
        path = Path(path)
        starts = [start for start, _ in scan_corpus(path)]
        return cls.from_offsets(path, starts)

    @classmethod
    def from_offsets(cls, path: str | os.PathLike[str], starts: Sequence[int]) -> Corpus:
        """A corpus over ``path`` whose documents start at the byte offsets ``starts`` (as
        collected from :func:`scan_corpus`)."""
        path = Path(path)
        if len(starts) == 0:
            raise CorpusFormatError(f"{path}: no documents; {_EXPECTED}")
        offsets = np.empty(len(starts) + 1, dtype=np.int64)
        offsets[:-1] = starts
        offsets[-1] = path.stat().st_size
        return cls(path, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> Document:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for a corpus of {len(self)} documents")
        row %= len(self)
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return _parse(self._map[start:end], f"{self.path} (document {row}, byte {start})")

    def documents(
        self, rows: Sequence[int], scores: Sequence[float] | None = None
    ) -> list[Document]:
        """The documents at ``rows``, each with its score when ``scores`` is given."""
        docs = [self[int(r)] for r in rows]
        if scores is None:
            return docs
        return [
            Document(id=d.id, contents=d.contents, score=float(s))
            for d, s in zip(docs, scores, strict=True)
        ]

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Corpus(path={str(self.path)!r}, documents={len(self)})"
