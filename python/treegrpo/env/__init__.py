"""The search-agent environment: prompts, step parsing, tools, retrievers, rewards, datasets."""

from treegrpo.env.tools import SearchTool, format_documents
from treegrpo.env.types import Document, Retriever, Tool

__all__ = ["Document", "Retriever", "SearchTool", "Tool", "format_documents"]
