"""An aiohttp app served on its own event loop in a daemon thread: the one helper for every
server a process runs beside its own work (the retriever server's in-thread mode, the SGLang
stand-in, fake servers in tests)."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["base_url", "start_app_in_thread"]


def base_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def start_app_in_thread(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 5,
    handler_cancellation: bool = False,
    on_cleanup: Callable[[], None] | None = None,
    name: str = "treegrpo-http-server",
) -> tuple[str, Callable[[], None]]:
    """Run any aiohttp ``app`` on its own event loop in a daemon thread (tests use it for fake
    servers). Returns ``(base url, stop)``; ``stop`` waits at most ``shutdown_timeout`` seconds
    for requests in flight, then closes everything and calls ``on_cleanup`` (also when the
    server fails to start, before the error is raised here)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        handler_cancellation=handler_cancellation,
    )
    started = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            state["port"] = runner.addresses[0][1]
        except BaseException as e:
            state["error"] = e
        else:
            started.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            if on_cleanup is not None:
                on_cleanup()
            loop.close()
            started.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        thread.join()
        raise state["error"]

    def stop() -> None:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join()

    return base_url(host, state["port"]), stop
