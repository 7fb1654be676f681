"""treegrpo: Tree-GRPO for LLM agents.

Rollouts are trees whose nodes are whole agent steps; siblings share their prefix, and outcome
rewards propagated through the tree give step-level signals. The rollout-tree scheduler
(selection, advantages, Arrow export) is the Rust extension ``treegrpo._core``.
"""

from __future__ import annotations

import importlib.metadata
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

try:
    # The installed distribution's version: Cargo.toml's package version, which maturin writes
    # into the wheel's metadata in PEP 440 form (`0.2.0-rc.1` -> `0.2.0rc1`).
    __version__: str = importlib.metadata.version("treegrpo")
except importlib.metadata.PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = _core.__version__

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
