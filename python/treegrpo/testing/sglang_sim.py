"""A latency-faithful SGLang simulator: the stand-in's HTTP protocol with no model compute.

The stand-in (:mod:`treegrpo.testing.sglang_standin`) runs a real model, so it is as slow as a
CPU; this server answers the same requests in the time an SGLang server on a GPU would take,
so the rollout's own behaviour (barriers, concurrency, cache reuse) can be measured at the
paper's scale on a laptop. Requests are read and answers shaped by the protocol module the
stand-in uses too (:mod:`treegrpo.testing.sglang_protocol`), and the control endpoints are the
stand-in's skeleton with the simulator's wording (:mod:`treegrpo.testing.sglang_control`).
Nothing here runs a model:

- **Scheduler** (SGLang's loop, simplified): requests wait in a queue; while fewer than
  ``max_running_requests`` samples run and the queue is not empty, a *prefill batch* admits
  waiting requests (first come first served, or longest cached prefix first with
  ``schedule_policy="lpm"``) up to ``max_prefill_tokens`` uncached tokens (at least one
  request), and takes ``prefill_base_s + prefill_s_per_token x uncached tokens``; it gives each
  sample its first token. Otherwise a *decode step* gives every running sample one token and
  takes ``decode_base_s + decode_s_per_request x B + decode_s_per_context_token x (the B
  samples' prompt + output tokens)``. A prefill batch holds decoding up, as in SGLang without
  mixed chunks.
- **Radix cache**: its own LRU radix tree over token ids (:class:`SimRadixCache`; not the
  client's cache model nor the Rust ``RadixIndex``, which a simulator must not share), with
  SGLang's rules: reuse capped at ``prompt_len - 1`` and rounded down to ``page_size``, the
  prompt inserted after its prefill and locked while the request runs, prompt + output minus
  the last token inserted at finish, least-recently-used unlocked leaves evicted beyond
  ``cache_tokens``; ``n > 1`` prefills the prompt once, then each sample reuses all but its
  last token. ``meta_info.cached_tokens`` reports the reuse.
- **Outputs**: synthetic. A sample's length is drawn from a lognormal (``output_median``
  tokens, log-space spread ``output_sigma``), clipped to ``[1, max_new_tokens]``; one drawn at
  or beyond ``max_new_tokens`` finishes with ``length``, a shorter one with ``stop``: on the
  request's first ``stop_token_ids`` id (kept in ``output_ids``, as SGLang does), or, with a
  ``tokenizer`` and ``endings``, on the tokens of an ending text (e.g. ``"<search> q
  </search>"``) whose last stop string of the request is the ``matched`` one. Filler tokens
  are drawn uniformly from ``[filler_low, vocab_size)`` minus the stop ids. Every draw comes
  from a generator seeded by ``seed``, the prompt, the sample's index and how often that
  prompt came before, so a run is reproducible whatever the request timing.
- **Time**: every step's duration is simulated time; the server sleeps it divided by
  ``time_scale`` (``time_scale=10``: ten simulated seconds pass in one real second;
  ``math.inf``: no sleeping at all, for measuring the client's own cost). Simulated time
  follows real time x ``time_scale`` while idle. ``e2e_latency`` and :attr:`SGLangSim.stats`
  (``GET /sim_stats``: busy seconds, steps, tokens) are in simulated seconds.
- **Control**: ``/abort_request`` (rid prefix, ``abort_all``), ``/pause_generation``
  (``abort``, ``retract``, ``in_place``) and ``/continue_generation``, ``/flush_cache`` (400
  unless idle), ``/update_weights_from_disk`` (takes ``update_weights_s``, sets the version,
  flushes the cache; nothing is loaded), ``/health``, ``/health_generate``, ``/model_info``
  and ``/server_info`` (both also under ``/get_...``). The process-group weight path is
  refused (400) with a message.

:class:`SimRetriever` adds the tool side: a retriever whose calls take a configurable
(lognormal) latency, scaled the same way.

The default parameters model a ~3B dense model (Qwen2.5-3B: 36 layers, 2 KV heads of 128)
in bfloat16 on one H100 SXM; ``docs/simulator.md`` gives the sources and the arithmetic.

Run it::

    python -m treegrpo.testing.sglang_sim --port 30000 --time-scale 10

or from a test: ``url, stop = start_sim(time_scale=50)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from treegrpo.env.types import Document
from treegrpo.httpserver import start_app_in_thread
from treegrpo.testing import sglang_protocol as protocol
from treegrpo.testing.sglang_control import ControlEndpoints, ControlMessages

__all__ = [
    "SGLangSim",
    "SimParams",
    "SimRadixCache",
    "SimRetriever",
    "main",
    "start_sim",
    "start_sim_server",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SimParams:
    """The simulated server. Times are simulated seconds; the defaults are a ~3B dense model
    in bfloat16 on one H100 SXM (docs/simulator.md).

    - ``max_running_requests``: samples decoding at once (SGLang's ``--max-running-requests``).
    - ``max_prefill_tokens``: uncached tokens one prefill batch takes at most (SGLang's
      ``--max-prefill-tokens``, default 16384); a longer prompt is still admitted alone.
    - ``prefill_base_s``, ``prefill_s_per_token``: a prefill batch's fixed cost and its cost
      per uncached token (1 / prefill throughput).
    - ``decode_base_s``, ``decode_s_per_request``, ``decode_s_per_context_token``: a decode
      step's fixed cost (reading the weights, launch overheads), per running sample (its
      share of the matmuls and sampling) and per token of context read by attention.
    - ``cache_tokens``: radix cache capacity in tokens (SGLang's ``max_total_num_tokens``);
      ``page_size``: reuse rounds down to whole pages.
    - ``output_median``, ``output_sigma``: the lognormal output length (median tokens,
      log-space standard deviation; 1.0 puts ~5 % of outputs above 5x the median).
    - ``context_length``: the longest prompt + output; ``vocab_size``; ``filler_low``: the
      lowest synthetic token id; ``eos_token_id``: reported, stops samples like a stop id.
    - ``update_weights_s``: a weight update's duration. ``schedule_policy``: ``fcfs`` or
      ``lpm`` (longest cached prefix first). ``seed``: the output draws.
    """

    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    prefill_base_s: float = 0.004
    prefill_s_per_token: float = 1 / 40_000
    decode_base_s: float = 0.005
    decode_s_per_request: float = 0.000_030
    decode_s_per_context_token: float = 0.000_000_011
    cache_tokens: int = 1_500_000
    page_size: int = 1
    output_median: float = 120.0
    output_sigma: float = 1.0
    context_length: int = 32768
    vocab_size: int = 151_936
    filler_low: int = 1000
    eos_token_id: int = 151_643
    update_weights_s: float = 2.0
    schedule_policy: str = "fcfs"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_prefill_tokens", "page_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimParams.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "prefill_base_s",
            "prefill_s_per_token",
            "decode_base_s",
            "decode_s_per_request",
            "decode_s_per_context_token",
            "update_weights_s",
            "output_sigma",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SimParams.{name} must be a finite number >= 0, got {value}")
        if not self.output_median >= 1:
            raise ValueError(
                f"SimParams.output_median must be >= 1 token, got {self.output_median}"
            )
        if self.cache_tokens < 0:
            raise ValueError(f"SimParams.cache_tokens must be >= 0, got {self.cache_tokens}")
        if not 0 <= self.filler_low < self.vocab_size:
            raise ValueError("SimParams.filler_low must be in [0, vocab_size)")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"schedule_policy must be fcfs or lpm, got {self.schedule_policy!r}")

    def prefill_time(self, uncached: int) -> float:
        """Seconds of a prefill batch computing ``uncached`` tokens."""
        return self.prefill_base_s + self.prefill_s_per_token * uncached

    def decode_time(self, batch: int, context: int) -> float:
        """Seconds of a decode step over ``batch`` samples holding ``context`` tokens."""
        return (
            self.decode_base_s
            + self.decode_s_per_request * batch
            + self.decode_s_per_context_token * context
        )


# --------------------------------------------------------------------------- radix cache


class _Node:
    __slots__ = ("children", "key", "last_used", "locks", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.locks = 0
        self.last_used = 0


class SimRadixCache:
    """An LRU radix tree over token ids, the simulator's own (see the module docstring).

    Nodes hold runs of tokens; :meth:`match` returns how many leading tokens of a sequence are
    held (and touches them), :meth:`insert` adds a sequence (splitting a node where it
    diverges), :meth:`lock` / :meth:`unlock` pin the path of a running request, and the
    least-recently-used unlocked leaves are evicted while more than ``capacity`` tokens are
    held."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.root = _Node((), None)
        self.size = 0  # tokens held
        self.evicted = 0  # tokens evicted since the start
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _walk(self, tokens: Sequence[int], split: bool) -> tuple[_Node, int]:
        """The deepest node whose path is a prefix of ``tokens``, and that path's length. With
        ``split``, a node only partly matched is split so that the match ends on a node."""
        node, pos, now = self.root, 0, self._tick()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            key = child.key
            common = 0
            limit = min(len(key), len(tokens) - pos)
            while common < limit and key[common] == tokens[pos + common]:
                common += 1
            if common < len(key):  # it diverges (or ends) inside this node; common >= 1
                if not split:
                    child.last_used = now
                    return node, pos + common
                child = self._split(child, common)
            child.last_used = now
            node, pos = child, pos + common
        return node, pos

    def _split(self, child: _Node, at: int) -> _Node:
        """Split ``child`` after ``at`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.key[:at], parent)
        upper.locks = child.locks
        upper.last_used = child.last_used
        parent.children[upper.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` the cache holds."""
        return self._walk(tokens, split=False)[1]

    def insert(self, tokens: Sequence[int]) -> None:
        """Hold ``tokens`` (and so every prefix of it), then evict down to the capacity."""
        node, pos = self._walk(tokens, split=True)
        if pos < len(tokens):
            leaf = _Node(tuple(tokens[pos:]), node)
            leaf.last_used = self._tick()
            node.children[leaf.key[0]] = leaf
            self.size += len(leaf.key)
        self.evict()

    def _path(self, tokens: Sequence[int]) -> list[_Node]:
        node, _ = self._walk(tokens, split=True)
        path = []
        while node is not self.root:
            path.append(node)
            assert node.parent is not None
            node = node.parent
        return path

    def lock(self, tokens: Sequence[int]) -> list[_Node]:
        """Pin the held prefix of ``tokens`` (a running request's); returns the handle."""
        path = self._path(tokens)
        for node in path:
            node.locks += 1
        return path

    def unlock(self, handle: list[_Node]) -> None:
        for node in handle:
            node.locks -= 1

    def evict(self) -> None:
        """Drop least-recently-used unlocked leaves while more than ``capacity`` are held."""
        if self.size <= self.capacity:
            return
        leaves = [n for n in self._nodes() if not n.children and not n.locks]
        leaves.sort(key=lambda n: n.last_used)
        while self.size > self.capacity and leaves:
            leaf = leaves.pop(0)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            self.evicted += len(leaf.key)
            if parent is not self.root and not parent.children and not parent.locks:
                # The parent became a leaf: it goes in LRU order among the others.
                index = 0
                while index < len(leaves) and leaves[index].last_used <= parent.last_used:
                    index += 1
                leaves.insert(index, parent)

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def reset(self) -> None:
        """Empty the cache (a weight update or ``/flush_cache``); locked paths stay valid."""
        self.root = _Node((), None)
        self.size = 0

    def __repr__(self) -> str:
        return f"SimRadixCache(tokens={self.size}, capacity={self.capacity})"


# --------------------------------------------------------------------------- requests


@dataclass
class _Sample:
    id: str
    prompt: list[int]
    max_new_tokens: int
    plan: list[int]  # the output it will produce
    finish_at_end: dict[str, Any]  # its finish reason once the plan is out
    output: list[int] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    cached_tokens: int = 0
    lock: list[_Node] | None = None
    weight_version: str = "default"


@dataclass
class _Job:
    rids: list[str]
    prompts: list[list[int]]
    samples: list[_Sample]
    n: int
    arrived: float  # simulated seconds
    done: asyncio.Future[None]
    admitted: bool = False


# --------------------------------------------------------------------------- the server


class SGLangSim(ControlEndpoints):
    """The simulator's state and its aiohttp application (:meth:`app`).

    Args:
        params: the simulated server (:class:`SimParams`).
        time_scale: simulated seconds per real second (``math.inf``: never sleep).
        tokenizer: only for ``endings`` (their tokens) and ``text`` in answers.
        endings: ``(text, weight)`` pairs: a sample that stops early ends on the tokens of
            one of them, drawn by weight (needs ``tokenizer``); without, on a stop id.
        model_path: what ``/model_info`` reports (a local directory for sglang-router).
    """

    control_messages = ControlMessages(
        abort_all="aborted (abort_all)",
        abort_rid="aborted by request",
        pause_abort="paused (abort)",
        paused="paused ({mode})",
        continued="continued",
        flush_busy="Cache not flushed: there are requests running or waiting",
    )

    def __init__(
        self,
        params: SimParams | None = None,
        *,
        time_scale: float = 1.0,
        tokenizer: Any = None,
        endings: Sequence[tuple[str, float]] = (),
        model_path: str = "/tmp",
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0 (math.inf: no sleeping), got {time_scale}")
        if endings and tokenizer is None:
            raise ValueError("endings need a tokenizer= (to turn their text into tokens)")
        self.params = params or SimParams()
        self.time_scale = float(time_scale)
        self.tokenizer = tokenizer
        self._endings = [(_encode(tokenizer, t), t, float(w)) for t, w in endings]
        for tokens, text, weight in self._endings:
            if not tokens or weight < 0:
                raise ValueError(f"ending {text!r} must encode to tokens and weigh >= 0")
        self.model_path = model_path
        self.cache = SimRadixCache(self.params.cache_tokens)
        self.weight_version = "default"
        self.clock = 0.0  # simulated seconds
        self._real_start = time.monotonic()
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._rids: set[str] = set()
        self._seen: dict[bytes, int] = {}  # prompt digest -> samples drawn for it
        self._paused = False
        self._updating = 0
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self.stats: dict[str, float] = {
            "busy_s": 0.0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
            "prefill_batches": 0,
            "decode_steps": 0,
            "requests": 0,
            "samples": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "prefill_tokens": 0,
            "generated_tokens": 0,
            "max_running": 0,
        }
        """Simulated seconds busy (prefill + decode), steps, tokens; ``GET /sim_stats``."""
        self.trace: list[tuple[str, float, int, int]] = []
        """Every step: (``prefill`` | ``decode``, simulated seconds, samples, tokens
        computed: uncached prompt tokens for a prefill, context tokens for a decode)."""

    # ------------------------------------------------------------------ time

    def now(self) -> float:
        """Simulated seconds now. Idle, the clock follows real time x scale; busy, it is at
        the end of the step in progress, and now is the earlier of the two."""
        if not math.isfinite(self.time_scale):
            return self.clock
        real = (time.monotonic() - self._real_start) * self.time_scale
        if not self._running and not self._waiting:
            self.clock = max(self.clock, real)
            return self.clock
        return min(self.clock, real)

    async def _spend(self, seconds: float, kind: str, samples: int, tokens: int) -> None:
        """A step of ``seconds``: counted busy, traced, then :meth:`_advance`."""
        self.stats["busy_s"] += seconds
        self.stats[f"{kind}_s"] += seconds
        self.trace.append((kind, seconds, samples, tokens))
        await self._advance(seconds)

    async def _advance(self, seconds: float) -> None:
        """Advance the clock by ``seconds`` and sleep until real time x scale reaches it."""
        self.clock += seconds
        if math.isfinite(self.time_scale):
            target = self._real_start + self.clock / self.time_scale
            await asyncio.sleep(max(0.0, target - time.monotonic()))
        else:
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ application

    def app(self) -> web.Application:
        app = protocol.application(
            {
                "generate": self._generate,
                "abort_request": self._abort_request,
                "pause_generation": self._pause_generation,
                "continue_generation": self._continue_generation,
                "update_weights_from_disk": self._update_weights_from_disk,
                "init_weights_update_group": self._not_simulated,
                "update_weights_from_distributed": self._not_simulated,
                "flush_cache": self._flush_cache,
                "health": self._health,
                "health_generate": self._health,
                "model_info": self._model_info,
                "server_info": self._server_info,
            },
            [("GET", "/sim_stats", self._sim_stats)],
        )
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._wake = asyncio.Event()
        self._scheduler = asyncio.create_task(self._schedule())

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler

    # ------------------------------------------------------------------ /generate

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            job, single = self._parse(await protocol.request_json(request))
        except protocol.BadRequest as e:
            return protocol.error(400, str(e))
        except (TypeError, protocol.InternalError) as e:  # a bare 500, as SGLang's server
            return protocol.internal_error(e)
        self.stats["requests"] += len(job.prompts)
        self._rids.update(job.rids)
        self._waiting.append(job)
        self._poke()
        try:
            await asyncio.shield(job.done)
        except asyncio.CancelledError:
            self._abort_matching(lambda s: s in job.samples, "client disconnected")
            raise
        finally:
            self._rids.difference_update(job.rids)
        answers = [self._answer(job, s) for s in job.samples]
        return web.json_response(answers[0] if single else answers)

    def _parse(self, body: Any) -> tuple[_Job, bool]:
        call = protocol.parse_generate(
            body,
            server="the simulator",
            tokenize=_no_text,
            check_prompt=self._check_prompt,
            context_length=self.params.context_length,
            in_flight=self._rids,
        )
        if call.per_prompt_sampling:
            raise protocol.BadRequest("sampling_params must be an object (one for all prompts)")
        sampling = call.sampling[0]
        max_new, n = sampling.max_new_tokens, sampling.n
        samples = []
        for r, prompt in zip(call.rids, call.prompts, strict=True):
            for i in range(n):
                sid = r if n == 1 else uuid.uuid4().hex  # SGLang: fresh ids for n > 1
                plan, finish = self._draw(
                    prompt, i, max_new, sampling.stop, sampling.stop_token_ids
                )
                samples.append(_Sample(sid, list(prompt), max_new, plan, finish))
        loop = asyncio.get_running_loop()
        job = _Job(call.rids, call.prompts, samples, n, self.now(), loop.create_future())
        return job, call.answers_one

    def _check_prompt(self, k: int, prompt: list[Any]) -> None:
        vocab = self.params.vocab_size
        for pos, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int):
                raise protocol.BadRequest(f"prompt {k}: input_ids[{pos}] is not a token id")
            if not 0 <= token < vocab:
                # A real server's scheduler crashes here (an IndexError in the embedding).
                raise protocol.InternalError(
                    f"prompt {k}: input_ids[{pos}] = {token} >= vocab {vocab}"
                )

    def _draw(
        self,
        prompt: list[int],
        index: int,
        max_new: int,
        stop: Sequence[str],
        stop_ids: Sequence[int],
    ) -> tuple[list[int], dict[str, Any]]:
        """One sample's output and finish reason (see the module docstring)."""
        p = self.params
        digest = hashlib.blake2b(
            b"".join(t.to_bytes(4, "little") for t in prompt), digest_size=16
        ).digest()
        occurrence = self._seen.get(digest, 0)
        self._seen[digest] = occurrence + 1
        rng = random.Random(f"{p.seed}/{digest.hex()}/{occurrence}")
        length = math.exp(math.log(p.output_median) + p.output_sigma * rng.gauss(0.0, 1.0))
        wanted = max(1, round(length))
        if max_new == 0:
            return [], {"type": "length", "length": 0}
        avoid = {*stop_ids, p.eos_token_id}
        ending: list[int] = []
        finish: dict[str, Any]
        if wanted >= max_new:
            ending, body_len = [], max_new
            finish = {"type": "length", "length": max_new}
        elif self._endings:
            weights = [w for _, _, w in self._endings]
            ending, text, _ = rng.choices(self._endings, weights=weights)[0]
            matched = next((x for x in stop if text.endswith(x)), None)
            if matched is None:  # not a stop string of this request: EOS after it
                ending = [*ending, stop_ids[0] if stop_ids else p.eos_token_id]
            body_len = max(0, wanted - len(ending))
            if body_len + len(ending) > max_new:  # the ending does not fit: cut at the limit
                finish = {"type": "length", "length": max_new}
            elif matched is None:
                finish = {"type": "stop", "matched": ending[-1]}
            else:
                finish = {"type": "stop", "matched": matched}
        else:
            stop_id = stop_ids[0] if stop_ids else p.eos_token_id
            ending, body_len = [stop_id], wanted - 1
            finish = {"type": "stop", "matched": stop_id}
        plan: list[int] = []
        while len(plan) < body_len:
            token = rng.randrange(p.filler_low, p.vocab_size)
            if token not in avoid:
                plan.append(token)
        plan.extend(ending)
        return plan[:max_new], finish

    def _answer(self, job: _Job, s: _Sample) -> dict[str, Any]:
        assert s.finish is not None
        meta = protocol.meta_info(
            id=s.id,
            finish_reason=s.finish,
            prompt_tokens=len(s.prompt),
            output_ids=s.output,
            cached_tokens=s.cached_tokens,
            weight_version=s.weight_version,
            e2e_latency=self.clock - job.arrived,
            output_log_probs=[-1.0] * len(s.output),  # always: there is no model to score
        )
        text = "" if self.tokenizer is None else str(self.tokenizer.decode(s.output))
        return protocol.answer_body(s.output, meta, text)

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.now()  # catch the clock up with the idle time
            while (self._waiting or self._running) and not self._paused:
                running = sum(s.finish is None for j in self._running for s in j.samples)
                room = self.params.max_running_requests - running
                if self._waiting and room > 0 and not self._updating:
                    await self._prefill(room)
                elif any(s.finish is None for j in self._running for s in j.samples):
                    await self._decode()
                self._complete_finished()
                if self._updating and not self._running:
                    break
                await asyncio.sleep(0)

    def _hits(self, job: _Job) -> list[int]:
        """Each prompt's reuse as the cache is now: capped at ``len - 1``, whole pages."""
        page, hits = self.params.page_size, []
        for prompt in job.prompts:
            hit = min(self.cache.match(prompt), len(prompt) - 1)
            hits.append(hit - hit % page)
        return hits

    async def _prefill(self, room: int) -> None:
        """One prefill batch: admit waiting jobs (their reuse measured before any of the batch
        is inserted: requests sharing an uncached prefix in one batch each compute it), compute
        their uncached prompt tokens, give every sample its first token."""
        p = self.params
        if p.schedule_policy == "lpm":
            self._waiting.sort(key=lambda j: -max(self.cache.match(q) for q in j.prompts))
        batch: list[tuple[_Job, list[int]]] = []
        tokens = 0
        running = any(s.finish is None for j in self._running for s in j.samples)
        while self._waiting:
            job = self._waiting[0]
            if len(job.samples) > room and (batch or running):
                break  # wait for room (a job larger than the limit runs alone)
            hits = self._hits(job)
            # n > 1: the prompt is prefilled alone, then each sample computes its last token.
            cost = sum(len(q) - h for q, h in zip(job.prompts, hits, strict=True))
            cost += job.n * len(job.prompts) if job.n > 1 else 0
            if batch and tokens + cost > p.max_prefill_tokens:
                break
            self._waiting.pop(0)
            batch.append((job, hits))
            tokens += cost
            room -= len(job.samples)
        if not batch:
            await self._decode()  # no room: decode until some sample finishes
            return
        page = p.page_size
        for job, hits in batch:
            position = 0
            for prompt, hit in zip(job.prompts, hits, strict=True):
                reuse = hit if job.n == 1 else (len(prompt) - 1) - (len(prompt) - 1) % page
                self.stats["prompt_tokens"] += len(prompt) * job.n
                self.stats["prefill_tokens"] += len(prompt) - hit + (job.n if job.n > 1 else 0)
                self.cache.insert(prompt)
                for s in job.samples[position : position + job.n]:
                    s.cached_tokens = reuse
                    s.lock = self.cache.lock(prompt)
                    self.stats["cached_tokens"] += reuse
                position += job.n
            job.admitted = True
            self._running.append(job)
        samples = sum(len(j.samples) for j, _ in batch)
        self.stats["prefill_batches"] += 1
        self.stats["samples"] += samples
        await self._spend(p.prefill_time(tokens), "prefill", samples, tokens)
        for job, _ in batch:
            for s in job.samples:
                self._emit(s)
        self._track_running()

    async def _decode(self) -> None:
        live = [s for j in self._running for s in j.samples if s.finish is None]
        context = sum(len(s.prompt) + len(s.output) for s in live)
        self.stats["decode_steps"] += 1
        await self._spend(self.params.decode_time(len(live), context), "decode", len(live), context)
        for s in live:
            if s.finish is None:  # not aborted during the step
                self._emit(s)

    def _emit(self, s: _Sample) -> None:
        """The sample's next token; its finish once its plan is out."""
        if s.finish is not None:
            return
        if len(s.output) < len(s.plan):
            s.output.append(s.plan[len(s.output)])
            self.stats["generated_tokens"] += 1
        if len(s.output) >= len(s.plan):
            s.finish = s.finish_at_end

    def _track_running(self) -> None:
        running = sum(s.finish is None for j in self._running for s in j.samples)
        self.stats["max_running"] = max(self.stats["max_running"], running)

    def _release(self, job: _Job) -> None:
        for s in job.samples:
            if s.lock is not None:
                self.cache.unlock(s.lock)
                s.lock = None
            if job.admitted and s.output and s.finish and s.finish["type"] != "abort":
                self.cache.insert(s.prompt + s.output[:-1])
            s.weight_version = self.weight_version
        if not job.done.done():
            job.done.set_result(None)

    # ------------------------------------------------------------------ control

    # /abort_request, /pause_generation, /continue_generation and /flush_cache are
    # ControlEndpoints'; the simulator's part:

    async def _clear_cache(self) -> None:
        self.cache.reset()

    async def _update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await protocol.json_body(request)
        if not isinstance(body.get("model_path"), str):
            return protocol.control(False, "model_path must be a string")
        self._updating += 1
        try:
            if body.get("abort_all_requests"):
                self._abort_matching(lambda s: True, "aborted for a weight update")
            while self._running:  # the running requests finish first (or were aborted)
                self._poke()
                await asyncio.sleep(0.001)
            await self._advance(self.params.update_weights_s)
            version = body.get("weight_version")
            self.weight_version = str(version) if version is not None else self.weight_version
            self.cache.reset()
        finally:
            self._updating -= 1
            self._poke()
        return protocol.control(True, "Succeeded to update model weights (simulated).")

    async def _not_simulated(self, request: web.Request) -> web.Response:
        return protocol.control(
            False,
            "the simulator has no weights to receive over a process group: use "
            "/update_weights_from_disk with it, or the stand-in (sglang_standin) for this path",
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _model_info(self, request: web.Request) -> web.Response:
        return protocol.model_info(self.model_path, self.weight_version)

    async def _server_info(self, request: web.Request) -> web.Response:
        p = self.params
        return protocol.server_info(
            model_path=self.model_path,
            page_size=p.page_size,
            schedule_policy=p.schedule_policy,
            skip_tokenizer_init=False,  # it ends outputs on stop strings itself
            context_length=p.context_length,
            max_total_num_tokens=p.cache_tokens,
            weight_version=self.weight_version,
            version="treegrpo-sim",
            max_running_requests=p.max_running_requests,
        )

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "clock_s": self.now()})


