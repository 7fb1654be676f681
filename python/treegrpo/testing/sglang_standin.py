"""A stand-in SGLang server for CPU tests: SGLang's HTTP protocol over a real (tiny) model.

CI has no GPU and cannot install SGLang, so the SGLang client is tested against this server:
real HTTP on 127.0.0.1 (``aiohttp.web``), real generation through treegrpo's embedded
transformers engine, and the behaviours of the shared ``sglang.md`` contract that treegrpo relies
on, so that pointing the client at a real SGLang server changes nothing:

- ``POST /generate``: ``input_ids`` as one list or a batch (list of lists; the answer is then a
  JSON array, prompt-major, ``n`` entries per prompt), ``sampling_params`` (max_new_tokens,
  temperature, top_p, top_k, stop, stop_token_ids, skip_special_tokens, no_stop_trim, n, ...),
  ``return_logprob`` (``output_token_logprobs`` as ``[logprob, token_id, null]``), ``rid``.
  Stop tokens and stop strings stay in ``output_ids``; ``no_stop_trim`` changes ``text`` only.
  ``finish_reason`` is ``{"type": "stop", "matched": id | str}``, ``{"type": "length",
  "length": k}`` or ``{"type": "abort", "message": ...}``. With ``n > 1`` the prompt is
  prefilled alone first and the samples get fresh ids.
- Errors: HTTP 400 ``{"error": {"message": ...}}`` for bad values, a prompt that does not fit the
  context, a duplicate in-flight ``rid``; HTTP 500 for an unknown ``sampling_params`` key (SGLang
  raises an uncaught TypeError). Token ids beyond the vocabulary are not checked by SGLang; here
  they are an HTTP 500 naming the id (a real server may crash instead).
- ``POST /abort_request`` aborts every running sample whose id starts with ``rid`` (or all with
  ``abort_all``); an aborted request answers HTTP 200 with ``finish_reason.type == "abort"`` and
  its partial output. A client that disconnects aborts its request.
- ``/pause_generation`` (``abort``: abort everything running; ``retract``/``in_place``: hold it)
  and ``/continue_generation``; requests sent while paused wait.
- ``/update_weights_from_disk`` loads an HF checkpoint into the model (waiting for running
  requests unless paused or ``abort_all_requests``), sets ``weight_version`` and flushes the
  cache (``flush_cache: false`` is refused: the engine never reuses KV of old weights);
  ``/flush_cache`` (400 unless idle); ``/init_weights_update_group`` and
  ``/update_weights_from_distributed`` really receive the tensors over a ``gloo`` process group
  (``nccl`` too where CUDA is present; refused with a clear message otherwise), loading each
  into the served parameter of its name; ``/destroy_weights_update_group`` leaves it. The
  stand-in joins with its own code (:func:`join_weight_update_group`), not the trainer's
  (``treegrpo.engine.sglang_group``), so a test of one checks the other.
- ``/get_weights_by_name`` (SGLang's debug endpoint): a served parameter's values as float32
  lists (its first ``truncate_size`` rows), for tests that check what the server holds.
- ``GET /health``, ``/health_generate``, ``/model_info``, ``/server_info``.
- ``meta_info.cached_tokens``: the prompt tokens the stand-in's own engine really served from
  its KV prefix cache when it prefilled the sample (the embedded engine's radix cache of
  ``--cache-tokens`` tokens: reuse capped at prompt_len - 1, the prompt inserted after
  prefill, prompt + output minus the last token at finish, least-recently-used eviction),
  rounded down to whole pages of ``--page-size`` as a paged SGLang server matches. It is
  measured, not predicted: the client's cache model (engine/cache_model.py) is not used here,
  so a test that the client predicts it checks the model against a real cache.

Reading requests and shaping answers (the protocol itself) is
:mod:`treegrpo.testing.sglang_protocol`, which the simulator shares; so are the two rules of
SGLang's server the stand-in applies: how it fails on prompt ids (``check_input_ids``) and when a
stop string ends a sample (``matched_stop_string``, after every token, on the decoded output).
They are written apart from the client's and the embedded engine's (``treegrpo.engine.tokens``,
``treegrpo.engine.stops``), which this module does not import, so a bug in either is caught by
tests against the other. The control endpoints' skeleton is
:mod:`treegrpo.testing.sglang_control`'s, the simulator's too. Scheduling mimics SGLang's
continuous batching: one scheduler task runs decode steps of ``decode_chunk`` tokens over every
running sample through the embedded engine (on its own thread, so the server keeps answering
while the model runs); new requests join at the next step, aborts and pauses take effect
between steps. Not emulated (a 400 rather than silently ignored):
streaming (``stream: true``), penalties, ``min_p``, ``min_new_tokens``, grammars and logit bias;
nor LoRA or multimodal inputs. ``--skip-tokenizer-init`` drops ``text`` and stop strings.

Run it::

    python -m treegrpo.testing.sglang_standin --model PATH --port 30000 [--cache-tokens N]

or from a test: ``url, stop = start_standin((model, tokenizer))``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from treegrpo.engine.base import GenerateRequest, SamplingParams
from treegrpo.httpserver import start_app_in_thread
from treegrpo.testing import sglang_protocol as protocol
from treegrpo.testing.sglang_control import ControlEndpoints, ControlMessages
from treegrpo.testing.sglang_protocol import Sampling

__all__ = [
    "SGLangStandin",
    "join_weight_update_group",
    "main",
    "start_standin",
    "start_standin_server",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CACHE_TOKENS = 65536

# Keys SGLang takes that the stand-in does not emulate, with their neutral values; any other
# value is a 400 here rather than silently ignored.
_NOT_EMULATED: dict[str, Any] = {
    "stop_regex": None,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "sampling_seed": None,
}


# Added to the message of a prompt id outside the vocabulary (an HTTP 500 here).
_UNCHECKED_BY_SGLANG = ": a real SGLang server does not check this and may crash"

# The engine's KV of old weights is never reused (a weight update flushes it), so the stand-in
# cannot serve SGLang's flush_cache=false: it refuses it rather than report reuse it did not do.
_KEEPS_NO_CACHE = (
    "the stand-in always flushes its KV cache on a weight update (its engine never reuses KV of "
    "old weights): send flush_cache=true"
)


# --------------------------------------------------------------------------- requests


@dataclass(eq=False)
class _Sample:
    """One sequence being generated (one of the ``n`` samples of one prompt)."""

    id: str
    prompt: list[int]
    params: Sampling
    return_logprob: bool
    output: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    prefilled: bool = False  # the engine has run its prompt (cached_tokens is then known)
    cached_tokens: int = 0
    weight_version: str = "default"


@dataclass(eq=False)
class _Job:
    """One ``/generate`` call: its prompts' rids and their samples, prompt-major."""

    rids: list[str]
    prompts: list[list[int]]
    samples: list[_Sample]
    started: float
    done: asyncio.Future[None]
    record: bool = True


