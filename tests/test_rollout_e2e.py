"""The tree rollout end to end with a tiny random policy, through the embedded engine and
through the SGLang client against the stand-in server (real HTTP, in a thread): the forests are
structurally valid, the random policy's garbage is handled by the environment's rules, the
budget adds up, and the Parquet logs read back with polars equal the Forest's contents.

A random policy writes a near-uniform token stream, so its steps almost never hold a tag: each
one either hits the per-turn token limit or ends on a stop id; either way it is an invalid
action (the reference's rule: it gets the invalid-action message and the episode goes on), up
to the final turn, a leaf ("truncated" when the limit cut it, else "forced_final"). The stop
ids below make both outcomes common, so both leaf reasons occur and expansions draw non-root
nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from reference import RefNode, node_stats
from reference import advantages as reference_advantages
from scripted import FixedRetriever
from sglang_helpers import Recorder
from treegrpo.engine.embedded import EmbeddedEngine
from treegrpo.engine.sglang_client import SGLangClient
from treegrpo.env import INVALID_ACTION, SearchEnv
from treegrpo.env.prompt import PromptBuilder
from treegrpo.logs import write_rollout
from treegrpo.rollout import Prompt, Rollout, RolloutConfig, RolloutResult
from treegrpo.testing.sglang_standin import start_standin_server
from treegrpo.testing.tiny import tiny_policy

QUESTIONS = (
    "who founded the company that built the bridge",
    "in which country is the city on the northern coast",
    "when was the painter of the opera born",
)
# EOS (2) plus 24 of the tiny vocabulary's 320 ids: about half of the 12-token steps end on one.
STOP_IDS = (2, *range(100, 124))
MAX_TURNS = 2
TREE = RolloutConfig(m=2, n=2, l=1, k=2, max_turns=MAX_TURNS, max_action_tokens=12, seed=7)
CHAIN = RolloutConfig(m=4, n=0, max_turns=MAX_TURNS, max_action_tokens=12, seed=7)
CONFIGS = {"tree": TREE, "chain": CHAIN, "tree-async": dataclasses.replace(TREE, schedule="async")}
# Columns of Forest.nodes() other than leaf_reason (a dictionary column, compared as text).
NODE_COLUMNS = [
    "node",
    "parent",
    "tree",
    "group",
    "depth",
    "prompt_len",
    "action_len",
    "observation_len",
    "num_children",
    "is_leaf",
    "kept",
    "reward",
    "kept_leaves",
    "value",
    "advantage_sum",
]


def text_reward(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None
) -> float:
    """A reward that varies with the response (exact match would be 0 for every leaf here), so
    that advantages, V and the summed advantages are not all zero."""
    return (len(solution_str) % 5) / 4


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    return tiny_policy(seed=0)


@pytest.fixture(scope="module")
def prompts(policy: tuple[Any, Any]) -> list[Prompt]:
    _, tok = policy
    builder = PromptBuilder()
    return [
        Prompt(10 + g, builder.render(q, tok), "nq", {"target": ["Paris"]})
        for g, q in enumerate(QUESTIONS)
    ]


@pytest.fixture(scope="module")
def standin(policy: tuple[Any, Any]) -> Any:
    _, url, stop = start_standin_server(policy)
    yield url
    stop()


def make_env(tokenizer: Any) -> SearchEnv:
    return SearchEnv(tokenizer, retriever=FixedRetriever(), max_turns=MAX_TURNS, max_obs_tokens=64)


def run_rollout(
    engine: Any, tokenizer: Any, prompts: list[Prompt], cfg: RolloutConfig, step: int = 0
) -> tuple[RolloutResult, Recorder]:
    recorder = Recorder(engine)
    runner = Rollout(
        recorder, make_env(tokenizer), text_reward, cfg, tokenizer=tokenizer, eos_token_ids=STOP_IDS
    )

    async def go() -> RolloutResult:
        try:
            return await runner.run(prompts, step=step)
        finally:
            await recorder.close()

    return asyncio.run(go()), recorder


@pytest.fixture(scope="module")
def rollouts(
    policy: tuple[Any, Any], prompts: list[Prompt], standin: str
) -> dict[tuple[str, str], tuple[RolloutResult, Recorder]]:
    """One rollout per (engine, config), shared by the tests below."""
    model, tok = policy
    out = {}
    for name, cfg in CONFIGS.items():
        out["embedded", name] = run_rollout(EmbeddedEngine(model, tok, seed=0), tok, prompts, cfg)
        out["sglang", name] = run_rollout(SGLangClient(standin, tokenizer=tok), tok, prompts, cfg)
    return out


CASES = [(e, c) for e in ("embedded", "sglang") for c in CONFIGS]
IDS = [f"{e}-{c}" for e, c in CASES]


# --------------------------------------------------------------------------- structure


def expected_leaf_reason(env: SearchEnv, depth: int, action_text: str, finish: str) -> str | None:
    """The environment's rules (env/steps.py) applied to one recorded step."""
    action = env.parse(action_text)
    if action.kind == "answer":
        return "answer"
    final = depth - 1 == env.max_turns
    if action.kind == "invalid" and finish != "stop" and (final or env.truncated_action == "leaf"):
        return "truncated"
    if final:
        return "forced_final"
    return None


