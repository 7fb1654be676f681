"""A model of SGLang's radix prefix cache: how many prompt tokens a request finds cached.

One :class:`RadixCacheModel` mirrors one server's cache, on :class:`treegrpo.RadixIndex`, by
the rules of :mod:`treegrpo.engine.cache_rules` (which the embedded engine's KV cache follows
too):

- a request is *admitted* (prefilled): its reuse is the longest cached prefix of the prompt
  within :func:`~treegrpo.engine.cache_rules.reusable_length`; then the prompt is inserted and
  locked while the request runs;
- at *finish*, :func:`~treegrpo.engine.cache_rules.sequence_at_finish` is inserted and the lock
  is released;
- when more tokens are cached than the capacity, least-recently-used unlocked leaves are evicted;
- a weight update flushes everything (:meth:`reset`).

The SGLang client uses it to predict ``cached_tokens`` per server. The stand-in server does not:
it reports what its own engine's KV cache really reused, so tests of the prediction against it
check this model against a real cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treegrpo._core import RadixIndex
from treegrpo.engine.cache_rules import (
    aligned,
    reusable_length,
    sequence_at_finish,
    stored_at_prefill,
)
from treegrpo.exceptions import LockError, StaleHandleError

__all__ = ["Admission", "RadixCacheModel"]


@dataclass(frozen=True)
class Admission:
    """An admitted request: ``cached_tokens`` it reuses, and the lock on its prompt."""

    cached_tokens: int
    handle: int | None
    generation: int


class RadixCacheModel:
    """One server's prefix cache (see the module docstring).

    Args:
        capacity: tokens the cache holds at most (SGLang's ``max_total_num_tokens``); None for
            no eviction.
        page_size: SGLang's ``--page-size``: matches and inserts are whole pages.
    """

    def __init__(self, capacity: int | None = None, page_size: int = 1) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 token or None, got {capacity}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.capacity = capacity
        self.page_size = page_size
        self._index = RadixIndex()
        # Bumped by reset(): handles from before a flush are not released into the new tree.
        self._generation = 0

    def _aligned(self, n: int) -> int:
        return aligned(n, self.page_size)

    def admit(self, prompt: Sequence[int]) -> Admission:
        """Prefill ``prompt``: returns its reuse and locks its tokens until :meth:`finish`."""
        prompt = list(prompt)
        limit = reusable_length(len(prompt), self.page_size)
        matched = self._index.match_prefix(prompt[:limit])[0] if limit else 0
        cached = self._aligned(matched)
        stored = stored_at_prefill(prompt, self.page_size)
        handle = None
        if stored:
            self._index.insert(stored, 0)
            handle = self._index.match_prefix(stored)[1]
            self._index.inc_lock_ref(handle)
        self._evict_over_capacity()
        return Admission(cached, handle, self._generation)

    def finish(
        self, admission: Admission, prompt: Sequence[int], output: Sequence[int] = ()
    ) -> None:
        """The request of ``admission`` ended with ``output``: cache prompt + output minus the
        last token, and release the prompt's lock."""
        if admission.generation != self._generation:
            return  # flushed while it ran: its lock went with the old tree
        stored = sequence_at_finish(prompt, output, self.page_size)
        if stored:
            self._index.insert(stored, 0)
        self._unlock(admission)
        self._evict_over_capacity()

    def release(self, admission: Admission) -> None:
        """The request of ``admission`` ended with nothing to cache (it failed): release its
        prompt's lock only."""
        if admission.generation == self._generation:
            self._unlock(admission)

    def _unlock(self, admission: Admission) -> None:
        if admission.handle is not None:
            try:
                self._index.dec_lock_ref(admission.handle)
            except (StaleHandleError, LockError):  # pragma: no cover - never locked twice
                pass

    def _evict_over_capacity(self) -> None:
        if self.capacity is not None and self._index.total_size > self.capacity:
            self._index.evict(self._index.total_size - self.capacity)

    def reset(self) -> None:
        """Flush: nothing is cached any more (running requests' locks are dropped too)."""
        self._index.reset()
        self._generation += 1

    @property
    def size(self) -> int:
        """Tokens cached."""
        return self._index.total_size

    def __repr__(self) -> str:
        return (
            f"RadixCacheModel(tokens={self.size}, capacity={self.capacity}, "
            f"page_size={self.page_size})"
        )
