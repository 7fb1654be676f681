"""BM25 retrieval over a JSONL corpus, with bm25s.

Tokenisation is bm25s's: lower-case, words of two or more word characters, English stopwords
removed, no stemming (PyStemmer would be one more compiled dependency). The index is bm25s's
eager sparse matrix of per-(term, document) scores, built once per corpus and settings and cached
on disk (see :mod:`treegrpo.env.retrievers.cache`); a later :meth:`BM25Retriever.from_corpus`
loads it instead of rebuilding.

Results hold only documents that match at least one query term (score > 0), best first: an
empty query, or one made only of stopwords and words the corpus never uses, returns ``[]``, and
a query that matches fewer than ``topk`` documents returns fewer (as Lucene does). ``topk``
larger than the corpus is clamped to its size.

Defaults ``k1=0.9, b=0.4`` are Pyserini's (Lucene's BM25 as Search-R1's BM25 baseline runs it).
"""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import bm25s
import numpy as np
from bm25s.tokenization import Tokenizer

from treegrpo.env.retrievers._common import check_request
from treegrpo.env.retrievers.cache import cache_root, corpus_fingerprint, index_dir
from treegrpo.env.retrievers.corpus import Corpus, scan_corpus
from treegrpo.env.types import Document
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError
from treegrpo.fsutil import atomic_directory

__all__ = ["BM25Method", "BM25Retriever"]

logger = logging.getLogger(__name__)

# bm25s's BM25L and BM25+ give every document a score, so "matching documents only" would not
# hold for them; they are not offered.
BM25Method = Literal["lucene", "robertson", "atire"]

# Bump when the cached files change meaning; old caches are then rebuilt, not misread.
_CACHE_FORMAT = 1
_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's default splitter
_STOPWORDS = "en"
_OFFSETS = "offsets.npy"
_META = "meta.json"


def _tokenizer() -> Tokenizer:
    return Tokenizer(lower=True, splitter=_TOKEN_PATTERN, stopwords=_STOPWORDS, stemmer=None)