@pytest.mark.parametrize(("engine", "config"), CASES, ids=IDS)
def test_forest_is_structurally_valid(rollouts, policy, prompts, engine, config):
    _, tok = policy
    cfg = CONFIGS[config]
    result, _ = rollouts[engine, config]
    forest = result.forest
    nodes = pl.DataFrame(forest.nodes()).with_columns(pl.col("leaf_reason").cast(pl.String))
    rows = nodes.to_dicts()
    assert [r["node"] for r in rows] == list(range(forest.num_nodes))
    prompt_of = {p.group: list(p.input_ids) for p in prompts}

    # M trees per prompt, each with 1 + L*N leaves of which K are kept.
    roots = nodes.filter(pl.col("parent").is_null())
    assert forest.num_trees == len(roots) == cfg.m * len(prompts)
    assert Counter(roots["group"].to_list()) == {p.group: cfg.m for p in prompts}
    leaves = nodes.filter(pl.col("is_leaf"))
    assert set(Counter(leaves["tree"].to_list()).values()) == {cfg.leaves_per_tree}
    k = cfg.k or cfg.leaves_per_tree
    assert set(Counter(leaves.filter(pl.col("kept"))["tree"].to_list()).values()) == {k}
    assert leaves["reward"].null_count() == 0  # rewards on every leaf
    assert all(math.isfinite(r) for r in leaves.filter(pl.col("kept"))["reward"])

    env = make_env(tok)
    children = Counter(r["parent"] for r in rows if r["parent"] is not None)
    for r in rows:
        ids, mask = forest.tokens(r["node"])
        assert r["num_children"] == children[r["node"]]
        assert (r["leaf_reason"] is not None) == r["is_leaf"]
        if r["parent"] is None:  # a root holds its prompt, masked
            assert r["depth"] == 0 and not r["is_leaf"]
            assert ids.tolist() == prompt_of[r["group"]] and not mask.any()
            assert r["action_len"] == r["observation_len"] == 0
            continue
        parent = rows[r["parent"]]
        assert parent["node"] < r["node"] and not parent["is_leaf"]
        assert r["depth"] == parent["depth"] + 1 <= cfg.max_turns + 1
        assert (r["tree"], r["group"], r["prompt_len"]) == (parent["tree"], parent["group"], 0)
        assert 1 <= r["action_len"] <= cfg.max_action_tokens
        # The step's tokens follow its parent's; action trained, observation masked.
        parent_ids, _ = forest.tokens(r["parent"])
        assert ids[: len(parent_ids)].tolist() == parent_ids.tolist()
        own = mask[len(parent_ids) :].tolist()
        assert own == [True] * r["action_len"] + [False] * r["observation_len"]
        info = result.info[r["node"]]
        action = ids[len(parent_ids) : len(parent_ids) + r["action_len"]].tolist()
        observation = ids[len(parent_ids) + r["action_len"] :].tolist()
        assert tok.decode(action, skip_special_tokens=True) == info.action_text
        assert tok.decode(observation) == info.observation_text
        assert (r["observation_len"] == 0) == r["is_leaf"]  # only open steps have observations
        # What the environment made of the policy's text.
        assert r["leaf_reason"] == expected_leaf_reason(
            env, r["depth"], info.action_text, info.finish_reason
        )
        if not r["is_leaf"]:  # a tool's documents, or the invalid-action message
            if info.tool is None:
                assert info.observation_text == INVALID_ACTION and not info.valid
            else:
                assert info.observation_text.startswith("\n\n<information>") and info.valid


