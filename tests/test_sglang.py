"""The SGLang client against the stand-in server (real HTTP, the tiny random Llama through the
embedded engine) and against fake servers that fail on purpose."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from aiohttp import web
from sglang_helpers import Standin
from treegrpo import InvalidArgumentError, TreeGRPOError
from treegrpo.engine.base import Completion, Engine, GenerateRequest, SamplingParams
from treegrpo.engine.errors import (
    InvalidTokenError,
    ServerControlError,
    ServerRequestError,
    ServerUnavailableError,
    StaleWeightsError,
)
from treegrpo.engine.sglang_client import (
    ROUTING_HEADER,
    SGLangClient,
    add_subcommand,
    launch_command,
    probe,
    retries_for_window,
)
from treegrpo.env.retrievers.server import start_app_in_thread
from treegrpo.testing.sglang_standin import (
    SGLangStandin,
    join_weight_update_group,
    start_standin_server,
)
from treegrpo.testing.tiny import tiny_model, tiny_policy

# Long requests are greedy: the random model then never says EOS early (a sampled one may), so a
# test can abort, pause or kill them mid-generation for sure.
GREEDY = dict(temperature=0.0)
LONG = {"max_new_tokens": 1500, "temperature": 0.0}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    return tiny_policy(seed=0)


@pytest.fixture(scope="module")
def standin(policy: tuple[Any, Any]) -> Iterator[Standin]:
    s = Standin(policy)
    yield s
    s.stop()


def client_for(urls: str | list[str], policy: tuple[Any, Any], **options: Any) -> SGLangClient:
    return SGLangClient(urls, tokenizer=policy[1], **options)


def prompt(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait (polling) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def running(standin: Standin, count: int = 1) -> Callable[[], bool]:
    """True once ``count`` samples run on ``standin`` and each has generated a token."""

    def check() -> bool:
        flight = standin.server.in_flight()
        return len(flight) >= count and all(v > 0 for v in flight.values())

    return check


async def post(url: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as r:
        raw = await r.text()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw


# --------------------------------------------------------------------------- fake servers


class FakeSGLang:
    """An aiohttp server whose ``/generate`` answers as ``respond(call number, body)`` says;
    records every body and header set. ``/health`` answers 200, the rest 404."""

    def __init__(self, respond: Callable[[int, dict[str, Any], web.Request], Any]) -> None:
        self.respond = respond
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/abort_request", self._ok)
        app.router.add_get("/health", self._ok)
        self.url, self.stop = start_app_in_thread(app, shutdown_timeout=0.1)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.times.append(time.monotonic())
        answer = self.respond(len(self.bodies), body, request)
        if asyncio.iscoroutine(answer):
            answer = await answer
        return answer


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeSGLang]]:
    servers: list[FakeSGLang] = []

    def make(respond: Callable[[int, dict[str, Any], web.Request], Any]) -> FakeSGLang:
        servers.append(FakeSGLang(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def sample(body: dict[str, Any], ids: list[int], finish: dict[str, Any]) -> dict[str, Any]:
    """An SGLang answer entry for ``body`` with output ``ids``."""
    return {
        "text": "",
        "output_ids": ids,
        "meta_info": {
            "id": body["rid"],
            "finish_reason": finish,
            "prompt_tokens": len(body["input_ids"]),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "output_token_logprobs": [[-0.25 * (i + 1), t, None] for i, t in enumerate(ids)],
            "weight_version": "default",
        },
    }


def answer(body: dict[str, Any]) -> web.Response:
    n = body["sampling_params"]["n"]
    entries = [sample(body, [7, 8, 2], {"type": "stop", "matched": 2}) for _ in range(n)]
    return web.json_response(entries[0] if n == 1 else entries)


# --------------------------------------------------------------------------- protocol


def test_request_body_follows_the_contract(fake):
    server = fake(lambda i, body, req: answer(body))
    request = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=9, stop=("</a>",), n=1))

    async def go() -> list[list[Completion]]:
        async with SGLangClient(server.url, vocab_size=100) as client:
            return await client.generate([request, request])

    out = run(go())
    body = server.bodies[0]
    assert body["input_ids"] == [5, 6, 7] and "text" not in body
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1
    assert body["stream"] is False
    assert set(body["sampling_params"]) == {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "stop_token_ids",
        "skip_special_tokens",
        "no_stop_trim",
        "n",
    }
    assert body["sampling_params"]["skip_special_tokens"] is False
    assert body["sampling_params"]["no_stop_trim"] is True
    assert body["sampling_params"]["stop"] == ["</a>"]
    # Logprob triples parsed, stop token kept, finish reason read.
    (c,) = out[0]
    assert c.output_ids == (7, 8, 2)
    assert c.log_probs == (-0.25, -0.5, -0.75)
    assert c.finish.type == "stop" and c.finish.matched == 2
    assert c.prompt_tokens == 3 and c.weight_version == "default"


def test_rids_are_fixed_width_and_never_prefixes(fake):
    server = fake(lambda i, body, req: answer(body))

    async def go() -> None:
        for _ in range(2):  # two clients: their rids differ too
            async with SGLangClient(server.url, vocab_size=100) as client:
                await client.generate([GenerateRequest([1, 2])] * 60)

    run(go())
    rids = [b["rid"] for b in server.bodies]
    assert len(set(rids)) == len(rids) == 120
    assert len({len(r) for r in rids}) == 1
    assert not any(a != b and b.startswith(a) for a in rids for b in rids)


def test_token_ids_beyond_the_vocabulary_are_rejected_before_sending(fake, policy):
    server = fake(lambda i, body, req: answer(body))

    async def go(ids: list[Any]) -> None:
        async with client_for(server.url, policy) as client:
            await client.generate([GenerateRequest([3, 4]), GenerateRequest(ids)])

    vocab = len(policy[1])
    for bad in ([1, vocab], [-1], [1, "7"]):
        with pytest.raises(InvalidTokenError, match=r"request 1: input_ids\[") as e:
            run(go(bad))
        assert isinstance(e.value, TreeGRPOError) and isinstance(e.value, ValueError)
    assert server.bodies == []  # nothing was sent, not even the good request


def test_http_400_is_not_retried(fake):
    def reject(i: int, body: dict[str, Any], req: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "top_p must be in (0, 1]"}}, status=400)

    server = fake(reject)

    async def go() -> None:
        async with SGLangClient(server.url, vocab_size=100, retries=3, backoff=0) as client:
            await client.generate([GenerateRequest([1, 2])])

    with pytest.raises(ServerRequestError, match=r"HTTP 400.*top_p must be in") as e:
        run(go())
    assert e.value.status == 400 and e.value.server_message == "top_p must be in (0, 1]"
    assert len(server.bodies) == 1


def test_5xx_and_dropped_connections_are_retried_with_backoff(fake):
    async def flaky(i: int, body: dict[str, Any], req: web.Request) -> web.StreamResponse:
        if i == 1:
            return web.Response(status=500, text="Internal Server Error")
        if i == 2:
            assert req.transport is not None
            req.transport.close()  # a dropped connection
            await asyncio.sleep(0.05)
            return web.Response(status=503)
        if i == 3:
            return web.Response(status=503, text="overloaded")
        return answer(body)

    server = fake(flaky)

    async def go() -> list[list[Completion]]:
        async with SGLangClient(server.url, vocab_size=100, retries=3, backoff=0.05) as client:
            return await client.generate([GenerateRequest([1, 2], SamplingParams(n=2))])

    out = run(go())
    assert len(out) == 1 and len(out[0]) == 2  # exactly the n samples, once
    assert len(server.bodies) == 4
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[2] >= 0.2  # 0.05, 0.1, 0.2 s
    assert len({b["rid"] for b in server.bodies}) == 4  # a fresh rid per attempt


def test_a_server_that_keeps_failing_raises_after_the_retries(fake):
    server = fake(lambda i, body, req: web.Response(status=502, text="bad gateway"))

    async def go() -> None:
        async with SGLangClient(server.url, vocab_size=100, retries=2, backoff=0) as client:
            await client.generate([GenerateRequest([1, 2])])

    with pytest.raises(ServerUnavailableError, match=r"3 attempts.*HTTP 502") as e:
        run(go())
    assert server.url in str(e.value) and isinstance(e.value, ConnectionError)
    assert len(server.bodies) == 3


def test_health_check_names_the_url_that_failed(fake):
    good = fake(lambda i, body, req: answer(body))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def go() -> None:
        client = SGLangClient([good.url, dead], vocab_size=100, retries=1, backoff=0)
        await client.start()

    with pytest.raises(ServerUnavailableError, match="GET /health") as e:
        run(go())
    assert dead in str(e.value) and good.url not in str(e.value)


def test_router_mode_sends_the_routing_key(fake):
    server = fake(lambda i, body, req: answer(body))

    async def go() -> None:
        async with SGLangClient(server.url, vocab_size=100, routing="router") as client:
            await client.generate([GenerateRequest([1], key="tree-7"), GenerateRequest([2])])

    run(go())
    assert server.headers[0][ROUTING_HEADER] == "tree-7"
    assert ROUTING_HEADER not in server.headers[1]


def test_launch_command_and_subcommand(capsys):
    line = launch_command("/ckpt/m", port=31000)
    assert line.startswith("python -m sglang.launch_server --model-path /ckpt/m")
    for flag in ("--port 31000", "--schedule-policy lpm", "--mem-fraction-static 0.7"):
        assert flag in line
    import argparse

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    args = parser.parse_args(["sglang", "command", "--model", "/ckpt/m", "--dp", "2"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "--dp-size 2" in out and "sglang_router" in out and "--policy cache_aware" in out


# --------------------------------------------------------------------------- the stand-in


def test_client_is_an_engine(standin, policy):
    assert isinstance(client_for(standin.url, policy), Engine)


def test_generate_on_the_standin(standin, policy):
    tok = policy[1]
    ids = prompt(tok, "Question: where was the founder born?")

    async def go() -> list[list[Completion]]:
        async with client_for(standin.url, policy) as client:
            return await client.generate(
                [
                    GenerateRequest(ids, SamplingParams(max_new_tokens=6, **GREEDY)),
                    GenerateRequest(ids, SamplingParams(max_new_tokens=5, n=3)),
                ]
            )

    (greedy,), siblings = run(go())
    assert len(siblings) == 3
    for c in (greedy, *siblings):
        assert all(0 <= t < len(tok) for t in c.output_ids)
        assert len(c.log_probs) == len(c.output_ids)
        assert all(lp <= 0 for lp in c.log_probs)
        assert c.prompt_tokens == len(ids)
        assert c.weight_version == "default"
    assert greedy.finish.type in ("length", "stop")


def test_raw_batch_is_prompt_major_with_logprob_triples(standin, policy):
    tok = policy[1]
    a, b = prompt(tok, "the quick brown fox"), prompt(tok, "<think> I need")
    body = {
        "input_ids": [a, b],
        "sampling_params": {"max_new_tokens": 3, "n": 2, "temperature": 0.7},
        "return_logprob": True,
        "logprob_start_len": -1,
        "rid": ["batch-a", "batch-b"],
    }
    status, entries = run(post(standin.url, "/generate", body))
    assert status == 200 and isinstance(entries, list) and len(entries) == 4
    assert [e["meta_info"]["prompt_tokens"] for e in entries] == [len(a), len(a), len(b), len(b)]
    ids = [e["meta_info"]["id"] for e in entries]
    assert len(set(ids)) == 4 and "batch-a" not in ids  # n > 1: fresh ids
    for e in entries:
        triples = e["meta_info"]["output_token_logprobs"]
        assert [t[1] for t in triples] == e["output_ids"]
        assert all(isinstance(t[0], float) and t[2] is None for t in triples)
        assert isinstance(e["text"], str)


def test_stop_token_ids_and_stop_strings(standin, policy):
    tok = policy[1]
    ids = prompt(tok, "<search> founder of the company </search>")

    async def gen(client: SGLangClient, **params: Any) -> Completion:
        sp = SamplingParams(max_new_tokens=12, **GREEDY, **params)
        [[c]] = await client.generate([GenerateRequest(ids, sp)])
        return c

    async def go() -> tuple[Completion, Completion, Completion]:
        async with client_for(standin.url, policy) as client:
            free = await gen(client)
            stop_id = free.output_ids[3]
            by_id = await gen(client, stop_token_ids=(stop_id,))
            text = tok.decode(free.output_ids[:5], skip_special_tokens=False)
            piece = tok.decode(free.output_ids[4:5], skip_special_tokens=False)
            by_str = await gen(client, stop=(piece,))
            assert text.endswith(piece)
            return free, by_id, by_str

    free, by_id, by_str = run(go())
    first = free.output_ids.index(free.output_ids[3])
    assert by_id.output_ids == free.output_ids[: first + 1]  # the stop token stays in
    assert by_id.finish.type == "stop" and by_id.finish.matched == free.output_ids[3]
    assert by_str.finish.type == "stop" and isinstance(by_str.finish.matched, str)
    assert by_str.output_ids == free.output_ids[: len(by_str.output_ids)]
    decoded = tok.decode(list(by_str.output_ids), skip_special_tokens=False)
    assert decoded.endswith(by_str.finish.matched) or by_str.finish.matched in decoded


def test_text_and_no_stop_trim(standin, policy):
    tok = policy[1]
    ids = prompt(tok, "<think> Now I know the city. </think>")
    base = {"input_ids": ids, "return_logprob": False}
    params = {"max_new_tokens": 8, "temperature": 0}
    _, free = run(post(standin.url, "/generate", {**base, "sampling_params": params}))
    stop_id = free["output_ids"][2]
    for no_stop_trim in (True, False):
        sp = {**params, "stop_token_ids": [stop_id], "no_stop_trim": no_stop_trim}
        sp["skip_special_tokens"] = False
        status, out = run(post(standin.url, "/generate", {**base, "sampling_params": sp}))
        assert status == 200 and out["output_ids"][-1] == stop_id
        kept = out["output_ids"] if no_stop_trim else out["output_ids"][:-1]
        assert out["text"] == tok.decode(kept, skip_special_tokens=False)
        assert "output_token_logprobs" not in out["meta_info"]


def test_error_shapes(standin, policy):
    ids = prompt(policy[1], "hello")
    context = standin.server.context_length
    cases = [
        ({"sampling_params": {"top_p": 1.5}}, 400, "top_p"),
        ({"sampling_params": {"temperature": -1}}, 400, "temperature"),
        ({"sampling_params": {"max_new_tokens": context}}, 400, "context length"),
        ({"input_ids": [3 + i % 300 for i in range(context)]}, 400, "context length"),
    ]
    for extra, status, words in cases:
        got, body = run(post(standin.url, "/generate", {"input_ids": ids, **extra}))
        assert got == status and words in body["error"]["message"]
    got, body = run(
        post(standin.url, "/generate", {"input_ids": ids, "sampling_params": {"seed": 1}})
    )
    assert got == 500 and isinstance(body, str)


def test_duplicate_in_flight_rid_is_a_400(standin, policy):
    ids = prompt(policy[1], "hello")
    body = {"input_ids": ids, "sampling_params": LONG, "rid": "dup-rid"}

    async def go() -> tuple[Any, Any]:
        first = asyncio.ensure_future(post(standin.url, "/generate", body))
        await until(running(standin))
        second = await post(standin.url, "/generate", body)
        await post(standin.url, "/abort_request", {"rid": "dup-rid", "abort_all": False})
        return await first, second

    (s1, first), (s2, second) = run(go())
    assert s2 == 400 and "dup-rid" in second["error"]["message"]
    assert s1 == 200 and first["meta_info"]["finish_reason"]["type"] == "abort"


def test_abort_matches_rid_prefixes(standin, policy):
    ids = prompt(policy[1], "hello")

    async def go() -> tuple[dict[str, Any], bool]:
        bodies = {rid: {"input_ids": ids, "sampling_params": LONG, "rid": rid} for rid in RIDS}
        tasks = {
            rid: asyncio.ensure_future(post(standin.url, "/generate", b))
            for rid, b in bodies.items()
        }
        await until(running(standin, 3))
        await post(standin.url, "/abort_request", {"rid": "req-1", "abort_all": False})
        out = {rid: (await tasks[rid])[1] for rid in ("req-1", "req-10")}
        untouched = "req-2" in standin.server.in_flight()
        await post(standin.url, "/abort_request", {"rid": "req-2", "abort_all": False})
        out["req-2"] = (await tasks["req-2"])[1]
        return out, untouched

    out, untouched = run(go())
    # "req-1" is a prefix of "req-10": both stopped. Hence the client's fixed-width rids.
    for rid in RIDS:
        finish = out[rid]["meta_info"]["finish_reason"]
        assert finish["type"] == "abort" and isinstance(finish["message"], str)
        assert 0 < len(out[rid]["output_ids"]) < LONG["max_new_tokens"]
    assert untouched


RIDS = ("req-1", "req-10", "req-2")


def test_close_aborts_a_long_request_from_another_task(standin, policy):
    ids = prompt(policy[1], "<answer> Beijing </answer>")

    async def go() -> Completion:
        client = client_for(standin.url, policy)
        await client.start()
        task = asyncio.ensure_future(
            client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=1000, **GREEDY))])
        )
        await until(running(standin))
        await client.close()
        [[c]] = await task
        return c

    c = run(go())
    assert c.finish.type == "abort" and 0 < len(c.output_ids) < 1000
    assert len(c.log_probs) == len(c.output_ids)


def test_length_finish(standin, policy):
    async def go() -> Completion:
        async with client_for(standin.url, policy) as client:
            sp = SamplingParams(max_new_tokens=4, stop_token_ids=(), temperature=0.0)
            [[c]] = await client.generate([GenerateRequest([5, 6, 7], sp)])
            return c

    c = run(go())
    if c.finish.type == "length":
        assert len(c.output_ids) == 4
    else:  # the random model said EOS early
        assert c.finish.type == "stop" and c.output_ids[-1] == 2


@pytest.mark.parametrize("page_size", [1, 4])
def test_predicted_cached_tokens_match_the_server_on_a_tree(make_standin, policy, page_size):
    tok = policy[1]
    server = make_standin(page_size=page_size)
    root = prompt(tok, "Answer the given question. Question: in which country is the city?")
    obs = prompt(tok, "<information>Doc 1 the company</information>")
    step = SamplingParams(max_new_tokens=8)

    async def go() -> tuple[Any, list[tuple[int, int, int]], list[Completion], int]:
        checks = []  # (child's cached_tokens, parent input length, parent output length)
        async with client_for(server.url, policy) as client:
            # Depth first: each child is sent after its parent returned, with the parent's
            # input + output + an observation as its input.
            [[parent]] = await client.generate([GenerateRequest(root, step, key="t0")])
            node = [*root, *parent.output_ids, *obs]
            [[child]] = await client.generate([GenerateRequest(node, step, key="t0")])
            checks.append((child.cached_tokens, len(root), len(parent.output_ids)))
            # Siblings of the same node as one n=2 request.
            [kids] = await client.generate(
                [GenerateRequest(node, SamplingParams(max_new_tokens=8, n=2), key="t0")]
            )
            grand = [*node, *child.output_ids, *obs]
            [[g]] = await client.generate([GenerateRequest(grand, step, key="t0")])
            checks.append((g.cached_tokens, len(node), len(child.output_ids)))
            return client.cache_report(), checks, kids, len(node)

    report, checks, kids, node_len = run(go())
    assert report.mismatches == ()  # predicted == reported, sample by sample
    assert len(report.records) == 5
    assert report.predicted_tokens == report.cached_tokens
    assert report.hit_rate > 0.5
    for cached, parent_in, parent_out in checks:
        floor = parent_in + parent_out - 1  # the contract's formula
        assert cached >= floor - floor % page_size and cached % page_size == 0
    for kid in kids:
        assert kid.cached_tokens == (node_len - 1) - (node_len - 1) % page_size


def test_reported_cached_tokens_are_what_the_engine_reused(make_standin, policy):
    # The stand-in measures its engine's KV reuse; the client's cache model plays no part: a
    # client that models a far smaller cache predicts evictions the server never made.
    server = make_standin()
    ids = prompt(policy[1], "Answer the given question. Question: where is the bridge?")
    step = SamplingParams(max_new_tokens=4)

    engine = server.server.engine

    async def go() -> tuple[list[Completion], Any]:
        async with client_for(server.url, policy, cache_tokens=8) as client:
            out = []
            for tail in ([], [40], [41], None, [42]):
                if tail is None:  # the engine loses its KV behind everyone's back
                    engine.flush_cache()
                    continue
                [[c]] = await client.generate([GenerateRequest([*ids, *tail], step)])
                out.append(c)
            return out, client.cache_report()

    before = engine.stats.cached_tokens
    (cold, warm, sibling, lost), report = run(go())
    assert cold.cached_tokens == 0
    assert warm.cached_tokens >= len(ids)  # the prompt (and some output) was in the engine's KV
    assert sibling.cached_tokens >= len(ids)
    assert lost.cached_tokens == 0  # nothing left in the engine's cache: nothing reused
    # every reported token is one the engine served from its cache (it also counts the reuse
    # of its own decode chunks, so at least as many)
    assert engine.stats.cached_tokens - before >= warm.cached_tokens + sibling.cached_tokens
    assert report.mismatches  # the client's 8-token model predicted no reuse
    assert all(r.predicted == 0 for r in report.records)


def test_a_weight_update_that_keeps_the_cache_is_refused(policy, tmp_path):
    tok = policy[1]
    server = Standin((tiny_model(len(tok), seed=0), tok))
    checkpoint = tmp_path / "step-1"
    tiny_model(len(tok), seed=1).save_pretrained(checkpoint)

    async def go() -> None:
        async with client_for(server.url, policy) as client:
            with pytest.raises(ServerControlError, match="send flush_cache=true"):
                await client.update_weights_from_disk(str(checkpoint), "v", flush_cache=False)

    try:
        run(go())
    finally:
        server.stop()


def test_lru_eviction_is_predicted_too(make_standin, policy):
    server = make_standin(cache_tokens=64)

    async def go() -> Any:
        async with client_for(server.url, policy) as client:
            for i in range(6):
                ids = [3 + i, *range(10, 30)]
                await client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=4))])
                await client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=4))])
            first = [3, *range(10, 30)]
            await client.generate([GenerateRequest(first, SamplingParams(max_new_tokens=4))])
            return client.cache_report()

    report = run(go())
    assert report.mismatches == ()
    assert report.records[-1].reported == 0  # evicted long ago
    assert report.records[1].reported == 20


def test_warm_prefix(make_standin, policy):
    server = make_standin()
    shared = prompt(policy[1], "Answer the given question. You must conduct reasoning")

    async def go() -> tuple[int, list[list[Completion]], Any]:
        async with client_for(server.url, policy) as client:
            cold = await client.warm_prefix(shared, key="k")
            out = await client.generate(
                [
                    GenerateRequest([*shared, 40 + i], SamplingParams(max_new_tokens=2), key="k")
                    for i in range(3)
                ]
            )
            return cold, out, client.cache_report()

    cold, out, report = run(go())
    assert cold == 0
    assert [o[0].cached_tokens for o in out] == [len(shared)] * 3
    assert report.mismatches == () and report.records[0].warm


def test_tree_affinity_over_two_servers(make_standin, policy):
    a, b = make_standin(), make_standin()
    keys = [f"tree-{i}" for i in range(8)]

    async def go() -> SGLangClient:
        async with client_for([a.url, b.url], policy) as client:
            for round_ in range(3):
                await client.generate(
                    [
                        GenerateRequest(
                            [3 + i, 50 + round_], SamplingParams(max_new_tokens=2), key=k
                        )
                        for i, k in enumerate(keys)
                    ]
                )
            return client

    client = run(go())
    seen = {s.url: [tuple(p) for p in s.server.prompts] for s in (a, b)}
    for i, k in enumerate(keys):
        holders = {url for url, prompts in seen.items() if any(p[0] == 3 + i for p in prompts)}
        assert holders == {client.server_for(k)}
    assert all(len(prompts) > 0 for prompts in seen.values())


def test_pause_and_continue(make_standin, policy):
    server = make_standin()
    ids = prompt(policy[1], "hello there")

    async def go() -> tuple[bool, Completion, Completion]:
        async with client_for(server.url, policy) as client:
            await client.pause_generation("retract")
            task = asyncio.ensure_future(
                client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=4))])
            )
            await asyncio.sleep(0.2)
            waited = not task.done()
            await client.continue_generation()
            [[held]] = await task
            long = asyncio.ensure_future(
                client.generate(
                    [GenerateRequest(ids, SamplingParams(max_new_tokens=1000, **GREEDY))]
                )
            )
            await until(running(server))
            await client.pause_generation("abort")
            [[aborted]] = await long
            await client.continue_generation()
            return waited, held, aborted

    waited, held, aborted = run(go())
    assert waited and held.finish.type != "abort"
    assert aborted.finish.type == "abort" and len(aborted.output_ids) < 1000


def test_weight_update_from_disk(policy, tmp_path):
    tok = policy[1]
    # Its own model object: the update must not touch the shared fixture's weights.
    server = Standin((tiny_model(len(tok), seed=0), tok))
    checkpoint = tmp_path / "step-1"
    tiny_model(len(tok), seed=1).save_pretrained(checkpoint)
    ids = prompt(tok, "Question: in which country is the city?")
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)

    async def go() -> tuple[Completion, Completion, Completion, str]:
        async with client_for(server.url, policy) as client:
            [[before]] = await client.generate([GenerateRequest(ids, greedy)])
            [[warm]] = await client.generate([GenerateRequest(ids, greedy)])
            await client.update_weights_from_disk(str(checkpoint), "step-1")
            version = client.weight_version
            [[after]] = await client.generate([GenerateRequest(ids, greedy)])
            with pytest.raises(ServerControlError, match="no checkpoint"):
                await client.update_weights_from_disk(str(tmp_path / "missing"), "step-2")
            [[again]] = await client.generate([GenerateRequest(ids, greedy)])
            assert again.weight_version == "step-1"  # the failed update changed nothing
            assert client.cache_report().mismatches == ()
            return before, warm, after, version

    try:
        before, warm, after, version = run(go())
    finally:
        server.stop()
    assert version == "step-1"
    assert before.weight_version == "default" and after.weight_version == "step-1"
    assert warm.cached_tokens == len(ids) - 1
    assert after.cached_tokens == 0  # the update flushed the cache: a cold start
    assert after.output_ids != before.output_ids  # new weights, new greedy text


def test_killed_server_is_retried_and_each_trajectory_returns_once(make_standin, policy):
    server = make_standin(decode_chunk=2)
    requests = [
        GenerateRequest(
            [3 + i, 9, 10], SamplingParams(max_new_tokens=200, n=1 + i % 2, **GREEDY), key=f"t{i}"
        )
        for i in range(6)
    ]

    async def go() -> list[list[Completion]]:
        async with client_for(server.url, policy, retries=6, backoff=0.1) as client:
            task = asyncio.ensure_future(client.generate(requests))
            await until(running(server, sum(r.sampling.n for r in requests)))
            assert not task.done()
            await asyncio.to_thread(server.stop)  # killed mid-batch
            await asyncio.sleep(0.4)
            await asyncio.to_thread(server.restart)
            return await task

    old = server.server
    out = run(go())
    assert [len(o) for o in out] == [r.sampling.n for r in requests]
    assert all(c.finish.type != "abort" for o in out for c in o)
    # Every request was answered exactly once, by one server or the other.
    answered = sorted(tuple(p) for s in (old, server.server) for p in s.answered)
    assert answered == sorted(tuple(r.input_ids) for r in requests)
    assert server.server is not old and server.server.answered


def test_stop_strings_are_matched_client_side_without_a_server_tokenizer(make_standin, policy):
    tok = policy[1]
    server = make_standin(skip_tokenizer_init=True)
    ids = prompt(tok, "<search> founder of the company </search>")
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)

    async def go() -> tuple[Completion, Completion]:
        async with client_for(server.url, policy) as client:
            [[free]] = await client.generate([GenerateRequest(ids, greedy)])
            piece = tok.decode(free.output_ids[4:5], skip_special_tokens=False)
            stop = SamplingParams(max_new_tokens=12, temperature=0.0, stop=(piece,))
            [[cut]] = await client.generate([GenerateRequest(ids, stop)])
            return free, cut

    free, cut = run(go())
    assert cut.finish.type == "stop" and isinstance(cut.finish.matched, str)
    assert 0 < len(cut.output_ids) <= 5 and cut.output_ids == free.output_ids[: len(cut.output_ids)]
    assert len(cut.log_probs) == len(cut.output_ids)
    _, raw = run(
        post(server.url, "/generate", {"input_ids": ids, "sampling_params": {"stop": "x"}})
    )
    assert "text" not in raw  # --skip-tokenizer-init answers carry no text

    async def without_tokenizer() -> None:
        async with SGLangClient(server.url, vocab_size=len(tok)) as client:
            await client.generate([GenerateRequest(ids, SamplingParams(stop=("x",)))])

    with pytest.raises(InvalidArgumentError, match="skip-tokenizer-init"):
        run(without_tokenizer())


def test_a_client_that_disconnects_aborts_its_request(make_standin, policy):
    server = make_standin()

    async def go() -> None:
        body = {"input_ids": [5, 6, 7], "sampling_params": LONG}
        task = asyncio.ensure_future(post(server.url, "/generate", body))
        await until(running(server))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not server.server.in_flight())

    run(go())
    [(_, _, kind)] = server.server.completed
    assert kind == "abort"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_standin_command_line_and_weights_over_a_gloo_group(policy, tmp_path):
    """``python -m treegrpo.testing.sglang_standin`` in its own process; the test is the trainer
    that broadcasts new weights over a gloo group, as it would over NCCL to a real server."""
    import torch
    from treegrpo.engine.embedded import EmbeddedEngine

    tok = policy[1]
    checkpoint = tmp_path / "policy"
    tiny_model(len(tok), seed=0).save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    command = [sys.executable, "-m", "treegrpo.testing.sglang_standin", "--model", str(checkpoint)]
    process = subprocess.Popen(
        [*command, "--port", "0", "--cache-tokens", "4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    try:
        for line in process.stdout:
            lines.append(line)
            if "serving" in line:
                break
        url = next(w for w in lines[-1].split() if w.startswith("http://"))
        reader.start()

        new = tiny_model(len(tok), seed=1)
        meta = [(name, p.dtype, tuple(p.shape)) for name, p in new.named_parameters()]
        ids = prompt(tok, "Question: in which country is the city?")
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        [[expected]] = EmbeddedEngine(new, tok).generate_sync([GenerateRequest(ids, greedy)])
        master = _free_port()

        def broadcast(group: Any) -> None:
            with torch.no_grad():
                for _, p in new.named_parameters():
                    torch.distributed.broadcast(p.detach().clone(), src=0, group=group)

        async def go() -> tuple[Completion, Completion, Completion, str]:
            async with client_for(url, policy) as client:
                [[before]] = await client.generate([GenerateRequest(ids, greedy)])
                group, _ = await asyncio.gather(
                    asyncio.to_thread(
                        join_weight_update_group, "gloo", "127.0.0.1", master, 2, 0, "wug"
                    ),
                    client.init_weights_update_group(
                        "127.0.0.1", master, 1, 2, group_name="wug", backend="gloo"
                    ),
                )
                try:
                    await asyncio.gather(
                        asyncio.to_thread(broadcast, group),
                        client.update_weights_from_distributed(meta, "wug", "dist-1"),
                    )
                finally:
                    torch.distributed.destroy_process_group(group)
                [[after]] = await client.generate([GenerateRequest(ids, greedy)])
                [[again]] = await client.generate([GenerateRequest(ids, greedy)])
                return before, after, again, client.weight_version

        before, after, again, version = run(go())
        assert version == "dist-1" and after.weight_version == "dist-1"
        assert after.cached_tokens == 0 and again.cached_tokens == len(ids) - 1
        assert after.output_ids == expected.output_ids != before.output_ids
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        if reader.is_alive():
            reader.join(timeout=10)
        process.stdout.close()
    assert code == 0, "".join(lines)


def test_flush_cache_info_endpoints_and_unsupported_options(make_standin, policy):
    server = make_standin()
    ids = prompt(policy[1], "hello")

    async def go() -> dict[str, Any]:
        async with client_for(server.url, policy) as client:
            await client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=2))])
            long = asyncio.ensure_future(
                client.generate([GenerateRequest(ids, SamplingParams(**LONG))])
            )
            await until(running(server))
            with pytest.raises(ServerControlError, match="idle"):
                await client.flush_cache()  # refused while a request runs
            await client.close()
            await long
        async with client_for(server.url, policy) as client:
            await client.flush_cache()
            [[c]] = await client.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=2))])
            assert c.cached_tokens == 0 and client.cache_report().mismatches == ()
            return {
                "server": await client.server_info(),
                "model": await client.model_info(),
            }

    info = run(go())
    assert info["server"]["max_total_num_tokens"] == server.server.cache_tokens
    assert info["model"]["is_generation"] is True
    assert info["server"]["weight_version"] == info["model"]["weight_version"] == "default"

    async def get(path: str) -> int:
        async with aiohttp.ClientSession() as session, session.get(server.url + path) as r:
            return r.status

    assert run(get("/health_generate")) == 200
    for options in ({"stream": True}, {"sampling_params": {"repetition_penalty": 1.2}}):
        status, body = run(post(server.url, "/generate", {"input_ids": ids, **options}))
        assert status == 400 and "stand-in" in body["error"]["message"]


# --------------------------------------------------------------------------- restarts


def test_a_server_restarted_mid_rollout_gets_the_pushed_weights_again(policy, tmp_path, caplog):
    # A server restarted within the retry window comes back with its base weights (version
    # "default"): its answers are discarded, the last update is pushed to it again, and every
    # request is generated again from the pushed weights.
    tok = policy[1]
    base, pushed = tmp_path / "base", tmp_path / "step-1"
    tiny_model(len(tok), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    tiny_model(len(tok), seed=1).save_pretrained(pushed)
    first, url, stop_first = start_standin_server(str(base), decode_chunk=2)
    port = int(url.rsplit(":", 1)[1])
    requests = [
        GenerateRequest(
            [3 + i, 9, 10], SamplingParams(max_new_tokens=120, n=1 + i % 2, **GREEDY), key=f"t{i}"
        )
        for i in range(4)
    ]
    total = sum(r.sampling.n for r in requests)
    restarted: list[tuple[SGLangStandin, Callable[[], None]]] = []

    def restart() -> SGLangStandin:
        server, _, stop = start_standin_server(str(base), port=port, decode_chunk=2)
        restarted.append((server, stop))
        return server

    async def go() -> tuple[Any, Any, Any, int, int]:
        async with client_for(url, policy, retry_window=20, backoff=0.1) as client:
            await client.update_weights_from_disk(str(pushed), "step-1")
            expected = await client.generate(requests)
            task = asyncio.ensure_future(client.generate(requests))
            await until(lambda: len(first.in_flight()) >= total)
            await until(lambda: all(v > 0 for v in first.in_flight().values()))
            await asyncio.to_thread(stop_first)  # killed mid-generation
            await asyncio.sleep(0.3)
            await asyncio.to_thread(restart)  # back, with its base weights
            during = await task
            once = client.weight_repushes
            # restarted again between two calls: found at the next answer
            await asyncio.to_thread(restarted[-1][1])
            await asyncio.to_thread(restart)
            after = await client.generate(requests[:1])
            return expected, during, after, once, client.weight_repushes

    caplog.set_level("WARNING", logger="treegrpo.engine.sglang_client")
    try:
        expected, during, after, once, twice = run(go())
    finally:
        stop_first()
        for _, stop in restarted:
            stop()
    versions = {c.weight_version for out in (expected, during, after) for o in out for c in o}
    assert versions == {"step-1"}
    assert [[c.output_ids for c in o] for o in during] == [
        [c.output_ids for c in o] for o in expected
    ]
    assert [c.output_ids for c in after[0]] == [c.output_ids for c in expected[0]]
    assert (once, twice) == (1, 2)  # one re-push per restart, however many requests saw it
    assert all(server.weight_version == "step-1" for server, _ in restarted)
    # the base weights generate something else: the check above can fail
    base_out = run(_generate_on(restarted[0][0], policy, requests[:1]))
    assert [c.output_ids for c in base_out[0]] != [c.output_ids for c in expected[0]]
    warned = [
        r.getMessage() for r in caplog.records if "weight_version 'default'" in r.getMessage()
    ]
    assert len(warned) == 2 and "restarted" in warned[0] and str(pushed) in warned[0]


async def _generate_on(server: SGLangStandin, policy: Any, requests: list[Any]) -> Any:
    """Generate with base weights on a fresh stand-in next to ``server`` (same model files)."""
    _, url, stop = await asyncio.to_thread(start_standin_server, server.model_path, decode_chunk=2)
    try:
        async with client_for(url, policy) as client:
            return await client.generate(requests)
    finally:
        await asyncio.to_thread(stop)


class StuckSGLang:
    """A server whose answers always say weight_version "default", whatever it was sent."""

    def __init__(self) -> None:
        self.updates: list[str] = []
        app = web.Application()
        app.router.add_get("/health", self._ok)
        app.router.add_post("/generate", self._generate)
        for path in ("/pause_generation", "/continue_generation", "/abort_request"):
            app.router.add_post(path, self._success)
        for path in ("/update_weights_from_disk", "/update_weights_from_distributed"):
            app.router.add_post(path, self._update)
        self.url, self.stop = start_app_in_thread(app, shutdown_timeout=0.1)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _success(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, "message": ""})

    async def _update(self, request: web.Request) -> web.Response:
        self.updates.append(request.path)
        return web.json_response({"success": True, "message": ""})

    async def _generate(self, request: web.Request) -> web.Response:
        return answer(await request.json())  # weight_version "default"


def test_weights_that_do_not_take_or_cannot_be_pushed_again_fail_clearly():
    server = StuckSGLang()

    async def go(distributed: bool) -> None:
        async with SGLangClient(server.url, vocab_size=100, backoff=0) as client:
            if distributed:
                await client.update_weights_from_distributed([], "g", "v1")
            else:
                await client.update_weights_from_disk("/ckpt", "v1")
            await client.generate([GenerateRequest([1, 2])])

    try:
        with pytest.raises(StaleWeightsError, match=r"after 3 pushes of 'v1' from /ckpt") as e:
            run(go(distributed=False))
        assert (e.value.url, e.value.expected, e.value.got) == (server.url, "v1", "default")
        assert server.updates == ["/update_weights_from_disk"] * 4  # the push, 3 re-pushes
        server.updates.clear()
        with pytest.raises(StaleWeightsError, match="cannot push weights sent over /update_w"):
            run(go(distributed=True))
        assert server.updates == ["/update_weights_from_distributed"]
    finally:
        server.stop()


def test_the_retry_window_sets_how_long_a_dead_server_is_waited_for():
    assert [retries_for_window(w) for w in (0, 0.5, 1.5, 3.5, 31.5)] == [0, 1, 2, 3, 10]
    assert retries_for_window(1.0, backoff=0.25, max_backoff=0.25) == 4
    assert SGLangClient("http://127.0.0.1:1", retry_window=30).retries == 10
    with pytest.raises(InvalidArgumentError, match="finite"):
        retries_for_window(float("inf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"3 attempts") as e:
        run(probe([dead], retry_window=0.6, backoff=0.2))
    assert time.monotonic() - started >= 0.6 and dead in str(e.value)
