"""A client for a remote retriever speaking Search-R1's ``POST /retrieve`` protocol.

    POST /retrieve  {"queries": ["q1", "q2"], "topk": 3, "return_scores": true}
    ->  {"result": [[{"document": {"id": "12", "contents": "..."}, "score": 12.3}, ...], ...]}

Servers that ignore ``return_scores`` and answer with the documents themselves
(``{"result": [[{"id": ..., "contents": ...}, ...], ...]}``) are read too (scores are then
None). That covers Search-R1's ``retrieval_server.py``, verl's search tool servers and
``treegrpo serve-retriever``.

The client is synchronous and thread-safe (stdlib ``urllib``, one connection per request), so
:class:`~treegrpo.env.SearchTool` can call it from worker threads.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from treegrpo.env.retrievers._common import check_request
from treegrpo.env.retrievers.errors import (
    RetrieverResponseError,
    RetrieverTimeoutError,
    RetrieverUnavailableError,
)
from treegrpo.env.types import Document
from treegrpo.exceptions import InvalidArgumentError

__all__ = ["HttpRetriever"]

_START_HINT = (
    "Is the server running? Start one with `treegrpo serve-retriever --corpus FILE --port 8000`."
)


class HttpRetriever:
    """Top-k documents from a ``/retrieve`` server; implements :class:`treegrpo.env.Retriever`.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/retrieve`` is appended when the URL
            has no path) or the full endpoint ``http://127.0.0.1:8000/retrieve``.
        timeout: seconds to wait for each request (connect and read).
        retries: extra attempts after a connection error, a timeout or an HTTP 5xx; an HTTP 4xx
            is the caller's mistake and is never retried.
        backoff: seconds before the first retry; each later retry waits twice as long.
        batch_size: the most queries sent in one request; longer lists are split.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30,
        retries: int = 3,
        backoff: float = 0.5,
        batch_size: int = 64,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgumentError(
                f"retriever URL must be http(s)://HOST[:PORT][/retrieve], got {url!r} "
                "(e.g. http://127.0.0.1:8000/retrieve)"
            )
        if parts.path in ("", "/"):
            parts = parts._replace(path="/retrieve")
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {timeout}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an integer >= 0, got {retries!r}")
        if not backoff >= 0:
            raise InvalidArgumentError(f"backoff must be >= 0 seconds, got {backoff}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.url = urllib.parse.urlunsplit(parts)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.batch_size = batch_size
        # A proxy from the environment (http_proxy) must not capture a server on this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        """The top ``topk`` documents for each query, with scores when the server sends them.

        Raises:
            RetrieverUnavailableError: the server could not be reached, or kept failing with
                HTTP 5xx, through every retry (:class:`RetrieverTimeoutError` if it timed out).
            RetrieverResponseError: the server rejected the request (HTTP 4xx) or answered
                with something that is not a ``/retrieve`` result.
        """
        check_request(queries, topk)
        queries = list(queries)
        results: list[list[Document]] = []
        for start in range(0, len(queries), self.batch_size):
            batch = queries[start : start + self.batch_size]
            body = {"queries": batch, "topk": topk, "return_scores": True}
            payload = self._post(json.dumps(body).encode())
            results.extend(self._parse(payload, len(batch), topk))
        return results

    def probe(self) -> None:
        """Check that the server answers: one one-query search, retried as any search is.
        A run calls it at start-up, so a dead or wrong URL is found before any model loads,
        not at the first search. Raises what :meth:`retrieve` raises."""
        self.retrieve(["treegrpo start-up check"], topk=1)

    def _post(self, body: bytes) -> bytes:
        """POST ``body`` to the server and return the response body, retrying what can be
        retried, with exponential backoff."""
        attempts = self.retries + 1
        started = time.monotonic()
        failure = ""
        timed_out = False
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500:
                    raise RetrieverResponseError(
                        f"retriever at {self.url} rejected the request with HTTP {e.code}: "
                        f"{message}",
                        status=e.code,
                    ) from None
                failure, timed_out = f"HTTP {e.code}: {message}", False
            except urllib.error.URLError as e:  # refused, unknown host, or connect timeout
                timed_out = isinstance(e.reason, TimeoutError)
                failure = _describe(e.reason)
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                # A read timeout, a reset or closed connection, a truncated response.
                timed_out = isinstance(e, TimeoutError)
                failure = _describe(e)
        elapsed = time.monotonic() - started
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f} s"
        if timed_out:
            raise RetrieverTimeoutError(
                f"retriever at {self.url} did not answer within {self.timeout:g} s ({tries}). "
                "Raise the timeout, lower batch_size, or check the server's load."
            )
        raise RetrieverUnavailableError(
            f"retriever at {self.url} is unavailable ({tries}; last error: {failure}). "
            + _START_HINT
        )

    def _parse(self, body: bytes, num_queries: int, topk: int) -> list[list[Document]]:
        def bad(what: str) -> RetrieverResponseError:
            return RetrieverResponseError(
                f"retriever at {self.url} sent a malformed response: {what}; expected "
                '{"result": [[{"document": {"id": ..., "contents": ...}, "score": ...}, ...], '
                "...]} with one list per query",
                status=200,
            )

        try:
            payload = json.loads(body)
        except ValueError:
            raise bad(f"not JSON ({_preview(body)})") from None
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, list):
            raise bad(f"no 'result' list in {_preview(body)}")
        if len(result) != num_queries:
            raise bad(f"{len(result)} result lists for {num_queries} queries")
        out: list[list[Document]] = []
        for q, hits in enumerate(result):
            if not isinstance(hits, list):
                raise bad(f"result {q} is not a list")
            docs = []
            for hit in hits[:topk]:
                doc = _document(hit)
                if doc is None:
                    raise bad(f"result {q} holds {_preview(json.dumps(hit).encode())}")
                docs.append(doc)
            out.append(docs)
        return out

    def __repr__(self) -> str:
        return (
            f"HttpRetriever(url={self.url!r}, timeout={self.timeout:g}, retries={self.retries}, "
            f"batch_size={self.batch_size})"
        )


def _document(hit: Any) -> Document | None:
    """A result entry, ``{"document": {...}, "score": s}`` or the document itself, as a
    Document; None when it is neither. ``id`` may be missing (Search-R1's client never reads
    it) and is then ``""``."""
    if not isinstance(hit, dict):
        return None
    doc, score = (hit["document"], hit.get("score")) if "document" in hit else (hit, None)
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        return None
    doc_id = doc.get("id", "")
    if isinstance(score, bool) or not isinstance(score, (int, float, type(None))):
        return None
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return None
    return Document(
        id=str(doc_id), contents=doc["contents"], score=None if score is None else float(score)
    )


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's explanation of an HTTP error: our ``{"error": {"message": ...}}``,
    FastAPI's ``{"detail": ...}``, or the start of the body."""
    try:
        body = error.read()
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        error.close()
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if "detail" in payload:
            return json.dumps(payload["detail"])[:500]
    return _preview(body) if body else str(error.reason)


def _describe(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


def _preview(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
