"""Argument checks every retriever shares."""

from __future__ import annotations

from collections.abc import Sequence

from treegrpo.exceptions import InvalidArgumentError

__all__ = ["check_request"]


def check_request(queries: Sequence[str], topk: int) -> None:
    """Raise :class:`InvalidArgumentError` unless ``queries`` is a sequence of strings (not one
    string) and ``topk`` an integer >= 1."""
    if isinstance(queries, (str, bytes)) or not all(isinstance(q, str) for q in queries):
        raise InvalidArgumentError(
            "queries must be a sequence of strings, e.g. ['who wrote Hamlet'], got "
            f"{type(queries).__name__}"
            + ("" if isinstance(queries, (str, bytes)) else " with a non-string item")
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise InvalidArgumentError(f"topk must be an integer >= 1, got {topk!r}")