# --------------------------------------------------------------------------- the server


class SGLangStandin(ControlEndpoints):
    """The stand-in's state and its aiohttp application (:meth:`app`).

    Args:
        engine: an :class:`~treegrpo.engine.embedded.EmbeddedEngine` over ``model``.
        model: the transformers model the engine runs (weight updates load into it).
        tokenizer: its tokenizer (``decode`` for ``text`` and stop strings, ``len`` for the
            vocabulary check).
        model_path: reported by ``/model_info`` and ``/server_info``.
        page_size: SGLang's ``--page-size``: reported reuse is rounded down to whole pages.

    The engine's ``kv_budget_tokens`` is the cache capacity reported as SGLang's
    ``max_total_num_tokens`` (:func:`start_standin_server` builds the engine with
    ``cache_tokens``).
        context_length: the longest prompt + output (default: the model's
            ``max_position_embeddings``).
        decode_chunk: tokens per decode step: between steps new requests join and aborts and
            pauses take effect.
        skip_tokenizer_init: answer like ``--skip-tokenizer-init`` (no ``text``; stop strings
            are not matched).
    """

    control_messages = ControlMessages(
        abort_all="aborted by /abort_request (abort_all)",
        abort_rid="aborted by /abort_request",
        pause_abort="aborted by /pause_generation",
        paused="Generation paused ({mode}).",
        continued="Generation continued.",
        flush_busy="Cache not flushed: requests are running or waiting (flush only when idle).",
    )

    def __init__(
        self,
        engine: Any,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str = "",
        page_size: int = 1,
        context_length: int | None = None,
        decode_chunk: int = 4,
        skip_tokenizer_init: bool = False,
    ) -> None:
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.cache_tokens = int(getattr(engine, "kv_budget_tokens", DEFAULT_CACHE_TOKENS))
        config = getattr(model, "config", None)
        self.vocab_size = int(
            getattr(engine, "vocab_size", 0) or getattr(config, "vocab_size", 0) or len(tokenizer)
        )
        self.context_length = int(
            context_length or getattr(config, "max_position_embeddings", 0) or 4096
        )
        self.decode_chunk = decode_chunk
        self.skip_tokenizer_init = skip_tokenizer_init
        self.weight_version = "default"
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        eos = getattr(engine, "eos_token_ids", None)
        self.eos_token_ids = frozenset(eos if eos is not None else [self.eos_token_id])
        # Scheduler state (touched only on the server's event loop).
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._rids: set[str] = set()
        self._paused = False
        self._updating = 0
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._engine_lock: asyncio.Lock | None = None
        self._groups: dict[str, Any] = {}
        # The model runs on its own thread, so the server keeps answering while it computes.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sglang-standin-model")
        # (sample id, prompt, finish type) of every /generate sample that finished.
        self.completed: list[tuple[str, list[int], str]] = []
        self.requests = 0  # /generate calls received
        self.answered: list[list[int]] = []  # prompts of the /generate answers sent

    # ------------------------------------------------------------------ application

    def app(self) -> web.Application:
        """The aiohttp application: every SGLang endpoint the contract names."""
        app = protocol.application(
            {
                "generate": self._generate,
                "abort_request": self._abort_request,
                "pause_generation": self._pause_generation,
                "continue_generation": self._continue_generation,
                "update_weights_from_disk": self._update_weights_from_disk,
                "init_weights_update_group": self._init_weights_update_group,
                "update_weights_from_distributed": self._update_weights_from_distributed,
                "destroy_weights_update_group": self._destroy_weights_update_group,
                "get_weights_by_name": self._get_weights_by_name,
                "flush_cache": self._flush_cache,
                "health": self._health,
                "health_generate": self._health_generate,
                "model_info": self._model_info,
                "server_info": self._server_info,
            }
        )
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._wake = asyncio.Event()
        self._engine_lock = asyncio.Lock()
        self._scheduler = asyncio.create_task(self._schedule())

    async def _on_shutdown(self, app: web.Application) -> None:
        # Like a killed server: no answer for what is running. aiohttp then cancels the waiting
        # handlers and closes their connections, and clients see a dropped connection.
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler

    def close(self) -> None:
        """Wait for the model step in progress, then leave the process groups."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        groups, self._groups = self._groups, {}
        for group in groups.values():
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                dist.destroy_process_group(group)

    async def _on_model_thread(self, fn: Callable[[], T]) -> T:
        """Run the blocking ``fn()`` on the model's thread and wait for it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------------ /generate

    @property
    def prompts(self) -> list[list[int]]:
        """The prompt of every ``/generate`` sample that finished (not aborted), in order."""
        return [prompt for _, prompt, kind in list(self.completed) if kind != "abort"]

    def in_flight(self) -> dict[str, int]:
        """Sample id -> tokens generated so far, for every running ``/generate`` sample (read
        from any thread: a snapshot)."""
        for _ in range(10):
            try:
                return {
                    s.id: len(s.output)
                    for job in list(self._running)
                    if job.record
                    for s in job.samples
                    if s.finish is None
                }
            except RuntimeError:  # pragma: no cover - changed while we read it
                continue
        return {}

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            job, single = self._parse_generate(await protocol.request_json(request))
        except protocol.BadRequest as e:
            return protocol.error(400, str(e))
        except (TypeError, protocol.InternalError) as e:  # a bare 500, as SGLang's server
            return protocol.internal_error(e)
        self._rids.update(job.rids)
        self._waiting.append(job)
        self._poke()
        try:
            await asyncio.shield(job.done)
        except asyncio.CancelledError:
            # The client went away: SGLang aborts a request whose connection closed.
            self._abort_job(job, "client disconnected")
            raise
        finally:
            self._rids.difference_update(job.rids)
        answers = [self._answer(job, s) for s in job.samples]
        self.answered.extend(job.prompts)
        return web.json_response(answers[0] if single else answers)

    def _parse_generate(self, body: Any) -> tuple[_Job, bool]:
        """Validate a ``/generate`` body into a job (raises BadRequest, InternalError or
        TypeError)."""
        call = protocol.parse_generate(
            body,
            server="the stand-in",
            tokenize=self._tokenize,
            check_prompt=self._check_prompt,
            context_length=self.context_length,
            in_flight=self._rids,
            not_emulated=_NOT_EMULATED,
        )
        samples = []
        for rid, prompt, p, flag in zip(
            call.rids, call.prompts, call.sampling, call.return_logprob, strict=True
        ):
            for _ in range(p.n):
                # n > 1: SGLang gives every sample a fresh id, so meta_info.id is not the rid.
                sid = rid if p.n == 1 else uuid.uuid4().hex
                samples.append(_Sample(sid, list(prompt), p, flag))
        loop = asyncio.get_running_loop()
        job = _Job(call.rids, call.prompts, samples, time.monotonic(), loop.create_future())
        return job, call.answers_one

    def _check_prompt(self, k: int, prompt: list[Any]) -> None:
        protocol.check_input_ids(k, prompt, self.vocab_size, note=_UNCHECKED_BY_SGLANG)

    def _tokenize(self, text: Any) -> list[Any]:
        if isinstance(text, str):
            return list(self.tokenizer.encode(text))
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [list(self.tokenizer.encode(t)) for t in text]
        raise protocol.BadRequest("text must be a string or a list of strings")

    def _answer(self, job: _Job, s: _Sample) -> dict[str, Any]:
        """One sample's answer, shaped like SGLang's non-streaming ``/generate``."""
        assert s.finish is not None
        meta = protocol.meta_info(
            id=s.id,
            finish_reason=s.finish,
            prompt_tokens=len(s.prompt),
            output_ids=s.output,
            cached_tokens=s.cached_tokens,
            weight_version=s.weight_version,
            e2e_latency=time.monotonic() - job.started,
            output_log_probs=s.log_probs if s.return_logprob else None,
        )
        text = None if self.skip_tokenizer_init else self._text(s)
        return protocol.answer_body(s.output, meta, text)

    def _text(self, s: _Sample) -> str:
        """``text``: the output decoded; without ``no_stop_trim`` a matched stop token is
        dropped and the text is cut where a matched stop string begins."""
        ids = s.output
        matched = s.finish.get("matched") if s.finish else None
        trim = not s.params.no_stop_trim and matched is not None
        if trim and isinstance(matched, int) and ids:
            ids = ids[:-1]
        text = str(self.tokenizer.decode(ids, skip_special_tokens=s.params.skip_special_tokens))
        if trim and isinstance(matched, str) and matched in text:
            text = text[: text.find(matched)]
        return text

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        """The scheduler: admit waiting jobs, run decode steps, finish samples."""
        assert self._wake is not None and self._engine_lock is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._busy() and not self._paused:
                if not self._updating:
                    await self._admit_waiting()
                batch = [s for job in self._running for s in job.samples if s.finish is None]
                if batch:
                    try:
                        async with self._engine_lock:
                            await self._step(batch)
                    except Exception as e:  # the model failed: fail these samples, keep serving
                        logger.exception("stand-in decode step failed")
                        for s in batch:
                            if s.finish is None:
                                s.finish = {"type": "abort", "message": f"{type(e).__name__}: {e}"}
                self._complete_finished()
                if self._updating and not self._running:
                    break  # let the weight update in
                await asyncio.sleep(0)  # let HTTP handlers (aborts, new requests) run

    async def _admit_waiting(self) -> None:
        """Move waiting jobs into the running batch. A prompt with ``n > 1`` samples is first
        prefilled alone, as SGLang does (a max_new_tokens 0 request through the engine, which
        caches it), so that each sample then reuses it."""
        while self._waiting:
            job = self._waiting.pop(0)
            position, alone = 0, []
            for prompt in job.prompts:
                n = job.samples[position].params.n
                position += n
                if n > 1:
                    alone.append(GenerateRequest(prompt, SamplingParams(max_new_tokens=0)))
            if alone:
                assert self._engine_lock is not None
                async with self._engine_lock:
                    await self._on_model_thread(lambda: self.engine.generate_sync(alone))  # noqa: B023
            self._running.append(job)

    async def _step(self, batch: list[_Sample]) -> None:
        """One decode step of up to ``decode_chunk`` tokens for every sample of ``batch``. A
        sample's first step prefills its prompt: the engine's reuse then is its
        ``cached_tokens``."""
        requests = [
            GenerateRequest(
                input_ids=s.prompt + s.output,
                sampling=SamplingParams(
                    max_new_tokens=min(self.decode_chunk, s.params.max_new_tokens - len(s.output)),
                    temperature=s.params.temperature,
                    top_p=s.params.top_p,
                    top_k=s.params.top_k,
                    stop_token_ids=s.params.stop_token_ids,
                    n=1,
                ),
            )
            for s in batch
        ]
        results = await self._on_model_thread(lambda: self.engine.generate_sync(requests))
        for s, completions in zip(batch, results, strict=True):
            completion = completions[0]
            if not s.prefilled:  # what the engine served from its cache, in whole pages
                s.prefilled = True
                s.cached_tokens = completion.cached_tokens - completion.cached_tokens % (
                    self.page_size
                )
            if s.finish is not None:
                continue  # aborted during the step: keep what it had
            if s.params.max_new_tokens == 0:
                s.finish = {"type": "length", "length": 0}
                continue
            for token, log_prob in zip(completion.output_ids, completion.log_probs, strict=True):
                s.output.append(int(token))
                s.log_probs.append(float(log_prob))
                s.finish = self._check_finished(s)
                if s.finish is not None:
                    break
            matched = completion.finish.matched
            if (
                s.finish is None
                and completion.finish.type == "stop"
                and not (s.params.ignore_eos and matched in self.eos_token_ids)
            ):
                # A stop the engine knows that this check does not (it ended the chunk).
                s.finish = {"type": "stop", "matched": matched}
            if s.finish is None and completion.finish.type == "abort":
                s.finish = {"type": "abort", "message": completion.finish.message or "aborted"}

    def _check_finished(self, s: _Sample) -> dict[str, Any] | None:
        """SGLang's order: length first, then stop tokens (EOS included), then stop strings."""
        if len(s.output) >= s.params.max_new_tokens:
            return {"type": "length", "length": s.params.max_new_tokens}
        last = s.output[-1]
        if last in s.params.stop_token_ids or (
            not s.params.ignore_eos and last in self.eos_token_ids
        ):
            return {"type": "stop", "matched": last}
        if s.params.stop and not self.skip_tokenizer_init:
            # The whole output decoded: SGLang decodes only its last stop_str_max_len + 1
            # tokens, which finds the same stops where each token decodes to a character.
            matched = protocol.matched_stop_string(s.output, s.params.stop, self._decode)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        return None

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def _release(self, job: _Job) -> None:
        for s in job.samples:
            s.weight_version = self.weight_version
            if job.record:
                kind = s.finish["type"] if s.finish is not None else "abort"
                self.completed.append((s.id, s.prompt, kind))
        if not job.done.done():
            job.done.set_result(None)

    def _abort_job(self, job: _Job, message: str) -> None:
        for s in job.samples:
            if s.finish is None:
                s.finish = {"type": "abort", "message": message}
        if job in self._waiting:
            self._waiting.remove(job)
            self._release(job)
        elif job in self._running:
            self._running.remove(job)
            self._release(job)

    async def _wait_drained(self) -> None:
        """Until no request runs (waiting ones stay queued while ``_updating``)."""
        self._poke()
        while self._running:
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ control endpoints

    # /abort_request, /pause_generation, /continue_generation and /flush_cache are
    # ControlEndpoints'; the stand-in's part:

    async def _clear_cache(self) -> None:
        await self._on_model_thread(self.engine.flush_cache)

    async def _quiesce(self, abort_all: bool) -> None:
        """What SGLang does before a weight update: abort everything if asked; unless paused,
        wait for the running requests (the update takes the write lock)."""
        if abort_all:
            self._abort_matching(lambda s: True, "aborted for a weight update")
        if not self._paused:
            await self._wait_drained()

    def _after_update(self, weight_version: Any) -> None:
        # the engine's weight-version bump already flushed its KV cache
        if isinstance(weight_version, str):
            self.weight_version = weight_version

    async def _update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await protocol.json_body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return protocol.control(False, "model_path is required")
        if body.get("flush_cache", True) is not True:
            return protocol.control(False, _KEEPS_NO_CACHE)
        assert self._engine_lock is not None
        self._updating += 1
        try:
            await self._quiesce(bool(body.get("abort_all_requests", False)))
            async with self._engine_lock:
                try:
                    await self._on_model_thread(lambda: self._load_checkpoint(path))
                except Exception as e:
                    return protocol.control(False, f"Failed to load weights from {path}: {e}")
                self._after_update(body.get("weight_version"))
        finally:
            self._updating -= 1
            self._poke()
        return protocol.control(True, f"Succeeded to update model weights from {path}.")

    def _load_checkpoint(self, path: str) -> None:
        """Copy the weights of the HF checkpoint at ``path`` into the served model."""
        from transformers import AutoModelForCausalLM

        if not Path(path).exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)
        state = loaded.state_dict()
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        # Under the engine's lock; the bump flushes its KV cache (old weights' KV is stale).
        with self.engine.exclusive():
            self.model.load_state_dict(state, strict=False)
            self.engine.bump_weight_version()

    async def _init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await protocol.json_body(request)
        try:
            address = _field(body, "master_address", str)
            port = _field(body, "master_port", int)
            rank_offset = _field(body, "rank_offset", int)
            world_size = _field(body, "world_size", int)
            group_name = body.get("group_name", "weight_update_group")
            backend = body.get("backend", "nccl")
        except protocol.BadRequest as e:
            return protocol.control(False, str(e))
        if not 0 < port < 65536 or world_size < 2 or not 1 <= rank_offset < world_size:
            return protocol.control(
                False,
                f"need 0 < master_port < 65536, world_size >= 2 and 1 <= rank_offset < "
                f"world_size (the trainer is rank 0); got port {port}, world_size "
                f"{world_size}, rank_offset {rank_offset}",
            )
        if group_name in self._groups:
            return protocol.control(False, f"process group {group_name!r} already exists")
        if backend not in ("gloo", "nccl"):
            return protocol.control(False, f"backend must be nccl or gloo, got {backend!r}")
        if backend == "nccl" and not _cuda_available():
            return protocol.control(
                False,
                "the stand-in runs on CPU and cannot join an NCCL group: use backend 'gloo' "
                "with the stand-in (the trainer's side works the same way)",
            )
        try:
            # The stand-in is one rank (a server with one GPU): rank_offset.
            group = await asyncio.to_thread(
                join_weight_update_group,
                backend,
                address,
                port,
                world_size,
                rank_offset,
                group_name,
            )
        except Exception as e:
            return protocol.control(False, f"Failed to init group {group_name}: {e}")
        self._groups[group_name] = group
        return protocol.control(True, f"Succeeded to initialize group {group_name} ({backend}).")

    async def _update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await protocol.json_body(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            return protocol.control(False, "names, dtypes and shapes must be lists")
        if not len(names) == len(dtypes) == len(shapes):
            return protocol.control(False, "names, dtypes and shapes must have the same length")
        if body.get("flush_cache", True) is not True:
            return protocol.control(False, _KEEPS_NO_CACHE)
        group_name = body.get("group_name", "weight_update_group")
        group = self._groups.get(group_name)
        if group is None:
            return protocol.control(
                False, f"no process group {group_name!r}: call /init_weights_update_group first"
            )
        assert self._engine_lock is not None
        self._updating += 1
        try:
            await self._quiesce(bool(body.get("abort_all_requests", False)))
            async with self._engine_lock:
                try:
                    problems = await self._on_model_thread(
                        lambda: self._receive(group, names, dtypes, shapes)
                    )
                except Exception as e:
                    return protocol.control(False, f"Failed to receive weights: {e}")
                if problems:
                    return protocol.control(False, "; ".join(problems))
                self._after_update(body.get("weight_version"))
        finally:
            self._updating -= 1
            self._poke()
        return protocol.control(True, f"Succeeded to update {len(names)} parameters.")

    def _receive(
        self, group: Any, names: list[Any], dtypes: list[Any], shapes: list[Any]
    ) -> list[str]:
        """Receive each broadcast tensor (all of them, so the trainer never hangs) and copy it
        into the model parameter of its name. Returns what did not fit."""
        import torch
        import torch.distributed as dist

        params = dict(self.model.named_parameters())
        device = "cuda" if _group_backend(group) == "nccl" else "cpu"
        problems = []
        with self.engine.exclusive():
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                kind = getattr(torch, str(dtype), None)
                if not isinstance(kind, torch.dtype):
                    raise ValueError(f"{name}: unknown dtype {dtype!r}")
                tensor = torch.empty([int(d) for d in shape], dtype=kind, device=device)
                dist.broadcast(tensor, src=0, group=group)
                target = params.get(name)
                if target is None:
                    problems.append(f"unknown parameter {name}")
                elif tuple(target.shape) != tuple(tensor.shape):
                    problems.append(f"{name}: shape {list(tensor.shape)} != {list(target.shape)}")
                else:
                    with torch.no_grad():
                        target.copy_(tensor.to(target.device, target.dtype))
            self.engine.bump_weight_version()
        return problems

    async def _destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await protocol.json_body(request)
        group_name = body.get("group_name", "weight_update_group")
        group = self._groups.pop(group_name, None)
        if group is None:
            return protocol.control(False, f"no process group {group_name!r} to destroy")
        import torch.distributed as dist

        await asyncio.to_thread(dist.destroy_process_group, group)
        return protocol.control(True, f"Succeeded to destroy group {group_name}.")

    # ------------------------------------------------------------------ information

    async def _get_weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's debug endpoint: the served parameter ``name`` as (nested) lists of float32
        values, its first ``truncate_size`` rows (default 100); HTTP 400 for an unknown name."""
        body = await protocol.json_body(request)
        name, truncate = body.get("name"), body.get("truncate_size", 100)
        if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 0:
            return protocol.error(400, f"truncate_size must be an integer >= 0, got {truncate!r}")
        param = dict(self.model.named_parameters()).get(name) if isinstance(name, str) else None
        if param is None:
            return protocol.error(400, f"Get parameter by name failed: no parameter {name!r}")
        assert self._engine_lock is not None

        def read() -> list[Any]:
            import torch

            with self.engine.exclusive(), torch.no_grad():
                values = param.detach().to("cpu", torch.float32)
            rows = values.tolist()
            return rows[:truncate] if isinstance(rows, list) else [rows]

        async with self._engine_lock:
            return web.json_response(await self._on_model_thread(read))

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _health_generate(self, request: web.Request) -> web.Response:
        """Generate one token, as SGLang's health check does."""
        prompt = [self.eos_token_id if self.eos_token_id is not None else 0]
        params = protocol.parse_sampling({"max_new_tokens": 1, "temperature": 0})
        loop = asyncio.get_running_loop()
        sample = _Sample(f"health-{uuid.uuid4().hex}", prompt, params, False)
        job = _Job([sample.id], [prompt], [sample], time.monotonic(), loop.create_future(), False)
        self._waiting.append(job)
        self._poke()
        try:
            await asyncio.wait_for(asyncio.shield(job.done), timeout=20)
        except asyncio.TimeoutError:
            self._abort_job(job, "health check timed out")
            return web.Response(status=503)
        return web.Response(status=200)

    async def _model_info(self, request: web.Request) -> web.Response:
        config = getattr(self.model, "config", None)
        return protocol.model_info(
            self.model_path,
            self.weight_version,
            model_type=getattr(config, "model_type", None),
            architectures=getattr(config, "architectures", None),
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        return protocol.server_info(
            model_path=self.model_path,
            page_size=self.page_size,
            schedule_policy="lpm",
            skip_tokenizer_init=self.skip_tokenizer_init,
            context_length=self.context_length,
            max_total_num_tokens=self.cache_tokens,
            weight_version=self.weight_version,
            version="treegrpo-standin",
        )


# --------------------------------------------------------------------------- helpers


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise protocol.BadRequest(f"{key} must be a {kind.__name__}, got {value!r}")
    return value


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - the stand-in needs torch anyway
        return False


def _group_backend(group: Any) -> str:
    try:
        import torch.distributed as dist

        return str(dist.get_backend(group))
    except Exception:
        return "gloo"


def join_weight_update_group(
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: float = 60.0,
) -> Any:
    """Join (or, as rank 0, create) the process group SGLang's ``/init_weights_update_group``
    forms: a TCP rendezvous at ``master_address:master_port`` and a group of its own named
    ``group_name``, apart from any default group. A test playing the trainer may call it
    with ``rank=0`` and broadcast from it; the trainer itself forms its side with its own code
    (:mod:`treegrpo.engine.sglang_group`), which this module never calls.

    This mirrors how SGLang (and the RL frameworks that drive it) build that group, with torch's
    private ``_new_process_group_helper``.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    wait = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(
        dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=wait)
    )
    store.set_timeout(wait)
    name: Any = getattr(c10d, "GroupName", str)(group_name)  # a NewType of str in recent torch
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], backend, store, group_name=name, timeout=wait
    )
    c10d._world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


# --------------------------------------------------------------------------- running


def _load(model_path: str | Path) -> tuple[Any, Any]:
    from treegrpo.engine.models import load_policy

    return load_policy(model_path)


def _make_engine(model: Any, tokenizer: Any, cache_tokens: int = DEFAULT_CACHE_TOKENS) -> Any:
    """The stand-in's engine: its KV prefix cache of ``cache_tokens`` tokens is the server's
    radix cache (what ``cached_tokens`` reports and ``max_total_num_tokens`` states)."""
    from treegrpo.engine.embedded import EmbeddedEngine

    return EmbeddedEngine(model, tokenizer, kv_budget_tokens=cache_tokens)


def start_standin(
    model: str | Path | tuple[Any, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> tuple[str, Callable[[], None]]:
    """Serve a stand-in from a background thread (for tests). ``model`` is a checkpoint
    directory or a ``(model, tokenizer)`` pair; ``port=0`` picks a free port; ``options`` go to
    :class:`SGLangStandin`. Returns ``(url, stop)``: ``stop()`` shuts the server down at once,
    as if killed (connections close, running requests are lost to their clients)."""
    _, url, stop = start_standin_server(model, host=host, port=port, **options)
    return url, stop


def start_standin_server(
    model: str | Path | tuple[Any, Any], *, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[SGLangStandin, str, Callable[[], None]]:
    """:func:`start_standin`, also returning the :class:`SGLangStandin` (tests inspect it)."""
    if isinstance(model, (str, Path)):
        options.setdefault("model_path", str(model))
        net, tokenizer = _load(model)
    else:
        net, tokenizer = model
    engine = _make_engine(net, tokenizer, options.pop("cache_tokens", DEFAULT_CACHE_TOKENS))
    server = SGLangStandin(engine, net, tokenizer, **options)
    url, stop = start_app_in_thread(
        server.app(),
        host,
        port,
        shutdown_timeout=0.05,
        handler_cancellation=True,
        on_cleanup=server.close,  # waits for the model step in progress
        name="sglang-standin-http",
    )
    return server, url, stop


async def _serve(server: SGLangStandin, host: str, port: int) -> None:
    runner = web.AppRunner(
        server.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]
        print(
            f"SGLang stand-in serving {server.model_path} on http://{host}:{bound} "
            f"(cache {server.cache_tokens} tokens, context {server.context_length}); "
            "Ctrl+C to stop",
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treegrpo.testing.sglang_standin --model PATH --port P``."""
    parser = argparse.ArgumentParser(
        prog="python -m treegrpo.testing.sglang_standin",
        description="A CPU stand-in for an SGLang server (its HTTP protocol over a real model "
        "through treegrpo's embedded engine), for tests.",
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--port", type=int, default=30000, help="port (default 30000; 0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=DEFAULT_CACHE_TOKENS,
        help=f"the engine's KV prefix cache in tokens (default {DEFAULT_CACHE_TOKENS})",
    )
    parser.add_argument("--page-size", type=int, default=1, help="cache page size (default 1)")
    parser.add_argument("--context-length", type=int, default=None, help="context length")
    parser.add_argument(
        "--decode-chunk", type=int, default=4, help="tokens per decode step (default 4)"
    )
    parser.add_argument(
        "--skip-tokenizer-init", action="store_true", help="answer without text, like SGLang's flag"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    net, tokenizer = _load(args.model)
    server = SGLangStandin(
        _make_engine(net, tokenizer, args.cache_tokens),
        net,
        tokenizer,
        model_path=args.model,
        page_size=args.page_size,
        context_length=args.context_length,
        decode_chunk=args.decode_chunk,
        skip_tokenizer_init=args.skip_tokenizer_init,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
