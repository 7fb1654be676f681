"""The asynchronous rollout (``tree.schedule="async"``): for given completions the forest is the
same whatever the timing, it equals the lockstep forest where no two branches share a context,
siblings still go out as one request with ``n`` under their prompt's routing key, no request is
lost or duplicated, and against the latency simulator it has lockstep's shapes, budgets and
reward distribution (statistically, over seeds)."""

from __future__ import annotations

import asyncio
import random
import statistics
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pytest
from fake_tokenizer import ChunkTokenizer
from scripted import FixedRetriever, ScriptedEngine
from treegrpo.engine.base import Completion, GenerateRequest
from treegrpo.env import SearchEnv
from treegrpo.env.rewards import compute_score
from treegrpo.rollout import Prompt, RolloutConfig, RolloutResult, rollout


def turns(context: str) -> int:
    return context.count("</information>")


def varied(context: str, i: int) -> tuple[str, str]:
    """A long-tailed policy: each (context, sample) searches 0 to 3 times, with a text unique to
    it (so no two branches share a context), then answers right or wrong."""
    h = zlib.crc32(f"{context}|{i}".encode())
    if turns(context) >= (h % 7) // 2:
        return f"<think>a{h % 1000}</think> <answer> Paris{h % 2} </answer>", "stop"
    return f"<think>s{h % 1000}</think> <search> q{h % 5} </search>", "stop"


def searches_first(context: str, i: int) -> tuple[str, str]:
    """`varied`, but every chain searches at least once (every tree has an open step)."""
    if turns(context) == 0:
        h = zlib.crc32(f"{context}|{i}".encode())
        return f"<think>f{h % 1000}</think> <search> first{h % 3} </search>", "stop"
    return varied(context, i)


class Delayed:
    """An engine wrapper that sleeps a seeded random time before every call (and records the
    order in which calls were made)."""

    def __init__(self, engine: Any, rng: random.Random | None) -> None:
        self.engine, self.rng = engine, rng
        self.order: list[tuple[int, ...]] = []

    @property
    def weight_version(self) -> str:
        return "0"

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        self.order.extend(tuple(r.input_ids) for r in requests)
        if self.rng is not None:
            await asyncio.sleep(self.rng.random() * 0.004)
        return await self.engine.generate(requests)


def run(
    config: RolloutConfig,
    policy: Any = varied,
    delay_seed: int | None = None,
    n_prompts: int = 4,
    log_prob: Any = None,
) -> tuple[RolloutResult, ScriptedEngine, Delayed]:
    tok = ChunkTokenizer()
    options = {} if log_prob is None else {"log_prob": log_prob}
    scripted = ScriptedEngine(tok, policy, **options)
    rng = None if delay_seed is None else random.Random(delay_seed)
    engine = Delayed(scripted, rng)
    env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=3, max_obs_tokens=200)
    if rng is not None:  # tool calls take a random time too
        step = env.step
        tool_rng = random.Random(delay_seed + 1000)

        async def slow_step(inputs: Any) -> Any:
            await asyncio.sleep(tool_rng.random() * 0.004)
            return await step(inputs)

        env.step = slow_step  # type: ignore[method-assign]
    prompts = [
        Prompt(g, tok.encode(f"Q{g}?", add_special_tokens=False), "nq", {"target": ["Paris0"]})
        for g in range(n_prompts)
    ]
    result = asyncio.run(rollout(engine, env, compute_score, prompts, config, tokenizer=tok))
    return result, scripted, engine