def _no_text(text: Any) -> list[Any]:
    raise protocol.BadRequest("send input_ids (the simulator has no tokenizer for text)")


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without that keyword
        return list(tokenizer.encode(text))


# --------------------------------------------------------------------------- the tool side


class SimRetriever:
    """A :class:`~treegrpo.env.Retriever` whose every call takes a simulated latency: the
    median ``latency_s`` seconds, lognormal with log-space spread ``sigma`` (0: fixed), divided
    by ``time_scale`` in real time (as the server's). It returns ``inner``'s documents, or
    ``topk`` synthetic ones of ``doc_words`` words per query. ``calls`` and ``waited_s``
    (simulated seconds) count what it did."""

    def __init__(
        self,
        inner: Any = None,
        *,
        latency_s: float = 0.05,
        sigma: float = 0.0,
        time_scale: float = 1.0,
        doc_words: int = 100,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(latency_s) and latency_s >= 0 and sigma >= 0):
            raise ValueError("latency_s and sigma must be finite numbers >= 0")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.inner = inner
        self.latency_s = latency_s
        self.sigma = sigma
        self.time_scale = time_scale
        self.doc_words = doc_words
        self._rng = random.Random(seed)
        self.calls = 0
        self.waited_s = 0.0

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        wait = self.latency_s * math.exp(self.sigma * self._rng.gauss(0.0, 1.0))
        self.calls += 1
        self.waited_s += wait
        if math.isfinite(self.time_scale):
            time.sleep(wait / self.time_scale)
        if self.inner is not None:
            return list(self.inner.retrieve(queries, topk))
        words = " ".join(f"w{i}" for i in range(self.doc_words))
        return [[Document(f"{i}", f'"Doc {i}"\n{q} {words}') for i in range(topk)] for q in queries]


