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
  ``X-SMG-Routing-Key: <key>`` (for its ``consistent_hashing`` policy; aborts and weight
  updates go to the workers, ``control_urls``, since the router answers 404 for them); or,
  with ``routing="round_robin"``, each request to the next server whatever its key.
- Retries with exponential backoff on connection errors, timeouts and HTTP 5xx, never on 4xx. A
  request either returns exactly its n samples once or raises: a retry is a new attempt with a new
  rid (the old one is aborted), and nothing of a failed attempt is kept. ``retry_window`` sets
  how long a server may fail before the client gives up (long enough to ride out a restart).
- Servers that go away: a refused or dropped connection marks the server gone; every attempt is
  routed anew, so its requests (those in flight included) move to a server that answers (the
  same one for every request of a key), and it gets them back once ``GET /health`` answers again.
  When none answers for ``retry_window`` seconds, the error names every server and its error.
- Token ids are checked against the vocabulary before anything is sent (a real server's
  scheduler crashes on an id beyond it): the ``vocab_size`` ``/model_info`` reports, else the
  tokenizer's length.
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

This module is the request path (routing, rids, retries of ``/generate``, stale weights,
answers); the rest lives beside it: HTTP and retries in :mod:`~treegrpo.engine.sglang_transport`,
the cache report in :mod:`~treegrpo.engine.sglang_cache`, the weight-update and pause calls and
the trainer's weight sync in :mod:`~treegrpo.engine.sglang_weights`, the launch lines and
``treegrpo sglang command`` in :mod:`~treegrpo.engine.sglang_launch`. Their public names are
importable from here as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from treegrpo.engine.base import (
    Completion,
    FinishReason,
    GenerateRequest,
    PolicySource,
    SamplingParams,
)
from treegrpo.engine.cache_model import RadixCacheModel
from treegrpo.engine.errors import (
    EngineClosedError,
    ServerControlError,
    ServerRequestError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from treegrpo.engine.sglang_cache import CacheLedger, CacheRecord, CacheReport, admit, release
from treegrpo.engine.sglang_group import SGLangGroupSync
from treegrpo.engine.sglang_launch import add_subcommand, launch_command, router_command
from treegrpo.engine.sglang_transport import START_HINT as _START_HINT
from treegrpo.engine.sglang_transport import Retriable as _Retriable
from treegrpo.engine.sglang_transport import Transport, retries_for_window
from treegrpo.engine.sglang_transport import normalize_url as _normalize_url
from treegrpo.engine.sglang_transport import preview as _preview
from treegrpo.engine.sglang_transport import stable_hash as _stable_hash
from treegrpo.engine.sglang_weights import SGLangWeightSync, WeightSyncCalls
from treegrpo.engine.stops import StopMatcher
from treegrpo.engine.tokens import check_token_ids
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

_ROUTINGS = ("tree", "round_robin", "router")
_WEIGHT_SYNCS = ("disk", "distributed")

_PROBE_INTERVAL_S = 1.0
"""Seconds between background ``GET /health`` probes of a server that went away while others
answer."""
_PROBE_FRESH_S = 0.1
"""Seconds a probe's result stands for the requests that wait on it."""


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
        self.vocab_size: int | None = None  # as /model_info reports it, if it does
        # Gone: the last attempt found nothing listening or lost its connection. Requests
        # then go to the other servers until a GET /health answers again (see _pick).
        self.gone = False
        self.gone_since = 0.0
        self.last_error = ""
        self.probe: asyncio.Task[None] | None = None
        self.probed_at = -math.inf
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

    def describe(self, now: float) -> str:
        """``url`` and, when gone, for how long and why (for error messages)."""
        if not self.gone:
            return f"{self.url} (answers /health)"
        return f"{self.url} (gone for {now - self.gone_since:.1f} s: {self.last_error})"


# --------------------------------------------------------------------------- the client


class SGLangClient(WeightSyncCalls):
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
            against (unless a server reports its own, below), and it trims stop strings
            client-side for servers started with ``--skip-tokenizer-init`` (which cannot match
            them).
        vocab_size: the vocabulary size when no tokenizer is given. A ``vocab_size`` that
            ``/model_info`` (or ``/get_model_info``) reports wins over both: it is the server's
            embedding, beyond which an id crashes it. Without any, only negative ids are
            caught.
        routing: ``"tree"`` (default): requests with the same key go to the same server (stable
            hash of the key modulo the number of servers; keyless requests round-robin).
            ``"round_robin"``: every request to the next server, keys ignored (no prefix
            reuse across a tree's requests beyond chance; even load whatever the keys).
            ``"router"``: one URL, a router that routes on the ``X-SMG-Routing-Key`` header.
        timeout: seconds one HTTP request may take (a whole generation, or a weight update).
        connect_timeout: seconds to open a connection.
        retries: extra attempts after a connection error, a timeout or an HTTP 5xx; HTTP 4xx is
            never retried.
        backoff: seconds before the first retry; each later retry waits twice as long...
        max_backoff: ...up to this many seconds.
        retry_window: instead of ``retries``: retry until the waits add up to this many seconds
            (:func:`retries_for_window`), e.g. the time a server takes to restart. A server that
            goes away (connection refused or dropped) hands its requests, each retried with a
            fresh rid, to the servers that answer; only when none answers for this long does a
            request fail (:class:`ServerUnavailableError` naming every server and its error).
        max_concurrency: requests in flight per server at most; more wait in the client.
        cache_tokens: each server's cache capacity for the ``cached_tokens`` prediction; by
            default ``max_total_num_tokens`` from ``/server_info`` (no eviction if absent).
        control_urls: with ``routing="router"``, the worker URLs that get weight updates and
            other control calls (default: the router URL itself).
        weight_sync: what :meth:`weight_sync` gives the trainer: ``"disk"`` (default; the
            policy saved and loaded with ``/update_weights_from_disk``) or ``"distributed"``
            (a process group the servers join, :mod:`~treegrpo.engine.sglang_group`).
        sync_address: with ``"distributed"``, this machine's address the servers connect to
            (default: the one on the interface that reaches the first server).
        sync_port: with ``"distributed"``, the group's port on this machine (0: a free one).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        routing: Literal["tree", "round_robin", "router"] = "tree",
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        retry_window: float | None = None,
        max_concurrency: int = 256,
        cache_tokens: int | None = None,
        control_urls: Sequence[str] | None = None,
        weight_sync: Literal["disk", "distributed"] = "disk",
        sync_address: str | None = None,
        sync_port: int = 0,
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
        if weight_sync not in _WEIGHT_SYNCS:
            raise InvalidOptionError(
                f"weight_sync must be one of {_WEIGHT_SYNCS}, got {weight_sync!r}"
            )
        if weight_sync == "disk" and (sync_address is not None or sync_port):
            raise InvalidArgumentError(
                'sync_address and sync_port only apply to weight_sync="distributed"'
            )
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
        else:  # the waits that many retries add up to
            retry_window = sum(min(backoff * 2**k, max_backoff) for k in range(retries))
        if max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._vocab_source = "vocab_size= of SGLangClient"
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
            self._vocab_source = "len(tokenizer)"
        if vocab_size is not None and vocab_size < 1:
            raise InvalidArgumentError(f"vocab_size must be >= 1, got {vocab_size}")
        self.urls = [_normalize_url(u) for u in urls]
        self.routing = routing
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = retries
        self.retry_window = float(retry_window)
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
        self.weight_sync_kind = weight_sync
        """How :meth:`weight_sync` syncs the trainer's weights: ``disk`` or ``distributed``."""
        self._sync_address = sync_address
        self._sync_port = int(sync_port)
        self._groups: list[SGLangGroupSync] = []  # closed with the client
        self._ledger = CacheLedger()
        self._http = Transport(
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
        )
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
            await self._read_vocab_size()
            version = infos[0].get("weight_version") if infos else None
            if isinstance(version, str):
                self._weight_version = version
            if self.vocab_size is None:
                logger.warning(
                    "SGLangClient has no vocab_size (pass tokenizer= or vocab_size=): token ids "
                    "beyond the vocabulary cannot be caught, and SGLang does not check them"
                )
            self._started = True

    async def _check_health(self) -> None:
        """``GET /health`` on every server and control URL (retried); on a failure the session
        is closed and the first URL's error raised."""
        self._http.open()
        urls = list(dict.fromkeys([*self.urls, *self._control]))
        checks = await asyncio.gather(
            *(self._http.get(u, "/health", parse=False) for u in urls), return_exceptions=True
        )
        failed = [e for e in checks if isinstance(e, BaseException)]
        if failed:
            await self._http.close()
            raise failed[0]

    async def _read_vocab_size(self) -> None:
        """Take the vocabulary size from ``/model_info`` (``/get_model_info`` on older servers)
        where a server reports one: it is the size of the server's embedding, the bound an id
        crashes it beyond. SGLang 0.5 reports none, so the tokenizer's length (or
        ``vocab_size=``) stays the bound there."""
        infos = await asyncio.gather(*(self._model_info_or_empty(s.url) for s in self._servers))
        for server, info in zip(self._servers, infos, strict=True):
            size = info.get("vocab_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                server.vocab_size = size
        reported = {s.url: s.vocab_size for s in self._servers if s.vocab_size is not None}
        if len(set(reported.values())) > 1:
            await self._http.close()
            sizes = ", ".join(f"{url}: {size}" for url, size in reported.items())
            raise InvalidArgumentError(
                f"the SGLang servers report different vocabulary sizes ({sizes}): they serve "
                "different models; point engine.urls at servers of one model"
            )
        if reported:
            url, size = next(iter(reported.items()))
            if self.vocab_size is not None and self.vocab_size != size:
                logger.info(
                    "%s/model_info reports vocab_size %d (%s gave %d): checking token ids "
                    "against the server's",
                    url,
                    size,
                    self._vocab_source,
                    self.vocab_size,
                )
            self.vocab_size = size
            self._vocab_source = f"the vocab_size {url}/model_info reports"

    async def _model_info_or_empty(self, url: str) -> dict[str, Any]:
        for path in ("/model_info", "/get_model_info"):
            try:
                info = await self._http.get(url, path)
            except (ServerRequestError, ServerResponseError):
                continue  # 404 on this path (older servers have only /get_model_info)
            return info if isinstance(info, dict) else {}
        return {}

    async def _server_info_or_empty(self, url: str) -> dict[str, Any]:
        try:
            info = await self._http.get(url, "/server_info")
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
        if self._http.session is not None:
            for group in self._groups:  # the servers leave the weight-update groups
                await group.aclose()
        self._closed = True
        if self._http.session is None:
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
        probes = [s.probe for s in self._servers if s.probe is not None]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await self._http.close()

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
        await self._ensure_started()  # the vocabulary size may come from the servers
        for i, request in enumerate(requests):
            self._check_request(i, request)
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
        await self._ensure_started()
        self._check_request(0, request)
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
        check_token_ids(
            ids,
            self.vocab_size,
            where=f"request {i}",
            note=(
                f" ({self._vocab_source}); nothing was sent: SGLang does not check token ids "
                "and its scheduler crashes on one beyond the vocabulary"
            ),
        )
        if self.vocab_size is not None:
            check_token_ids(
                request.sampling.stop_token_ids,
                self.vocab_size,
                where=f"request {i}",
                name="stop_token_ids",
                note=f" ({self._vocab_source})",
            )

    def _route(self, key: str | None) -> _Server:
        """The server a request with ``key`` belongs on (whether it answers or not)."""
        if self.routing == "router" or len(self._servers) == 1:
            return self._servers[0]
        if key is None or self.routing == "round_robin":
            return self._servers[next(self._round_robin) % len(self._servers)]
        return self._servers[_stable_hash(key) % len(self._servers)]

    def server_for(self, key: str | None) -> str:
        """The URL a request with ``key`` goes to (the router's with ``routing="router"``)
        while every server answers. For a keyless request this takes a turn of the
        round-robin."""
        return self._route(key).url

    # ------------------------------------------------------------------ servers that go away

    async def _pick(self, key: str | None) -> _Server | None:
        """The server for the next attempt of a request with ``key``: its own (:meth:`_route`)
        unless that one is gone, then one of those that are not (the same for every request of
        a key: the highest hash of key and URL, so a group's prefixes stay together). When all
        are gone, each is probed (``GET /health``, shared by the requests waiting); None when
        none answers."""
        own = self._route(key)
        if not own.gone:
            return own
        self._probe_soon(own)  # so that it gets its requests back once it answers
        chosen = self._fallback(key)
        if chosen is not None:
            return chosen
        await asyncio.gather(*(self._probe(s) for s in self._servers))
        return own if not own.gone else self._fallback(key)

    def _fallback(self, key: str | None) -> _Server | None:
        alive = [s for s in self._servers if not s.gone]
        if not alive:
            return None
        if key is None or self.routing == "round_robin":
            return alive[next(self._round_robin) % len(alive)]
        return max(alive, key=lambda s: _stable_hash(f"{key}\n{s.url}"))

    def _mark_gone(self, server: _Server, error: _Retriable) -> None:
        server.last_error = str(error)
        if server.gone:
            return
        server.gone, server.gone_since = True, time.monotonic()
        server.cache.reset()  # when it comes back (a restart) its cache is empty
        others = sum(not s.gone for s in self._servers)
        logger.warning(
            "SGLang server %s went away (%s); %s",
            server.url,
            error,
            f"its requests go to the {others} other server(s) that answer until it is back"
            if others
            else "no server answers: requests wait for one to come back",
        )

    def _mark_back(self, server: _Server) -> None:
        if server.gone:
            server.gone = False
            logger.warning(
                "SGLang server %s answers again after %.1f s",
                server.url,
                time.monotonic() - server.gone_since,
            )

    async def _probe(self, server: _Server) -> None:
        """Update ``server.gone`` from one ``GET /health``; concurrent callers share it, and a
        result younger than ``_PROBE_FRESH_S`` stands."""
        if server.probe is None or server.probe.done():
            if time.monotonic() - server.probed_at < _PROBE_FRESH_S:
                return
            server.probe = asyncio.ensure_future(self._ping(server))
        await asyncio.shield(server.probe)

    def _probe_soon(self, server: _Server) -> None:
        """Probe a gone server in the background, at most every ``_PROBE_INTERVAL_S``."""
        idle = server.probe is None or server.probe.done()
        if idle and time.monotonic() - server.probed_at >= _PROBE_INTERVAL_S:
            server.probe = asyncio.ensure_future(self._ping(server))

    async def _ping(self, server: _Server) -> None:
        try:
            problem = await self._http.ping(server.url)
        except EngineClosedError:
            problem = "the client was closed"
        server.probed_at = time.monotonic()
        if problem is None:
            self._mark_back(server)
        elif server.gone:
            server.last_error = problem

    def _none_answers(self, elapsed: float, attempts: int) -> ServerUnavailableError:
        now = time.monotonic()
        servers = "; ".join(s.describe(now) for s in self._servers)
        many = len(self._servers) > 1
        return ServerUnavailableError(
            f"no SGLang server answered /generate for {elapsed:.1f} s ({attempts} attempts, "
            f"retry window {self.retry_window:g} s): {servers}. Check that "
            f"{'they are' if many else 'it is'} running and reachable from this machine (host, "
            "port, firewall) and read the server log for why it stopped (killed, out of "
            "memory, a crash); a restart that takes longer needs a longer retry_window= "
            "(engine.retry_window_s in a training config). " + _START_HINT
        )

    # ------------------------------------------------------------------ one request

    def _new_rid(self) -> str:
        return f"{self._rid_prefix}{next(self._counter):012d}"

    async def _generate_one(
        self, request: GenerateRequest, *, warm: bool = False
    ) -> list[Completion]:
        """One request, retried until it returns its ``n`` samples once: every attempt has a
        fresh rid and is routed anew (:meth:`_pick`), so a request whose server went away
        moves to one that answers; nothing of a failed attempt is kept."""
        sampling = request.sampling
        input_ids = [int(t) for t in request.input_ids]
        headers = {ROUTING_HEADER: request.key} if self.routing == "router" and request.key else {}
        started = time.monotonic()
        failure: _Retriable | None = None
        server = self._route(request.key)
        attempt = repushes = 0
        while attempt <= self.retries:
            if failure is not None:  # the previous attempt failed: back off
                await asyncio.sleep(self._http.delay(attempt))
                if self._closed:
                    raise EngineClosedError(
                        f"the SGLangClient was closed while a request to {server.url} "
                        f"waited to retry (last error: {failure})"
                    )
            picked = await self._pick(request.key)
            if picked is None:  # every server is gone
                failure = _Retriable("no server answers GET /health", refused=True)
                attempt += 1
                continue
            server = picked
            if sampling.stop and server.skip_tokenizer_init and self.tokenizer is None:
                raise InvalidArgumentError(
                    f"{server.url} runs with --skip-tokenizer-init, so it cannot match stop "
                    "strings: pass tokenizer= to SGLangClient to match them client-side"
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
            async with server.slots:
                admissions = admit(server.cache, input_ids, sampling.n)
                server.in_flight[rid] = sampling.n
                try:
                    payload = await self._http.post(server.url, "/generate", body, headers)
                    completions = self._parse_generate(server, payload, len(input_ids), sampling)
                except _Retriable as e:
                    failure = e
                    attempt += 1
                    release(server.cache, admissions)
                    if e.gone:
                        self._mark_gone(server, e)
                    if not e.refused:
                        # The server may still run it: abort, so it does not compute for nobody.
                        await self._abort_quietly(server.url, rid)
                    continue
                except asyncio.CancelledError:
                    release(server.cache, admissions)
                    await self._abort_quietly(server.url, rid)
                    raise
                except BaseException:
                    release(server.cache, admissions)
                    raise
                finally:
                    server.in_flight.pop(rid, None)
            self._mark_back(server)
            stale = self._stale_version(completions, epoch)
            if stale is not None or server.repushes != seen:
                # From weights other than the pushed ones (or across a re-push): discard,
                # make sure the server holds the pushed weights, generate again.
                release(server.cache, admissions)
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
            self._ledger.record(
                server.cache, server.url, rid, input_ids, admissions, completions, warm
            )
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
        if failure.gone and all(s.gone for s in self._servers):
            raise self._none_answers(elapsed, attempts)
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

    def cache_report(self, *, reset: bool = False) -> CacheReport:
        """Predicted vs reported ``cached_tokens`` of every sample since the last reset, and
        the hit rate. ``reset=True`` starts a new window (e.g. one per rollout step)."""
        return self._ledger.report(reset=reset)

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
        output after the first token whose text completes one (the stop text stays in), by
        SGLang's rule (:mod:`treegrpo.engine.stops`)."""
        assert self.tokenizer is not None  # checked before sending
        tokenizer = self.tokenizer
        matcher = StopMatcher(
            stops, lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=False))
        )
        cut = matcher.cut(completion.output_ids)
        if cut is None:
            return completion
        end, matched = cut
        return Completion(
            output_ids=completion.output_ids[:end],
            log_probs=completion.log_probs[:end],
            finish=FinishReason("stop", matched=matched),
            cached_tokens=completion.cached_tokens,
            prompt_tokens=completion.prompt_tokens,
            weight_version=completion.weight_version,
        )

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
        """``/abort_request`` for what was sent to ``url``; through a router, to every worker
        (sglang-router answers 404 for it)."""
        body = {"rid": rid, "abort_all": abort_all}
        if self.routing != "router":
            await self._http.post(url, "/abort_request", body, {})
            return
        await asyncio.gather(
            *(self._http.post(u, "/abort_request", body, {}) for u in self._control)
        )

    async def _abort_quietly(self, url: str, rid: str) -> None:
        """Best effort: a server that cannot be reached has nothing running for us."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._abort(url, rid), timeout=self.connect_timeout)

    # ------------------------------------------------------------------ control
    # (the weight updates and pauses: WeightSyncCalls, in sglang_weights.py)

    def weight_sync(self, source: PolicySource) -> SGLangWeightSync | SGLangGroupSync:
        """The trainer's weight sync, of the kind this client was made with
        (``weight_sync=``): the policy pushed from disk after every update
        (:class:`SGLangWeightSync`), or broadcast over a process group the servers join
        (:class:`~treegrpo.engine.sglang_group.SGLangGroupSync`); the client closes the
        group when it closes."""
        if self.weight_sync_kind == "disk":
            return SGLangWeightSync(self, source)
        sync = SGLangGroupSync(self, source, address=self._sync_address, port=self._sync_port)
        self._groups.append(sync)
        return sync

    @property
    def control_urls(self) -> list[str]:
        """The servers that take control calls (weight updates, aborts): the ``urls``, or
        with ``routing="router"`` the workers behind the router."""
        return list(self._control)

    async def flush_cache(self) -> None:
        """``POST /flush_cache`` on every control URL; SGLang refuses (400) unless idle."""
        await self._ensure_started()
        await asyncio.gather(*(self._control_post(u, "/flush_cache", {}) for u in self._control))
        for server in self._servers:
            server.cache.reset()

    async def server_info(self, url: str | None = None) -> dict[str, Any]:
        """``GET /server_info`` of ``url`` (default: the first server)."""
        await self._ensure_started()
        info = await self._http.get(_normalize_url(url or self.urls[0]), "/server_info")
        return info if isinstance(info, dict) else {"value": info}

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        """``GET /model_info`` of ``url`` (default: the first server)."""
        await self._ensure_started()
        info = await self._http.get(_normalize_url(url or self.urls[0]), "/model_info")
        return info if isinstance(info, dict) else {"value": info}

    async def _control_post(self, url: str, path: str, body: dict[str, Any]) -> Any:
        """A control POST: not retried (a weight update or a group join must not run twice);
        ``{"success": false}`` raises :class:`ServerControlError`."""
        try:
            payload = await self._http.post(url, path, body, {}, control=True)
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
