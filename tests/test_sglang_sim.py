"""The latency-faithful SGLang simulator: its timing model against a hand-computed case, its
radix cache (reuse of shared prefixes, LRU eviction, matches against a slow reference), and a
tree rollout through the SGLang client against it."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from treegrpo.engine.base import GenerateRequest, SamplingParams
from treegrpo.engine.sglang_client import SGLangClient
from treegrpo.testing.sglang_sim import SGLangSim, SimParams, SimRadixCache, start_sim_server

STOP = 7  # the stop id of the requests below


def sampling(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 10, "stop_token_ids": (STOP,), **kw})


@pytest.fixture
def sims() -> Iterator[Any]:
    stops = []

    def make(params: SimParams, **options: Any) -> tuple[SGLangSim, str]:
        server, url, stop = start_sim_server(params, **options)
        stops.append(stop)
        return server, url

    yield make
    for stop in stops:
        stop()


async def post(url: str, path: str, body: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        return await r.json(content_type=None)


# --------------------------------------------------------------------------- timing


def test_the_scheduler_takes_the_hand_computed_time(sims):
    params = SimParams(
        max_running_requests=2,
        prefill_base_s=0.01,
        prefill_s_per_token=0.001,
        decode_base_s=0.002,
        decode_s_per_request=0.001,
        decode_s_per_context_token=0.0001,
        output_median=3,
        output_sigma=0.0,  # every output is 3 tokens: 2 fillers and the stop id
        vocab_size=100,
        filler_low=10,
    )
    sim, url = sims(params, time_scale=math.inf)
    prompts = [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]

    async def go() -> list[Any]:
        async with SGLangClient(url, vocab_size=100) as client:
            await post(url, "/pause_generation", {"mode": "in_place"})
            task = asyncio.ensure_future(
                client.generate([GenerateRequest(p, sampling()) for p in prompts])
            )
            while len(sim._waiting) < 3:  # all queued before the scheduler runs
                await asyncio.sleep(0.001)
            await post(url, "/continue_generation", {})
            return await task

    out = asyncio.run(go())
    # Two fit: one prefill of 10 tokens, two decode steps of B=2 (contexts 12 then 14 tokens);
    # then the third: a prefill of 5, two steps of B=1 (contexts 6, 7).
    expected = [
        ("prefill", 0.01 + 0.001 * 10, 2, 10),
        ("decode", 0.002 + 0.001 * 2 + 0.0001 * 12, 2, 12),
        ("decode", 0.002 + 0.001 * 2 + 0.0001 * 14, 2, 14),
        ("prefill", 0.01 + 0.001 * 5, 1, 5),
        ("decode", 0.002 + 0.001 * 1 + 0.0001 * 6, 1, 6),
        ("decode", 0.002 + 0.001 * 1 + 0.0001 * 7, 1, 7),
    ]
    assert [(k, n, t) for k, _, n, t in sim.trace] == [(k, n, t) for k, _, n, t in expected]
    for (_, got, _, _), (_, want, _, _) in zip(sim.trace, expected, strict=True):
        assert got == pytest.approx(want)
    total = sum(d for _, d, _, _ in expected)
    assert sim.stats["busy_s"] == pytest.approx(total) and sim.clock == pytest.approx(total)
    assert sim.stats["max_running"] == 2
    for (c,) in out:
        assert len(c.output_ids) == 3 and c.output_ids[-1] == STOP
        assert c.finish.type == "stop" and c.finish.matched == STOP
        assert all(10 <= t < 100 and t != STOP for t in c.output_ids[:-1])


def test_output_lengths_follow_the_lognormal_clipped_at_max_new_tokens(sims):
    params = SimParams(output_median=20, output_sigma=1.0, vocab_size=100, filler_low=10)
    _, url = sims(params, time_scale=math.inf)

    async def go() -> list[Any]:
        async with SGLangClient(url, vocab_size=100) as client:
            return await client.generate(
                [
                    GenerateRequest([1, 2, i % 90 + 10], sampling(max_new_tokens=60))
                    for i in range(400)
                ]
            )

    lengths = [len(c.output_ids) for (c,) in asyncio.run(go())]
    cut = [n for n in lengths if n == 60]
    # P(lognormal(median 20, sigma 1) >= 60) = P(Z >= ln 3) = 0.136
    assert 0.08 < len(cut) / len(lengths) < 0.2
    assert 15 <= sorted(lengths)[len(lengths) // 2] <= 25  # the median
    assert max(lengths) == 60 and min(lengths) >= 1


# --------------------------------------------------------------------------- cache


def test_shared_prefixes_report_cached_tokens(sims):
    sim, url = sims(SimParams(vocab_size=100, filler_low=10, output_median=4), time_scale=math.inf)
    prompt = list(range(10, 30))

    async def go() -> None:
        async with SGLangClient(url, vocab_size=100) as client:
            [(first,)] = await client.generate([GenerateRequest(prompt, sampling())])
            assert first.cached_tokens == 0
            child = [*prompt, *first.output_ids, 40, 41, 42]
            [(again,), (grand,)] = await client.generate(
                [GenerateRequest(prompt, sampling()), GenerateRequest(child, sampling())]
            )
            assert again.cached_tokens == len(prompt) - 1  # capped at prompt_len - 1
            # prompt + output minus its last token were inserted at finish
            assert grand.cached_tokens == len(prompt) + len(first.output_ids) - 1
            [siblings] = await client.generate([GenerateRequest(child, sampling(n=3))])
            assert [c.cached_tokens for c in siblings] == [len(child) - 1] * 3
            assert len({c.output_ids for c in siblings}) > 1  # each sample its own draw

    asyncio.run(go())
    assert sim.stats["cached_tokens"] > 0


def test_lru_eviction_under_a_small_capacity():
    cache = SimRadixCache(capacity=10)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    cache.insert(a)
    cache.insert(b)
    assert cache.size == 8 and cache.match(a) == 4
    cache.match(a)  # a is now more recent than b
    cache.insert(c)  # 12 tokens > 10: the least recently used leaf (b) goes
    assert (cache.match(a), cache.match(b), cache.match(c)) == (4, 0, 4)
    assert cache.size == 8 and cache.evicted == 4
    handle = cache.lock(a)  # locked: never evicted, however old
    cache.insert([13, 14, 15, 16])
    assert cache.match(a) == 4 and cache.match(c) == 0
    cache.unlock(handle)
    cache.insert([1, 2, 99, 98, 97])  # shares a's first two tokens: a split
    # 11 tokens: [13..16] is the least recently used leaf (a was matched after it), so it
    # goes, and both halves of the split a stay.
    assert cache.match([13, 14, 15, 16]) == 0 and cache.match(a) == 4 and cache.size == 7


def test_eviction_drops_the_servers_reuse(sims):
    params = SimParams(
        cache_tokens=30, vocab_size=100, filler_low=10, output_median=2, output_sigma=0
    )
    sim, url = sims(params, time_scale=math.inf)
    first, other = list(range(10, 30)), list(range(40, 60))

    async def go() -> list[int]:
        async with SGLangClient(url, vocab_size=100) as client:
            out = []
            for p in (first, first, other, first):
                [(c,)] = await client.generate([GenerateRequest(p, sampling())])
                out.append(c.cached_tokens)
            return out

    # The third prompt's 20 tokens push the first out of a 30-token cache.
    assert asyncio.run(go()) == [0, 19, 0, 0]
    assert sim.cache.evicted > 0


def reference_match(held: list[list[int]], tokens: list[int]) -> int:
    """The longest common prefix of ``tokens`` with any held sequence (no eviction)."""
    best = 0
    for seq in held:
        n = 0
        while n < min(len(seq), len(tokens)) and seq[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best


def test_matches_agree_with_a_slow_reference():
    rng = random.Random(5)
    cache, held = SimRadixCache(capacity=10**9), []
    for _ in range(400):
        base = rng.choice(held) if held and rng.random() < 0.7 else []
        seq = base[: rng.randrange(len(base) + 1)] + [
            rng.randrange(4) for _ in range(rng.randrange(1, 6))
        ]
        probe = [*seq[: rng.randrange(1, len(seq) + 1)], rng.randrange(4)]
        assert cache.match(probe) == reference_match(held, probe)
        cache.insert(seq)
        held.append(seq)
    assert cache.size == sum(1 for _ in _trie_tokens(held))


def _trie_tokens(held: list[list[int]]) -> Iterator[tuple[int, ...]]:
    """Distinct non-empty prefixes of the held sequences: the tokens a radix tree holds."""
    yield from {tuple(s[:i]) for s in held for i in range(1, len(s) + 1)}


# --------------------------------------------------------------------------- time scale


def test_the_time_scale_runs_simulated_time_faster(sims):
    params = SimParams(
        decode_base_s=0.02, output_median=25, output_sigma=0, vocab_size=100, filler_low=10
    )
    sim, url = sims(params, time_scale=10.0)

    async def go() -> float:
        async with SGLangClient(url, vocab_size=100) as client:
            started = time.monotonic()
            await client.generate([GenerateRequest([1, 2, 3], sampling(max_new_tokens=40))])
            return time.monotonic() - started

    wall = asyncio.run(go())
    busy = sim.stats["busy_s"]  # 24 decode steps of ~20 ms and a prefill: ~0.5 s simulated
    assert busy > 0.45
    assert wall >= busy / 10  # it sleeps its share, never less


# --------------------------------------------------------------------------- a rollout


def test_a_tree_rollout_runs_against_the_simulator(sims):
    pytest.importorskip("torch")
    from scripted import FixedRetriever
    from treegrpo.env import SearchEnv
    from treegrpo.env.prompt import PromptBuilder
    from treegrpo.rollout import Prompt, Rollout, RolloutConfig
    from treegrpo.testing.sglang_sim import SimRetriever
    from treegrpo.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    params = SimParams(
        vocab_size=len(tok), filler_low=3, eos_token_id=2, output_median=12, output_sigma=0.8
    )
    endings = [("<search> bridge </search>", 0.6), ("<answer> Paris </answer>", 0.4)]
    sim, url = sims(params, time_scale=200.0, tokenizer=tok, endings=endings)
    retriever = SimRetriever(FixedRetriever(), latency_s=0.2, time_scale=200.0)
    env = SearchEnv(tok, retriever=retriever, max_turns=3, max_obs_tokens=48)
    cfg = RolloutConfig(m=2, n=2, l=1, k=2, max_turns=3, max_action_tokens=40, seed=1)
    builder = PromptBuilder()
    prompts = [
        Prompt(g, builder.render(f"question {g}", tok), "nq", {"target": ["Paris"]})
        for g in range(4)
    ]
    client = SGLangClient(url, tokenizer=tok)
    runner = Rollout(client, env, lambda *a, **k: 1.0, cfg, tokenizer=tok, eos_token_ids=(2,))

    async def go() -> Any:
        try:
            return await runner.run(prompts, step=0)
        finally:
            await client.close()

    result = asyncio.run(go())
    forest = result.forest
    assert forest.num_trees == cfg.m * len(prompts)
    assert forest.num_leaves == forest.num_trees * cfg.leaves_per_tree
    assert result.total.tool_calls > 0 and retriever.calls > 0  # searches happened
    reasons = {info.finish_reason for info in result.info.values()}
    assert "stop" in reasons
    assert result.total.cached_tokens > 0  # children reuse their parents' prefixes
    assert sim.stats["requests"] == result.total.requests
