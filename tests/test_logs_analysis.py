"""Rollout-log analysis on logs made by small tree rollouts with a scripted policy: every query
against the same number computed in plain Python from the Forest and the rollout; the plots,
the HTML viewer (in headless Chromium) and the ``treegrpo logs`` commands."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_tokenizer import ChunkTokenizer
from polars.testing import assert_frame_equal
from scripted import FixedRetriever, ScriptedEngine
from treegrpo.cli import main
from treegrpo.env import SearchEnv
from treegrpo.env.rewards import compute_score
from treegrpo.exceptions import InvalidArgumentError, RunFormatError, RunNotFoundError
from treegrpo.logs import (
    SIGNAL_TOLERANCE,
    advantage_by_depth,
    branch_points,
    branching,
    budget,
    em_curve,
    failures,
    leaf_budget,
    load_run,
    metric_curve,
    reward_curve,
    summary,
    write_rollout,
    write_table_atomic,
)
from treegrpo.logs.analysis import Run
from treegrpo.logs.viewer import tree_frame, tree_html
from treegrpo.rollout import Prompt, RolloutConfig, RolloutResult, rollout

STEPS = (1, 2, 3)
SOURCES = ("nq", "hotpotqa")

# ---------------------------------------------------------------------- a small run


def hash_policy(context: str, i: int) -> tuple[str, str]:
    """A deterministic 'policy' whose action depends on a hash of the context and the sample
    index: searches, right and wrong answers, invalid actions and truncations all occur."""
    r = zlib.crc32(f"{context}|{i}".encode()) % 100
    if r < 40:
        return f"<think>t</think> <search> q{r} </search>", "stop"
    if r < 62:
        return "<think>ok</think> <answer> Paris </answer>", "stop"
    if r < 80:
        return "<think>hm</think> <answer> Rome </answer>", "stop"
    if r < 92:
        return "I am not sure what to do", "stop"
    return "rambling on and on", "length"


def shaped(data_source: str, solution: str, ground_truth: Any, extra: Any = None) -> float:
    # Search-R1's format-shaped reward: several reward levels, so sibling values differ often.
    return compute_score(data_source, solution, ground_truth, extra, format_shaped=True)


@dataclass
class Logged:
    """A logged run and what made it: the rollouts and advantages by (step, rank)."""

    path: Path
    results: dict[tuple[int, int], RolloutResult] = field(default_factory=dict)
    advantages: dict[tuple[int, int], pl.DataFrame] = field(default_factory=dict)
    val: dict[int, dict[str, float]] = field(default_factory=dict)

    def at(self, step: int) -> list[tuple[RolloutResult, pl.DataFrame]]:
        """The rollouts of one step, one per rank."""
        return [(self.results[k], self.advantages[k]) for k in sorted(self.results) if k[0] == step]


def make_run(path: Path, config: RolloutConfig, *, ranks: int = 1) -> Logged:
    """Three training steps of 4 prompts (2 data sources), logged as training logs them:
    Parquet partitions per step and metrics.jsonl with validation EM at steps 0 and 3. With
    ``ranks`` > 1 each rank rolls out its share of the prompts in its own forest and writes its
    own part, as data-parallel training does: node and tree ids repeat across ranks."""
    tok = ChunkTokenizer(chunk=2)
    env = SearchEnv(tok, retriever=FixedRetriever(), max_turns=2, max_obs_tokens=60)
    logged = Logged(path)
    lines = []
    logged.val[0] = {"val-core/nq/acc/mean@1": 0.25, "val-core/all/acc/mean@1": 0.2}
    lines.append({"step": 0, **logged.val[0]})
    for step in STEPS:
        prompts = [
            Prompt(
                g,
                tok.encode(f"Q{g} at step {step}?", add_special_tokens=False),
                SOURCES[g % 2],
                {"target": ["Paris"]},
            )
            for g in range(4)
        ]
        share = len(prompts) // ranks
        for rank in range(ranks):
            mine = prompts[rank * share : (rank + 1) * share]
            engine = ScriptedEngine(tok, hash_policy, log_prob=lambda i: -0.3)
            result = asyncio.run(
                rollout(engine, env, shaped, mine, config, tokenizer=tok, step=step)
            )
            adv = result.forest.advantages("tree")
            write_rollout(path, step, result, adv, rank=rank if ranks > 1 else None)
            logged.results[(step, rank)] = result
            logged.advantages[(step, rank)] = pl.DataFrame(adv)
        score = pl.concat([a for _, a in logged.at(step)])["reward"].mean()
        lines.append({"step": step, "critic/score/mean": score, "actor/pg_loss": 0.1 * step})
    logged.val[3] = {
        "val-core/nq/acc/mean@1": 0.5,
        "val-core/hotpotqa/acc/mean@1": 0.4,
        "val-core/all/acc/mean@1": 0.45,
    }
    lines.append({"step": 3, **logged.val[3]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return logged


TREE = RolloutConfig(m=2, n=2, l=2, k=3, max_turns=2)  # 5 leaves a tree, 3 kept: some dropped


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    return make_run(tmp_path_factory.mktemp("tree"), TREE)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-ranks"])
def logged(request: pytest.FixtureRequest, plain: Logged, tmp_path_factory) -> Logged:
    if request.param == 1:
        return plain
    return make_run(tmp_path_factory.mktemp("ranks"), TREE, ranks=request.param)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    return make_run(tmp_path_factory.mktemp("chain"), RolloutConfig(m=4, n=0, max_turns=2))


# ---------------------------------------------------------------------- the plain-Python reference


@dataclass
class Ref:
    """One rank's forest at one step, recomputed from first principles: parents, children,
    kept leaves, V and summed advantage per node (walking every kept leaf up to its root)."""

    rows: dict[int, dict[str, Any]]
    children: dict[int, list[int]]
    kept: dict[int, int]
    value: dict[int, float]
    adv_sum: dict[int, float]
    source: dict[int, str]


def reference(result: RolloutResult, adv: pl.DataFrame) -> Ref:
    forest = result.forest
    rows = {r["node"]: r for r in pa.table(forest.nodes()).to_pylist()}
    children: dict[int, list[int]] = defaultdict(list)
    for node, r in rows.items():
        if r["parent"] is not None:
            children[r["parent"]].append(node)
    count: dict[int, int] = defaultdict(int)
    total: dict[int, float] = defaultdict(float)
    adv_sum: dict[int, float] = defaultdict(float)
    for leaf, reward, a in adv.select("leaf", "reward", "advantage").iter_rows():
        node = leaf
        while node is not None:
            count[node] += 1
            total[node] += reward
            adv_sum[node] += a
            node = rows[node]["parent"]
    value = {n: total[n] / count[n] for n in count}
    source = {n: result.prompts[r["group"]].data_source for n, r in rows.items()}
    return Ref(rows, children, dict(count), value, dict(adv_sum), source)


@pytest.fixture(scope="module")
def refs(logged: Logged) -> dict[tuple[int, int], Ref]:
    return {k: reference(logged.results[k], logged.advantages[k]) for k in logged.results}


def approx(x: float | None) -> Any:
    return None if x is None else pytest.approx(x, rel=1e-9, abs=1e-12)


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def stdev(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def rows_by(frame: pl.DataFrame, *keys: str) -> dict[Any, dict[str, Any]]:
    out = {}
    for row in frame.iter_rows(named=True):
        key = tuple(row[k] for k in keys)
        out[key if len(keys) > 1 else key[0]] = row
    return out


def total_nodes(logged: Logged) -> int:
    return sum(r.forest.num_nodes for r in logged.results.values())


# ---------------------------------------------------------------------- loading


def test_load_run_reads_every_step_and_table(logged: Logged):
    run = load_run(logged.path)
    nodes = run.nodes.collect()
    assert sorted(nodes["step"].unique()) == list(STEPS)
    assert sorted(nodes["rank"].unique()) == sorted({rank for _, rank in logged.results})
    assert nodes.height == total_nodes(logged)
    assert run.trajectories.collect().height == sum(len(a) for a in logged.advantages.values())
    assert nodes.schema["leaf_reason"] == pl.String
    metrics = run.metrics.collect()
    assert metrics.columns == ["step", "metric", "value"]
    assert metric_curve(run.metrics, "actor/pg_loss").collect()["value"].to_list() == [
        pytest.approx(0.1 * s) for s in STEPS
    ]
    assert repr(run) == f"Run({str(logged.path)!r})"


def test_em_curve_is_the_validation_metrics(plain: Logged):
    em = em_curve(load_run(plain.path).metrics).collect()
    expect = sorted(
        (step, name.split("/")[1], value)
        for step, val in plain.val.items()
        for name, value in val.items()
    )
    assert [tuple(r) for r in em.iter_rows()] == expect


def test_reward_curve_equals_the_kept_leaves_rewards(logged: Logged):
    run = load_run(logged.path)
    curve = rows_by(reward_curve(run.trajectories).collect(), "step", "data_source")
    expect: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for (step, _), result in logged.results.items():
        adv = logged.advantages[(step, _)]
        a = dict(zip(adv["leaf"], adv["advantage"], strict=True))
        leaves = pl.DataFrame(result.forest.leaves()).filter(pl.col("kept"))
        for leaf, group, reward in leaves.select("leaf", "group", "reward").iter_rows():
            expect[(step, result.prompts[group].data_source)].append((reward, a[leaf]))
    assert set(curve) == set(expect)
    for key, pairs in expect.items():
        row, rewards = curve[key], [r for r, _ in pairs]
        assert row["leaves"] == len(pairs)
        assert row["reward_mean"] == approx(mean(rewards))
        assert row["reward_std"] == approx(stdev(rewards))
        assert row["advantage_abs_mean"] == approx(mean([abs(x) for _, x in pairs]))
    overall = reward_curve(run.trajectories, by=["step"]).collect()
    assert overall["reward_mean"].to_list() == [
        approx(mean([r for _, a in logged.at(s) for r in a["reward"]])) for s in STEPS
    ]


def test_advantage_and_value_by_depth(logged: Logged, refs: dict[tuple[int, int], Ref]):
    got = rows_by(advantage_by_depth(load_run(logged.path).nodes).collect(), "depth")
    per_depth: dict[int, list[tuple[float, float, float | None]]] = defaultdict(list)
    for ref in refs.values():
        for node in ref.kept:
            parent = ref.rows[node]["parent"]
            gain = None if parent is None else abs(ref.value[node] - ref.value[parent])
            per_depth[ref.rows[node]["depth"]].append((ref.value[node], ref.adv_sum[node], gain))
    assert set(got) == set(per_depth)
    for depth, items in per_depth.items():
        row = got[depth]
        values = [v for v, _, _ in items]
        sums = [s for _, s, _ in items]
        gains = [g for _, _, g in items if g is not None]
        assert row["nodes"] == len(items)
        assert row["value_mean"] == approx(mean(values))
        assert row["value_std"] == approx(stdev(values))
        assert row["value_gain_abs_mean"] == approx(mean(gains))
        assert row["advantage_sum_mean"] == pytest.approx(mean(sums), abs=1e-9)
        assert row["advantage_sum_abs_mean"] == approx(mean([abs(s) for s in sums]))
    # depth 0 holds every root with a kept leaf; the deepest level reaches the forced final turn
    assert got[0]["nodes"] == sum(r.forest.num_trees for r in logged.results.values())
    assert max(got) == 3


def branch_reference(refs: dict[tuple[int, int], Ref]) -> dict[tuple[int, int, int], dict]:
    out = {}
    for (step, rank), ref in refs.items():
        for node, kids in ref.children.items():
            if len(kids) < 2:
                continue
            values = [ref.value[k] for k in kids if ref.kept.get(k, 0) > 0]
            gap = max(values) - min(values) if len(values) >= 2 else None
            out[(step, rank, node)] = {
                "depth": ref.rows[node]["depth"],
                "num_children": len(kids),
                "compared": len(values),
                "gap": gap,
                "signal": gap is not None and gap > SIGNAL_TOLERANCE,
                "data_source": ref.source[node],
            }
    return out


def test_branch_points_and_sibling_gaps(logged: Logged, refs: dict[tuple[int, int], Ref]):
    got = rows_by(branch_points(load_run(logged.path).nodes).collect(), "step", "rank", "node")
    expect = branch_reference(refs)
    assert set(got) == set(expect)
    for key, e in expect.items():
        row = got[key]
        assert {k: row[k] for k in ("depth", "num_children", "compared", "signal")} == {
            k: e[k] for k in ("depth", "num_children", "compared", "signal")
        }
        assert row["gap"] == approx(e["gap"])
        assert row["data_source"] == e["data_source"]
    # the fixture exercises every case: with a signal, without one, and not comparable
    assert {e["signal"] for e in expect.values()} == {True, False}
    assert any(e["gap"] is None for e in expect.values())
    assert any(e["gap"] == 0 for e in expect.values())


def test_branching_by_depth_and_overall(logged: Logged, refs: dict[tuple[int, int], Ref]):
    nodes = load_run(logged.path).nodes
    expect = branch_reference(refs)
    got = rows_by(branching(nodes).collect(), "depth")
    depths = Counter(e["depth"] for e in expect.values())
    assert set(got) == set(depths)
    for depth, n in depths.items():
        items = [e for e in expect.values() if e["depth"] == depth]
        row = got[depth]
        assert row["branch_points"] == n
        assert row["share"] == approx(n / len(expect))
        assert row["compared"] == sum(e["compared"] >= 2 for e in items)
        assert row["with_signal"] == sum(e["signal"] for e in items)
        assert row["signal_share"] == approx(sum(e["signal"] for e in items) / n)
        assert row["gap_mean"] == approx(mean([e["gap"] for e in items if e["gap"] is not None]))
    (row,) = branching(nodes, by=()).collect().iter_rows(named=True)
    assert row["branch_points"] == len(expect)
    assert row["signal_share"] == approx(sum(e["signal"] for e in expect.values()) / len(expect))
    per_step = rows_by(branching(nodes, by=["step", "depth"]).collect(), "step", "depth")
    for step in STEPS:
        shares = [r["share"] for (s, _), r in per_step.items() if s == step]
        assert sum(shares) == pytest.approx(1.0)


def path_tool_calls(result: RolloutResult, leaf: int) -> int:
    calls, node = 0, leaf
    while node in result.info:  # steps only: the root holds the prompt
        calls += result.info[node].tool is not None
        node = result.info[node].parent
    return calls


def test_leaf_budget_walks_each_path(logged: Logged):
    got = rows_by(leaf_budget(load_run(logged.path).nodes).collect(), "step", "rank", "leaf")
    n_leaves = 0
    for (step, rank), result in logged.results.items():
        forest = result.forest
        leaves = pa.table(forest.leaves()).to_pylist()
        n_leaves += len(leaves)
        for leaf in leaves:
            _, mask = forest.tokens(leaf["leaf"])  # the trajectory: True on action tokens
            row = got[(step, rank, leaf["leaf"])]
            assert row["path_tokens"] == int(mask.sum()) == leaf["action_tokens"]
            assert row["path_tool_calls"] == path_tool_calls(result, leaf["leaf"])
            assert (row["turns"], row["kept"], row["leaf_reason"]) == (
                leaf["depth"],
                leaf["kept"],
                leaf["leaf_reason"],
            )
    assert len(got) == n_leaves


def test_budget_equals_what_the_rollout_counted(logged: Logged):
    nodes = load_run(logged.path).nodes
    got = rows_by(budget(nodes).collect(), "step")
    for step in STEPS:
        results = [r for r, _ in logged.at(step)]
        row = got[step]
        generated = sum(r.total.generated_tokens for r in results)
        n_leaves = sum(r.total.leaves for r in results)
        calls = sum(r.total.tool_calls for r in results)
        assert row["trees"] == sum(r.forest.num_trees for r in results)
        assert row["leaves"] == n_leaves == sum(r.forest.num_leaves for r in results)
        assert row["generated_tokens"] == generated
        assert row["tool_calls"] == calls
        assert row["generated_tokens_per_leaf"] == approx(generated / n_leaves)
        assert row["tool_calls_per_leaf"] == approx(calls / n_leaves)
        paths = [  # the kept leaves: the Forest's own token count, tool calls walked up
            (x["action_tokens"], path_tool_calls(r, x["leaf"]))
            for r in results
            for x in pa.table(r.forest.leaves()).to_pylist()
            if x["kept"]
        ]
        assert row["kept_leaves"] == len(paths)
        assert row["path_tokens_mean"] == approx(mean([t for t, _ in paths]))
        assert row["path_tool_calls_mean"] == approx(mean([c for _, c in paths]))
        assert row["token_reuse"] == approx(sum(t for t, _ in paths) / generated)
    (one,) = budget(nodes, by=()).collect().iter_rows(named=True)
    assert one["generated_tokens"] == sum(r.total.generated_tokens for r in logged.results.values())
    # the same path means as walking every kept leaf's path (leaf_budget)
    walked = leaf_budget(nodes).filter(pl.col("kept")).collect()
    assert one["path_tokens_mean"] == approx(walked["path_tokens"].mean())
    assert one["path_tool_calls_mean"] == approx(walked["path_tool_calls"].mean())


def test_token_reuse_is_one_for_chains_and_above_for_trees(chain: Logged, tmp_path: Path):
    (row,) = budget(load_run(chain.path).nodes, by=()).collect().iter_rows(named=True)
    assert row["token_reuse"] == pytest.approx(1.0)
    everything = RolloutConfig(m=2, n=2, l=2, max_turns=2)  # every leaf kept
    tree = make_run(tmp_path, everything)
    (row,) = budget(load_run(tree.path).nodes, by=()).collect().iter_rows(named=True)
    assert row["token_reuse"] > 1.2  # kept trajectories share their prefixes
    assert branch_points(load_run(chain.path).nodes).collect().height == 0


def test_failures_count_invalid_actions_truncations_and_forced_finals(logged: Logged):
    got = rows_by(failures(load_run(logged.path).nodes).collect(), "step")
    seen: Counter[str] = Counter()
    for step in STEPS:
        steps, invalid, reasons = 0, 0, Counter()
        for result, _ in logged.at(step):
            leaves = pa.table(result.forest.leaves()).to_pylist()
            leaf_ids = {x["leaf"] for x in leaves}
            reasons.update(x["leaf_reason"] for x in leaves)
            invalid += sum(1 for n, x in result.info.items() if n not in leaf_ids and not x.valid)
            steps += len(result.info)
            assert len(result.info) == result.forest.num_nodes - result.forest.num_trees
        n_leaves = sum(reasons.values())
        row = got[step]
        assert row["steps"] == steps
        assert row["invalid_actions"] == invalid
        assert row["invalid_share"] == approx(invalid / steps)
        for reason, column in (("answer", "answered"), ("truncated", "truncated")):
            assert row[column] == reasons[reason]
            assert row[f"{column}_share"] == approx(reasons[reason] / n_leaves)
        assert row["forced_final"] == reasons["forced_final"]
        assert row["context_limit"] == reasons["context_limit"]  # 0 unless a run ran out of room
        seen.update({"invalid": invalid, **reasons})
    assert min(seen.values()) > 0, f"the scripted policy should hit every failure mode: {seen}"


def test_summary_collects_the_same_numbers(logged: Logged):
    run = load_run(logged.path)
    tables = summary(run)
    overview = tables["run"].row(0, named=True)
    assert overview["steps"] == len(STEPS)
    assert overview["nodes"] == total_nodes(logged)
    assert overview["kept_leaves"] == sum(len(a) for a in logged.advantages.values())
    # (sums in a parallel group-by may add in another order: equal up to rounding)
    assert_frame_equal(tables["depth"], advantage_by_depth(run.nodes).collect())
    assert_frame_equal(tables["branching"], branching(run.nodes).collect())
    assert_frame_equal(tables["failures"], failures(run.nodes, by=()).collect())
    rewards = rows_by(tables["rewards"], "data_source")
    first = [r for _, a in logged.at(STEPS[0]) for r in a["reward"]]
    last = [r for _, a in logged.at(STEPS[-1]) for r in a["reward"]]
    assert rewards["all"]["reward_first"] == approx(mean(first))
    assert rewards["all"]["reward_last"] == approx(mean(last))
    assert rewards["nq"]["em_first"] == 0.25 and rewards["nq"]["em_last"] == 0.5
    assert rewards["hotpotqa"]["em_first"] == rewards["hotpotqa"]["em_last"] == 0.4


def test_tree_frame_takes_one_groups_nodes_and_advantages(logged: Logged):
    run = load_run(logged.path)
    for (step, rank), result in logged.results.items():
        adv = logged.advantages[(step, rank)]
        for group in result.prompts:
            frame = tree_frame(run, step, group)
            forest = pl.DataFrame(result.forest.nodes()).filter(pl.col("group") == group)
            assert frame["node"].to_list() == forest["node"].to_list()
            assert set(frame["rank"]) == {rank}
            mine = adv.filter(pl.col("group") == group).sort("leaf")
            kept = frame.filter(pl.col("advantage").is_not_null()).sort("node")
            assert kept["node"].to_list() == mine["leaf"].to_list()
            assert kept["advantage"].to_list() == mine["advantage"].to_list()


# ---------------------------------------------------------------------- malformed run directories


def test_missing_or_malformed_run_directories_name_what_is_wrong(plain: Logged, tmp_path: Path):
    with pytest.raises(RunNotFoundError, match=r"run directory .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunNotFoundError, match="is not a directory"):
        load_run(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunNotFoundError, match=r"has no nodes/ directory"):
        load_run(empty)
    (empty / "nodes").mkdir()
    with pytest.raises(RunNotFoundError, match=r"nodes holds no Parquet files"):
        load_run(empty)

    def copy() -> Path:
        out = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(plain.path, out)
        return out

    run = copy()
    shutil.rmtree(run / "trajectories")
    with pytest.raises(RunNotFoundError, match="has no trajectories/ directory"):
        load_run(run)
    run = copy()
    (run / "nodes" / "step=000002" / "part-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RunFormatError, match=r"step=000002.part-0\.parquet: not a readable"):
        load_run(run)
    run = copy()
    part = run / "trajectories" / "step=000001" / "part-0.parquet"
    table = pq.read_table(part).drop_columns(["advantage", "turns"])
    write_table_atomic(table, part, name="trajectories")
    with pytest.raises(RunFormatError, match=r"lacks the columns \['advantage', 'turns'\]"):
        load_run(run)
    run = copy()
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:6: not a JSON line"):
        load_run(run)
    run = copy()
    (run / "metrics.jsonl").unlink()  # a rollout without training has no metrics: fine
    assert load_run(run).metrics.collect().height == 0


def test_a_step_missing_a_table_is_left_out_not_counted(
    plain: Logged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # Training writes a step's nodes, then its trajectories: a run stopped in between has a
    # step with nodes alone, which must not count as a step (nor its nodes as the run's).
    run = tmp_path / "run"
    shutil.copytree(plain.path, run)
    shutil.rmtree(run / "trajectories" / "step=000003")
    with pytest.warns(UserWarning, match=r"step\(s\) 3 left out"):
        loaded = load_run(run)
    assert loaded.incomplete_steps == (3,)
    tables = summary(loaded)
    assert tables["run"]["steps"].item() == 2
    assert tables["run"]["nodes"].item() == sum(
        plain.results[(s, 0)].forest.num_nodes for s in (1, 2)
    )
    assert assert_steps(loaded) == [1, 2]
    assert main(["logs", "summary", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"run {run}: 2 steps," in out and "(left out, a table missing: step 3)" in out
    assert err.startswith("treegrpo logs summary: warning: ") and len(err.splitlines()) == 1
    # a data-parallel step whose trajectories lack one rank's part is left out too
    nodes = run / "nodes" / "step=000002"
    ranked = pq.read_table(nodes / "part-0.parquet")
    write_table_atomic(ranked, nodes / "part-1.parquet", name="nodes")
    with pytest.warns(UserWarning, match=r"step\(s\) 2, 3 left out"):
        assert assert_steps(load_run(run)) == [1]


def assert_steps(run: Run) -> list[int]:
    steps = [
        sorted(table.select(pl.col("step").unique()).collect()["step"].to_list())
        for table in (run.nodes, run.trajectories)
    ]
    assert steps[0] == steps[1]
    return steps[0]


def test_a_torn_metrics_line_is_named_by_its_line_number(plain: Logged, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(plain.path, run)
    good = (run / "metrics.jsonl").read_text()
    assert len(good.splitlines()) == 5
    # in the middle: an error naming the line
    (run / "metrics.jsonl").write_text(good.replace("\n", '\n{"step": 2, "actor/pg', 1))
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:2: not a JSON line"):
        load_run(run)
    # the last line, cut short by a stop mid-write (no newline): left out, with a warning
    (run / "metrics.jsonl").write_text(good + '{"step": 4, "critic/sco')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:6: the last line is cut short"):
        metrics = load_run(run).metrics.collect()
    assert_frame_equal(metrics, load_run(plain.path).metrics.collect())


def test_a_run_resumed_with_another_world_size_reads_every_part(plain: Logged, tmp_path: Path):
    # step 2 as if written by two ranks (with a `rank` column), steps 1 and 3 by one process
    run = tmp_path / "run"
    shutil.copytree(plain.path, run)
    for table in ("nodes", "trajectories"):
        part = run / table / "step=000002" / "part-0.parquet"
        rows = pq.read_table(part)
        for rank in (0, 1):
            ranked = rows.append_column("rank", pa.array([rank] * len(rows), pa.int32()))
            write_table_atomic(ranked, part.with_name(f"part-{rank}.parquet"), name=table)
    nodes = load_run(run).nodes
    counts = nodes.group_by("step", "rank").len().sort("step", "rank").collect().rows()
    n = {s: plain.results[(s, 0)].forest.num_nodes for s in STEPS}
    assert counts == [(1, 0, n[1]), (2, 0, n[2]), (2, 1, n[2]), (3, 0, n[3])]
    # the copies' node ids collide, but each rank's branch points stay its own
    points = branch_points(nodes).filter(pl.col("step") == 2).collect()
    assert_frame_equal(
        points.filter(pl.col("rank") == 0).drop("rank"),
        points.filter(pl.col("rank") == 1).drop("rank"),
    )


# ---------------------------------------------------------------------- the command line

PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (path, width, height)
    with Image.open(path) as image:
        low, high = image.convert("L").getextrema()
    assert high - low > 100, f"{path} looks blank"


def test_cli_summary(plain: Logged, capsys: pytest.CaptureFixture[str]):
    assert main(["logs", "summary", str(plain.path)]) == 0
    out = capsys.readouterr().out
    n_nodes = total_nodes(plain)
    assert f"run {plain.path}: 3 steps, 24 trees, {n_nodes} nodes" in out
    for title in ("per data source", "by depth", "branching by depth", "token reuse"):
        assert title in out
    assert main(["logs", "summary", str(plain.path), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    expect = summary(load_run(plain.path))
    assert set(tables) == {*expect, "incomplete_steps"} and tables["incomplete_steps"] == []
    assert_frame_equal(pl.DataFrame(tables["branching"]), expect["branching"], check_dtypes=False)


def test_cli_errors_are_messages(tmp_path: Path, plain: Logged, capsys: pytest.CaptureFixture):
    assert main(["logs", "summary", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("treegrpo logs summary: error: run directory") and "does not exist" in err
    out = tmp_path / "t.html"
    assert (
        main(["logs", "tree", str(plain.path), "--step", "9", "--group", "0", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "error: step 9 is not in the run" in err and "its steps are [1, 2, 3]" in err
    with pytest.raises(InvalidArgumentError, match=r"group 7 is not at step 2 .* \[0, 1, 2, 3\]"):
        tree_html(load_run(plain.path), 2, 7)


def test_cli_plot_and_compare_write_png_images(
    plain: Logged, chain: Logged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    pytest.importorskip("matplotlib", reason="plots need the viz extra (matplotlib)")
    assert main(["logs", "plot", str(plain.path), "--out", str(tmp_path / "plots")]) == 0
    written = [Path(x) for x in capsys.readouterr().out.split()]
    names = {"rewards.png", "depth.png", "branching.png", "budget.png", "failures.png"}
    assert {p.name for p in written} == names
    for path in written:
        check_png(path)
    argv = ["logs", "compare", str(plain.path), str(chain.path), "--labels", "tree", "chain"]
    assert main([*argv, "--out", str(tmp_path / "cmp")]) == 0
    written = [Path(x) for x in capsys.readouterr().out.split()]
    assert {p.name for p in written} == {"rewards.png", "budget.png", "depth.png", "failures.png"}
    for path in written:
        check_png(path)


# ---------------------------------------------------------------------- the HTML viewer


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_tree_page_in_headless_chromium(plain: Logged, tmp_path: Path):
    step, group = 1, 1
    out = tmp_path / "tree.html"
    argv = ["logs", "tree", str(plain.path), "--step", str(step), "--group", str(group)]
    assert main([*argv, "--out", str(out)]) == 0
    page = out.read_text()
    # self-contained: nothing to fetch (the SVG namespace string is not a resource)
    assert not re.search(r"\b(src|href)\s*=|@import|url\(\s*['\"]?http", page)
    forest = pl.DataFrame(plain.results[(step, 0)].forest.nodes()).filter(pl.col("group") == group)
    leaves = forest.filter(pl.col("is_leaf"))
    pick = forest.filter(~pl.col("is_leaf") & pl.col("parent").is_not_null())["node"][0]
    action = plain.results[(step, 0)].info[pick].action_text

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; `make venv` tries)")
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            f"{out.as_uri()}#metric=adv&node={pick}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert f'data-nodes="{forest.height}"' in dom, "the page's script did not run to its end"
    classes = re.findall(r'<g class="(node[^"]*)"', dom)
    assert len(classes) == forest.height
    words = Counter(w for c in classes for w in c.split())
    assert words["kept"] == leaves.filter(pl.col("kept")).height
    assert words["dropped"] == leaves.filter(~pl.col("kept")).height
    assert words["branch"] == forest.filter(pl.col("num_children") >= 2).height
    assert words["selected"] == 1
    assert action in dom, "clicking (here: #node=) shows the node's action text"
    assert f">node {pick} (tree " in dom


def test_failures_count_leaves_that_ran_out_of_context():
    nodes = pl.LazyFrame(
        {
            "step": [1, 1, 1, 1],
            "parent": [None, 0, 1, 0],
            "is_leaf": [False, False, True, True],
            "valid": [True, True, True, True],
            "leaf_reason": [None, None, "context_limit", "answer"],
        }
    )
    (row,) = failures(nodes).collect().to_dicts()
    assert (row["leaves"], row["context_limit"], row["answered"]) == (2, 1, 1)
    assert row["context_limit_share"] == approx(0.5)
