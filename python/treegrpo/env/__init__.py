"""The search-agent environment: prompts, step parsing, tools, retrievers, rewards, datasets.

The datasets (``Example``, ``load_search_r1``, ``write_search_r1``) load on first use, so a
rollout, which needs the environment but no Parquet file, does not import pyarrow.
"""

from typing import Any

from treegrpo.env.prompt import SEARCH_R1_TEMPLATE, PromptBuilder, normalize_question
from treegrpo.env.rewards import (
    compute_score,
    exact_match_score,
    extract_answer,
    f1_score,
    format_reward,
    is_valid_format,
    load_reward_fn,
    normalize_answer,
)
from treegrpo.env.steps import (
    INVALID_ACTION,
    STOP_STRINGS,
    Action,
    SearchEnv,
    StepInput,
    StepResult,
    parse_action,
    wrap_information,
)
from treegrpo.env.tools import SearchTool, format_documents
from treegrpo.env.types import Document, Retriever, Tool

__all__ = [
    "INVALID_ACTION",
    "SEARCH_R1_TEMPLATE",
    "STOP_STRINGS",
    "Action",
    "Document",
    "Example",
    "PromptBuilder",
    "Retriever",
    "SearchEnv",
    "SearchTool",
    "StepInput",
    "StepResult",
    "Tool",
    "compute_score",
    "exact_match_score",
    "extract_answer",
    "f1_score",
    "format_documents",
    "format_reward",
    "is_valid_format",
    "load_reward_fn",
    "load_search_r1",
    "normalize_answer",
    "normalize_question",
    "parse_action",
    "wrap_information",
    "write_search_r1",
]

_DATASETS = ("Example", "load_search_r1", "write_search_r1")


def __getattr__(name: str) -> Any:
    if name in _DATASETS:
        from treegrpo.env import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
