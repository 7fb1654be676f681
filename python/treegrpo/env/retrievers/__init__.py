"""Retrievers for the search tool: BM25 and dense over a local JSONL corpus, a client for a
remote ``/retrieve`` server, and that server.

    from treegrpo.env.retrievers import BM25Retriever, HttpRetriever, serving

    local = BM25Retriever.from_corpus("wiki-18.jsonl")        # index cached on disk
    local.retrieve(["who wrote hamlet"], topk=3)              # -> [[Document, ...]]
    with serving(local) as url:                               # POST /retrieve on 127.0.0.1
        HttpRetriever(url).retrieve(["who wrote hamlet"])     # the same documents

Every retriever implements :class:`treegrpo.env.Retriever`. Dense retrieval needs the optional
``treegrpo[dense]`` dependencies; its module imports torch only when one is built.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from treegrpo.env.retrievers.bm25 import BM25Retriever
from treegrpo.env.retrievers.corpus import Corpus, iter_corpus, read_corpus, scan_corpus
from treegrpo.env.retrievers.dense import DenseRetriever, SentenceEncoder, model_dir
from treegrpo.env.retrievers.errors import (
    CorpusFormatError,
    MissingDependencyError,
    RetrieverResponseError,
    RetrieverTimeoutError,
    RetrieverUnavailableError,
)
from treegrpo.env.retrievers.http import HttpRetriever
from treegrpo.env.retrievers.server import create_app, serve, serving, start_server_in_thread
from treegrpo.env.types import Retriever
from treegrpo.exceptions import InvalidOptionError

__all__ = [
    "BM25Retriever",
    "Corpus",
    "CorpusFormatError",
    "DenseRetriever",
    "HttpRetriever",
    "MissingDependencyError",
    "RetrieverResponseError",
    "RetrieverTimeoutError",
    "RetrieverUnavailableError",
    "SentenceEncoder",
    "create_app",
    "iter_corpus",
    "load_retriever",
    "model_dir",
    "read_corpus",
    "scan_corpus",
    "serve",
    "serving",
    "start_server_in_thread",
]

RetrieverKind = Literal["bm25", "dense", "http"]


def load_retriever(
    kind: RetrieverKind, source: str | os.PathLike[str], **options: Any
) -> Retriever:
    """A retriever by name: ``"bm25"`` or ``"dense"`` over the corpus file ``source``, or
    ``"http"`` for the server at URL ``source``. ``options`` go to the constructor
    (``cache_dir=...``, ``device=...``, ``timeout=...``)."""
    if kind == "bm25":
        return BM25Retriever.from_corpus(source, **options)
    if kind == "dense":
        return DenseRetriever.from_corpus(source, **options)
    if kind == "http":
        return HttpRetriever(str(source), **options)
    raise InvalidOptionError(f"unknown retriever {kind!r}; expected one of bm25, dense, http")
