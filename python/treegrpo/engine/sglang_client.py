"""The SGLang client: treegrpo's :class:`~treegrpo.engine.Engine` over SGLang's HTTP API.

SGLang pins its own torch, so it runs as separate server processes and treegrpo talks to them
over HTTP (``aiohttp``); nothing here imports SGLang. The protocol is the one written down in the
shared ``sglang.md``:

- ``POST /generate`` with token ids (never text, so prefixes match token for token), only the
  sampling keys SGLang knows, ``return_logprob`` with ``logprob_start_len = -1`` (which keeps the
  prefix cache on), a fresh fixed-width ``rid`` per attempt and ``stream = false``. Siblings of one
  node are one request with ``n > 1``; its answer holds the n samples.
- Tree affinity: every request with the same :attr:`GenerateRequest.key` goes to the same server
  (a stable hash of the key), so a tree's prefixes stay in one radix cache; or, with
  ``routing="router"``, everything goes to one ``sglang_router`` URL with the header
  ``X-SMG-Routing-Key: <key>`` (for its ``consistent_hashing`` policy).
- Retries with exponential backoff on connection errors, timeouts and HTTP 5xx, never on 4xx. A
  request either returns exactly its n samples once or raises: a retry is a new attempt with a new
  rid (the old one is aborted), and nothing of a failed attempt is kept. ``retry_window`` sets
  how long a server may fail before the client gives up (long enough to ride out a restart).
- Stale weights: a server restarted within that window comes back with its base weights. Every
  answer carries ``meta_info.weight_version``; when it is not the version last pushed through
  this client, the answer is discarded (never returned), the last update from disk is pushed to
  that server again and the request is generated anew (a warning says so). A request whose
  server got such a re-push while it ran is generated anew too. Where the weights cannot be
  pushed again (they came over a process group), :class:`StaleWeightsError` is raised instead.
- ``cached_tokens`` prediction: one :class:`~treegrpo.engine.cache_model.RadixCacheModel` per
  server mirrors what it should hold; :meth:`SGLangClient.cache_report` compares the prediction
  with what the server reports and gives the hit rate (cached / prompt tokens).
- Weight sync: from disk (``/update_weights_from_disk`` inside ``/pause_generation`` and
  ``/continue_generation``) or over a process group (``/init_weights_update_group`` and
  ``/update_weights_from_distributed``: the HTTP side; the trainer broadcasts the tensors).

The client holds no tree logic: the rollout sends children after their parents have returned
(depth first) and may warm a shared prefix with :meth:`SGLangClient.warm_prefix`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import operator
import secrets
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from treegrpo.engine.base import Completion, FinishReason, GenerateRequest, SamplingParams
from treegrpo.engine.cache_model import Admission, RadixCacheModel
from treegrpo.engine.errors import (
    EngineClosedError,
    InvalidTokenError,
    ServerControlError,
    ServerRequestError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
    StaleWeightsError,
)
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError

__all__ = [
    "ROUTING_HEADER",
    "CacheRecord",
    "CacheReport",
    "SGLangClient",
    "add_subcommand",
    "launch_command",
    "probe",
    "retries_for_window",
    "router_command",
]

logger = logging.getLogger(__name__)

ROUTING_HEADER = "X-SMG-Routing-Key"
"""The header ``sglang_router`` hashes with ``--policy consistent_hashing``."""

_ROUTINGS = ("tree", "router")
_PAUSE_MODES = ("abort", "retract", "in_place")
_START_HINT = (
    "Is the server running? Print a launch line with `treegrpo sglang command --model PATH`."
)
# Re-pushes of the weights one request may trigger before its server counts as broken.
_MAX_REPUSHES = 3


def retries_for_window(window: float, backoff: float = 0.5, max_backoff: float = 4.0) -> int:
    """The fewest retries whose waits (``backoff``, doubling, each at most ``max_backoff``
    seconds) add up to at least ``window`` seconds: 0 for a window of 0. With the defaults,
    30 s is 10 retries (0.5 + 1 + 2 + 4 x 7 = 31.5 s)."""
    if not (math.isfinite(window) and window >= 0):
        raise InvalidArgumentError(
            f"retry window must be a finite number of seconds >= 0, got {window}"
        )
    if window > 0 and not (backoff > 0 and max_backoff > 0):
        raise InvalidArgumentError("a retry window > 0 needs backoff > 0 and max_backoff > 0")
    retries, waited = 0, 0.0
    while waited < window:
        waited += min(backoff * 2**retries, max_backoff)
        retries += 1
    return retries


# --------------------------------------------------------------------------- cache report


@dataclass(frozen=True)
class CacheRecord:
    """One sample's prefix-cache outcome: ``predicted`` by the client's model of the server's
    radix cache, ``reported`` by the server (``meta_info.cached_tokens``). ``warm`` marks a
    :meth:`SGLangClient.warm_prefix` request."""

    rid: str
    url: str
    prompt_tokens: int
    predicted: int
    reported: int
    warm: bool = False


@dataclass(frozen=True)
class CacheReport:
    """The cache records since the last reset (:meth:`SGLangClient.cache_report`)."""

    records: tuple[CacheRecord, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.records)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the servers reported as served from their caches."""
        return sum(r.reported for r in self.records)

    @property
    def predicted_tokens(self) -> int:
        return sum(r.predicted for r in self.records)

    @property
    def hit_rate(self) -> float:
        """Reported cached tokens / prompt tokens (0 when there was no request)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mismatches(self) -> tuple[CacheRecord, ...]:
        """Records whose prediction differs from the report (eviction under memory pressure,
        requests sharing an uncached prefix in one prefill batch, a restarted server)."""
        return tuple(r for r in self.records if r.predicted != r.reported)

    def __str__(self) -> str:
        return (
            f"CacheReport(samples={len(self.records)}, prompt_tokens={self.prompt_tokens}, "
            f"hit_rate={self.hit_rate:.3f}, predicted_hit_rate={self.predicted_hit_rate:.3f}, "
            f"mismatches={len(self.mismatches)})"
        )


# --------------------------------------------------------------------------- servers


class _Server:
    """What the client knows about one server URL."""

    def __init__(self, url: str, max_concurrency: int, capacity: int | None) -> None:
        self.url = url
        self.slots = asyncio.Semaphore(max_concurrency)
        self.cache = RadixCacheModel(capacity)
        self.capacity_given = capacity is not None
        self.skip_tokenizer_init = False
        self.in_flight: dict[str, int] = {}  # rid -> n
        # Weights pushed to this server again after it came back with others (see
        # SGLangClient._restore_weights); one re-push at a time.
        self.repushes = 0
        self.repush_lock = asyncio.Lock()

    def configure(self, info: Mapping[str, Any]) -> None:
        """Take page size, cache capacity and tokenizer mode from ``/server_info``."""
        page = info.get("page_size")
        page_size = page if isinstance(page, int) and page >= 1 else self.cache.page_size
        capacity = self.cache.capacity
        total = info.get("max_total_num_tokens")
        if not self.capacity_given and isinstance(total, int) and total > 0:
            capacity = total
        if (page_size, capacity) != (self.cache.page_size, self.cache.capacity):
            self.cache = RadixCacheModel(capacity, page_size)
        self.skip_tokenizer_init = bool(info.get("skip_tokenizer_init", False))


class _Retriable(Exception):
    """An attempt that failed in a way worth retrying."""

    def __init__(self, message: str, *, timed_out: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.refused = refused


# --------------------------------------------------------------------------- the client


class SGLangClient:
    """An :class:`~treegrpo.engine.Engine` that generates on SGLang servers.

    ``await client.start()`` checks every server (``GET /health``) and reads its settings
    (``/server_info``); ``generate`` starts the client itself if needed. Use it as an async
    context manager to close it (aborting what is still running) on exit::

        async with SGLangClient(["http://127.0.0.1:30000"], tokenizer=tok) as client:
            out = await client.generate([GenerateRequest(ids, SamplingParams(n=4), key="t0")])

    Args:
        urls: server base URLs, e.g. ``["http://127.0.0.1:30000", "http://127.0.0.1:30001"]``
            (one per data-parallel server), or the one ``sglang_router`` URL with
            ``routing="router"``.
        tokenizer: optional; ``len(tokenizer)`` is the vocabulary size token ids are checked
            against, and it trims stop strings client-side for servers started with
            ``--skip-tokenizer-init`` (which cannot match them).
        vocab_size: the vocabulary size when no tokenizer is given. Without either, only
            negative ids are caught.
        routing: ``"tree"`` (default): requests with the same key go to the same server (stable
            hash of the key modulo the number of servers; keyless requests round-robin).
            ``"router"``: one URL, a router that routes on the ``X-SMG-Routing-Key`` header.
        timeout: seconds one HTTP request may take (a whole generation, or a weight update).
        connect_timeout: seconds to open a connection.
        retries: extra attempts after a connection error, a timeout or an HTTP 5xx; HTTP 4xx is
            never retried.
        backoff: seconds before the first retry; each later retry waits twice as long...
        max_backoff: ...up to this many seconds.
        retry_window: instead of ``retries``: retry until the waits add up to this many seconds
            (:func:`retries_for_window`), e.g. the time a server takes to restart.
        max_concurrency: requests in flight per server at most; more wait in the client.
        cache_tokens: each server's cache capacity for the ``cached_tokens`` prediction; by
            default ``max_total_num_tokens`` from ``/server_info`` (no eviction if absent).
        control_urls: with ``routing="router"``, the worker URLs that get weight updates and
            other control calls (default: the router URL itself).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        routing: Literal["tree", "router"] = "tree",
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        retry_window: float | None = None,
        max_concurrency: int = 256,
        cache_tokens: int | None = None,
        control_urls: Sequence[str] | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise InvalidArgumentError("SGLangClient needs at least one server URL")
        if routing not in _ROUTINGS:
            raise InvalidOptionError(f"routing must be one of {_ROUTINGS}, got {routing!r}")
        if routing == "router" and len(urls) != 1:
            raise InvalidArgumentError(
                f'routing="router" takes the one router URL, got {len(urls)} URLs; pass the '
                'workers as control_urls, or use routing="tree" to route client-side'
            )
        if control_urls is not None and routing != "router":
            raise InvalidArgumentError('control_urls only applies to routing="router"')
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise InvalidArgumentError(f"{name} must be > 0 seconds, got {value}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an integer >= 0, got {retries!r}")
        if not (math.isfinite(backoff) and backoff >= 0):
            raise InvalidArgumentError(f"backoff must be >= 0 seconds, got {backoff}")
        if not max_backoff > 0:
            raise InvalidArgumentError(f"max_backoff must be > 0 seconds, got {max_backoff}")
        if retry_window is not None:
            retries = retries_for_window(retry_window, backoff, max_backoff)
        if max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        if vocab_size is not None and vocab_size < 1:
            raise InvalidArgumentError(f"vocab_size must be >= 1, got {vocab_size}")
        self.urls = [_normalize_url(u) for u in urls]
        self.routing = routing
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._servers = [_Server(u, max_concurrency, cache_tokens) for u in self.urls]
        self._control = (
            [_normalize_url(u) for u in control_urls] if control_urls is not None else self.urls
        )
        # Fixed-width rids: a per-client random prefix and a zero-padded counter, so no rid is a
        # prefix of another (SGLang aborts by rid prefix).
        self._rid_prefix = f"tg{secrets.token_hex(6)}-"
        self._counter = itertools.count()
        self._round_robin = itertools.count()
        self._weight_version = "default"
        self._version_epoch = 0  # weight updates made through this client
        # The last weight update made through this client: (endpoint, body), to push it again
        # to a server that lost it; None before the first.
        self._pushed: tuple[str, dict[str, Any]] | None = None
        self.weight_repushes = 0
        """Times a server's weights were pushed again after it answered from other weights."""
        self._records: list[CacheRecord] = []
        self._session: aiohttp.ClientSession | None = None
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the HTTP session and check every server: ``GET /health`` (retried), then its
        settings from ``/server_info``. Raises :class:`ServerUnavailableError` naming the first
        URL that does not answer."""
        if self._closed:
            raise EngineClosedError("this SGLangClient was closed; create a new one")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await self._check_health()
            infos = await asyncio.gather(
                *(self._server_info_or_empty(s.url) for s in self._servers)
            )
            for server, info in zip(self._servers, infos, strict=True):
                server.configure(info)
            version = infos[0].get("weight_version") if infos else None
            if isinstance(version, str):
                self._weight_version = version
            if self.vocab_size is None:
                logger.warning(
                    "SGLangClient has no vocab_size (pass tokenizer= or vocab_size=): token ids "
                    "beyond the vocabulary cannot be caught, and SGLang does not check them"
                )
            self._started = True

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout, sock_connect=self.connect_timeout
                ),
            )
        return self._session

    async def _check_health(self) -> None:
        """``GET /health`` on every server and control URL (retried); on a failure the session
        is closed and the first URL's error raised."""
        session = self._open_session()
        urls = list(dict.fromkeys([*self.urls, *self._control]))
        checks = await asyncio.gather(
            *(self._get(u, "/health", parse=False) for u in urls), return_exceptions=True
        )
        failed = [e for e in checks if isinstance(e, BaseException)]
        if failed:
            await session.close()
            self._session = None
            raise failed[0]

    async def _server_info_or_empty(self, url: str) -> dict[str, Any]:
        try:
            info = await self._get(url, "/server_info")
        except (ServerRequestError, ServerResponseError):
            return {}  # an old server or a router without /server_info: keep the defaults
        return info if isinstance(info, dict) else {}

    async def close(
        self, *, abort: bool = True, abort_all: bool = False, grace: float = 5.0
    ) -> None:
        """Abort what is still running and close the HTTP session.

        ``abort``: send ``POST /abort_request`` for each in-flight rid (``abort_all: false``)
        and wait up to ``grace`` seconds for the answers: the waiting :meth:`generate` calls
        then return those samples with ``finish.type == "abort"``. SGLang gives the samples of
        an ``n > 1`` request fresh ids, so those cannot be aborted by rid; ``abort_all=True``
        aborts everything on the servers instead (only when this client is their one user).
        Requests still open when the session closes fail with :class:`EngineClosedError`.
        """
        if self._closed:
            return
        self._closed = True
        if self._session is None:
            return
        if abort:
            if abort_all:
                await asyncio.gather(
                    *(self._abort(s.url, "", abort_all=True) for s in self._servers),
                    return_exceptions=True,
                )
            else:
                await self._abort_in_flight()
            # Let the aborted requests come back (with finish abort) before the session goes.
            deadline = time.monotonic() + grace
            while any(s.in_flight for s in self._servers) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await self._session.close()

    async def __aenter__(self) -> SGLangClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def weight_version(self) -> str:
        """The servers' weight version: from ``/server_info`` at start, then from each answer's
        ``meta_info.weight_version`` and each successful weight update."""
        return self._weight_version

    # ------------------------------------------------------------------ generation

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        """Generate every request concurrently; returns, per request and in order, its ``n``
        completions.

        Raises:
            InvalidTokenError: a token id out of the vocabulary (nothing was sent).
            ServerRequestError: a server rejected a request (HTTP 4xx; not retried).
            ServerUnavailableError: a server kept failing through every retry
                (:class:`ServerTimeoutError` if it timed out).
            ServerResponseError: an answer that does not follow the protocol.
            StaleWeightsError: a server answers from weights other than the ones last pushed
                and they could not be pushed to it again.
        When one request fails the others are cancelled (and aborted on their servers).
        """
        requests = list(requests)
        for i, request in enumerate(requests):
            self._check_request(i, request)
        await self._ensure_started()
        tasks = [asyncio.ensure_future(self._generate_one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def warm_prefix(self, input_ids: Sequence[int], key: str | None = None) -> int:
        """Prefill ``input_ids`` on the server of ``key`` (``max_new_tokens: 0``) so requests
        that extend it find it cached, e.g. a prompt shared by requests sent together. Returns
        the ``cached_tokens`` the server reported for this prefill."""
        request = GenerateRequest(input_ids, SamplingParams(max_new_tokens=0), key=key)
        self._check_request(0, request)
        await self._ensure_started()
        [completion] = await self._generate_one(request, warm=True)
        return completion.cached_tokens

    async def _ensure_started(self) -> None:
        if self._closed:
            raise EngineClosedError("this SGLangClient was closed; create a new one")
        if not self._started:
            await self.start()

    def _check_request(self, i: int, request: GenerateRequest) -> None:
        ids = request.input_ids
        if len(ids) == 0:
            raise InvalidArgumentError(f"request {i} has no input_ids: send at least one token")
        for pos, raw in enumerate(ids):
            try:
                if isinstance(raw, bool):
                    raise TypeError
                token = operator.index(raw)  # ints and NumPy integers, not floats or strings
            except TypeError:
                raise InvalidTokenError(
                    f"request {i}: input_ids[{pos}] = {raw!r} is not an integer token id"
                ) from None
            if token < 0 or (self.vocab_size is not None and token >= self.vocab_size):
                bound = f"[0, {self.vocab_size})" if self.vocab_size is not None else ">= 0"
                raise InvalidTokenError(
                    f"request {i}: input_ids[{pos}] = {token} is outside the vocabulary {bound}; "
                    "SGLang does not check token ids and may crash on it"
                )
        if self.vocab_size is not None:
            for token in request.sampling.stop_token_ids:
                if not 0 <= token < self.vocab_size:
                    raise InvalidTokenError(
                        f"request {i}: stop token id {token} is outside the vocabulary "
                        f"[0, {self.vocab_size})"
                    )

    def _route(self, key: str | None) -> _Server:
        if self.routing == "router" or len(self._servers) == 1:
            return self._servers[0]
        if key is None:
            return self._servers[next(self._round_robin) % len(self._servers)]
        return self._servers[_stable_hash(key) % len(self._servers)]

    def server_for(self, key: str | None) -> str:
        """The URL a request with ``key`` goes to (the router's with ``routing="router"``).
        For a keyless request this takes a turn of the round-robin."""
        return self._route(key).url

    def _new_rid(self) -> str:
        return f"{self._rid_prefix}{next(self._counter):012d}"

    async def _generate_one(
        self, request: GenerateRequest, *, warm: bool = False
    ) -> list[Completion]:
        server = self._route(request.key)
        sampling = request.sampling
        if sampling.stop and server.skip_tokenizer_init and self.tokenizer is None:
            raise InvalidArgumentError(
                f"{server.url} runs with --skip-tokenizer-init, so it cannot match stop strings: "
                "pass tokenizer= to SGLangClient to match them client-side"
            )
        input_ids = [int(t) for t in request.input_ids]
        headers = {ROUTING_HEADER: request.key} if self.routing == "router" and request.key else {}
        started = time.monotonic()
        failure: _Retriable | None = None
        attempt = repushes = 0
        async with server.slots:
            while attempt <= self.retries:
                if failure is not None:  # the previous attempt failed: back off
                    await asyncio.sleep(self._delay(attempt))
                    if self._closed:
                        raise EngineClosedError(
                            f"the SGLangClient was closed while a request to {server.url} "
                            f"waited to retry (last error: {failure})"
                        )
                rid = self._new_rid()
                epoch, seen = self._version_epoch, server.repushes
                body = {
                    "input_ids": input_ids,
                    "sampling_params": _sampling_params(sampling),
                    "return_logprob": True,
                    "logprob_start_len": -1,
                    "rid": rid,
                    "stream": False,
                }
                admissions = self._admit(server, input_ids, sampling.n)
                server.in_flight[rid] = sampling.n
                try:
                    payload = await self._post(server.url, "/generate", body, headers)
                    completions = self._parse_generate(server, payload, len(input_ids), sampling)
                except _Retriable as e:
                    failure = e
                    attempt += 1
                    self._release(server, admissions)
                    if e.refused:
                        # Nothing listens there: when the server comes back its cache is empty.
                        server.cache.reset()
                    else:
                        # The server may still run it: abort, so it does not compute for nobody.
                        await self._abort_quietly(server.url, rid)
                    continue
                except asyncio.CancelledError:
                    self._release(server, admissions)
                    await self._abort_quietly(server.url, rid)
                    raise
                except BaseException:
                    self._release(server, admissions)
                    raise
                finally:
                    server.in_flight.pop(rid, None)
                stale = self._stale_version(completions, epoch)
                if stale is not None or server.repushes != seen:
                    # From weights other than the pushed ones (or across a re-push): discard,
                    # make sure the server holds the pushed weights, generate again.
                    self._release(server, admissions)
                    if self._closed:
                        raise EngineClosedError(
                            f"the SGLangClient was closed while {server.url} answered from "
                            f"weights other than those last pushed"
                        )
                    repushes += 1
                    if stale is not None:
                        await self._restore_weights(server, stale, seen, repushes)
                    failure = None
                    continue
                self._record(server, rid, input_ids, admissions, completions, warm)
                if epoch == self._version_epoch:
                    # No weight update through this client since it was sent: the answer's
                    # version is the servers' current one.
                    self._weight_version = completions[-1].weight_version
                if sampling.stop and server.skip_tokenizer_init:
                    completions = [self._trim_stop_strings(c, sampling.stop) for c in completions]
                return completions
        assert failure is not None
        elapsed = time.monotonic() - started
        attempts = self.retries + 1
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f} s"
        if failure.timed_out:
            raise ServerTimeoutError(
                f"SGLang server {server.url} did not answer /generate within {self.timeout:g} s "
                f"({tries}). Raise timeout= or lower max_new_tokens."
            )
        raise ServerUnavailableError(
            f"SGLang server {server.url} failed /generate ({tries}; last error: {failure}). "
            + _START_HINT
        )

    def _delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)

    def _stale_version(self, completions: Sequence[Completion], epoch: int) -> str | None:
        """The version of an answer that is not the one last pushed through this client, when
        no update was made meanwhile (an answer to a request sent before an update may carry
        the version before it); None when every completion is current."""
        if self._pushed is None or epoch != self._version_epoch:
            return None
        expected = self._pushed[1]["weight_version"]
        for completion in completions:
            if completion.weight_version != expected:
                return completion.weight_version
        return None

    async def _restore_weights(self, server: _Server, got: str, seen: int, repushes: int) -> None:
        """Push the last weight update again to ``server``, which answered from weights of
        version ``got`` (a restart with its base weights), unless another request did so after
        ``seen``. Raises :class:`StaleWeightsError` where that cannot be done."""
        assert self._pushed is not None
        path, body = self._pushed
        expected = body["weight_version"]
        async with server.repush_lock:
            if server.repushes != seen:
                return  # restored since this request was sent: generate it again
            where = f"SGLang server {server.url} answered from weight_version {got!r}"
            if path != "/update_weights_from_disk":
                raise StaleWeightsError(
                    f"{where}, not {expected!r} (the version last pushed): it restarted with "
                    f"other weights, and the client cannot push weights sent over {path} again. "
                    "Restart the run (it resumes from its last checkpoint)",
                    url=server.url,
                    expected=expected,
                    got=got,
                )
            if repushes > _MAX_REPUSHES:
                raise StaleWeightsError(
                    f"{where} after {_MAX_REPUSHES} pushes of {expected!r} from "
                    f"{body['model_path']}: the update does not take; check the server's log",
                    url=server.url,
                    expected=expected,
                    got=got,
                )
            logger.warning(
                "%s, not %r (the version last pushed): it restarted with other weights. "
                "Pushing %s again; its answers from the other weights are discarded and "
                "generated again.",
                where,
                expected,
                body["model_path"],
            )
            urls = [server.url] if self.routing == "tree" else self._control
            await self._update_weights(path, body, "abort", urls=urls)
            if body.get("flush_cache", True):
                for each in self._servers if self.routing == "router" else [server]:
                    each.cache.reset()
            server.repushes += 1
            self.weight_repushes += 1

    def _admit(self, server: _Server, input_ids: list[int], n: int) -> list[Admission]:
        """Predict each sample's ``cached_tokens``. With ``n > 1`` SGLang first prefills the
        prompt alone (``max_new_tokens: 0``), then runs the n samples on the cached prompt."""
        if n > 1:
            prefill = server.cache.admit(input_ids)
            server.cache.finish(prefill, input_ids)
        return [server.cache.admit(input_ids) for _ in range(n)]

    @staticmethod
    def _release(server: _Server, admissions: list[Admission]) -> None:
        for admission in admissions:
            server.cache.release(admission)

    def _record(
        self,
        server: _Server,
        rid: str,
        input_ids: list[int],
        admissions: list[Admission],
        completions: list[Completion],
        warm: bool,
    ) -> None:
        for k, (admission, completion) in enumerate(zip(admissions, completions, strict=True)):
            server.cache.finish(admission, input_ids, completion.output_ids)
            self._records.append(
                CacheRecord(
                    rid=rid if len(completions) == 1 else f"{rid}/{k}",
                    url=server.url,
                    prompt_tokens=completion.prompt_tokens,
                    predicted=admission.cached_tokens,
                    reported=completion.cached_tokens,
                    warm=warm,
                )
            )

    def cache_report(self, *, reset: bool = False) -> CacheReport:
        """Predicted vs reported ``cached_tokens`` of every sample since the last reset, and
        the hit rate. ``reset=True`` starts a new window (e.g. one per rollout step)."""
        report = CacheReport(tuple(self._records))
        if reset:
            self._records.clear()
        return report

    def _parse_generate(
        self, server: _Server, payload: Any, prompt_len: int, sampling: SamplingParams
    ) -> list[Completion]:
        url = server.url + "/generate"
        entries = payload if isinstance(payload, list) else [payload]
        if len(entries) != sampling.n:
            raise ServerResponseError(
                f"{url} answered with {len(entries)} samples for a request of n={sampling.n}",
                url=url,
            )
        return [_completion(e, url, prompt_len, self._weight_version) for e in entries]

    def _trim_stop_strings(self, completion: Completion, stops: Sequence[str]) -> Completion:
        """A server started with ``--skip-tokenizer-init`` cannot see stop strings: cut the
        output after the first token whose text completes one (the stop text stays in)."""
        assert self.tokenizer is not None  # checked before sending
        ids = list(completion.output_ids)

        def first_stop(text: str) -> str | None:
            hits = [(text.find(s), s) for s in stops if s in text]
            return min(hits)[1] if hits else None

        if first_stop(self.tokenizer.decode(ids, skip_special_tokens=False)) is None:
            return completion
        for end in range(1, len(ids) + 1):
            matched = first_stop(self.tokenizer.decode(ids[:end], skip_special_tokens=False))
            if matched is not None:
                return Completion(
                    output_ids=tuple(ids[:end]),
                    log_probs=completion.log_probs[:end],
                    finish=FinishReason("stop", matched=matched),
                    cached_tokens=completion.cached_tokens,
                    prompt_tokens=completion.prompt_tokens,
                    weight_version=completion.weight_version,
                )
        return completion  # pragma: no cover - the full text holds a stop string

    # ------------------------------------------------------------------ aborts

    async def abort(self, rid: str) -> None:
        """``POST /abort_request`` for ``rid`` on every server (SGLang aborts each request whose
        rid starts with it)."""
        await self._ensure_started()
        await asyncio.gather(*(self._abort(s.url, rid) for s in self._servers))

    async def _abort_in_flight(self) -> None:
        pending = [(s.url, rid) for s in self._servers for rid in list(s.in_flight)]
        await asyncio.gather(
            *(self._abort_quietly(url, rid) for url, rid in pending), return_exceptions=True
        )

    async def _abort(self, url: str, rid: str, *, abort_all: bool = False) -> None:
        await self._post(url, "/abort_request", {"rid": rid, "abort_all": abort_all}, {})

    async def _abort_quietly(self, url: str, rid: str) -> None:
        """Best effort: a server that cannot be reached has nothing running for us."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._abort(url, rid), timeout=self.connect_timeout)

    # ------------------------------------------------------------------ control

    async def update_weights_from_disk(
        self,
        model_path: str,
        weight_version: str,
        *,
        load_format: str | None = None,
        flush_cache: bool = True,
        pause_mode: Literal["abort", "retract", "in_place"] | None = "abort",
    ) -> None:
        """Load an HF checkpoint that every server can read from ``model_path``; afterwards
        answers report ``weight_version``.

        The update runs between ``POST /pause_generation {"mode": pause_mode}`` and
        ``POST /continue_generation`` (``"abort"``: requests in flight come back with
        ``finish.type == "abort"``; ``"retract"``/``"in_place"``: they resume on the new
        weights). ``pause_mode=None``, or a server without ``/pause_generation``, sends
        ``abort_all_requests: true`` with the update instead. ``flush_cache`` empties the radix
        caches (SGLang's default): the next round starts cold.

        Raises:
            ServerControlError: a server answered ``success: false`` (e.g. a bad path).
        """
        body: dict[str, Any] = {
            "model_path": str(model_path),
            "weight_version": str(weight_version),
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            body["load_format"] = load_format
        await self._update_weights("/update_weights_from_disk", body, pause_mode)
        self._after_weight_update(str(weight_version), flush_cache)
        self._pushed = ("/update_weights_from_disk", body)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int | Sequence[int],
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Ask the servers to join the trainer's process group for weight broadcasts.

        The trainer is rank 0 (the group's master at ``master_address:master_port``); a server
        with G GPUs takes ranks ``rank_offset .. rank_offset + G - 1``. With several control
        URLs pass one ``rank_offset`` per URL. The call returns once every rank has joined, so
        the trainer must join the group concurrently, e.g. in a thread::

            join = asyncio.to_thread(init_trainer_group, ...)  # the trainer side
            await asyncio.gather(join, client.init_weights_update_group(addr, port, 1, 2))
        """
        offsets = [rank_offset] if isinstance(rank_offset, int) else list(rank_offset)
        if len(offsets) != len(self._control):
            raise InvalidArgumentError(
                f"rank_offset gives {len(offsets)} offsets for {len(self._control)} servers: "
                "pass one per server (e.g. [1, 1 + G, 1 + 2G] for servers of G GPUs)"
            )
        await self._ensure_started()
        await asyncio.gather(
            *(
                self._control_post(
                    url,
                    "/init_weights_update_group",
                    {
                        "master_address": master_address,
                        "master_port": int(master_port),
                        "rank_offset": int(offset),
                        "world_size": int(world_size),
                        "group_name": group_name,
                        "backend": backend,
                    },
                )
                for url, offset in zip(self._control, offsets, strict=True)
            )
        )

    async def update_weights_from_distributed(
        self,
        named_tensors_meta: Iterable[tuple[str, Any, Sequence[int]]],
        group_name: str,
        weight_version: str,
        *,
        flush_cache: bool = True,
        pause_mode: Literal["abort", "retract", "in_place"] | None = "abort",
    ) -> None:
        """Receive new weights over the group of :meth:`init_weights_update_group`.

        ``named_tensors_meta``: ``(name, dtype, shape)`` per tensor, in the order the trainer
        broadcasts them from its rank 0 (dtype as ``torch.bfloat16`` or ``"bfloat16"``). This
        sends the HTTP side only and returns when the servers have received every tensor, so
        the trainer must broadcast concurrently (in a thread: the broadcasts block)::

            send = asyncio.to_thread(broadcast_all, model, group)  # the trainer side
            await asyncio.gather(send, client.update_weights_from_distributed(meta, "g", "v2"))
        """
        names, dtypes, shapes = [], [], []
        for name, dtype, shape in named_tensors_meta:
            names.append(str(name))
            dtypes.append(str(dtype).removeprefix("torch."))
            shapes.append([int(d) for d in shape])
        body = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": flush_cache,
            "weight_version": str(weight_version),
        }
        await self._update_weights("/update_weights_from_distributed", body, pause_mode)
        self._after_weight_update(str(weight_version), flush_cache)
        self._pushed = ("/update_weights_from_distributed", body)

    async def _update_weights(
        self,
        path: str,
        body: dict[str, Any],
        pause_mode: str | None,
        *,
        urls: Sequence[str] | None = None,
    ) -> None:
        """``path`` with ``body`` on ``urls`` (default: every control URL), inside a pause."""
        if pause_mode is not None and pause_mode not in _PAUSE_MODES:
            raise InvalidOptionError(
                f"pause_mode must be one of {_PAUSE_MODES} or None, got {pause_mode!r}"
            )
        await self._ensure_started()
        targets = list(self._control if urls is None else urls)
        paused: list[str] = []
        try:
            if pause_mode is not None:
                for url in targets:
                    try:
                        await self._control_post(url, "/pause_generation", {"mode": pause_mode})
                        paused.append(url)
                    except ServerRequestError as e:
                        if e.status != 404:
                            raise
            bodies = [
                dict(body, abort_all_requests=url not in paused)
                if path == "/update_weights_from_disk"
                else body
                for url in targets
            ]
            await asyncio.gather(
                *(self._control_post(url, path, b) for url, b in zip(targets, bodies, strict=True))
            )
        finally:
            for url in paused:
                await self._control_post(url, "/continue_generation", {})

    def _after_weight_update(self, weight_version: str, flush_cache: bool) -> None:
        self._weight_version = weight_version
        self._version_epoch += 1
        if flush_cache:
            for server in self._servers:
                server.cache.reset()

    async def pause_generation(
        self, mode: Literal["abort", "retract", "in_place"] = "abort"
    ) -> None:
        """``POST /pause_generation`` on every control URL (``"abort"``: requests in flight come
        back aborted; ``"retract"``/``"in_place"``: they wait for :meth:`continue_generation`)."""
        if mode not in _PAUSE_MODES:
            raise InvalidOptionError(f"mode must be one of {_PAUSE_MODES}, got {mode!r}")
        await self._ensure_started()
        await asyncio.gather(
            *(self._control_post(u, "/pause_generation", {"mode": mode}) for u in self._control)
        )

    async def continue_generation(self) -> None:
        """``POST /continue_generation`` on every control URL."""
        await self._ensure_started()
        await asyncio.gather(
            *(self._control_post(u, "/continue_generation", {}) for u in self._control)
        )

    async def flush_cache(self) -> None:
        """``POST /flush_cache`` on every control URL; SGLang refuses (400) unless idle."""
        await self._ensure_started()
        await asyncio.gather(*(self._control_post(u, "/flush_cache", {}) for u in self._control))
        for server in self._servers:
            server.cache.reset()

    async def server_info(self, url: str | None = None) -> dict[str, Any]:
        """``GET /server_info`` of ``url`` (default: the first server)."""
        await self._ensure_started()
        info = await self._get(_normalize_url(url or self.urls[0]), "/server_info")
        return info if isinstance(info, dict) else {"value": info}

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        """``GET /model_info`` of ``url`` (default: the first server)."""
        await self._ensure_started()
        info = await self._get(_normalize_url(url or self.urls[0]), "/model_info")
        return info if isinstance(info, dict) else {"value": info}

    async def _control_post(self, url: str, path: str, body: dict[str, Any]) -> Any:
        """A control POST: not retried (a weight update or a group join must not run twice);
        ``{"success": false}`` raises :class:`ServerControlError`."""
        try:
            payload = await self._post(url, path, body, {}, control=True)
        except _Retriable as e:
            raise ServerUnavailableError(
                f"SGLang server {url}{path} failed: {e}. " + _START_HINT
            ) from None
        if isinstance(payload, dict) and payload.get("success") is False:
            message = str(payload.get("message", ""))
            raise ServerControlError(
                f"{url}{path} failed: {message}", url=url + path, server_message=message
            )
        return payload

    # ------------------------------------------------------------------ HTTP

    async def _post(
        self,
        url: str,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        *,
        control: bool = False,
    ) -> Any:
        """One POST. Raises :class:`_Retriable` for connection errors, timeouts and 5xx,
        :class:`ServerRequestError` for 4xx (and for a control endpoint's 400
        ``{"success": false}``, :class:`ServerControlError`)."""
        assert self._session is not None
        endpoint = url + path
        try:
            async with self._session.post(endpoint, json=body, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except asyncio.TimeoutError:
            raise _Retriable(f"no answer within {self.timeout:g} s", timed_out=True) from None
        except aiohttp.ClientConnectorError as e:
            raise _Retriable(f"cannot connect ({e})", refused=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Retriable(f"{type(e).__name__}: {e}") from None
        return _read_answer(endpoint, status, raw, control=control)

    async def _get(self, url: str, path: str, *, parse: bool = True) -> Any:
        """A GET, retried like ``/generate``; :class:`ServerUnavailableError` names the URL."""
        if self._session is None:
            raise EngineClosedError("call `await client.start()` first")
        endpoint = url + path
        failure: _Retriable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt))
            try:
                async with self._session.get(endpoint) as response:
                    raw = await response.read()
                    status = response.status
            except asyncio.TimeoutError:
                failure = _Retriable(f"no answer within {self.timeout:g} s", timed_out=True)
                continue
            except (aiohttp.ClientError, OSError) as e:
                failure = _Retriable(f"{type(e).__name__}: {e}")
                continue
            if not parse:
                if status >= 500:
                    failure = _Retriable(f"HTTP {status}: {_preview(raw.decode(errors='replace'))}")
                    continue
                if status >= 400:
                    _read_answer(endpoint, status, raw, control=False)  # raises
                return None
            try:
                return _read_answer(endpoint, status, raw, control=False)
            except _Retriable as e:
                failure = e
        timed_out = failure is not None and failure.timed_out
        raise (ServerTimeoutError if timed_out else ServerUnavailableError)(
            f"SGLang server {url} is unavailable: GET {path} failed "
            f"({self.retries + 1} attempts; last error: {failure}). " + _START_HINT
        )

    def __repr__(self) -> str:
        return (
            f"SGLangClient(urls={self.urls!r}, routing={self.routing!r}, "
            f"weight_version={self._weight_version!r}, retries={self.retries})"
        )