class BM25Retriever:
    """Top-k BM25 retrieval over a JSONL corpus; implements :class:`treegrpo.env.Retriever`.

    Build one with :meth:`from_corpus`. ``retrieve`` is thread-safe, so a server may call it
    from several threads at once.

    Attributes:
        corpus: the documents, read from the corpus file on demand.
        cache_path: the index folder, or None when caching was off.
        loaded_from_cache: whether the index was loaded from ``cache_path`` (True) or built.
    """

    def __init__(
        self,
        index: bm25s.BM25,
        tokenizer: Tokenizer,
        corpus: Corpus,
        *,
        cache_path: Path | None = None,
        loaded_from_cache: bool = False,
        n_threads: int = 0,
    ) -> None:
        self._index = index
        self._tokenizer = tokenizer
        self.corpus = corpus
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache
        self.n_threads = n_threads

    @classmethod
    def from_corpus(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        k1: float = 0.9,
        b: float = 0.4,
        method: BM25Method = "lucene",
        n_threads: int = 0,
    ) -> BM25Retriever:
        """Index the JSONL corpus at ``path``, or load its index from the cache.

        Args:
            path: the corpus, one ``{"id": str, "contents": str}`` object a line.
            cache_dir: the cache root (default ``$TREEGRPO_CACHE``, else ``~/.cache/treegrpo``);
                the index lives in ``<cache_dir>/bm25/<corpus hash>-<settings hash>/``.
            cache: False builds the index in memory and writes nothing.
            k1: term-frequency saturation (> 0).
            b: document-length normalisation, 0 (none) to 1 (full).
            method: bm25s's BM25 variant; ``"lucene"`` is what Pyserini / Search-R1 use.
            n_threads: threads bm25s scores one batch with; 0 scores in the calling thread. The
                numpy scorer holds the GIL for most of its work, so on 2 cores threads do not
                pay (see bench/env.py); run several retrieve calls concurrently instead.
        """
        if method not in get_args(BM25Method):
            raise InvalidOptionError(
                f"unknown BM25 method {method!r}; expected one of {', '.join(get_args(BM25Method))}"
            )
        if not k1 > 0:
            raise InvalidArgumentError(f"k1 must be > 0, got {k1}")
        if not 0 <= b <= 1:
            raise InvalidArgumentError(f"b must be in [0, 1], got {b}")
        if n_threads < 0:
            raise InvalidArgumentError(f"n_threads must be >= 0, got {n_threads}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        settings = _settings(k1, b, method)
        if not cache:
            index, tokenizer, corpus = _build(path, settings)
            return cls(index, tokenizer, corpus, n_threads=n_threads)

        root = cache_root(cache_dir)
        folder = index_dir(root, "bm25", corpus_fingerprint(path, root=root), settings)
        if folder.is_dir():
            try:
                index, tokenizer, corpus = _load(folder, path)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("BM25 cache %s is unreadable (%s); rebuilding it", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                return cls(
                    index,
                    tokenizer,
                    corpus,
                    cache_path=folder,
                    loaded_from_cache=True,
                    n_threads=n_threads,
                )
        index, tokenizer, corpus = _build(path, settings)
        saved = _save(folder, index, corpus, settings)
        return cls(
            index, tokenizer, corpus, cache_path=folder if saved else None, n_threads=n_threads
        )

    def __len__(self) -> int:
        return len(self.corpus)

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        """The best ``topk`` documents for each query, best first, each with its BM25 score.

        Only documents sharing a term with the query are returned (see the module docstring):
        an empty query gives ``[]``."""
        rows, scores = self.search(queries, topk)
        return [self.corpus.documents(r, s) for r, s in zip(rows, scores, strict=True)]

    def search(
        self, queries: Sequence[str], topk: int = 3
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Like :meth:`retrieve`, but the corpus rows and scores (two arrays per query) instead
        of documents."""
        check_request(queries, topk)
        k = min(topk, len(self.corpus))
        token_ids = list(
            self._tokenizer.streaming_tokenize(list(queries), update_vocab=False, allow_empty=False)
        )
        rows: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(token_ids)
        scores: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(token_ids)
        asked = [i for i, ids in enumerate(token_ids) if ids]
        if not asked:
            return rows, scores
        found_rows, found_scores = self._index.retrieve(
            [token_ids[i] for i in asked],
            k=k,
            sorted=True,
            show_progress=False,
            n_threads=self.n_threads,
            backend_selection="numpy",
        )
        for i, r, s in zip(asked, found_rows, found_scores, strict=True):
            matched = s > 0  # sorted best first, so the matches are a prefix
            rows[i], scores[i] = r[matched], s[matched]
        return rows, scores

    def __repr__(self) -> str:
        cache = "memory" if self.cache_path is None else str(self.cache_path)
        return (
            f"BM25Retriever(documents={len(self.corpus)}, terms={len(self._index.vocab_dict)}, "
            f"k1={self._index.k1}, b={self._index.b}, method={self._index.method!r}, "
            f"index={cache!r})"
        )


def _settings(k1: float, b: float, method: str) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "k1": float(k1),
        "b": float(b),
        "method": method,
        "lower": True,
        "token_pattern": _TOKEN_PATTERN,
        "stopwords": _STOPWORDS,
        "stemmer": None,
    }


def _build(path: Path, settings: dict[str, Any]) -> tuple[bm25s.BM25, Tokenizer, Corpus]:
    """One streaming pass over the file: validate, record offsets, tokenise; then index."""
    starts = array.array("q")

    def contents() -> Any:
        for start, doc in scan_corpus(path):
            starts.append(start)
            yield doc.contents

    tokenizer = _tokenizer()
    token_ids = list(tokenizer.streaming_tokenize(contents(), update_vocab=True, allow_empty=True))
    corpus = Corpus.from_offsets(path, starts)
    index = bm25s.BM25(k1=settings["k1"], b=settings["b"], method=settings["method"])
    index.index((token_ids, tokenizer.get_vocab_dict()), show_progress=False)
    return index, tokenizer, corpus


def _save(folder: Path, index: bm25s.BM25, corpus: Corpus, settings: dict[str, Any]) -> bool:
    meta = {
        "corpus": str(corpus.path.resolve()),
        "corpus_bytes": int(corpus.offsets[-1]),
        "documents": len(corpus),
        "settings": settings,
        "bm25s": bm25s.__version__,
    }
    try:
        with atomic_directory(folder) as scratch:
            index.save(scratch, show_progress=False)
            np.save(scratch / _OFFSETS, corpus.offsets)
            (scratch / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    except OSError as e:  # a read-only or full cache disk must not stop training
        logger.warning("could not cache the BM25 index in %s (%s); continuing without", folder, e)
        return False
    return True


def _load(folder: Path, path: Path) -> tuple[bm25s.BM25, Tokenizer, Corpus]:
    meta = json.loads((folder / _META).read_text(encoding="utf-8"))
    offsets = np.load(folder / _OFFSETS)
    if meta["documents"] != len(offsets) - 1:
        raise ValueError(f"{len(offsets) - 1} offsets for {meta['documents']} documents")
    index = bm25s.BM25.load(folder, mmap=False, show_progress=False)
    tokenizer = _tokenizer()
    # The index's vocabulary is the tokenizer's (token -> id), saved once, with the index.
    tokenizer.word_to_id = index.vocab_dict
    return index, tokenizer, Corpus(path, offsets)
