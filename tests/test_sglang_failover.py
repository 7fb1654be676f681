"""A real server's sharp edges: token ids beyond the server's vocabulary are refused before
anything is sent, and requests of a server that goes away mid-rollout move to one that answers,
each answered once; when none answers within the retry window the error names them all."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from aiohttp import web
from scripted import FixedRetriever
from sglang_helpers import Recorder
from treegrpo import InvalidArgumentError
from treegrpo.engine.base import Completion, GenerateRequest, SamplingParams
from treegrpo.engine.errors import InvalidTokenError, ServerUnavailableError
from treegrpo.engine.sglang_client import SGLangClient
from treegrpo.env import SearchEnv
from treegrpo.env.prompt import PromptBuilder
from treegrpo.env.retrievers.server import start_app_in_thread
from treegrpo.rollout import Prompt, Rollout, RolloutConfig
from treegrpo.testing.tiny import tiny_policy

LONG = SamplingParams(max_new_tokens=400, temperature=0.0)


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    return tiny_policy(seed=0)


class Fake:
    """A server whose ``/generate`` answers three tokens; ``/model_info`` (and
    ``/get_model_info``) answer ``model_info`` where given, else 404."""

    def __init__(self, model_info: dict[str, Any] | None = None, *, legacy: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/abort_request", self._ok)
        app.router.add_get("/health", self._ok)
        if model_info is not None:
            self.model_info = model_info

            async def info(request: web.Request) -> web.Response:
                return web.json_response(self.model_info)

            app.router.add_get("/get_model_info", info)
            if not legacy:
                app.router.add_get("/model_info", info)
        self.url, self.stop = start_app_in_thread(app, shutdown_timeout=0.1)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        n = body["sampling_params"]["n"]
        entry = {
            "output_ids": [7, 8, 2],
            "meta_info": {
                "id": body["rid"],
                "finish_reason": {"type": "stop", "matched": 2},
                "prompt_tokens": len(body["input_ids"]),
                "cached_tokens": 0,
                "output_token_logprobs": [[-0.5, t, None] for t in (7, 8, 2)],
                "weight_version": "default",
            },
        }
        return web.json_response(entry if n == 1 else [entry] * n)


@pytest.fixture
def fake() -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def make(*args: Any, **kwargs: Any) -> Fake:
        made.append(Fake(*args, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.stop()


# --------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("legacy", [False, True], ids=["model_info", "get_model_info"])
def test_ids_beyond_the_vocabulary_the_server_reports_are_refused_before_sending(fake, legacy):
    server = fake({"model_path": "/m", "vocab_size": 50}, legacy=legacy)

    async def go(ids: list[int]) -> list[list[Completion]]:
        # The client's own bound (100) is looser than the server's embedding (50).
        async with SGLangClient(server.url, vocab_size=100) as client:
            assert client.vocab_size == 50
            return await client.generate([GenerateRequest([3, 4]), GenerateRequest(ids)])

    with pytest.raises(InvalidTokenError, match=r"request 1: input_ids\[1\] = 50") as e:
        asyncio.run(go([1, 50]))
    assert e.value.out_of_range
    message = str(e.value)
    assert "[0, 50)" in message and f"{server.url}/model_info" in message
    assert server.bodies == []  # nothing sent, not even the good request
    out = asyncio.run(go([1, 49]))  # the last id of the vocabulary passes
    assert [len(c) for c in out] == [1, 1] and len(server.bodies) == 2


def test_without_a_reported_vocabulary_the_tokenizers_length_is_the_bound(fake, policy):
    _, tok = policy
    server = fake({"model_path": "/m"})  # SGLang 0.5's /model_info: no vocab_size

    async def go() -> None:
        async with SGLangClient(server.url, tokenizer=tok) as client:
            await client.generate([GenerateRequest([1, len(tok)])])

    with pytest.raises(InvalidTokenError, match=rf"\[0, {len(tok)}\) \(len\(tokenizer\)\)"):
        asyncio.run(go())
    assert server.bodies == []


def test_servers_of_different_vocabularies_are_refused(fake):
    a, b = fake({"vocab_size": 50}), fake({"vocab_size": 60})

    async def go() -> None:
        async with SGLangClient([a.url, b.url], vocab_size=100):
            pass

    with pytest.raises(InvalidArgumentError, match="different vocabulary sizes") as e:
        asyncio.run(go())
    assert a.url in str(e.value) and b.url in str(e.value)


# --------------------------------------------------------------------------- servers that go away


def test_a_gone_servers_keys_move_together_to_servers_that_answer(fake):
    servers = [fake() for _ in range(3)]
    keys = [f"group-{g}" for g in range(40)]

    async def go() -> tuple[str, dict[str, str]]:
        client = SGLangClient([s.url for s in servers], vocab_size=100, retries=3, backoff=0)
        async with client:
            own = {k: client.server_for(k) for k in keys}
            gone = next(s for s in servers if s.url == own[keys[0]])
            gone.stop()
            for _ in range(3):  # three rounds: each key stays where it went
                await client.generate(
                    [GenerateRequest([1, 2, g], key=k) for g, k in enumerate(keys)]
                )
            return gone.url, own

    gone, own = asyncio.run(go())
    served: dict[int, set[str]] = {}
    for s in servers:
        for body in s.bodies:
            served.setdefault(body["input_ids"][2], set()).add(s.url)
    assert sorted(served) == list(range(len(keys)))
    for g, k in enumerate(keys):
        (url,) = served[g]  # one server per key, every round
        assert url != gone
        if own[k] != gone:
            assert url == own[k]  # keys of the servers that answer do not move


def make_prompts(tok: Any) -> list[Prompt]:
    builder = PromptBuilder()
    questions = ["who built the bridge", "where is the city", "when was the painter born"]
    return [
        Prompt(10 + g, builder.render(q, tok), "nq", {"target": ["x"]})
        for g, q in enumerate(questions)
    ]


def test_killing_one_of_two_servers_mid_rollout_loses_and_duplicates_nothing(make_standin, policy):
    _, tok = policy
    a, b = make_standin(decode_chunk=1), make_standin(decode_chunk=1)
    prompts = make_prompts(tok)
    cfg = RolloutConfig(m=2, n=2, l=1, k=2, max_turns=2, max_action_tokens=48, seed=3)
    env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=2, max_obs_tokens=48)
    client = SGLangClient([a.url, b.url], tokenizer=tok, retry_window=10, backoff=0.05)
    # Kill the server that holds the most groups, once it runs requests of the rollout.
    owners = Counter(client.server_for(f"group-{p.group}") for p in prompts)
    victim = a if owners[a.url] >= owners[b.url] else b
    survivor = b if victim is a else a
    killed = threading.Event()

    def kill_mid_rollout() -> None:
        deadline = time.monotonic() + 120
        while not victim.server.in_flight() and time.monotonic() < deadline:
            time.sleep(0.001)
        victim.stop()
        killed.set()

    watcher = threading.Thread(target=kill_mid_rollout, daemon=True)
    watcher.start()
    recorder = Recorder(client)
    runner = Rollout(recorder, env, lambda *a, **k: 0.5, cfg, tokenizer=tok, eos_token_ids=(2,))

    async def go() -> Any:
        try:
            return await runner.run(prompts, step=0)
        finally:
            await recorder.close()

    result = asyncio.run(go())
    watcher.join(timeout=5)
    assert killed.is_set(), "the server was never caught with requests in flight"
    forest = result.forest
    assert forest.num_trees == cfg.m * len(prompts)
    assert forest.num_leaves == forest.num_trees * cfg.leaves_per_tree
    # Each request got its n samples, and each was answered once: the victim's answers before
    # it died plus the survivor's are exactly the requests.
    assert all(len(outs) == req.sampling.n for req, outs in recorder.calls)
    assert len(victim.server.answered) + len(survivor.server.answered) == len(recorder.calls)
    completions = sum(len(outs) for _, outs in recorder.calls)
    assert completions == forest.num_nodes - forest.num_trees
    # The victim's groups went on on the survivor.
    theirs = [
        list(q.input_ids) for q in prompts if client.server_for(f"group-{q.group}") == victim.url
    ]
    assert any(p[: len(q)] == q for p in survivor.server.answered for q in theirs)


def test_a_server_that_comes_back_gets_its_keys_back(make_standin):
    a, b = make_standin(), make_standin()

    async def go() -> None:
        async with SGLangClient([a.url, b.url], vocab_size=300, backoff=0.05) as client:
            key = next(f"k{i}" for i in range(100) if client.server_for(f"k{i}") == a.url)
            request = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=2), key=key)
            a.stop()
            await client.generate([request])
            assert len(b.server.answered) == 1
            a.restart()
            deadline = time.monotonic() + 30
            while not a.server.answered:  # a background probe finds it back
                assert time.monotonic() < deadline, "the restarted server never got its key"
                await client.generate([request])
                await asyncio.sleep(0.1)

    asyncio.run(go())


def test_when_every_server_is_gone_the_error_names_them_within_the_window(make_standin):
    a, b = make_standin(decode_chunk=1), make_standin(decode_chunk=1)

    async def go() -> None:
        client = SGLangClient(
            [a.url, b.url], vocab_size=300, retry_window=1.0, backoff=0.1, max_backoff=0.2
        )
        async with client:
            task = asyncio.ensure_future(
                client.generate([GenerateRequest([5, 6, i], LONG, key=f"k{i}") for i in range(4)])
            )
            deadline = time.monotonic() + 60
            while not (a.server.in_flight() and b.server.in_flight()):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.005)
            a.stop()
            b.stop()
            await task

    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="no SGLang server answered") as e:
        asyncio.run(go())
    message = str(e.value)
    assert a.url in message and b.url in message
    assert "retry window 1 s" in message and "engine.retry_window_s" in message
    assert "cannot connect" in message  # each server's own error
    assert time.monotonic() - started < 60
