"""A retriever HTTP server speaking Search-R1's protocol (``treegrpo serve-retriever``).

    GET  /health    -> {"status": "ok", "documents": N, "retriever": "BM25Retriever"}
    POST /retrieve  {"queries": [...], "topk": 3, "return_scores": true}
                    -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}

Without ``return_scores`` (default false, as in Search-R1) each per-query list holds the
documents themselves. ``topk`` defaults to the server's ``--topk``. A bad request (including a
body nested too deeply to decode) gets HTTP 400 with ``{"error": {"message": ...}}``; a failure
inside the retriever, HTTP 500 with the same shape (clients retry a 5xx, never a 4xx).

Retrieval is CPU work, so it runs in a thread pool, off the event loop; at most
``max_concurrency`` requests retrieve at once and the rest wait their turn, so a burst queues
instead of piling threads on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from treegrpo.env.types import Document, Retriever
from treegrpo.exceptions import TreeGRPOError
from treegrpo.httpserver import base_url, start_app_in_thread

__all__ = [
    "add_subcommand",
    "create_app",
    "serve",
    "serving",
    "start_app_in_thread",
    "start_server_in_thread",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000


class _Limits:
    def __init__(self, topk: int, max_topk: int, max_queries: int, max_concurrency: int) -> None:
        self.topk = topk
        self.max_topk = max_topk
        self.max_queries = max_queries
        self.max_concurrency = max_concurrency
        self.executor: ThreadPoolExecutor | None = None
        self.slots: asyncio.Semaphore | None = None


_RETRIEVER = web.AppKey("retriever", Retriever)
_LIMITS = web.AppKey("limits", _Limits)


class _BadRequest(Exception):
    pass


def create_app(
    retriever: Retriever,
    *,
    topk: int = 3,
    max_topk: int = 1000,
    max_queries: int = 4096,
    max_concurrency: int = 4,
) -> web.Application:
    """The aiohttp application serving ``retriever``.

    Args:
        topk: documents per query when a request does not say.
        max_topk: the largest ``topk`` a request may ask for (larger gets HTTP 400).
        max_queries: the most queries one request may carry (more gets HTTP 400).
        max_concurrency: requests retrieving at once (threads in the pool); others wait.
    """
    for name, value in (("topk", topk), ("max_topk", max_topk), ("max_queries", max_queries)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    app = web.Application(middlewares=[_json_errors])
    app[_RETRIEVER] = retriever
    app[_LIMITS] = _Limits(topk, max_topk, max_queries, max_concurrency)
    app.router.add_get("/health", _health)
    app.router.add_post("/retrieve", _retrieve)
    app.on_startup.append(_start_pool)
    app.on_cleanup.append(_stop_pool)
    return app


async def _start_pool(app: web.Application) -> None:
    limits = app[_LIMITS]
    limits.executor = ThreadPoolExecutor(
        max_workers=limits.max_concurrency, thread_name_prefix="treegrpo-retrieve"
    )
    limits.slots = asyncio.Semaphore(limits.max_concurrency)


async def _stop_pool(app: web.Application) -> None:
    executor = app[_LIMITS].executor
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)


async def _health(request: web.Request) -> web.Response:
    retriever = request.app[_RETRIEVER]
    size = len(retriever) if hasattr(retriever, "__len__") else None
    return web.json_response(
        {"status": "ok", "documents": size, "retriever": type(retriever).__name__}
    )


async def _retrieve(request: web.Request) -> web.Response:
    limits = request.app[_LIMITS]
    try:
        body = await request.json()
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return _error(400, f"body must be JSON ({e})")
    except RecursionError:  # the decoder recurses once per level of nesting
        return _error(400, "body is nested too deeply; send " + _EXAMPLE)
    try:
        queries, topk, with_scores = _parse_request(body, limits)
    except _BadRequest as e:
        return _error(400, str(e))
    if not queries:
        return web.json_response({"result": []})
    assert limits.slots is not None
    async with limits.slots:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            limits.executor, request.app[_RETRIEVER].retrieve, queries, topk
        )
    return web.json_response(
        {"result": [[_hit(d, with_scores) for d in docs] for docs in results]},
        dumps=_dumps,
    )


_EXAMPLE = '{"queries": ["who wrote Hamlet"], "topk": 3, "return_scores": true}'


def _parse_request(body: Any, limits: _Limits) -> tuple[list[str], int, bool]:
    example = _EXAMPLE
    if not isinstance(body, dict):
        raise _BadRequest(f"body must be a JSON object like {example}")
    if "queries" not in body:
        raise _BadRequest(f"missing 'queries'; send {example}")
    queries = body["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise _BadRequest("'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise _BadRequest(
            f"{len(queries)} queries in one request; the limit is {limits.max_queries}: "
            "split them into batches"
        )
    topk = body.get("topk", limits.topk)
    if topk is None:
        topk = limits.topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
        raise _BadRequest(f"'topk' must be an integer from 1 to {limits.max_topk}, got {topk!r}")
    with_scores = body.get("return_scores", False)
    if not isinstance(with_scores, bool):
        raise _BadRequest(f"'return_scores' must be true or false, got {with_scores!r}")
    return queries, topk, with_scores


def _hit(doc: Document, with_scores: bool) -> dict[str, Any]:
    if with_scores:
        return {"document": doc.to_json(), "score": doc.score}
    return doc.to_json()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error answers ``{"error": {"message": ...}}``, including aiohttp's own (404, 405,
    413), so a client has one shape to read."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, f"{e.reason}: {request.method} {request.path}")
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("retrieval failed for %s %s", request.method, request.path)
        return _error(500, f"retriever failed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- running


def start_server_in_thread(
    retriever: Retriever, host: str = "127.0.0.1", port: int = 0, **app_options: Any
) -> tuple[str, Callable[[], None]]:
    """Serve ``retriever`` from a background thread; for tests and single-process runs.

    ``port=0`` picks a free port. Returns ``(url, stop)``: the server's base URL
    (``http://127.0.0.1:PORT``, ready for :class:`HttpRetriever`) and a function that shuts it
    down and waits for the thread. ``app_options`` go to :func:`create_app`.
    """
    return start_app_in_thread(create_app(retriever, **app_options), host, port)


@contextlib.contextmanager
def serving(
    retriever: Retriever, host: str = "127.0.0.1", port: int = 0, **app_options: Any
) -> Iterator[str]:
    """``with serving(retriever) as url: ...``: :func:`start_server_in_thread`, stopped on exit."""
    url, stop = start_server_in_thread(retriever, host, port, **app_options)
    try:
        yield url
    finally:
        stop()


def serve(
    corpus: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    retriever: str = "bm25",
    topk: int = 3,
    cache_dir: str | os.PathLike[str] | None = None,
    max_concurrency: int = 4,
    device: str | None = None,
) -> None:
    """Index ``corpus`` (or load its cached index) and serve it until SIGINT or SIGTERM."""
    from treegrpo.env.retrievers import load_retriever

    print(f"loading the {retriever} index of {corpus} ...", flush=True)
    options: dict[str, Any] = {"cache_dir": cache_dir}
    if device is not None:
        options["device"] = device
    local = load_retriever(retriever, corpus, **options)
    app = create_app(local, topk=topk, max_concurrency=max_concurrency)
    source = "loaded from" if getattr(local, "loaded_from_cache", False) else "built; cached in"
    cache = getattr(local, "cache_path", None)
    if cache is not None:
        print(f"index {source} {cache}", flush=True)
    asyncio.run(_serve_forever(app, host, port, len(local), retriever, topk))


async def _serve_forever(
    app: web.Application, host: str, port: int, size: int, kind: str, topk: int
) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]
        print(
            f"serving {size:,} documents on {base_url(host, bound)} ({kind}, top {topk}; "
            "POST /retrieve, GET /health); Ctrl+C to stop",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping", flush=True)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- command line


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve-retriever`` on the ``treegrpo`` command's subparsers
    (``parser.add_subparsers(...)``); it sets ``run`` to a function of the parsed args."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve-retriever",
        help="serve a corpus over Search-R1's /retrieve HTTP protocol",
        description=_DESCRIPTION,
    )
    _add_arguments(parser)
    return parser


_DESCRIPTION = (
    'Index a JSONL corpus (one {"id", "contents"} object a line, wiki-18 format) and serve it '
    "on POST /retrieve, the protocol of Search-R1's retrieval server. The index is cached, so a "
    "second start is fast."
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, type=Path, help="JSONL corpus file")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--retriever",
        choices=("bm25", "dense"),
        default="bm25",
        help="bm25 (default) or dense (all-MiniLM-L6-v2; needs treegrpo[dense])",
    )
    parser.add_argument(
        "--topk", type=int, default=3, help="documents per query when a request omits topk"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="index cache root (default $TREEGRPO_CACHE, else ~/.cache/treegrpo)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=4,
        help="requests retrieving at once; more wait in line (default 4)",
    )
    parser.add_argument(
        "--device", default=None, help="dense only: torch device (default cuda if available)"
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        serve(
            args.corpus,
            host=args.host,
            port=args.port,
            retriever=args.retriever,
            topk=args.topk,
            cache_dir=args.cache_dir,
            max_concurrency=args.max_concurrency,
            device=args.device,
        )
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        in_use = e.errno == errno.EADDRINUSE
        hint = " (is another server on that port? pass --port)" if in_use else ""
        print(f"treegrpo serve-retriever: error: {e}{hint}", file=sys.stderr)
        return 1
    except (TreeGRPOError, ValueError) as e:
        print(f"treegrpo serve-retriever: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treegrpo.env.retrievers.server --corpus FILE``: the subcommand alone, until
    it is wired into ``treegrpo``."""
    parser = argparse.ArgumentParser(prog="treegrpo serve-retriever", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