def test_the_random_policy_reaches_every_kind_of_step(rollouts):
    """Invalid actions that go on, truncations, and forced final turns all occur (with the
    deterministic embedded engine), so the checks above cover each of them."""
    kinds: Counter[str] = Counter()
    for config in CONFIGS:
        result, _ = rollouts["embedded", config]
        nodes = pl.DataFrame(result.forest.nodes())
        nodes = nodes.with_columns(pl.col("leaf_reason").cast(pl.String))
        for r in nodes.filter(pl.col("parent").is_not_null()).iter_rows(named=True):
            kinds[r["leaf_reason"] or "invalid, continued"] += 1
    assert kinds["invalid, continued"] and kinds["truncated"] and kinds["forced_final"], kinds
    # expansions drew non-root nodes too (a second child only comes from an expansion)
    result, _ = rollouts["embedded", "tree"]
    nodes = pl.DataFrame(result.forest.nodes())
    assert (nodes.filter(pl.col("depth") > 0)["num_children"] > 1).any()


@pytest.mark.parametrize(("engine", "config"), CASES, ids=IDS)
def test_requests_and_budget(rollouts, engine, config):
    cfg = CONFIGS[config]
    result, recorder = rollouts[engine, config]
    forest = result.forest
    nodes = pl.DataFrame(forest.nodes())
    rows = nodes.to_dicts()
    context_of = {tuple(forest.tokens(i)[0].tolist()): i for i in range(forest.num_nodes)}
    completions = [c for _, outs in recorder.calls for c in outs]
    assert len(completions) == forest.num_nodes - forest.num_trees
    seen: set[tuple[int, ...]] = set()
    for req, outs in recorder.calls:
        context = tuple(req.input_ids)
        row = rows[context_of[context]]  # every request continues a node's context
        assert not row["is_leaf"] and len(outs) == req.sampling.n
        assert req.sampling.max_new_tokens == cfg.max_action_tokens
        assert set(STOP_IDS) <= set(req.sampling.stop_token_ids)
        # Prefix reuse, SGLang's rules: a prompt is cached once prefilled (all but its last
        # token is reused), and a finished request leaves its prompt + output minus the last
        # token, so the request continuing a step reuses at least its parent's context + action.
        cached = outs[0].cached_tokens
        if context in seen:
            assert cached == len(context) - 1
        if row["parent"] is not None:
            assert cached >= len(forest.tokens(row["parent"])[0]) + row["action_len"] - 1
        seen.add(context)

    budget = result.total
    assert budget.generated_tokens == nodes["action_len"].sum()
    assert budget.generated_tokens == sum(len(c.output_ids) for c in completions)
    assert budget.requests == len(recorder.calls)
    assert budget.prefill_tokens + budget.cached_tokens == sum(
        len(r.input_ids) for r, _ in recorder.calls
    )
    assert budget.cached_tokens == sum(outs[0].cached_tokens for _, outs in recorder.calls)
    assert budget.tool_calls == sum(1 for x in result.info.values() if x.tool is not None)
    assert budget.leaves == forest.num_leaves
    for group, b in result.budget.items():
        assert b.leaves == cfg.m * cfg.leaves_per_tree
        assert b.generated_tokens == nodes.filter(pl.col("group") == group)["action_len"].sum()
    assert budget.leaves_per_1k_generated == pytest.approx(
        1000 * forest.num_leaves / budget.generated_tokens
    )
    assert 0 < budget.cache_hit_rate < 1
    if engine == "embedded":  # the rollout's accounting is the engine's own
        stats = recorder.engine.stats
        assert (budget.prefill_tokens, budget.cached_tokens) == (
            stats.prefill_tokens,
            stats.cached_tokens,
        )
        assert budget.generated_tokens == stats.decode_tokens


def test_same_prompts_and_seed_give_the_same_forest(policy, prompts, rollouts):
    model, tok = policy
    again, _ = run_rollout(EmbeddedEngine(model, tok, seed=0), tok, prompts, TREE)
    first, _ = rollouts["embedded", "tree"]
    assert pl.DataFrame(again.forest.nodes()).equals(pl.DataFrame(first.forest.nodes()))
    assert again.info == first.info
    assert again.total == first.total


# --------------------------------------------------------------------------- logs


def reference_nodes(result: RolloutResult) -> list[RefNode]:
    leaves = {r["leaf"]: r for r in pl.DataFrame(result.forest.leaves()).iter_rows(named=True)}
    out = []
    for r in pl.DataFrame(result.forest.nodes()).iter_rows(named=True):
        leaf = leaves.get(r["node"])
        out.append(
            RefNode(
                parent=r["parent"],
                tree=r["tree"],
                group=r["group"],
                leaf=leaf is not None,
                kept=bool(leaf and leaf["kept"]),
                reward=leaf["reward"] if leaf else None,
            )
        )
    return out


def scan(run: Path, table: str) -> pl.DataFrame:
    return pl.scan_parquet(run / table / "**" / "*.parquet", hive_partitioning=True).collect()


