"""treegrpo: Tree-GRPO for LLM agents.

Rollouts are trees whose nodes are whole agent steps; siblings share their prefix, and outcome
rewards propagated through the tree give step-level signals. The rollout-tree scheduler
(selection, advantages, Arrow export) is the Rust extension ``treegrpo._core``.
"""

from __future__ import annotations

import warnings

from treegrpo import _core
from treegrpo._core import Forest, Pack, RadixIndex, Table
from treegrpo.exceptions import (
    CorpusFormatError,
    InvalidArgumentError,
    InvalidOptionError,
    InvalidStepError,
    LockError,
    MissingDependencyError,
    RetrieverResponseError,
    RetrieverTimeoutError,
    RetrieverUnavailableError,
    RewardError,
    StaleHandleError,
    SynthesisError,
    TreeGRPOError,
    UnknownNodeError,
)

__version__: str = _core.__version__

if _core.BUILD_PROFILE != "release":
    warnings.warn(
        "treegrpo's Rust extension is a debug build: it is many times slower. "
        "Rebuild with `maturin develop --release` (or `make develop`).",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "CorpusFormatError",
    "Forest",
    "InvalidArgumentError",
    "InvalidOptionError",
    "InvalidStepError",
    "LockError",
    "MissingDependencyError",
    "Pack",
    "RadixIndex",
    "RetrieverResponseError",
    "RetrieverTimeoutError",
    "RetrieverUnavailableError",
    "RewardError",
    "StaleHandleError",
    "SynthesisError",
    "Table",
    "TreeGRPOError",
    "UnknownNodeError",
    "__version__",
]