def canonical(result: RolloutResult) -> dict[int, Any]:
    """Per tree: its steps in the order they are numbered within it (parent as a local index,
    texts, finish, mean log-prob), its kept leaves and their rewards; node ids left out."""
    forest = result.forest
    local: dict[int, tuple[int, int]] = {}
    trees: dict[int, list[Any]] = defaultdict(list)
    for node in sorted(result.info):
        info = result.info[node]
        tree = forest.place(node)[0]
        assert info.parent is not None
        parent = local.get(info.parent, (tree, -1))[1]
        local[node] = (tree, len(trees[tree]))
        trees[tree].append(
            (
                parent,
                info.action_text,
                info.observation_text,
                info.finish_reason,
                info.mean_log_prob,
                info.answer,
            )
        )
    leaves = pa.table(forest.leaves()).to_pylist()
    kept: dict[int, list[Any]] = defaultdict(list)
    for row in leaves:
        kept[row["tree"]].append((local[row["leaf"]][1], row["kept"], row["reward"]))
    return {t: (trees[t], sorted(kept[t])) for t in range(forest.num_trees)}


ASYNC = RolloutConfig(m=2, n=3, l=2, max_turns=3, seed=5, schedule="async")


@pytest.mark.parametrize(
    "config",
    [
        ASYNC,
        replace(ASYNC, k=3),
        replace(ASYNC, include_root=False, replace=False),
        replace(ASYNC, selection="surprisal", overexpand_penalty=0.5),
    ],
    ids=["uniform", "k=3", "no-root-no-replace", "surprisal"],
)
def test_the_forest_is_the_same_whatever_the_timing(config):
    log_prob = lambda i: -0.3 - 0.2 * i  # noqa: E731 (surprisal draws see the sample index)
    base, _, quiet = run(config, log_prob=log_prob)
    for seed in range(3):
        other, _, delayed = run(config, delay_seed=seed, log_prob=log_prob)
        assert delayed.order != quiet.order  # the delays did reorder the calls
        assert canonical(other) == canonical(base)
        assert other.total.as_dict() == base.total.as_dict()


def test_it_equals_the_lockstep_forest_when_no_two_branches_share_a_context():
    # Without the root as a candidate and with an open step in every tree, no two branches of
    # a round share a context (the policy's texts are unique), so lockstep sends the same
    # requests and records every tree in the same order.
    cfg = RolloutConfig(m=2, n=2, l=2, max_turns=3, seed=3, include_root=False)
    lock, lock_engine, _ = run(cfg, searches_first)
    for seed in (None, 0):
        asy, asy_engine, _ = run(replace(cfg, schedule="async"), searches_first, delay_seed=seed)
        assert canonical(asy) == canonical(lock)
        assert asy.total.as_dict() == lock.total.as_dict()
        assert sent(asy_engine) == sent(lock_engine)


def sent(engine: ScriptedEngine) -> Counter:
    """The requests an engine got, as (context text, n): the ChunkTokenizer numbers chunks as
    it first meets them, so token ids depend on the order of the calls."""
    return Counter(
        (engine.tokenizer.decode(list(r.input_ids)), r.sampling.n) for r in engine.requests
    )


def test_siblings_go_as_one_request_with_n_under_their_prompts_key_and_none_is_lost():
    result, engine, _ = run(ASYNC, delay_seed=7)
    texts = [engine.tokenizer.decode(list(r.input_ids)) for r in engine.requests]
    for r, text in zip(engine.requests, texts, strict=True):
        assert r.key is not None and text.startswith(f"Q{r.key.removeprefix('group-')}?")
    # Every sample of every request is one recorded step, and every step came from one.
    assert sum(r.sampling.n for r in engine.requests) == len(result.info)
    assert result.total.requests == len(engine.requests)
    # The M roots of a prompt are one request with n = M (the first one with the prompt).
    for g in range(4):
        (first, *_) = [r for r, t in zip(engine.requests, texts, strict=True) if t == f"Q{g}?"]
        assert first.sampling.n == ASYNC.m
    # A step drawn twice in a round is one request with n = 2, not two requests: the number
    # of requests is one per prompt (its roots), one per distinct node drawn per tree and
    # round, and one per step after a chain's first.
    chains = 4 * ASYNC.m + result.forest.num_trees * ASYNC.l * ASYNC.n
    first_requests = len(engine.requests) - (len(result.info) - chains)
    assert 4 < first_requests < chains
    assert any(
        r.sampling.n > 1 and "<information>" in t
        for r, t in zip(engine.requests, texts, strict=True)
    )
    leaves = Counter(pa.table(result.forest.leaves()).column("tree").to_pylist())
    assert set(leaves.values()) == {ASYNC.leaves_per_tree}


