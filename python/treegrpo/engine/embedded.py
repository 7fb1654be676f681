"""The embedded engine: batched generation with a transformers model in this process, with a
radix prefix cache of KV blocks, sharing the model object with the learner.

How calls run: every request is validated where it is made (token ids in the vocabulary,
:func:`~treegrpo.engine.tokens.check_token_ids`; the prompt within the context), then the call
joins the engine's *running batch*, continuous batching as a serving engine does: one worker
at a time (the thread of the ``generate_sync`` call that found none running, or a thread of the
event loop's executor for ``generate``) holds the model and alternates admitting the calls that
arrived (their prompts
prefilled in chunks, into the rows of one KV slab) with one decode step over every row of the
batch (:mod:`treegrpo.engine.scheduling`). A call made while others decode thus joins them at
the next step, and an asynchronous caller with many small calls (the rollout's
``tree.schedule=async``) still fills the batch; each call returns as soon as its own samples are
done. The KV memory is :mod:`treegrpo.engine.kv_cache`'s (the batch's slab and the prefix cache
between calls, ``kv_budget_tokens``, on SGLang's cache rules), the sampler
:mod:`treegrpo.engine.sampling`'s (seeded with ``seed``: the same calls in the same order give the
same samples; calls that join at different steps draw in a different order), the stop-string rule
SGLang's (:mod:`treegrpo.engine.stops`). A weight update flushes the cache.

:meth:`EmbeddedEngine.state_dict` / :meth:`~EmbeddedEngine.load_state_dict` carry the sampling
generator and the weight version through a checkpoint, so a resumed run samples on. With
temperature 1 the ``log_probs`` equal a fresh forward pass's log-softmax.

Weight sharing: the engine holds the very model object the learner trains. The learner takes
:meth:`EmbeddedEngine.exclusive` around each optimizer step (generation never overlaps it), then
calls :meth:`EmbeddedEngine.bump_weight_version`, which flushes the KV cache (KV from old weights
must not be reused) and moves ``weight_version`` from ``"0"`` to ``"1"``... Every completion names
the version that produced it. The trainer gets this arrangement, or a replica of the learner's
model refreshed after every update, from :meth:`EmbeddedEngine.weight_sync`
(:class:`EmbeddedWeightSync`).

Limits: decoder-only models with full attention in every layer (Llama, Qwen2/3, SmolLM2,
Mistral without a sliding window); the batch's slab holds ``rows x max(prompt + max_new_tokens)``
token positions (only the ones used are touched; it grows by doubling as calls join and goes when
the batch empties); ``kv_budget_tokens`` bounds the cache between calls, not that working slab.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from treegrpo.engine.base import Completion, GenerateRequest, PolicySource, SamplingParams
from treegrpo.engine.errors import EngineClosedError, EngineError
from treegrpo.engine.kv_cache import PrefixCache as _PrefixCache
from treegrpo.engine.kv_cache import Slab as _Slab  # noqa: F401 - the old name, still importable
from treegrpo.engine.sampling import Sampler
from treegrpo.engine.scheduling import Call as _Call
from treegrpo.engine.scheduling import Job as _Job
from treegrpo.engine.scheduling import Scheduler
from treegrpo.engine.tokens import check_token_ids
from treegrpo.exceptions import InvalidArgumentError

__all__ = ["EmbeddedEngine", "EmbeddedWeightSync", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was made (or since :meth:`EmbeddedEngine.reset_stats`).

    Token counts, for the rollout's budget accounting:

    - ``prompt_tokens``: tokens of the prompts prefilled (a prompt shared by ``n`` samples or by
      identical requests of one call counts once; a call's prompt that an earlier call of the
      same batch, see :meth:`EmbeddedEngine.generate`, also has counts as that call would
      have counted it after the other: all but its last token cached, SGLang's rule);
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
        self._sampler = Sampler(seed)
        self._generator = self._sampler.generator
        self._version = 0
        self._stats = EngineStats()
        self._scheduler = Scheduler(
            model,
            tokenizer,
            self._cache,
            self._sampler,
            self._count,
            max_batch_tokens=max_batch_tokens,
            context_length=self.context_length,
            layers=self._layers,
            kv_heads=self._kv_heads,
            head_dim=self._head_dim,
            eos_token_ids=self.eos_token_ids,
        )
        self._lock = threading.Lock()  # the model: generation vs. optimizer steps
        self._exclusive_depth = 0  # > 0 while a caller holds exclusive(): bump needs no lock
        self._calls_lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._closed = False
        # calls waiting to join the running batch, and whether a worker thread runs it
        self._queue_lock = threading.Lock()
        self._pending: list[_Job] = []
        self._working = False

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
        """Hold the model: no generation runs until the block ends (waits until the running
        batch is empty).

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

    def weight_sync(self, source: PolicySource) -> EmbeddedWeightSync:
        """The trainer's weight sync (:class:`EmbeddedWeightSync`): shared weights when this
        engine runs ``source.model`` itself, else a replica refreshed after every update."""
        return EmbeddedWeightSync(self, source)

    # ---- generation

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        """Per request, its ``n`` completions (see the module docstring).

        The call joins the engine's running batch at its next decode step (or starts one, on a
        thread of the loop's executor, so the event loop keeps running), and returns when all
        its samples have finished. Cancelling the awaiting task aborts the call's requests
        (they stop at the next token; a call cancelled before it joined never runs).

        Raises:
            InvalidTokenError: a token id that is negative, not an int or beyond the vocabulary.
            InvalidArgumentError: an empty prompt or one that fills the context, or an item that
                is not a :class:`GenerateRequest`.
            EngineClosedError: after :meth:`close`.
        """
        ids = self._validate(requests)
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[Completion]]] = loop.create_future()

        def deliver(result: list[list[Completion]] | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, result)

        call, start = self._submit(requests, ids, deliver)
        if start:  # on a thread of the loop's executor (reused: its OpenMP team stays warm)
            loop.run_in_executor(None, self._work)
        try:
            return await future
        except asyncio.CancelledError:
            call.cancelled = True
            call.aborted = [True] * len(call.aborted)
            raise

    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        """:meth:`generate` for callers without an event loop (blocks this thread, which runs
        the batch itself if no other worker does)."""
        ids = self._validate(requests)
        if not requests:
            return []
        done = threading.Event()
        box: list[list[list[Completion]] | BaseException] = []

        def deliver(result: list[list[Completion]] | BaseException) -> None:
            box.append(result)
            done.set()

        _, start = self._submit(requests, ids, deliver)
        if start:  # this thread runs the batch (until it is empty)
            self._work()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

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

    def _validate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        if self._closed:
            raise EngineClosedError("generate on a closed EmbeddedEngine: make a new engine")
        if isinstance(requests, GenerateRequest):
            raise InvalidArgumentError("generate takes a sequence of GenerateRequest, not one")
        for i, r in enumerate(requests):
            if not isinstance(r, GenerateRequest):
                raise InvalidArgumentError(
                    f"request {i} is a {type(r).__name__}, not a GenerateRequest"
                )
        return [self._check_prompt(i, r) for i, r in enumerate(requests)]

    def _check_prompt(self, i: int, request: GenerateRequest) -> list[int]:
        ids = check_token_ids(request.input_ids, self.vocab_size, where=f"request {i}")
        if not ids:
            raise InvalidArgumentError(f"request {i}: input_ids is empty (a prompt needs a token)")
        if len(ids) >= self.context_length:
            raise InvalidArgumentError(
                f"request {i}: the prompt has {len(ids)} tokens; the model's context holds "
                f"{self.context_length}, which leaves no room to generate"
            )
        return ids

    def _submit(
        self,
        requests: Sequence[GenerateRequest],
        ids: list[list[int]],
        deliver: Callable[[list[list[Completion]] | BaseException], None],
    ) -> tuple[_Call, bool]:
        """Queue a call for the running batch. Returns it, and whether no worker runs the batch:
        the caller must then run :meth:`_work` (its own thread, or a worker thread)."""
        call = _Call([r.key for r in requests])
        with self._calls_lock:
            self._calls.add(call)
        with self._queue_lock:
            self._pending.append(_Job(list(requests), ids, call, deliver))
            start = not self._working
            self._working = True
        return call, start

    # ---- the work (one worker thread at a time, under the model lock)

    def _work(self) -> None:
        """Run the batch until it is empty and no call waits: admit the waiting calls, one
        decode step, hand back the calls that finished; again."""
        jobs: list[_Job] = []
        try:
            with self._held():
                was_training = self.model.training
                self.model.eval()
                try:
                    with torch.inference_mode():
                        while True:
                            with self._queue_lock:
                                jobs, self._pending = self._pending, []
                                if not jobs and self._scheduler.idle:
                                    self._working = False
                                    return
                            self._advance(jobs)
                            jobs = []
                finally:
                    self.model.train(was_training)
        except BaseException as e:  # pragma: no cover - a bug above: fail everyone, never hang
            with self._queue_lock:
                stranded, self._pending = self._pending, []
                self._working = False
            self._fail([*jobs, *stranded], e)
            raise

    def _advance(self, jobs: list[_Job]) -> None:
        """Admit ``jobs``, one decode step, hand back what finished. A failure of the model
        fails every call of the batch (and drops the batch); the engine goes on serving."""
        admit = []
        for job in jobs:
            if job.call.cancelled:  # its caller went away before it joined
                self._forget(job.call)
            elif self._closed:
                self._hand_back(job, EngineClosedError("the EmbeddedEngine was closed"))
            else:
                admit.append(job)
        try:
            self._scheduler.admit(admit, self.weight_version)
            self._scheduler.step()
        except Exception as e:
            self._fail(admit, e)
            return
        for job, out in self._scheduler.finished():
            self._stats = _add(
                self._stats, requests=len(job.requests), completions=sum(len(o) for o in out)
            )
            self._hand_back(job, out)

    def _fail(self, jobs: list[_Job], error: BaseException) -> None:
        """Fail ``jobs`` and every call of the batch (each once) and drop the batch."""
        for job in {id(j): j for j in [*jobs, *self._scheduler.jobs]}.values():
            self._hand_back(job, error)
        self._scheduler.reset()

    def _hand_back(self, job: _Job, result: list[list[Completion]] | BaseException) -> None:
        self._forget(job.call)
        job.deliver(result)

    def _forget(self, call: _Call) -> None:
        with self._calls_lock:
            self._calls.discard(call)

    def _count(self, **delta: float) -> None:
        self._stats = _add(self._stats, **delta)

    def _draw(self, log_probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """:meth:`treegrpo.engine.sampling.Sampler.draw` with the engine's generator."""
        return self._sampler.draw(log_probs, params)


def _settle(
    future: asyncio.Future[list[list[Completion]]], result: list[list[Completion]] | BaseException
) -> None:
    if future.done():  # cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class EmbeddedWeightSync:
    """:class:`~treegrpo.engine.base.WeightSync` of the embedded engine.

    Shared weights (the engine runs the learner's very model object): the learner steps inside
    :meth:`EmbeddedEngine.exclusive` and calls :meth:`EmbeddedEngine.bump_weight_version`
    (``on_step``, ``hold``); :meth:`push` has nothing to do. A replica (the learner's model is
    sharded by FSDP2, or the engine runs another dtype): :meth:`push` loads the learner's full
    weights into it (``load_state_dict`` casts the dtype) and bumps the version, under
    ``exclusive``. The checkpoint keeps the engine's sampling generator and weight version."""

    keeps_state = True

    def __init__(self, engine: EmbeddedEngine, source: PolicySource) -> None:
        self.engine = engine
        self.source = source
        self.shared = engine.model is source.model
        self.on_step = engine.bump_weight_version if self.shared else None
        self.hold = engine.exclusive if self.shared else None

    def start(self) -> None:
        """Nothing to form: the engine lives in this process."""

    def push(self, version: int) -> None:
        if self.shared:
            return  # the learner's on_step bumped the version
        state = self.source.state_dict(True)  # under FSDP2 every rank gathers the shards
        with self.engine.exclusive():
            self.engine.model.load_state_dict(state, strict=False)  # casts the dtype
            self.engine.bump_weight_version()

    def weights_loaded(self) -> None:
        """Weights changed under the engine's cache: a new version (sharded: the next
        :meth:`push` refreshes the replica and bumps it)."""
        if not self.source.sharded:
            self.engine.bump_weight_version()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)


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


def _add(stats: EngineStats, **delta: float) -> EngineStats:
    values = {name: getattr(stats, name) + d for name, d in delta.items()}
    return EngineStats(**{**stats.__dict__, **values})
