"""The exceptions treegrpo raises. Every one derives from :class:`TreeGRPOError`, and from the
built-in exception it refines, so ``except ValueError`` keeps working."""

from __future__ import annotations

__all__ = [
    "InvalidArgumentError",
    "InvalidOptionError",
    "InvalidStepError",
    "LockError",
    "RewardError",
    "StaleHandleError",
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
