"""The control endpoints both SGLang doubles take from testing/sglang_control.py: the same
codes, bodies and flow on each, with each double's own wording (pinned here as it was before
the two were written once)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("aiohttp")

import aiohttp
from treegrpo.testing.sglang_sim import SimParams, start_sim_server
from treegrpo.testing.sglang_standin import start_standin_server

WORDING = {
    "sim": {
        "abort_all": "aborted (abort_all)",
        "abort_rid": "aborted by request",
        "pause_abort": "paused (abort)",
        "paused": "paused ({mode})",
        "continued": "continued",
        "flush_busy": "Cache not flushed: there are requests running or waiting",
    },
    "standin": {
        "abort_all": "aborted by /abort_request (abort_all)",
        "abort_rid": "aborted by /abort_request",
        "pause_abort": "aborted by /pause_generation",
        "paused": "Generation paused ({mode}).",
        "continued": "Generation continued.",
        "flush_busy": "Cache not flushed: requests are running or waiting (flush only when idle).",
    },
}


@pytest.fixture(params=["sim", "standin"])
def double(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, str]]:
    """``(kind, server, url)`` of a fresh double."""
    kind = request.param
    if kind == "sim":
        server, url, stop = start_sim_server(
            SimParams(vocab_size=100, filler_low=10), time_scale=math.inf
        )
    else:
        from treegrpo.testing.tiny import tiny_policy

        server, url, stop = start_standin_server(tiny_policy(seed=0))
    yield kind, server, url
    stop()


async def post(url: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as r:
        raw = await r.text()
    return r.status, (json.loads(raw) if raw else None)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out waiting")


def generate(url: str, rid: str) -> asyncio.Future[tuple[int, Any]]:
    body = {"input_ids": [3, 4, 5], "rid": rid, "sampling_params": {"max_new_tokens": 4}}
    return asyncio.ensure_future(post(url, "/generate", body))


def test_pause_abort_continue_and_flush(double):
    kind, server, url = double
    words = WORDING[kind]

    def ok(message: str) -> tuple[int, Any]:
        return 200, {"success": True, "message": message}

    def refused(message: str) -> tuple[int, Any]:
        return 400, {"success": False, "message": message}

    async def go() -> None:
        paused = words["paused"].format(mode="in_place")
        assert await post(url, "/pause_generation", {"mode": "in_place"}) == ok(paused)
        first, second = generate(url, "job-1"), generate(url, "job-2")
        await until(lambda: len(server._waiting) == 2)  # paused: they wait
        assert await post(url, "/flush_cache", {}) == refused(words["flush_busy"])
        assert await post(url, "/abort_request", {"rid": 5}) == (
            400,
            {"error": {"message": "rid must be a string"}},
        )
        assert await post(url, "/abort_request", {"rid": ""}) == (200, None)  # aborts nothing
        assert await post(url, "/abort_request", {"rid": "job-1"}) == (200, None)
        status, answer = await first
        assert status == 200 and answer["output_ids"] == []
        assert answer["meta_info"]["finish_reason"] == {
            "type": "abort",
            "message": words["abort_rid"],
        }
        assert not second.done() and len(server._waiting) == 1
        bad = "mode must be abort, retract or in_place, got 'later'"
        assert await post(url, "/pause_generation", {"mode": "later"}) == refused(bad)
        paused = words["paused"].format(mode="abort")
        assert await post(url, "/pause_generation", {}) == ok(paused)  # abort, the default
        status, answer = await second
        assert answer["meta_info"]["finish_reason"]["message"] == words["pause_abort"]
        assert await post(url, "/continue_generation", {}) == ok(words["continued"])
        assert await post(url, "/flush_cache", {}) == ok("Cache flushed.")
        # Running again: a request now finishes on its own.
        status, answer = await generate(url, "job-3")
        assert status == 200 and answer["meta_info"]["finish_reason"]["type"] != "abort"

    asyncio.run(go())


def test_abort_all(double):
    kind, server, url = double

    async def go() -> None:
        await post(url, "/pause_generation", {"mode": "retract"})
        jobs = [generate(url, f"job-{i}") for i in range(3)]
        await until(lambda: len(server._waiting) == 3)
        assert await post(url, "/abort_request", {"abort_all": True}) == (200, None)
        for job in jobs:
            status, answer = await job
            assert status == 200
            assert answer["meta_info"]["finish_reason"] == {
                "type": "abort",
                "message": WORDING[kind]["abort_all"],
            }
        assert not server._waiting and not server._running

    asyncio.run(go())
