"""The SGLang client's transport: HTTP with retries, answers read into typed errors.

- :class:`Transport` holds the ``aiohttp`` session. :meth:`Transport.post` makes one POST and
  raises :class:`Retriable` on connection errors, timeouts and HTTP 5xx (the caller decides
  whether to try again: ``/generate`` is retried with a new rid, control calls never);
  :meth:`Transport.get` retries by itself. HTTP 4xx is never retried
  (:class:`~treegrpo.engine.errors.ServerRequestError`).
- Backoff: ``backoff`` seconds before the first retry, doubling up to ``max_backoff``;
  :func:`retries_for_window` turns "how long may a server fail" into a number of retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import aiohttp

from treegrpo.engine.errors import (
    EngineClosedError,
    ServerControlError,
    ServerRequestError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from treegrpo.exceptions import InvalidArgumentError

__all__ = [
    "START_HINT",
    "Retriable",
    "Transport",
    "normalize_url",
    "preview",
    "retries_for_window",
    "stable_hash",
]

START_HINT = (
    "Is the server running? Print a launch line with `treegrpo sglang command --model PATH`."
)


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


class Retriable(Exception):
    """An attempt that failed in a way worth retrying. ``refused``: nothing listens there;
    ``dropped``: the connection broke (a server killed mid-request, a reset). Either way the
    server is gone for now (``gone``); a timeout or an HTTP 5xx came from a live server."""

    def __init__(
        self,
        message: str,
        *,
        timed_out: bool = False,
        refused: bool = False,
        dropped: bool = False,
    ) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.refused = refused
        self.dropped = dropped

    @property
    def gone(self) -> bool:
        return self.refused or self.dropped


class Transport:
    """HTTP to the servers: one session, ``timeout`` seconds per request and
    ``connect_timeout`` to connect; ``retries`` extra attempts for GETs (see the module
    docstring)."""

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        """The session (made on first use)."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout, sock_connect=self.connect_timeout
                ),
            )
        return self.session

    async def close(self) -> None:
        """Close the session (a later :meth:`open` makes a new one)."""
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)

    async def post(
        self,
        url: str,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        *,
        control: bool = False,
    ) -> Any:
        """One POST. Raises :class:`Retriable` for connection errors, timeouts and 5xx,
        :class:`ServerRequestError` for 4xx (and for a control endpoint's 400
        ``{"success": false}``, :class:`ServerControlError`)."""
        if self.session is None:
            raise EngineClosedError("the client's HTTP session is closed")
        endpoint = url + path
        try:
            async with self.session.post(endpoint, json=body, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ConnectionTimeoutError as e:  # no connection at all: a host gone
            raise Retriable(f"cannot connect ({e or 'timed out'})", refused=True) from None
        except asyncio.TimeoutError:
            raise Retriable(f"no answer within {self.timeout:g} s", timed_out=True) from None
        except aiohttp.ClientConnectorError as e:
            raise Retriable(f"cannot connect ({e})", refused=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Retriable(f"{type(e).__name__}: {e}", dropped=True) from None
        return read_answer(endpoint, status, raw, control=control)

    async def ping(self, url: str) -> str | None:
        """One ``GET /health``, not retried, within ``connect_timeout`` seconds: None when
        the server answers 200, else what went wrong."""
        if self.session is None:
            raise EngineClosedError("the client's HTTP session is closed")
        try:
            async with self.session.get(
                url + "/health", timeout=aiohttp.ClientTimeout(total=self.connect_timeout)
            ) as response:
                await response.read()
                status = response.status
        except asyncio.TimeoutError:
            return f"GET /health: no answer within {self.connect_timeout:g} s"
        except aiohttp.ClientConnectorError as e:
            return f"cannot connect ({e})"
        except (aiohttp.ClientError, OSError) as e:
            return f"GET /health: {type(e).__name__}: {e}"
        return None if status == 200 else f"GET /health answered HTTP {status}"

    async def get(self, url: str, path: str, *, parse: bool = True) -> Any:
        """A GET, retried like ``/generate``; :class:`ServerUnavailableError` names the URL."""
        if self.session is None:
            raise EngineClosedError("call `await client.start()` first")
        endpoint = url + path
        failure: Retriable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.delay(attempt))
            try:
                async with self.session.get(endpoint) as response:
                    raw = await response.read()
                    status = response.status
            except asyncio.TimeoutError:
                failure = Retriable(f"no answer within {self.timeout:g} s", timed_out=True)
                continue
            except (aiohttp.ClientError, OSError) as e:
                failure = Retriable(f"{type(e).__name__}: {e}")
                continue
            if not parse:
                if status >= 500:
                    failure = Retriable(f"HTTP {status}: {preview(raw.decode(errors='replace'))}")
                    continue
                if status >= 400:
                    read_answer(endpoint, status, raw, control=False)  # raises
                return None
            try:
                return read_answer(endpoint, status, raw, control=False)
            except Retriable as e:
                failure = e
        timed_out = failure is not None and failure.timed_out
        raise (ServerTimeoutError if timed_out else ServerUnavailableError)(
            f"SGLang server {url} is unavailable: GET {path} failed "
            f"({self.retries + 1} attempts; last error: {failure}). " + START_HINT
        )


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(
            f"server URL must be http(s)://HOST:PORT, got {url!r} (e.g. http://127.0.0.1:30000)"
        )
    return url


def stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same in every process (``hash()`` is salted per run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def read_answer(endpoint: str, status: int, raw: bytes, *, control: bool) -> Any:
    """The JSON of an answer, or the typed error its status calls for."""
    text = raw.decode("utf-8", errors="replace")
    try:
        payload: Any = json.loads(text) if text.strip() else None
    except ValueError:
        payload = None
        if status < 400 and control:
            return {"message": text}  # e.g. SGLang's plain-text /flush_cache answer
    if status >= 500:
        raise Retriable(f"HTTP {status}: {preview(text)}")
    if status >= 400:
        message = error_message(payload, text)
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
            f"{endpoint} answered with non-JSON: {preview(text)}", url=endpoint
        )
    return payload


def error_message(payload: Any, text: str) -> str:
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
    return preview(text)


def preview(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
