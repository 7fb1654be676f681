"""The search tool: a retriever behind the Search-R1 ``<search>`` action."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from treegrpo.env.types import Document, Retriever

__all__ = ["SearchTool", "format_documents"]


def format_documents(docs: Sequence[Document]) -> str:
    """Search-R1's observation body: one ``Doc {i}(Title: {title}) {text}`` line per document,
    the title being the first line of its contents as it is (wiki-18's quotes kept)."""
    return "".join(f"Doc {i}(Title: {d.title}) {d.text}\n" for i, d in enumerate(docs, start=1))


class SearchTool:
    """``<search> query </search>`` -> the top-k documents of ``retriever``."""

    name = "search"
    tag = "search"

    def __init__(self, retriever: Retriever, topk: int = 3) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.retriever = retriever
        self.topk = topk

    async def call(self, queries: list[str]) -> list[str]:
        # Retrievers are synchronous (CPU index or blocking HTTP): run off the event loop so
        # generation of other branches goes on meanwhile.
        results = await asyncio.to_thread(self.retriever.retrieve, queries, self.topk)
        return [format_documents(docs) for docs in results]