def test_a_failing_tool_fails_the_rollout_and_leaves_no_branch_running():
    tok = ChunkTokenizer()
    engine = ScriptedEngine(tok, varied)
    env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=3, max_obs_tokens=200)
    calls = 0

    async def broken(inputs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the retriever is down")
        return await SearchEnv.step(env, inputs)

    env.step = broken  # type: ignore[method-assign]
    prompts = [Prompt(g, tok.encode(f"Q{g}?"), "nq", {"target": ["x"]}) for g in range(4)]

    async def go() -> None:
        with pytest.raises(RuntimeError, match="the retriever is down"):
            await rollout(engine, env, compute_score, prompts, ASYNC, tokenizer=tok)
        await asyncio.sleep(0.01)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []

    asyncio.run(go())


def test_the_schedule_is_validated():
    with pytest.raises(ValueError, match="schedule must be one of 'async', 'lockstep'"):
        RolloutConfig(schedule="eventually")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the simulator


@pytest.mark.parametrize("schedule", ["lockstep", "async"])
def test_against_the_simulator_no_request_is_lost_or_duplicated(schedule):
    stats, results = simulate(schedule, seeds=[0])
    (sim_requests,) = stats
    (result,) = results
    assert sim_requests == result.total.requests
    leaves = Counter(pa.table(result.forest.leaves()).column("tree").to_pylist())
    assert set(leaves.values()) == {SIM_TREE.leaves_per_tree}


def test_against_the_simulator_async_has_lockstep_shapes_budgets_and_rewards():
    seeds = list(range(4))
    per: dict[str, dict[str, list[float]]] = {}
    for schedule in ("lockstep", "async"):
        _, results = simulate(schedule, seeds)
        per[schedule] = distributions(results)
    # means over 4 x 64 leaves: a difference of this size would be a change of distribution
    assert_alike(per["lockstep"], per["async"], reward_tolerance=0.12)


def distributions(results: Sequence[RolloutResult]) -> dict[str, list[float]]:
    """Leaves per rollout, every leaf's reward, generated tokens and tool calls per leaf."""
    return {
        "rewards": [r for res in results for r in rewards(res)],
        "tokens": [res.total.generated_tokens / res.total.leaves for res in results],
        "tools": [res.total.tool_calls / res.total.leaves for res in results],
        "leaves": [res.total.leaves for res in results],
    }


def assert_alike(
    lock: dict[str, list[float]], asy: dict[str, list[float]], reward_tolerance: float
) -> None:
    """The same shapes, and means within the tolerance (rewards) or 15% (tokens, tools)."""
    assert asy["leaves"] == lock["leaves"]
    assert abs(statistics.mean(asy["rewards"]) - statistics.mean(lock["rewards"])) < (
        reward_tolerance
    )
    for key in ("tokens", "tools"):
        a, b = statistics.mean(asy[key]), statistics.mean(lock[key])
        assert abs(a - b) <= 0.15 * b, (key, a, b)


SIM_TREE = RolloutConfig(m=2, n=2, l=1, max_turns=3, max_action_tokens=40, seed=1)


def rewards(result: RolloutResult) -> list[float]:
    return pa.table(result.forest.leaves()).column("reward").to_pylist()


def simulate(schedule: str, seeds: list[int]) -> tuple[list[int], list[RolloutResult]]:
    pytest.importorskip("torch")
    from treegrpo.engine.sglang_client import SGLangClient
    from treegrpo.env.prompt import PromptBuilder
    from treegrpo.rollout import Rollout
    from treegrpo.testing.sglang_sim import SimParams, SimRetriever, start_sim_server
    from treegrpo.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    endings = [("<search> bridge </search>", 0.5), ("<answer> Paris </answer>", 0.5)]
    builder = PromptBuilder()
    prompts = [
        Prompt(g, builder.render(f"question {g}", tok), "nq", {"target": ["Paris"]})
        for g in range(8)
    ]
    cfg = replace(SIM_TREE, schedule=schedule)  # type: ignore[arg-type]
    stats, results = [], []
    for seed in seeds:
        params = SimParams(
            vocab_size=len(tok),
            filler_low=3,
            eos_token_id=2,
            output_median=12,
            output_sigma=0.8,
            seed=seed,
        )
        sim, url, stop = start_sim_server(params, time_scale=500.0, tokenizer=tok, endings=endings)
        try:
            retriever = SimRetriever(FixedRetriever(), latency_s=0.2, time_scale=500.0)
            env = SearchEnv(tok, retriever=retriever, max_turns=3, max_obs_tokens=48)
            client = SGLangClient(url, tokenizer=tok)
            runner = Rollout(client, env, compute_score, cfg, tokenizer=tok, eos_token_ids=(2,))

            async def go(
                runner: Rollout = runner, client: SGLangClient = client, step: int = seed
            ) -> Any:
                try:
                    return await runner.run(prompts, step=step)
                finally:
                    await client.close()

            results.append(asyncio.run(go()))
            stats.append(sim.stats["requests"])
        finally:
            stop()
    return stats, results


# --------------------------------------------------------------------------- the embedded engine


def test_on_the_embedded_engine_async_has_lockstep_shapes_budgets_and_rewards():
    # The embedded engine's continuous batching under the async loop: calls join its running
    # decode, yet every request is served once (the rollout's counts are the engine's own) and
    # the trajectories are distributed as under lockstep (same policy, same sampler; only the
    # order of draws differs).
    pytest.importorskip("torch")
    from treegrpo.engine.embedded import EmbeddedEngine
    from treegrpo.env.prompt import PromptBuilder
    from treegrpo.rollout import Rollout
    from treegrpo.testing.tiny import tiny_policy

    model, tok = tiny_policy(seed=0)
    builder = PromptBuilder()
    prompts = [
        Prompt(g, builder.render(f"question {g} about a bridge", tok), "nq", {"target": ["x"]})
        for g in range(8)
    ]
    stops = (2, *range(100, 124))  # about half of the steps end on one

    def score(text: str, *_: Any, **__: Any) -> float:  # a function of the sampled text
        return float(zlib.crc32(text.encode()) % 2)

    per: dict[str, dict[str, list[float]]] = {}
    for schedule in ("lockstep", "async"):
        results = []
        for seed in range(4):
            engine = EmbeddedEngine(model, tok, seed=seed)
            env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=2, max_obs_tokens=48)
            cfg = RolloutConfig(
                m=2, n=2, l=1, max_turns=2, max_action_tokens=16, seed=seed, schedule=schedule
            )
            runner = Rollout(engine, env, score, cfg, tokenizer=tok, eos_token_ids=stops)
            result = asyncio.run(runner.run(prompts, step=seed))
            stats, total = engine.stats, result.total
            assert total.requests == stats.requests
            assert total.generated_tokens == stats.decode_tokens
            assert (total.prefill_tokens, total.cached_tokens) == (
                stats.prefill_tokens,
                stats.cached_tokens,
            )
            leaves = Counter(pa.table(result.forest.leaves()).column("tree").to_pylist())
            assert set(leaves.values()) == {cfg.leaves_per_tree}
            results.append(result)
        per[schedule] = distributions(results)
    assert_alike(per["lockstep"], per["async"], reward_tolerance=0.15)  # 4 x 48 leaves
