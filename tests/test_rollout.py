"""The tree rollout with a scripted policy: exact shapes, contexts, leaves, budget and logs."""

from __future__ import annotations

import asyncio
from collections import Counter

import polars as pl
import pyarrow as pa
import pytest
from fake_tokenizer import ChunkTokenizer
from scripted import FixedRetriever, Policy, ScriptedEngine
from treegrpo.env import SearchEnv
from treegrpo.env.rewards import compute_score
from treegrpo.env.steps import INVALID_ACTION
from treegrpo.exceptions import InvalidArgumentError
from treegrpo.logs import write_rollout
from treegrpo.rollout import Prompt, RolloutConfig, rollout


def turns(context: str) -> int:
    return context.count("</information>")


def search_then_answer(answer_at: int = 2) -> Policy:
    def policy(context: str, i: int) -> tuple[str, str]:
        t = turns(context)
        if t >= answer_at:
            return f"<think>done</think> <answer> Paris{i % 2} </answer>", "stop"
        return f"<think>t{t}</think> <search> q{t} </search>", "stop"

    return policy


def run(
    policy: Policy,
    config: RolloutConfig,
    n_prompts: int = 2,
    max_turns: int = 3,
    *,
    engine_options: dict | None = None,
    **env_options,
):
    tok = ChunkTokenizer()
    engine = ScriptedEngine(tok, policy, **(engine_options or {}))
    env = SearchEnv(
        tok, retriever=FixedRetriever(), max_turns=max_turns, max_obs_tokens=200, **env_options
    )
    prompts = [
        Prompt(g, tok.encode(f"Q{g}?", add_special_tokens=False), "nq", {"target": ["Paris0"]})
        for g in range(n_prompts)
    ]
    result = asyncio.run(rollout(engine, env, compute_score, prompts, config, tokenizer=tok))
    return result, engine, tok


def leaf_counts(result) -> Counter:
    leaves = pa.table(result.forest.leaves())
    return Counter(leaves.column("tree").to_pylist())


@pytest.mark.parametrize(("m", "n", "l"), [(2, 2, 1), (1, 2, 1), (2, 3, 2), (3, 0, 1)])
def test_every_tree_ends_with_1_plus_l_n_leaves(m, n, l):  # noqa: E741
    cfg = RolloutConfig(m=m, n=n, l=l, max_turns=3, seed=1)
    result, _, _ = run(search_then_answer(), cfg, n_prompts=3)
    assert result.forest.num_trees == 3 * m
    assert set(leaf_counts(result).values()) == {1 + l * n}
    assert result.forest.num_leaves == 3 * m * (1 + l * n)
    assert result.total.leaves == result.forest.num_leaves


def test_expansions_continue_from_the_drawn_nodes_context():
    result, engine, _ = run(search_then_answer(), RolloutConfig(m=2, n=2, l=1, seed=3))
    forest = result.forest
    contexts = {tuple(forest.tokens(node)[0].tolist()): node for node in range(forest.num_nodes)}
    for req in engine.requests:
        node = contexts[tuple(req.input_ids)]  # every request continues an existing node
        assert not pa.table(forest.nodes()).column("is_leaf")[node].as_py()
    # each step's parent context + its own tokens = its context
    nodes = pa.table(forest.nodes()).to_pylist()
    for row in nodes:
        if row["parent"] is not None:
            ids, mask = forest.tokens(row["node"])
            parent_ids, _ = forest.tokens(row["parent"])
            assert ids[: len(parent_ids)].tolist() == parent_ids.tolist()
            own = mask[len(parent_ids) :].tolist()
            assert own == [True] * row["action_len"] + [False] * row["observation_len"]
    # draws of the same node were sent as one request with n siblings
    assert sum(r.sampling.n for r in engine.requests) == forest.num_nodes - forest.num_trees


def test_observations_are_masked_and_hold_the_documents():
    result, _, tok = run(search_then_answer(), RolloutConfig(m=1, n=0))
    info = result.info
    searched = [i for i, x in info.items() if x.tool == "search"]
    assert searched and all(info[i].query.startswith("q") for i in searched)
    ids, mask = result.forest.tokens(searched[0])
    observation = tok.decode([t for t, m in zip(ids.tolist(), mask.tolist(), strict=True) if not m])
    assert '<information>Doc 1(Title: "Page") about q0</information>' in observation


