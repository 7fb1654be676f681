"""The shapes the environment's parts agree on: documents, retrievers and tools."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Document", "Retriever", "Tool"]


@dataclass(frozen=True)
class Document:
    """One corpus entry in wiki-18 format: ``contents`` is the quoted title on its first line,
    then the text.

    ``title`` is that first line as it is, quotes and spaces kept, and ``text`` the rest: the two
    parts Search-R1's observation shows (``Doc 1(Title: "Aaron") Aaron is ...``)."""

    id: str
    contents: str
    score: float | None = None

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0]

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) > 1 else ""

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "contents": self.contents}


@runtime_checkable
class Retriever(Protocol):
    """Top-k documents per query (a local index or a remote `/retrieve` server)."""

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]: ...


@runtime_checkable
class Tool(Protocol):
    """A tool the agent calls with ``<tag> query </tag>``.

    ``call`` gets the queries of one agent step across all active branches and returns one
    observation body per query (the environment wraps it, e.g. in ``<information>``)."""

    name: str
    tag: str

    async def call(self, queries: list[str]) -> list[str]: ...
