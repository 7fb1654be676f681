"""Routing over several servers: tree affinity keeps a prompt group on one server, round robin
spreads requests, and the real sglang-router (``cache_aware``) in front of two stand-ins keeps
each group on the worker that holds its prefix (cached tokens reported through the router)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from treegrpo.engine.base import GenerateRequest, SamplingParams
from treegrpo.engine.sglang_client import SGLangClient
from treegrpo.testing.sglang_sim import SimParams, start_sim_server
from treegrpo.testing.sglang_standin import start_standin_server
from treegrpo.testing.tiny import tiny_policy

PARAMS = SimParams(vocab_size=300, filler_low=10, output_median=3, eos_token_id=2)


@pytest.fixture
def sims() -> Iterator[list[Any]]:
    made = [start_sim_server(PARAMS, time_scale=float("inf")) for _ in range(3)]
    yield made
    for _, _, stop in made:
        stop()


def served_by(sims: list[Any]) -> dict[int, set[int]]:
    """Prompt group (the prompt's first token) -> the servers that served it."""
    out: dict[int, set[int]] = {}
    for index, (sim, _, _) in enumerate(sims):
        for first in sim.first_tokens:
            out.setdefault(first, set()).add(index)
    return out


def requests(groups: int, per_group: int) -> list[GenerateRequest]:
    sampling = SamplingParams(max_new_tokens=4)
    return [
        GenerateRequest([100 + g, 5, 6, k + 10], sampling, key=f"group-{g}")
        for g in range(groups)
        for k in range(per_group)
    ]


def record_first_tokens(sims: list[Any]) -> None:
    """Let each simulator remember the first token of every prompt it prefilled."""
    for sim, _, _ in sims:
        sim.first_tokens = []
        original = sim._parse

        def parse(body: Any, sim: Any = sim, original: Any = original) -> Any:
            job, single = original(body)
            sim.first_tokens.extend(p[0] for p in job.prompts)
            return job, single

        sim._parse = parse


def test_tree_affinity_keeps_every_group_on_one_server(sims):
    record_first_tokens(sims)

    async def go() -> None:
        async with SGLangClient([u for _, u, _ in sims], vocab_size=300) as client:
            await client.generate(requests(groups=12, per_group=6))

    asyncio.run(go())
    where = served_by(sims)
    assert len(where) == 12 and all(len(s) == 1 for s in where.values())
    assert len({next(iter(s)) for s in where.values()}) > 1  # the groups spread over servers


def test_round_robin_spreads_requests_whatever_their_key(sims):
    record_first_tokens(sims)

    async def go() -> None:
        urls = [u for _, u, _ in sims]
        async with SGLangClient(urls, vocab_size=300, routing="round_robin") as client:
            await client.generate(requests(groups=2, per_group=30))

    asyncio.run(go())
    load = Counter(len(sim.first_tokens) for sim, _, _ in sims)
    assert load == Counter({20: 3})  # 60 requests, 20 each
    assert all(len(s) == 3 for s in served_by(sims).values())  # a group on every server


# --------------------------------------------------------------------------- the real router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def router_and_workers(tmp_path: Path) -> Iterator[tuple[str, list[Any]]]:
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip(
            "sglang_router is not installed: `pip install sglang-router==0.3.2` (make develop "
            "installs it with the dev extra)"
        )
    policy = tiny_policy(seed=0)
    workers = [start_standin_server(policy, model_path=str(tmp_path)) for _ in range(2)]
    port, metrics = free_port(), free_port()
    log = open(tmp_path / "router.log", "w")
    command = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
        "--worker-urls", *[url for _, url, _ in workers],
        "--policy", "cache_aware",
    ]  # fmt: skip
    router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, router, tmp_path / "router.log")
        yield url, workers
    finally:
        router.terminate()
        try:
            router.wait(timeout=10)
        except subprocess.TimeoutExpired:
            router.kill()
        log.close()
        for _, _, stop in workers:
            stop()


def wait_healthy(url: str, router: subprocess.Popen[bytes], log: Path) -> None:
    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + 60
    while not asyncio.run(healthy()):
        if router.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sglang_router did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_the_real_router_keeps_prompt_groups_on_the_worker_holding_their_prefix(
    router_and_workers,
):
    url, workers = router_and_workers
    _, tok = tiny_policy(seed=0)
    groups = [
        list(tok.encode(f"question number {g} about the bridge and the city")) for g in range(4)
    ]
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0)

    async def go() -> list[list[Any]]:
        client = SGLangClient(
            url, tokenizer=tok, routing="router", control_urls=[u for _, u, _ in workers]
        )
        async with client:
            first = await client.generate(
                [GenerateRequest(p, sampling, key=f"group-{g}") for g, p in enumerate(groups)]
            )
            # Each group's children: prompt + its output + an observation, twice over.
            children = [
                GenerateRequest([*p, *outs[0].output_ids, 5, 6, 7], sampling, key=f"group-{g}")
                for g, (p, outs) in enumerate(zip(groups, first, strict=True))
                for _ in range(2)
            ]
            second = await client.generate(children)
            await client.abort("tg-nothing")  # to the workers: the router 404s it
            return [first, second]

    first, second = asyncio.run(go())
    for g, outs in enumerate(first):  # (groups share their first words, so some reuse)
        assert outs[0].cached_tokens < len(groups[g]) - 1
    for k, outs in enumerate(second):
        g = k // 2
        parent = first[g][0]
        # The router sent the child to the worker that served its parent: the prefix was there.
        assert outs[0].cached_tokens >= len(groups[g]) + len(parent.output_ids) - 1
    answered = [server.answered for server, _, _ in workers]
    for g, prompt in enumerate(groups):
        holders = [i for i, a in enumerate(answered) if any(p[: len(prompt)] == prompt for p in a)]
        assert len(holders) == 1, f"group {g} was served by workers {holders}"