def test_forced_final_turn_and_truncation_are_leaves():
    never = lambda ctx, i: ("<think>hm</think> <search> x </search>", "stop")  # noqa: E731
    result, _, _ = run(never, RolloutConfig(m=1, n=0, max_turns=2), max_turns=2)
    leaves = pa.table(result.forest.leaves()).to_pylist()
    assert {(x["leaf_reason"], x["depth"]) for x in leaves} == {("forced_final", 3)}


def test_a_step_cut_by_the_token_limit_goes_on_with_the_invalid_action_message():
    rambling = lambda ctx, i: ("no tags at all", "length")  # noqa: E731
    # the reference's rule (the default): an invalid action, the episode goes on to the final
    # turn, whose cut step is a leaf "truncated"
    result, _, _ = run(rambling, RolloutConfig(m=1, n=0))
    leaves = pa.table(result.forest.leaves()).to_pylist()
    assert {(x["leaf_reason"], x["depth"]) for x in leaves} == {("truncated", 4)}
    steps = [x for x in result.info.values() if x.finish_reason == "length"]
    assert len(steps) == 4 * 2  # 4 turns x 2 prompts
    assert sum(x.observation_text == INVALID_ACTION for x in steps) == 3 * 2
    # treegrpo's earlier rule, as an option: the cut step is a leaf
    result, _, _ = run(rambling, RolloutConfig(m=1, n=0), truncated_action="leaf")
    leaves = pa.table(result.forest.leaves()).to_pylist()
    assert {(x["leaf_reason"], x["depth"]) for x in leaves} == {("truncated", 1)}


def nested_search(context: str, i: int) -> tuple[str, str]:
    """Turn 0 writes a search whose query holds an answer pair; turn 1 answers."""
    step = "<think>x</think><search> a <answer> b </answer> c </search>"
    if "</information>" in context:
        return "<answer> done </answer>", "stop"
    for cut in range(len(step), 0, -1):  # a continuation: write the rest of the step
        if context.endswith(step[:cut]):
            return step[cut:], "stop"
    return step, "stop"


def test_a_step_goes_on_past_an_answer_inside_a_search_as_the_references_cut():
    # Search-R1 cuts a turn at its first </search>; stop strings stopped it at </answer>
    cfg = RolloutConfig(m=1, n=0)
    result, engine, _ = run(nested_search, cfg, n_prompts=1, engine_options={"stops": True})
    first = next(x for x in result.info.values() if x.parent == 0)
    assert first.action_text == "<think>x</think><search> a <answer> b </answer> c </search>"
    assert (first.tool, first.query) == ("search", "a <answer> b </answer> c")
    assert first.finish_reason == "stop"
    assert len(engine.requests) == 3  # the step, its continuation, then the answer
    # the continuation goes on from the step's context + what the step generated so far
    partial = "<think>x</think><search> a <answer> b </answer>"
    tok = engine.tokenizer
    assert list(engine.requests[1].input_ids) == [
        *engine.requests[0].input_ids,
        *tok.encode(partial, add_special_tokens=False),
    ]
    assert engine.requests[1].sampling.max_new_tokens == cfg.max_action_tokens - len(
        "<think>x</think><search> a <answer> b </answer>"
    )
    nodes = pl.DataFrame(result.forest.nodes())
    assert result.total.generated_tokens == nodes["action_len"].sum()


def test_a_stray_answer_tag_without_a_later_search_is_cut_back_to_it():
    def policy(context: str, i: int) -> tuple[str, str]:
        if context.endswith("hmm </answer>"):
            return " more words", "stop"  # ends at EOS: no tool tag closes
        if "</answer>" in context or "</information>" in context:
            return "<answer> done </answer>", "stop"
        return "hmm </answer> more words", "stop"

    result, engine, _ = run(policy, RolloutConfig(m=1, n=0), 1, engine_options={"stops": True})
    first = next(x for x in result.info.values() if x.parent == 0)
    assert first.action_text == "hmm </answer>"  # the reference's cut at the first </answer>
    assert first.observation_text == INVALID_ACTION and first.tool is None
    assert len(engine.requests) == 3
    nodes = pl.DataFrame(result.forest.nodes())
    dropped = len(" more words")
    assert result.total.generated_tokens == nodes["action_len"].sum() + dropped


def test_a_plain_answer_is_not_continued():
    answer = lambda ctx, i: ("<think>x</think><answer> b </answer> and more", "stop")  # noqa: E731
    result, engine, _ = run(answer, RolloutConfig(m=1, n=0), 1, engine_options={"stops": True})
    assert len(engine.requests) == 1
    (leaf,) = [x for x in result.info.values() if x.answer is not None]
    assert leaf.action_text == "<think>x</think><answer> b </answer>"


