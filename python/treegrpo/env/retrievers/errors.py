"""The errors the retrievers raise (defined with every other treegrpo error in
:mod:`treegrpo.exceptions`; re-exported here for the retriever modules)."""

from __future__ import annotations

from treegrpo.exceptions import (
    CorpusFormatError,
    MissingDependencyError,
    RetrieverResponseError,
    RetrieverTimeoutError,
    RetrieverUnavailableError,
)

__all__ = [
    "CorpusFormatError",
    "MissingDependencyError",
    "RetrieverResponseError",
    "RetrieverTimeoutError",
    "RetrieverUnavailableError",
]