# --------------------------------------------------------------------------- running


def start_sim(**options: Any) -> tuple[str, Callable[[], None]]:
    """Serve a simulator from a background thread (for tests); ``options`` go to
    :func:`start_sim_server`. Returns ``(url, stop)``."""
    _, url, stop = start_sim_server(**options)
    return url, stop


def start_sim_server(
    params: SimParams | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> tuple[SGLangSim, str, Callable[[], None]]:
    """:func:`start_sim`, also returning the :class:`SGLangSim` (tests read its stats).
    ``options`` go to :class:`SGLangSim` (``time_scale``, ``tokenizer``, ``endings``...)."""
    server = SGLangSim(params, **options)
    url, stop = start_app_in_thread(
        server.app(),
        host,
        port,
        shutdown_timeout=0.05,
        handler_cancellation=True,
        name="sglang-sim-http",
    )
    return server, url, stop


async def _serve(server: SGLangSim, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        print(
            f"SGLang simulator on http://{host}:{runner.addresses[0][1]} "
            f"(time scale {server.time_scale:g}); Ctrl+C to stop",
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treegrpo.testing.sglang_sim --port P [--time-scale S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m treegrpo.testing.sglang_sim",
        description="A latency-faithful SGLang simulator (SGLang's HTTP protocol, no model).",
    )
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--time-scale", type=float, default=1.0, help="simulated s per real s")
    parser.add_argument("--max-running-requests", type=int, default=SimParams.max_running_requests)
    parser.add_argument("--output-median", type=float, default=SimParams.output_median)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    params = SimParams(
        max_running_requests=args.max_running_requests,
        output_median=args.output_median,
        seed=args.seed,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(SGLangSim(params, time_scale=args.time_scale), args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