def always_search(context: str, i: int) -> tuple[str, str]:
    return "<think>more</think> <search> q </search>", "stop"


@pytest.mark.parametrize("max_model_len", [60, 100, 130])
def test_a_trajectory_at_max_model_len_ends_as_a_leaf_not_an_engine_error(max_model_len):
    cfg = RolloutConfig(m=2, n=2, l=1, max_turns=6, max_model_len=max_model_len, seed=1)
    # the engine raises if a request could pass its context length: it never does
    options = {"stops": True, "context_length": max_model_len}
    result, engine, _ = run(always_search, cfg, max_turns=6, engine_options=options)
    assert all(
        len(r.input_ids) + r.sampling.max_new_tokens < max_model_len for r in engine.requests
    )
    leaves = pl.DataFrame(result.forest.leaves())
    assert set(leaves["leaf_reason"].cast(pl.Utf8)) == {"context_limit"}
    for leaf in leaves["leaf"]:
        assert len(result.forest.tokens(leaf)[0]) <= max_model_len - 1  # the whole trajectory
    assert set(leaf_counts(result).values()) == {3}  # every tree still has 1 + L*N leaves


def test_max_model_len_comes_from_the_engine_and_a_too_long_prompt_is_refused():
    options = {"stops": True, "context_length": 80}
    result, _, _ = run(always_search, RolloutConfig(m=1, n=0, max_turns=6), 1, 6,
                       engine_options=options)  # fmt: skip
    assert set(pl.DataFrame(result.forest.leaves())["leaf_reason"].cast(pl.Utf8)) == {
        "context_limit"
    }
    with pytest.raises(InvalidArgumentError, match="max_model_len=3"):
        run(always_search, RolloutConfig(m=1, n=0, max_model_len=3), 1)


def test_overexpand_penalty_changes_the_draws_within_a_round():
    def repeats(penalty: float) -> int:
        """Nodes that got two branches in the expansion round, over seeds."""
        out = 0
        for seed in range(12):
            cfg = RolloutConfig(m=1, n=2, l=1, seed=seed, overexpand_penalty=penalty)
            result, _, _ = run(search_then_answer(), cfg, n_prompts=1)
            # every open node had one child (its chain) before the round
            children = pl.DataFrame(result.forest.nodes())["num_children"]
            out += int((children >= 3).sum())
        return out

    assert repeats(0.0) > 0  # the reference: with replacement, a node can be drawn twice
    assert repeats(1e9) == 0  # a node drawn once weighs ~0 for the round's next draw


def test_k_subsampling_and_rewards():
    result, _, _ = run(search_then_answer(), RolloutConfig(m=2, n=2, l=1, k=2, seed=5))
    leaves = pl.DataFrame(result.forest.leaves())
    assert leaves.filter(pl.col("kept")).group_by("tree").len()["len"].to_list() == [2] * 4
    # answers "Paris0" (sample 0) are correct, "Paris1" are not
    for row in leaves.iter_rows(named=True):
        text = result.response_text(row["leaf"])
        assert row["reward"] == (1.0 if "Paris0" in text.split("<answer>")[-1] else 0.0)
    adv = pl.DataFrame(result.forest.advantages("tree"))
    assert len(adv) == 8


def test_chain_mode_is_n_zero_and_equals_l_zero():
    a, _, _ = run(search_then_answer(), RolloutConfig(m=4, n=0, seed=2))
    b, _, _ = run(search_then_answer(), RolloutConfig(m=4, n=2, l=0, seed=2))
    assert pl.DataFrame(a.forest.nodes()).equals(pl.DataFrame(b.forest.nodes()))
    assert set(leaf_counts(a).values()) == {1}


def test_budget_counts_what_was_spent():
    result, engine, _ = run(search_then_answer(), RolloutConfig(m=2, n=2, l=1, seed=4))
    nodes = pl.DataFrame(result.forest.nodes())
    assert result.total.generated_tokens == nodes["action_len"].sum()
    assert result.total.tool_calls == sum(1 for x in result.info.values() if x.tool)
    assert result.total.requests == len(engine.requests)
    assert result.total.prefill_tokens == sum(len(r.input_ids) for r in engine.requests)
    assert result.total.leaves_per_1k_generated == pytest.approx(
        1000 * result.forest.num_leaves / result.total.generated_tokens
    )


