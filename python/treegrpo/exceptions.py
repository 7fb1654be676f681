"""The exceptions treegrpo raises. Every one derives from :class:`TreeGRPOError`, and from the
built-in exception it refines, so ``except ValueError`` keeps working."""

from __future__ import annotations

__all__ = [
    "CorpusFormatError",
    "InvalidArgumentError",
    "InvalidOptionError",
    "InvalidStepError",
    "LockError",
    "MissingDependencyError",
    "RetrieverResponseError",
    "RetrieverTimeoutError",
    "RetrieverUnavailableError",
    "RewardError",
    "RunDirError",
    "RunFormatError",
    "RunNotFoundError",
    "StaleHandleError",
    "SynthesisError",
    "TreeGRPOError",
    "UnknownNodeError",
]


class TreeGRPOError(Exception):
    """Base class of every treegrpo error."""


class _KeyErrorMessage(KeyError):
    # KeyError's str() quotes its argument; show the message as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownNodeError(TreeGRPOError, _KeyErrorMessage):
    """A node id that the forest does not hold."""


class StaleHandleError(TreeGRPOError, _KeyErrorMessage):
    """A radix-index handle whose node was evicted (or never existed)."""


class InvalidStepError(TreeGRPOError, ValueError):
    """A step that cannot be added where it was asked for (e.g. under a leaf)."""


class RewardError(TreeGRPOError, ValueError):
    """A reward on a non-leaf, a non-finite reward, or a missing one."""


class InvalidOptionError(TreeGRPOError, ValueError):
    """An unknown name for a string option; the message lists the valid ones."""


class InvalidArgumentError(TreeGRPOError, ValueError):
    """An argument out of its valid range (e.g. K larger than a tree's leaves, a bad token id)."""


class LockError(TreeGRPOError, ValueError):
    """An unbalanced lock release on the radix index."""


# ---- environment: corpora, retrievers, the synthetic world


class CorpusFormatError(TreeGRPOError, ValueError):
    """A corpus file that is not JSONL with one ``{"id": str, "contents": str}`` object a line.

    The message names the file and the 1-based line number."""


class RetrieverUnavailableError(TreeGRPOError, ConnectionError):
    """A retriever server that could not be reached (refused connection, reset, HTTP 5xx), after
    every retry. The message names the URL."""


class RetrieverTimeoutError(RetrieverUnavailableError, TimeoutError):
    """A retriever server that did not answer within the timeout, after every retry."""


class RetrieverResponseError(TreeGRPOError, ValueError):
    """A retriever server that answered, but not with results: an HTTP 4xx (the request was
    rejected; never retried) or a body that does not follow the ``/retrieve`` protocol.

    ``status`` is the HTTP status code (200 for a malformed body)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MissingDependencyError(TreeGRPOError, ImportError):
    """An optional dependency (e.g. torch for dense retrieval) that is not installed; the
    message says what to install."""


class SynthesisError(TreeGRPOError, RuntimeError):
    """The synthetic world could not be built as promised (e.g. a gold hop's page not retrieved)."""


# ---- rollout logs


class RunNotFoundError(TreeGRPOError, FileNotFoundError):
    """A run directory, or a table of it (``nodes/``, ``trajectories/``), that does not exist or
    holds no log files. The message names the missing path."""


class RunFormatError(TreeGRPOError, ValueError):
    """Rollout logs that are not what treegrpo writes: an unreadable Parquet file, a table
    without the columns the analysis needs, a metrics line that is not JSON. The message names
    the file and what is wrong."""


class RunDirError(TreeGRPOError, ValueError):
    """A run directory that this run may not use: held by a live run (the message names its
    pid, host and start time), holding another run or a run of an incompatible config (the
    message lists each difference), or not a directory. Nothing in it has been changed."""
