"""The embedded engine: batched generation with a transformers model in this process, with a
radix prefix cache of KV blocks, sharing the model object with the learner.

How one :meth:`EmbeddedEngine.generate` call runs (all of it under the engine's lock, on a worker
thread, so the event loop keeps serving tool calls):

1. Validate every request (token ids in the vocabulary, the prompt within the context).
   Requests with the same ``input_ids`` share one prefill, so ``n`` siblings (or identical
   requests) prefill their prompt once; each sample then gets its own row.
2. Lay the call out in one KV *slab*, ``(layers, K/V, rows, kv_heads, columns, head_dim)``:
   every prompt right-aligned at column ``P`` (the longest prompt), generated tokens after it.
   Rows of different lengths are left-padded; attention uses an explicit 4-D additive mask and
   explicit per-row ``position_ids``, so the RoPE positions baked into cached keys stay right.
3. Prefill in chunks of at most ``max_batch_tokens`` padded new tokens. A chunk first asks the
   radix index for each prompt's longest cached prefix (capped at ``prompt_len - 1``: one token
   must run to give logits, as in SGLang) and copies those KV blocks into the slab, then runs
   only the remaining tokens (long prompts in several pieces). Once a prompt is complete its KV
   is inserted into the cache, so a later chunk of the same call already reuses it.
4. Copy each prompt's KV into its siblings' rows and decode all rows in lock step, one token per
   forward, logits for the last position only (never the full ``(batch, time, vocab)`` tensor).
   A row finishes on a stop token id or EOS (kept in the output), on a stop string found in the
   decoded output (the tokens up to the one completing it are kept), at ``max_new_tokens``, at
   the model's context length, or when aborted. At finish, prompt + output minus its last token
   (which never went through the model) is inserted into the cache, as SGLang does. Finished
   rows are compacted out of the slab once they are a quarter of it.

The prefix cache (``kv_budget_tokens``): :class:`treegrpo.RadixIndex` holds the token sequences;
each insert stores one KV *block* with exactly the new positions ``[m, L)`` of all layers and a
link to the block holding position ``m - 1`` (the value the index returns for the matched
prefix). A match of length ``m`` walks block -> parent block and copies the slices that cover
``[0, m)``. The index evicts least-recently-used leaves first, so a block's ancestors outlive it;
a block is freed when the index reports its value dropped. Evictions run after every insert
until the blocks held fit the budget. A weight update flushes the cache.

Sampling: per-row temperature (0 = greedy, the argmax of the raw logits), top-k, top-p (the
smallest set of top tokens whose mass reaches ``top_p``), drawn from one ``torch.Generator``
seeded with ``seed``: the same calls in the same order give the same samples;
:meth:`EmbeddedEngine.state_dict` / :meth:`~EmbeddedEngine.load_state_dict` carry the generator
and the weight version through a checkpoint, so a resumed run samples on. ``log_probs`` are
``log_softmax(logits / temperature)`` at the sampled token, before top-k/top-p truncation (what
SGLang returns by default); greedy rows use temperature 1. With temperature 1 they equal a fresh
forward pass's log-softmax.

Weight sharing: the engine holds the very model object the learner trains. The learner takes
:meth:`EmbeddedEngine.exclusive` around each optimizer step (generation never overlaps it), then
calls :meth:`EmbeddedEngine.bump_weight_version`, which flushes the KV cache (KV from old weights
must not be reused) and moves ``weight_version`` from ``"0"`` to ``"1"``... Every completion names
the version that produced it.

Limits: decoder-only models with full attention in every layer (Llama, Qwen2/3, SmolLM2,
Mistral without a sliding window); the slab of one call holds ``rows x (P + max_new_tokens)``
token positions (only the ones used are touched); ``kv_budget_tokens`` bounds the cache between
calls, not that working slab.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from treegrpo._core import RadixIndex
from treegrpo.engine.base import Completion, FinishReason, GenerateRequest, SamplingParams
from treegrpo.engine.errors import EngineClosedError, EngineError, InvalidTokenError
from treegrpo.exceptions import InvalidArgumentError

__all__ = ["EmbeddedEngine", "EngineStats"]

# A row is dropped from the slab (a copy of its live KV) once this share of rows has finished.
_COMPACT_FRACTION = 0.25
# First candidate set for top-k / top-p sampling, and its growth factor until it holds every
# row's nucleus (topk over 49k logits costs ~10 ms for 16 rows; a full sort ~80 ms).
_TOPK_CANDIDATES = 256
_TOPK_GROWTH = 8


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was made (or since :meth:`EmbeddedEngine.reset_stats`).

    Token counts, for the rollout's budget accounting:

    - ``prompt_tokens``: tokens of the prompts prefilled (a prompt shared by ``n`` samples or by
      identical requests of one call counts once);
    - ``cached_tokens``: of those, served from the prefix cache;
    - ``prefill_tokens``: of those, computed (``prompt_tokens - cached_tokens``);
    - ``decode_tokens``: tokens generated (every sampled output token).

    Also ``requests`` and ``completions`` served, model ``forward_passes``, wall time spent in
    prefill and in decode (seconds), tokens evicted from the cache, and cache flushes."""

    requests: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    forward_passes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    evicted_tokens: int = 0
    cache_flushes: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """``cached_tokens / prompt_tokens`` (0 before any prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# --------------------------------------------------------------------------- the KV slab


class _Slab:
    """The KV of one generate call: ``buf[layer, 0 | 1, row, kv_head, column, head_dim]``.

    Forwards read and write it through :class:`_SlabCache`. Before each forward the engine sets
    which rows run (a contiguous range), where the new keys go, and which columns to return."""

    def __init__(
        self, layers: int, rows: int, heads: int, columns: int, dim: int, dtype: Any, device: Any
    ) -> None:
        # torch.empty: pages nobody writes are never touched (the decode tail of short rows).
        self.buf = torch.empty((layers, 2, rows, heads, columns, dim), dtype=dtype, device=device)
        self.rows = (0, rows)
        self.read = (0, 0)
        # Prefill: scatter positions (slab rows, slab columns, source rows, source columns).
        self.scatter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Decode: every row writes its one new token at this column.
        self.column = 0

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
        if self.scatter is None:  # decode: one token per row
            k_all[r0:r1, :, self.column] = keys[:, :, 0]
            v_all[r0:r1, :, self.column] = values[:, :, 0]
        else:
            rows, cols, src_rows, src_cols = self.scatter
            k_all[rows, :, cols] = keys[src_rows, :, src_cols]
            v_all[rows, :, cols] = values[src_rows, :, src_cols]
        lo, hi = self.read
        return k_all[r0:r1, :, lo:hi], v_all[r0:r1, :, lo:hi]


def _slab_cache(slab: _Slab, layers: int) -> Any:
    """A transformers ``Cache`` whose ``update`` writes into (and reads from) ``slab``."""
    return _slab_cache_class()(slab, layers)


@functools.cache
def _slab_cache_class() -> type:
    # One class for every call, holding its slab as an attribute. (A class made per call, with
    # the slab in a closure, kept each call's slab alive until the cyclic garbage collector ran,
    # since a class is part of reference cycles: several GB per call piled up in a rollout.)
    from transformers.cache_utils import Cache, DynamicLayer

    class _SlabCache(Cache):
        def __init__(self, slab: _Slab, layers: int) -> None:
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

    return _SlabCache


# --------------------------------------------------------------------------- the prefix cache


@dataclass
class _Block:
    kv: torch.Tensor  # (layers, 2, kv_heads, length, head_dim): positions [start, start + length)
    start: int
    parent: int | None  # block holding position start - 1


class _PrefixCache:
    """KV blocks indexed by a :class:`RadixIndex` (see the module docstring)."""

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


# --------------------------------------------------------------------------- per-call state


@dataclass
class _Prompt:
    ids: list[int]
    rows: list[int] = field(default_factory=list)  # slab rows sampling from it (first: prefill)
    cached: int = 0
    done: int = 0  # positions whose KV is in the slab
    logits: torch.Tensor | None = None


@dataclass
class _Row:
    request: int
    sample: int
    prompt: int
    params: SamplingParams
    limit: int  # max new tokens, capped by the context
    stop_ids: frozenset[int]
    stops: tuple[str, ...]
    output: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


class _Call:
    """One generate call as :meth:`EmbeddedEngine.abort` sees it."""

    def __init__(self, keys: list[str | None]) -> None:
        self.keys = keys
        self.aborted = [False] * len(keys)


# --------------------------------------------------------------------------- the engine


class EmbeddedEngine:
    """Generation with a transformers causal LM in this process (see the module docstring).

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=4-D, position_ids,
            past_key_values, logits_to_keep)``); the same object the learner trains.
        tokenizer: its tokenizer: ``decode`` for stop strings, EOS ids.
        kv_budget_tokens: token positions the prefix cache keeps between calls (LRU eviction
            beyond); 0 disables the cache. Each position costs :attr:`kv_bytes_per_token` bytes
            (45 KiB for SmolLM2-135M in float32).
        max_batch_tokens: padded new tokens per prefill forward (rows x longest piece); longer
            prompts are prefilled in pieces. Bounds prefill memory; on CPU ~2k is also fastest.
        seed: seeds the sampling generator.
        eos_token_ids: ids that always end generation (kept in the output); default: the
            tokenizer's EOS, the model config's and its generation config's.

    Use ``await engine.generate(requests)`` (or :meth:`generate_sync` from plain threads);
    ``engine.stats`` for token counters; :meth:`exclusive` + :meth:`bump_weight_version` around
    optimizer steps.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        kv_budget_tokens: int = 32_768,
        max_batch_tokens: int = 2_048,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if isinstance(kv_budget_tokens, bool) or not isinstance(kv_budget_tokens, int):
            raise InvalidArgumentError(f"kv_budget_tokens must be an int, got {kv_budget_tokens!r}")
        if kv_budget_tokens < 0:
            raise InvalidArgumentError(
                "kv_budget_tokens must be >= 0 (0 disables the prefix cache), "
                f"got {kv_budget_tokens}"
            )
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int):
            raise InvalidArgumentError(f"max_batch_tokens must be an int, got {max_batch_tokens!r}")
        if max_batch_tokens < 1:
            raise InvalidArgumentError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.seed = seed

        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise EngineError(
                f"EmbeddedEngine supports full-attention decoders only; this model has layer "
                f"types {sorted(set(layer_types))} (sliding-window or linear attention)"
            )
        self._layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2**31 - 1)

        if eos_token_ids is None:
            found: set[int] = set()
            for source in (
                getattr(tokenizer, "eos_token_id", None),
                getattr(config, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None),
            ):
                if isinstance(source, int):
                    found.add(source)
                elif isinstance(source, (list, tuple)):
                    found.update(int(t) for t in source)
            self.eos_token_ids = frozenset(found)
        else:
            self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

        self._cache = _PrefixCache(kv_budget_tokens)
        # On the CPU whatever the model's device: the same seed gives the same draws anywhere.
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)
        self._version = 0
        self._stats = EngineStats()
        self._lock = threading.Lock()  # the model: generation vs. optimizer steps
        self._exclusive_depth = 0  # > 0 while a caller holds exclusive(): bump needs no lock
        self._calls_lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._closed = False

    # ---- public state

    def __repr__(self) -> str:
        return (
            f"EmbeddedEngine(model={type(self.model).__name__}, weight_version={self._version}, "
            f"cache={self._cache.stored}/{self._cache.budget} tokens)"
        )

    @property
    def weight_version(self) -> str:
        """The weights' version: ``"0"`` at start, one more per :meth:`bump_weight_version`."""
        return str(self._version)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters (see :class:`EngineStats`)."""
        return self._stats

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs for the engine to continue as if never stopped: the sampling
        generator's state and the weight version (the KV cache is not kept: a resumed engine
        recomputes it, and a weight update flushes it anyway)."""
        with self._held():
            return {"generator": self._generator.get_state(), "weight_version": self._version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state (flushing the cache: the weights may differ from
        the ones it was filled with)."""
        with self._held():
            self._generator.set_state(state["generator"])
            self._version = int(state["weight_version"])
            self._flush()

    def reset_stats(self) -> EngineStats:
        """Zero the counters; returns the values they had."""
        old, self._stats = self._stats, EngineStats()
        return old

    @property
    def kv_budget_tokens(self) -> int:
        """Token positions the prefix cache may keep (0: no cache)."""
        return self._cache.budget

    @property
    def cache_size(self) -> int:
        """Token positions whose KV the prefix cache holds now (<= :attr:`kv_budget_tokens`
        after every call)."""
        return self._cache.stored

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one token position takes (all layers, keys and values)."""
        dtype = next(self.model.parameters()).dtype
        element = torch.empty((), dtype=dtype).element_size()
        return self._layers * 2 * self._kv_heads * self._head_dim * element

    # ---- weight sharing

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The model lock, for the engine's own work (generation, flushes)."""
        with self._lock:
            yield

    def exclusive(self) -> _Exclusive:
        """Hold the model: no generation runs until the block ends (waits for a running one).

        Works as ``with engine.exclusive():`` (blocks the calling thread while it waits) and as
        ``async with engine.exclusive():`` (waits on a worker thread; the event loop keeps
        running). The learner wraps each optimizer step in it and calls
        :meth:`bump_weight_version` inside. Not re-entrant."""
        return _Exclusive(self)

    def bump_weight_version(self) -> str:
        """After an optimizer step: flush the prefix cache and move to the next weight version.

        Call it inside :meth:`exclusive` or alone (it then waits for a running generation).
        Returns the new version."""
        if self._exclusive_depth > 0:
            return self._bump()
        with self._held():
            return self._bump()

    def _bump(self) -> str:
        self._version += 1
        self._flush()
        return self.weight_version

    def flush_cache(self) -> None:
        """Drop every cached KV block (waits for a running generation)."""
        if self._exclusive_depth > 0:
            self._flush()
            return
        with self._held():
            self._flush()

    def _flush(self) -> None:
        self._cache.reset()
        self._stats = _add(self._stats, cache_flushes=1)

    # ---- generation

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        """Per request, its ``n`` completions (see the module docstring).

        Runs on a worker thread under the engine's lock; concurrent calls run one after another.
        Cancelling the awaiting task aborts the call's requests (they stop at the next token).

        Raises:
            InvalidTokenError: a token id that is negative, not an int or beyond the vocabulary.
            InvalidArgumentError: an empty prompt or one that fills the context, or an item that
                is not a :class:`GenerateRequest`.
            EngineClosedError: after :meth:`close`.
        """
        call = self._register(requests)
        try:
            return await asyncio.to_thread(self._run_registered, requests, call)
        except asyncio.CancelledError:
            call.aborted = [True] * len(call.aborted)
            raise

    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        """:meth:`generate` for callers without an event loop (blocks this thread)."""
        return self._run_registered(requests, self._register(requests))

    def abort(self, key_prefix: str | None = None) -> int:
        """Abort running and waiting requests whose ``key`` starts with ``key_prefix`` (all
        requests when None). They finish with ``FinishReason("abort")`` and the tokens made so
        far. Returns how many requests were marked."""
        marked = 0
        with self._calls_lock:
            for call in self._calls:
                for i, key in enumerate(call.keys):
                    if key_prefix is None or (key is not None and key.startswith(key_prefix)):
                        if not call.aborted[i]:
                            call.aborted[i] = True
                            marked += 1
        return marked

    async def close(self) -> None:
        """Abort what runs, wait for it, drop the cache. Later calls raise EngineClosedError."""
        self._closed = True
        self.abort()
        await asyncio.to_thread(self.flush_cache)

    def _register(self, requests: Sequence[GenerateRequest]) -> _Call:
        if self._closed:
            raise EngineClosedError("generate on a closed EmbeddedEngine: make a new engine")
        if isinstance(requests, GenerateRequest):
            raise InvalidArgumentError("generate takes a sequence of GenerateRequest, not one")
        for i, r in enumerate(requests):
            if not isinstance(r, GenerateRequest):
                raise InvalidArgumentError(
                    f"request {i} is a {type(r).__name__}, not a GenerateRequest"
                )
        call = _Call([r.key for r in requests])
        with self._calls_lock:
            self._calls.add(call)
        return call

    def _run_registered(
        self, requests: Sequence[GenerateRequest], call: _Call
    ) -> list[list[Completion]]:
        try:
            prompts = [self._check_prompt(i, r) for i, r in enumerate(requests)]
            with self._held():
                if self._closed:
                    raise EngineClosedError("the EmbeddedEngine was closed while this call waited")
                return self._generate_locked(requests, prompts, call)
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def _check_prompt(self, i: int, request: GenerateRequest) -> list[int]:
        raw = request.input_ids
        if isinstance(raw, torch.Tensor):
            raw = raw.tolist()
        if isinstance(raw, (str, bytes)):
            raise InvalidTokenError(f"request {i}: input_ids must be token ids, not a string")
        ids: list[int] = []
        for pos, t in enumerate(raw):
            if isinstance(t, bool):
                raise InvalidTokenError(f"request {i}: input_ids[{pos}] is a bool, not a token id")
            try:
                v = operator.index(t)
            except TypeError:
                raise InvalidTokenError(
                    f"request {i}: input_ids[{pos}] is {t!r}, not an int token id"
                ) from None
            if not 0 <= v < self.vocab_size:
                raise InvalidTokenError(
                    f"request {i}: input_ids[{pos}] = {v} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
            ids.append(v)
        if not ids:
            raise InvalidArgumentError(f"request {i}: input_ids is empty (a prompt needs a token)")
        if len(ids) >= self.context_length:
            raise InvalidArgumentError(
                f"request {i}: the prompt has {len(ids)} tokens; the model's context holds "
                f"{self.context_length}, which leaves no room to generate"
            )
        return ids

    # ---- the work (under the lock, on the calling thread)

    def _generate_locked(
        self, requests: Sequence[GenerateRequest], ids: list[list[int]], call: _Call
    ) -> list[list[Completion]]:
        version = self.weight_version
        prompts: list[_Prompt] = []
        by_ids: dict[tuple[int, ...], int] = {}
        rows: list[_Row] = []
        for r, (req, prompt_ids) in enumerate(zip(requests, ids, strict=True)):
            p = by_ids.setdefault(tuple(prompt_ids), len(prompts))
            if p == len(prompts):
                prompts.append(_Prompt(prompt_ids))
            sp = req.sampling
            stops = (sp.stop,) if isinstance(sp.stop, str) else tuple(s for s in sp.stop if s)
            limit = min(sp.max_new_tokens, self.context_length - len(prompt_ids))
            stop_ids = self.eos_token_ids | frozenset(int(t) for t in sp.stop_token_ids)
            for s in range(sp.n):
                rows.append(_Row(r, s, p, sp, limit, stop_ids, stops))
        # Prompts in order of the tokens they will compute (the cache's answer now), so that a
        # prefill chunk holds similar lengths; slab rows: each prompt's first row (it runs the
        # prefill) in that order, then the other rows.
        ranked = sorted(range(len(prompts)), key=lambda p: self._uncached(prompts[p].ids))
        new_index = {old: new for new, old in enumerate(ranked)}
        prompts = [prompts[p] for p in ranked]
        for row in rows:
            row.prompt = new_index[row.prompt]
        firsts: dict[int, int] = {}
        for i, row in enumerate(rows):
            firsts.setdefault(row.prompt, i)
        first_rows = [firsts[p] for p in range(len(prompts))]
        taken = set(first_rows)
        rows = [rows[i] for i in first_rows] + [r for i, r in enumerate(rows) if i not in taken]
        for i, row in enumerate(rows):
            prompts[row.prompt].rows.append(i)

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self._run(prompts, rows, call)
        finally:
            self.model.train(was_training)

        out: list[list[Completion]] = [[] for _ in requests]
        for row in sorted(rows, key=lambda x: (x.request, x.sample)):
            assert row.finish is not None
            prompt = prompts[row.prompt]
            out[row.request].append(
                Completion(
                    output_ids=tuple(row.output),
                    log_probs=tuple(row.log_probs),
                    finish=row.finish,
                    cached_tokens=prompt.cached,
                    prompt_tokens=len(prompt.ids),
                    weight_version=version,
                )
            )
        self._stats = _add(self._stats, requests=len(requests), completions=len(rows))
        return out

    def _run(self, prompts: list[_Prompt], rows: list[_Row], call: _Call) -> None:
        longest = max(len(p.ids) for p in prompts)
        decode_columns = max(0, max(row.limit for row in rows) - 1)
        param = next(self.model.parameters())
        slab = _Slab(
            self._layers,
            len(rows),
            self._kv_heads,
            longest + decode_columns,
            self._head_dim,
            param.dtype,
            param.device,
        )
        # Attention reads masked columns too, and 0 * NaN is NaN: zero each prompt's left padding
        # (its other prompt columns are all written before they are read; siblings copy them).
        for prompt in prompts:
            slab.buf[:, :, prompt.rows[0], :, : longest - len(prompt.ids)].zero_()
        cache = _slab_cache(slab, self._layers)

        evicted = self._cache.evicted
        start = time.perf_counter()
        self._prefill(prompts, slab, cache, longest)
        # Siblings: copy each prompt's KV into the rest of its rows.
        src = [p.rows[0] for p in prompts for _ in p.rows[1:]]
        dst = [r for p in prompts for r in p.rows[1:]]
        if dst:
            slab.buf[:, :, dst, :, :longest] = slab.buf[:, :, src, :, :longest]
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        self._decode(prompts, rows, slab, cache, longest, call)
        self._stats = _add(
            self._stats,
            prefill_seconds=prefill_s,
            decode_seconds=time.perf_counter() - start,
            evicted_tokens=self._cache.evicted - evicted,
        )

    def _uncached(self, ids: list[int]) -> int:
        """Tokens of ``ids`` a prefill would compute if the cache stays as it is."""
        return len(ids) - self._cache.match(ids[:-1])[0]

    def _prefill(self, prompts: list[_Prompt], slab: _Slab, cache: Any, longest: int) -> None:
        """Run every prompt's uncached tokens; leaves each prompt's last-position logits."""
        # Prompt p's first slab row is row p, so a chunk of consecutive prompts is a contiguous
        # row range. Cut where rows x widest piece would pass max_batch_tokens.
        chunks: list[list[int]] = []
        current: list[int] = []
        widest = 0
        for p in range(len(prompts)):
            width = self._uncached(prompts[p].ids)
            if current and (len(current) + 1) * max(widest, width) > self.max_batch_tokens:
                chunks.append(current)
                current, widest = [], 0
            current.append(p)
            widest = max(widest, width)
        if current:
            chunks.append(current)

        for chunk in chunks:
            for p in chunk:
                self._load_prefix(prompts[p], slab, longest)
            while True:
                active = [p for p in chunk if prompts[p].done < len(prompts[p].ids)]
                if not active:
                    break
                self._prefill_forward(prompts, active, chunk, slab, cache, longest)
            for p in chunk:
                prompt = prompts[p]
                row = prompt.rows[0]
                base = longest - len(prompt.ids)
                self._cache.insert(prompt.ids, slab.buf[:, :, row], base)

    def _load_prefix(self, prompt: _Prompt, slab: _Slab, longest: int) -> None:
        """Copy the prompt's cached prefix (at most len - 1 tokens) into its first row."""
        length, pieces = self._cache.match(prompt.ids[:-1])
        row = prompt.rows[0]
        base = longest - len(prompt.ids)
        for kv, first in pieces:
            slab.buf[:, :, row, :, base + first : base + first + kv.shape[3]] = kv
        prompt.cached = prompt.done = length
        self._stats = _add(
            self._stats,
            prompt_tokens=len(prompt.ids),
            cached_tokens=length,
            prefill_tokens=len(prompt.ids) - length,
        )

    def _prefill_forward(
        self,
        prompts: list[_Prompt],
        active: list[int],
        chunk: list[int],
        slab: _Slab,
        cache: Any,
        longest: int,
    ) -> None:
        """One forward over the chunk's rows: each active prompt runs its next piece."""
        # Rows of the chunk are contiguous; inactive ones ride along with one pad query.
        r0, r1 = prompts[chunk[0]].rows[0], prompts[chunk[-1]].rows[0] + 1
        n_rows = r1 - r0
        width = max(1, self.max_batch_tokens // max(1, len(active)))
        spans = {
            p: (prompts[p].done, min(len(prompts[p].ids), prompts[p].done + width)) for p in active
        }
        q_len = max(e - s for s, e in spans.values())
        device = slab.buf.device

        input_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        position_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        # Per row: the slab column of each query (-1 for pads) and the valid key columns.
        q_cols = torch.full((n_rows, q_len), -1, dtype=torch.long)
        key_lo = torch.zeros(n_rows, dtype=torch.long)
        key_hi = torch.zeros(n_rows, dtype=torch.long)
        w_rows, w_cols, s_rows, s_cols = [], [], [], []
        for p in chunk:
            prompt = prompts[p]
            i = prompt.rows[0] - r0
            base = longest - len(prompt.ids)
            key_lo[i] = base
            if p not in spans:
                key_hi[i] = base + len(prompt.ids)
                continue
            s, e = spans[p]
            n = e - s
            input_ids[i, q_len - n :] = torch.tensor(prompt.ids[s:e])
            position_ids[i, q_len - n :] = torch.arange(s, e)
            q_cols[i, q_len - n :] = torch.arange(base + s, base + e)
            key_hi[i] = base + e
            w_rows.append(torch.full((n,), prompt.rows[0]))
            w_cols.append(torch.arange(base + s, base + e))
            s_rows.append(torch.full((n,), i))
            s_cols.append(torch.arange(q_len - n, q_len))
        lo, hi = int(key_lo.min()), int(key_hi.max())
        # A row whose piece ends before ``hi`` has unwritten (masked) columns in the window:
        # make them finite.
        for p in chunk:
            end = int(key_hi[prompts[p].rows[0] - r0])
            if end < hi:
                slab.buf[:, :, prompts[p].rows[0], :, end:hi].zero_()
        k_cols = torch.arange(lo, hi)
        valid = (k_cols[None, :] >= key_lo[:, None]) & (k_cols[None, :] < key_hi[:, None])
        causal = k_cols[None, None, :] <= q_cols[:, :, None]
        pad = (q_cols < 0)[:, :, None]
        allowed = valid[:, None, :] & (causal | pad)
        mask = _additive(allowed[:, None], slab.buf.dtype).to(device)

        slab.rows = (r0, r1)
        slab.read = (lo, hi)
        slab.scatter = (
            torch.cat(w_rows).to(device),
            torch.cat(w_cols).to(device),
            torch.cat(s_rows).to(device),
            torch.cat(s_cols).to(device),
        )
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        slab.scatter = None
        self._stats = _add(self._stats, forward_passes=1)
        logits = out.logits[:, -1].float()
        for p, (_, e) in spans.items():
            prompts[p].done = e
            if e == len(prompts[p].ids):
                prompts[p].logits = logits[prompts[p].rows[0] - r0]

    def _decode(
        self,
        prompts: list[_Prompt],
        rows: list[_Row],
        slab: _Slab,
        cache: Any,
        longest: int,
        call: _Call,
    ) -> None:
        """Sample the first token of every row from its prompt's logits, then decode."""
        device = slab.buf.device
        live = list(range(len(rows)))  # slab row i holds rows[live[i]]
        for row in rows:
            if row.limit == 0:
                row.finish = FinishReason("length")
            elif call.aborted[row.request]:
                row.finish = FinishReason("abort", message="aborted before generation")
        logits = torch.stack([prompts[row.prompt].logits for row in rows])  # type: ignore[misc]
        self._sample_step(rows, live, logits)
        step = 0
        while True:
            self._finish_rows(prompts, rows, live, slab, longest, step, call)
            active = [i for i, r in enumerate(live) if rows[r].finish is None]
            if not active:
                return
            if len(active) < len(live) and len(live) - len(active) >= _COMPACT_FRACTION * len(live):
                lo = longest - max(len(prompts[rows[live[i]].prompt].ids) for i in active)
                self._compact(slab, active, lo, longest + step)
                live = [live[i] for i in active]
            # Feed each row's last sampled token at column longest + step.
            column = longest + step
            input_ids = torch.tensor(
                [[rows[r].output[-1] if rows[r].output else 0] for r in live], dtype=torch.long
            )
            # Finished rows still in the slab run on: keep their positions inside the context.
            position_ids = torch.tensor(
                [
                    [min(len(prompts[rows[r].prompt].ids) + step, self.context_length - 1)]
                    for r in live
                ],
                dtype=torch.long,
            )
            lo = longest - max(len(prompts[rows[r].prompt].ids) for r in live)
            k_cols = torch.arange(lo, column + 1)
            starts = torch.tensor([longest - len(prompts[rows[r].prompt].ids) for r in live])
            allowed = k_cols[None, :] >= starts[:, None]
            mask = _additive(allowed[:, None, None, :], slab.buf.dtype).to(device)
            slab.rows = (0, len(live))
            slab.read = (lo, column + 1)
            slab.column = column
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=mask,
                position_ids=position_ids.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._stats = _add(self._stats, forward_passes=1)
            step += 1
            self._sample_step(rows, live, out.logits[:, -1].float())

    def _finish_rows(
        self,
        prompts: list[_Prompt],
        rows: list[_Row],
        live: list[int],
        slab: _Slab,
        longest: int,
        step: int,
        call: _Call,
    ) -> None:
        """Check the rows that just got a token; cache the KV of the ones that finished."""
        for i, r in enumerate(live):
            row = rows[r]
            if row.finish is None:
                row.finish = self._check_finish(row, call)
                if row.finish is None:
                    continue
                prompt = prompts[row.prompt]
                seq = prompt.ids + row.output[:-1]
                base = longest - len(prompt.ids)
                # Prompt at [base, longest), output token j (fed at step j + 1) at longest + j.
                assert len(row.output) - 1 <= step
                self._cache.insert(seq, slab.buf[:, :, i], base)

    def _check_finish(self, row: _Row, call: _Call) -> FinishReason | None:
        if not row.output:
            return None
        last = row.output[-1]
        if last in row.stop_ids:
            return FinishReason("stop", matched=last)
        if row.stops:
            text = self.tokenizer.decode(row.output, skip_special_tokens=False)
            best: tuple[int, str] | None = None
            for s in row.stops:
                at = text.find(s)
                if at >= 0 and (best is None or at + len(s) < best[0]):
                    best = (at + len(s), s)
            if best is not None:
                return FinishReason("stop", matched=best[1])
        if len(row.output) >= row.limit:
            return FinishReason("length")
        if call.aborted[row.request]:
            return FinishReason("abort", message="aborted")
        return None

    def _compact(self, slab: _Slab, keep: list[int], lo: int, hi: int) -> None:
        """Move the slab rows ``keep`` to the front (columns ``[lo, hi)``, the ones in use)."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=slab.buf.device)
        slab.buf[:, :, : len(keep), :, lo:hi] = slab.buf[:, :, index, :, lo:hi]

    # ---- sampling

    def _sample_step(self, rows: list[_Row], live: list[int], logits: torch.Tensor) -> None:
        """Sample one token for every unfinished row of ``live`` from ``logits`` (one per live
        slab row, float32)."""
        todo = [i for i, r in enumerate(live) if rows[r].finish is None]
        if not todo:
            return
        logits = logits[todo]
        params = [rows[live[i]].params for i in todo]
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        log_probs = torch.log_softmax(logits / temps.to(logits.device)[:, None], dim=-1)
        tokens = logits.argmax(dim=-1)  # greedy rows: argmax of the raw logits
        sampled = [j for j, p in enumerate(params) if p.temperature > 0]
        if sampled:
            tokens[sampled] = self._draw(log_probs[sampled], [params[i] for i in sampled])
        chosen = log_probs.gather(1, tokens[:, None])[:, 0]
        self._stats = _add(self._stats, decode_tokens=len(todo))
        for i, t, lp in zip(todo, tokens.tolist(), chosen.tolist(), strict=True):
            row = rows[live[i]]
            row.output.append(int(t))
            row.log_probs.append(float(lp))

    def _draw(self, log_probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """One token per row from ``softmax(log_probs)``, truncated by each row's top-k / top-p.

        Top-k / top-p look at the ``k`` most likely tokens only (``torch.topk``, much cheaper
        than sorting the vocabulary), ``k`` grown until it holds every row's kept set."""
        vocab = log_probs.shape[-1]
        device = log_probs.device
        probs = log_probs.exp()
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
        if bool((top_k >= vocab).all()) and bool((top_p >= 1).all()):
            return self._categorical(probs)
        limited = top_k[top_k < vocab]
        k = min(vocab, max(_TOPK_CANDIDATES, int(limited.max()) if limited.numel() else 0))
        while True:
            values, index = probs.topk(k, dim=-1)  # sorted, most likely first
            mass = values.cumsum(-1)
            covered = (top_k <= k) | (mass[:, -1] >= top_p) | (k == vocab)
            if bool(covered.all()):
                break
            k = min(vocab, k * _TOPK_GROWTH)
        rank = torch.arange(k, device=device)[None, :]
        keep = rank < top_k[:, None]
        # The nucleus: every token whose preceding mass is below top_p (the first always).
        keep &= ((mass - values) < top_p[:, None]) | (top_p >= 1)[:, None]
        return index.gather(1, self._categorical(values * keep)[:, None])[:, 0]

    def _categorical(self, weights: torch.Tensor) -> torch.Tensor:
        """One index per row, drawn in proportion to ``weights`` (>= 0, any scale): inverse CDF
        with a float64 cumulative sum (``torch.multinomial`` is slow over a whole vocabulary)."""
        cdf = weights.double().cumsum(-1)
        u = torch.rand(weights.shape[0], 1, generator=self._generator, dtype=torch.float64)
        u = u.to(cdf.device) * cdf[:, -1:]
        # The first index whose cumulative weight passes u: zero-weight entries never win.
        return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)


class _Exclusive:
    """:meth:`EmbeddedEngine.exclusive`: a sync and async context manager over the model lock."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self._engine = engine

    def __enter__(self) -> EmbeddedEngine:
        self._engine._lock.acquire()
        self._engine._exclusive_depth += 1
        return self._engine

    def __exit__(self, *exc: object) -> None:
        self._engine._exclusive_depth -= 1
        self._engine._lock.release()

    async def __aenter__(self) -> EmbeddedEngine:
        lock = self._engine._lock
        acquiring = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The worker thread may still get the lock: give it back when it does.
            acquiring.add_done_callback(lambda f: lock.release() if not f.cancelled() else None)
            raise
        self._engine._exclusive_depth += 1
        return self._engine

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask as an additive float mask (0 / most negative finite)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _add(stats: EngineStats, **delta: float) -> EngineStats:
    values = {name: getattr(stats, name) + d for name, d in delta.items()}
    return EngineStats(**{**stats.__dict__, **values})