async def probe(urls: str | Sequence[str], **options: Any) -> None:
    """Check that every server answers ``GET /health``, retried as :class:`SGLangClient`
    retries (``options`` go to it: ``retry_window=...``); raises
    :class:`ServerUnavailableError` naming the first URL that does not. Cheap: a run calls it
    before any model loads."""
    client = SGLangClient(urls, **options)
    try:
        await client._check_health()
    finally:
        await client.close(abort=False)


# --------------------------------------------------------------------------- protocol helpers


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(
            f"server URL must be http(s)://HOST:PORT, got {url!r} (e.g. http://127.0.0.1:30000)"
        )
    return url


def _stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same in every process (``hash()`` is salted per run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _sampling_params(s: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params``: only keys it knows (an unknown key is an HTTP 500)."""
    return {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "stop": list(s.stop),
        "stop_token_ids": list(s.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "n": s.n,
    }


def _read_answer(endpoint: str, status: int, raw: bytes, *, control: bool) -> Any:
    """The JSON of an answer, or the typed error its status calls for."""
    text = raw.decode("utf-8", errors="replace")
    try:
        payload: Any = json.loads(text) if text.strip() else None
    except ValueError:
        payload = None
        if status < 400 and control:
            return {"message": text}  # e.g. SGLang's plain-text /flush_cache answer
    if status >= 500:
        raise _Retriable(f"HTTP {status}: {_preview(text)}")
    if status >= 400:
        message = _error_message(payload, text)
        if control and isinstance(payload, dict) and payload.get("success") is False:
            raise ServerControlError(
                f"{endpoint} failed (HTTP {status}): {message}",
                url=endpoint,
                server_message=message,
            )
        raise ServerRequestError(
            f"{endpoint} rejected the request (HTTP {status}): {message}",
            status=status,
            url=endpoint,
            server_message=message,
        )
    if payload is None and text.strip():
        raise ServerResponseError(
            f"{endpoint} answered with non-JSON: {_preview(text)}", url=endpoint
        )
    return payload


def _error_message(payload: Any, text: str) -> str:
    """The server's words from ``{"error": {"message": ...}}``, ``{"message": ...}`` or
    ``{"detail": ...}`` (FastAPI), else the body."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):
            if key in payload:
                return str(payload[key])
    return _preview(text)


def _preview(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _completion(entry: Any, url: str, prompt_len: int, weight_version: str) -> Completion:
    """One ``/generate`` answer entry as a :class:`Completion`."""

    def bad(what: str) -> ServerResponseError:
        return ServerResponseError(
            f"{url} sent a malformed sample: {what}; expected "
            '{"output_ids": [...], "meta_info": {"finish_reason": {...}, '
            '"output_token_logprobs": [[logprob, token_id, null], ...], ...}} '
            "(was return_logprob honoured?)",
            url=url,
        )

    if not isinstance(entry, dict) or not isinstance(entry.get("meta_info"), dict):
        raise bad(f"no meta_info in {_preview(json.dumps(entry))}")
    meta = entry["meta_info"]
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise bad("no output_token_logprobs")
    try:
        log_probs = tuple(float("nan") if t[0] is None else float(t[0]) for t in triples)
        logprob_ids = [int(t[1]) for t in triples]
    except (TypeError, ValueError, IndexError):
        raise bad("output_token_logprobs entries are not [logprob, token_id, text]") from None
    output_ids = entry.get("output_ids")
    if output_ids is None:
        output_ids = logprob_ids  # SGLang 0.4.6 has no output_ids: the logprobs carry the ids
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise bad("output_ids is not a list of token ids")
    if len(output_ids) != len(log_probs):
        raise bad(f"{len(output_ids)} output_ids but {len(log_probs)} logprobs")
    version = meta.get("weight_version")
    return Completion(
        output_ids=tuple(output_ids),
        log_probs=log_probs,
        finish=_finish_reason(meta.get("finish_reason"), bad),
        cached_tokens=int(meta.get("cached_tokens") or 0),
        prompt_tokens=int(meta.get("prompt_tokens") or prompt_len),
        weight_version=version if isinstance(version, str) else weight_version,
    )


def _finish_reason(raw: Any, bad: Any) -> FinishReason:
    if not isinstance(raw, dict) or raw.get("type") not in ("stop", "length", "abort"):
        raise bad(f"finish_reason {raw!r} is not stop, length or abort")
    kind = raw["type"]
    if kind == "stop":
        matched = raw.get("matched")
        return FinishReason("stop", matched=matched if isinstance(matched, (int, str)) else None)
    if kind == "length":
        return FinishReason("length")
    return FinishReason("abort", message=str(raw.get("message") or "aborted"))


# --------------------------------------------------------------------------- launching


def launch_command(
    model_path: str, *, port: int = 30000, dp: int = 1, host: str = "127.0.0.1"
) -> str:
    """The recommended SGLang launch line for ``model_path`` (run it in SGLang's own
    environment): longest-prefix-match scheduling, 30% of GPU memory left for activations.
    ``dp > 1`` adds ``--dp-size`` (one URL, SGLang balances its ranks); for cache-aware routing
    over separate servers see :func:`router_command`."""
    if dp < 1:
        raise InvalidArgumentError(f"dp must be >= 1, got {dp}")
    parts = [
        "python -m sglang.launch_server",
        f"--model-path {model_path}",
        f"--host {host}",
        f"--port {port}",
        "--mem-fraction-static 0.7",
        "--schedule-policy lpm",
    ]
    if dp > 1:
        parts.append(f"--dp-size {dp}")
    return " ".join(parts)


def router_command(
    worker_urls: Sequence[str],
    *,
    port: int = 30000,
    host: str = "127.0.0.1",
    policy: Literal["cache_aware", "consistent_hashing"] = "cache_aware",
) -> str:
    """``sglang_router`` in front of ``worker_urls``. ``cache_aware`` routes each request to the
    worker whose cache holds its longest prefix; ``consistent_hashing`` routes on the
    ``X-SMG-Routing-Key`` header that ``SGLangClient(routing="router")`` sends (tree affinity)."""
    return (
        f"python -m sglang_router.launch_router --worker-urls {' '.join(worker_urls)} "
        f"--policy {policy} --host {host} --port {port}"
    )


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sglang`` (with ``sglang command --model PATH [--dp K] [--port P]``) on the
    ``treegrpo`` command's subparsers; sets ``run`` to a function of the parsed args."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sglang", help="SGLang rollout servers: print how to launch them"
    )
    verbs = parser.add_subparsers(dest="sglang_command", required=True)
    command = verbs.add_parser(
        "command",
        help="print the recommended SGLang launch line",
        description="Print the SGLang launch line treegrpo expects (prefix-cache friendly "
        "scheduling, memory left for long trees). Run it in SGLang's own environment.",
    )
    command.add_argument("--model", required=True, help="model path or hub id")
    command.add_argument("--dp", type=int, default=1, help="data-parallel servers (default 1)")
    command.add_argument("--port", type=int, default=30000, help="port (default 30000)")
    command.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    command.set_defaults(run=_print_command)
    return parser


def _print_command(args: argparse.Namespace) -> int:
    if args.dp < 1:
        print(f"--dp must be >= 1, got {args.dp}", file=sys.stderr)
        return 2
    print(launch_command(args.model, port=args.port, dp=args.dp, host=args.host))
    if args.dp > 1:
        workers = [f"http://{args.host}:{args.port + 1 + i}" for i in range(args.dp)]
        print(
            f"\n# Or {args.dp} separate servers (one GPU each, CUDA_VISIBLE_DEVICES=i) on ports "
            f"{args.port + 1}..{args.port + args.dp}, each launched as above without --dp-size,"
            "\n# behind sglang_router with cache-aware routing (pip install sglang-router):"
        )
        print(router_command(workers, port=args.port, host=args.host))
        print(
            "# or give treegrpo the worker URLs themselves: SGLangClient routes each tree to "
            "one server (tree affinity)."
        )
    return 0