@pytest.mark.parametrize("selection", ["uniform", "surprisal"])
def test_root_excluded_expands_open_steps_and_falls_back_to_a_lone_root(selection):
    # Prompt 0's chains answer at once (no open step); prompt 1's search twice first.
    def policy(context: str, i: int) -> tuple[str, str]:
        return search_then_answer(answer_at=0 if "Q0?" in context else 2)(context, i)

    cfg = RolloutConfig(m=2, n=2, l=1, include_root=False, selection=selection, seed=7)
    result, _, _ = run(policy, cfg)
    assert set(leaf_counts(result).values()) == {3}
    nodes = pl.DataFrame(result.forest.nodes())
    roots = nodes.filter(pl.col("parent").is_null())
    children = roots.select("group", "num_children").sort("group")["num_children"].to_list()
    assert children == [3, 3, 1, 1]  # group 0: 1 chain + 2 from the root; group 1: chain only
    # group 1's expansions hang under steps 1 and 2 (depth 1 or 2), never under its roots
    expanded = nodes.filter((pl.col("group") == 1) & (pl.col("num_children") > 1))
    assert expanded.height >= 1 and expanded["depth"].is_between(1, 2).all()


def test_surprisal_selection_draws_open_nodes_and_prefers_uncertain_ones():
    def policy(context: str, i: int) -> tuple[str, str]:
        return search_then_answer()(context, i)

    cfg = RolloutConfig(m=2, n=3, l=1, selection="surprisal", seed=9)
    result, _, _ = run(policy, cfg)
    assert set(leaf_counts(result).values()) == {4}


def test_logs_read_back_with_polars_equal_the_forest(tmp_path):
    result, _, _ = run(search_then_answer(), RolloutConfig(m=2, n=2, l=1, k=2, seed=6))
    adv = result.forest.advantages("tree")
    paths = write_rollout(tmp_path, 3, result, adv)
    assert paths["nodes"] == tmp_path / "nodes" / "step=000003" / "part-0.parquet"
    nodes = pl.scan_parquet(
        tmp_path / "nodes" / "**" / "*.parquet", hive_partitioning=True
    ).collect()
    expect = pl.DataFrame(result.forest.nodes())
    assert nodes["step"].unique().to_list() == [3]
    assert nodes.select(expect.columns).equals(expect)
    assert nodes["action_text"].null_count() == result.forest.num_trees  # roots only
    traj = pl.read_parquet(paths["trajectories"])
    assert traj["advantage"].to_list() == pl.DataFrame(adv)["advantage"].to_list()
    assert set(traj.columns) >= {"reward", "a_inter", "a_intra", "length", "turns", "response"}
    meta = pa.parquet.read_schema(paths["nodes"]).metadata
    assert meta[b"treegrpo.schema_version"] == b"1"
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file left behind"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"k \(leaves kept per tree\) must be in \[1, 1 \+ l\*n\]"):
        RolloutConfig(m=2, n=2, l=1, k=4)
    with pytest.raises(ValueError, match="selection must be"):
        RolloutConfig(selection="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_turns"):
        run(search_then_answer(), RolloutConfig(max_turns=2), max_turns=3)


def test_a_rollout_imports_no_pyarrow():
    """The rollout keeps the procedure; the tree logic is the Forest's (selection, contexts,
    paths), so a rollout with the embedded engine on the tiny policy never loads pyarrow."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    code = """
import asyncio, sys
from scripted import FixedRetriever
from treegrpo.engine.embedded import EmbeddedEngine
from treegrpo.env import SearchEnv
from treegrpo.env.rewards import compute_score
from treegrpo.rollout import Prompt, RolloutConfig, rollout
from treegrpo.testing.tiny import tiny_policy

model, tok = tiny_policy(seed=0)
env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=1, max_obs_tokens=16)
prompts = [Prompt(0, tok.encode("who founded it?"), "nq", {"target": ["x"]})]
cfg = RolloutConfig(m=2, n=2, l=1, k=2, max_turns=1, max_action_tokens=6,
                    selection="surprisal", include_root=False)
engine = EmbeddedEngine(model, tok, seed=0)
result = asyncio.run(rollout(engine, env, compute_score, prompts, cfg, tokenizer=tok,
                             eos_token_ids=(2,)))
assert result.forest.num_leaves == 2 * 3, result.forest
print(sorted(m for m in sys.modules if m.split(".")[0] == "pyarrow"))
"""
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