@pytest.mark.parametrize(("engine", "config"), CASES, ids=IDS)
def test_logs_read_back_with_polars_equal_the_forest(rollouts, tmp_path, engine, config):
    cfg = CONFIGS[config]
    result, _ = rollouts[engine, config]
    forest = result.forest
    adv = forest.advantages("tree")
    write_rollout(tmp_path, 7, result, adv)

    # nodes: the Forest's own columns, and the texts the rollout recorded
    logged = scan(tmp_path, "nodes").sort("node")
    assert logged["step"].unique().to_list() == [7]
    expect = pl.DataFrame(forest.nodes())
    assert logged.select(NODE_COLUMNS).equals(expect.select(NODE_COLUMNS))
    assert logged["leaf_reason"].cast(pl.String).equals(expect["leaf_reason"].cast(pl.String))
    for r in logged.filter(pl.col("parent").is_not_null()).iter_rows(named=True):
        info = result.info[r["node"]]
        assert r["action_text"] == info.action_text
        assert r["observation_text"] == info.observation_text
        assert r["finish_reason"] == info.finish_reason
        assert (r["tool"], r["query"], r["valid"]) == (info.tool, info.query, info.valid)
        assert r["mean_log_prob"] == pytest.approx(info.mean_log_prob)
    roots = logged.filter(pl.col("parent").is_null())
    assert roots["action_text"].null_count() == len(roots) == forest.num_trees

    # V, kept leaves and summed advantage agree with a slow reference over the same rewards
    ref = reference_nodes(result)
    ref_adv = reference_advantages(ref, "tree")
    for r, (kept, value, adv_sum) in zip(
        logged.iter_rows(named=True), node_stats(ref, ref_adv), strict=True
    ):
        assert r["kept_leaves"] == kept
        assert r["value"] == (None if value is None else pytest.approx(value, abs=1e-12))
        assert r["advantage_sum"] == pytest.approx(adv_sum, abs=1e-9)
    assert set(roots["kept_leaves"].to_list()) == {cfg.k or cfg.leaves_per_tree}

    # trajectories: one row per kept leaf, the advantages table plus lengths and turns
    traj = scan(tmp_path, "trajectories").sort("leaf")
    table = pl.DataFrame(adv).sort("leaf")
    columns = ["leaf", "tree", "group", "reward", "a_inter", "a_intra", "advantage"]
    assert traj.select(columns).equals(table.select(columns))
    assert len(traj) == forest.num_trees * (cfg.k or cfg.leaves_per_tree)
    for r in traj.iter_rows(named=True):
        assert (r["a_inter"], r["a_intra"], r["advantage"]) == pytest.approx(
            ref_adv[r["leaf"]], abs=1e-9
        )
    leaves = pl.DataFrame(forest.leaves()).filter(pl.col("kept")).sort("leaf")
    assert traj["length"].equals(leaves["length"])
    assert traj["turns"].to_list() == leaves["depth"].to_list()
    assert traj["response"].to_list() == [result.response_text(x) for x in traj["leaf"]]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("engine", ["embedded", "sglang"])
def test_trajectories_end_at_the_models_context_length_not_in_the_engine(prompts, engine):
    # A model whose context holds the prompt and little more: before max_model_len bounded the
    # rollout, its engine refused the first context that reached it (an engine error).
    longest = max(len(p.input_ids) for p in prompts)
    context = longest + 40
    model, tok = tiny_policy(seed=0, max_position_embeddings=context)
    cfg = RolloutConfig(m=2, n=2, l=1, max_turns=6, max_action_tokens=12, seed=3)
    env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=6, max_obs_tokens=24)
    stop: Any = None
    if engine == "embedded":
        gen: Any = EmbeddedEngine(model, tok, seed=0)  # max_model_len: its context_length
    else:  # the SGLang client does not know the server's context: the trainer sets it
        _, url, stop = start_standin_server((model, tok))
        gen = SGLangClient(url, tokenizer=tok)
        cfg = RolloutConfig(**{**cfg.__dict__, "max_model_len": context})
    runner = Rollout(gen, env, text_reward, cfg, tokenizer=tok, eos_token_ids=STOP_IDS)

    async def go() -> RolloutResult:
        try:
            return await runner.run(prompts)
        finally:
            await gen.close()

    try:
        result = asyncio.run(go())
    finally:
        if stop is not None:
            stop()
    leaves = pl.DataFrame(result.forest.leaves()).with_columns(pl.col("leaf_reason").cast(pl.Utf8))
    assert "context_limit" in set(leaves["leaf_reason"])
    for leaf in leaves["leaf"]:
        assert len(result.forest.tokens(leaf)[0]) <= context - 1
