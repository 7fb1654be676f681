"""The embedded engine's KV memory: the running batch's slab and the prefix cache between calls.

- :class:`Slab`: the KV of the running batch (:mod:`treegrpo.engine.scheduling`), ``(layers,
  K/V, rows, kv_heads, columns, head_dim)``, read and written by the model through
  :func:`slab_cache` (a transformers ``Cache``). Every row holds its sequence from column 0
  (column = position), prompt then generated tokens.
- :class:`PrefixCache`: KV *blocks* indexed by a :class:`treegrpo.RadixIndex`. Each insert
  stores one block with exactly the new positions ``[m, L)`` of all layers and a link to the
  block holding position ``m - 1`` (the value the index returns for the matched prefix). A match
  of length ``m`` walks block -> parent block and copies the slices that cover ``[0, m)``. The
  index evicts least-recently-used leaves first, so a block's ancestors outlive it; a block is
  freed when the index reports its value dropped. Evictions run after every insert until the
  blocks held fit the budget. What a prompt may reuse and what a finished row leaves cached are
  SGLang's rules (:mod:`treegrpo.engine.cache_rules`), as in the client's cache model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from treegrpo._core import RadixIndex
from treegrpo.engine.cache_rules import reusable_length, sequence_at_finish
from treegrpo.engine.errors import EngineError

__all__ = ["PrefixCache", "Slab", "slab_cache"]


class Slab:
    """The running batch's KV: ``buf[layer, 0 | 1, row, kv_head, column, head_dim]``.

    Forwards read and write it through :class:`SlabCache`. Before each forward the scheduler
    sets which rows run (a contiguous range), where the new keys go (``scatter`` for a prefill
    piece, ``decode`` for one token per row at the row's own column) and which columns to
    return."""

    def __init__(
        self, layers: int, rows: int, heads: int, columns: int, dim: int, dtype: Any, device: Any
    ) -> None:
        # torch.empty: pages nobody writes are never touched (the decode tail of short rows).
        self.buf = torch.empty((layers, 2, rows, heads, columns, dim), dtype=dtype, device=device)
        self.rows = (0, rows)
        self.read = (0, 0)
        # Prefill: scatter positions (slab rows, slab columns, source rows, source columns).
        self.scatter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Decode: row ``rows[i]`` writes its one new token at column ``columns[i]``.
        self.decode: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r0, r1 = self.rows
        k_all, v_all = self.buf[layer, 0], self.buf[layer, 1]
        if keys.shape[1] != k_all.shape[1] or keys.shape[3] != k_all.shape[3]:
            raise EngineError(
                f"the model's layer {layer} produced keys of shape {tuple(keys.shape)}, but the "
                f"engine expected {k_all.shape[1]} key/value heads of dimension {k_all.shape[3]} "
                "(config num_key_value_heads / head_dim): this model's attention is not supported"
            )
        if self.decode is not None:  # one token per row, each at its own column
            rows, cols = self.decode
            k_all[rows, :, cols] = keys[:, :, 0]
            v_all[rows, :, cols] = values[:, :, 0]
        elif self.scatter is not None:
            rows, cols, src_rows, src_cols = self.scatter
            k_all[rows, :, cols] = keys[src_rows, :, src_cols]
            v_all[rows, :, cols] = values[src_rows, :, src_cols]
        lo, hi = self.read
        return k_all[r0:r1, :, lo:hi], v_all[r0:r1, :, lo:hi]


def slab_cache(slab: Slab, layers: int) -> Any:
    """A transformers ``Cache`` whose ``update`` writes into (and reads from) ``slab``."""
    return _slab_cache_class()(slab, layers)


@functools.cache
def _slab_cache_class() -> type:
    # One class for every call, holding its slab as an attribute. (A class made per call, with
    # the slab in a closure, kept each call's slab alive until the cyclic garbage collector ran,
    # since a class is part of reference cycles: several GB per call piled up in a rollout.)
    from transformers.cache_utils import Cache, DynamicLayer

    class SlabCache(Cache):
        def __init__(self, slab: Slab, layers: int) -> None:
            super().__init__(layers=[DynamicLayer() for _ in range(layers)])
            self.slab = slab

        def update(
            self,
            key_states: torch.Tensor,
            value_states: torch.Tensor,
            layer_idx: int,
            *a: Any,
            **k: Any,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self.slab.write(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.slab.read[1] - self.slab.read[0]

    return SlabCache


# ---------------------------------------------------------------------------- prefix cache


@dataclass
class _Block:
    kv: torch.Tensor  # (layers, 2, kv_heads, length, head_dim): positions [start, start + length)
    start: int
    parent: int | None  # block holding position start - 1


class PrefixCache:
    """KV blocks indexed by a :class:`RadixIndex` (see the module docstring), at most
    ``budget`` token positions between calls (0: nothing is cached)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.index = RadixIndex()
        self.blocks: dict[int, _Block] = {}
        self.stored = 0  # positions held by blocks (>= index.total_size: tails evicted in part)
        self.evicted = 0
        self._next = 0

    def match(self, tokens: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, int]]]:
        """Longest cached prefix of ``tokens``: its length and the KV pieces covering it, in
        order, each as ``(kv slice, first position)``."""
        if not self.blocks or not tokens:
            return 0, []
        length, _, value = self.index.match_prefix(tokens)
        pieces: list[tuple[torch.Tensor, int]] = []
        end = length
        while end > 0:
            assert value is not None
            block = self.blocks[value]
            pieces.append((block.kv[:, :, :, : end - block.start], block.start))
            end, value = block.start, block.parent
        pieces.reverse()
        return length, pieces

    def insert(self, tokens: Sequence[int], kv: torch.Tensor, column: int) -> int:
        """Store ``tokens``, whose KV is ``kv[:, :, :, column + t]`` for position ``t`` (``kv``:
        one slab row, ``(layers, 2, kv_heads, columns, head_dim)``). Only the positions not
        stored yet are copied. Returns how many positions were added."""
        if self.budget <= 0 or not tokens:
            return 0
        m, _, parent = self.index.match_prefix(tokens)
        if m >= len(tokens):
            return 0
        block = kv[:, :, :, column + m : column + len(tokens)].clone()
        value = self._next
        self._next += 1
        present = self.index.insert(tokens, value)
        if present != m:  # pragma: no cover - the index changed between two calls under our lock
            raise EngineError(f"prefix cache out of step: matched {m}, insert found {present}")
        self.blocks[value] = _Block(block, m, parent if m > 0 else None)
        self.stored += len(tokens) - m
        self._evict()
        return len(tokens) - m

    def reuse(self, prompt: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, int]]]:
        """What a prefill of ``prompt`` may reuse (:func:`reusable_length`): :meth:`match` of
        all but its last token."""
        return self.match(prompt[: reusable_length(len(prompt))])

    def insert_finished(
        self, prompt: Sequence[int], output: Sequence[int], kv: torch.Tensor, column: int
    ) -> int:
        """A finished row: store :func:`sequence_at_finish` (prompt + output minus its last
        token, whose KV was never computed); ``kv`` and ``column`` as in :meth:`insert`."""
        return self.insert(sequence_at_finish(prompt, output), kv, column)

    def _evict(self) -> None:
        while self.stored > self.budget:
            freed, dropped = self.index.evict(self.stored - self.budget)
            self.evicted += freed
            for value in dropped:
                self.stored -= self.blocks.pop(value).kv.shape[3]
            if freed == 0 and not dropped:
                break

    def reset(self) -> None:
        self.index.reset()
        self.blocks.clear()
        self.stored = 0
