"""The Forest against the slow reference in tests/reference.py, plus its errors and Arrow export."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import treegrpo
from hypothesis import given
from hypothesis import strategies as st
from reference import advantages, mix_seed, node_stats, root_fallback, surprisal_weights, trajectory
from strategies import forests, scored_forests
from treegrpo import Forest

ESTIMATORS = ["tree", "tree_intra", "tree_inter", "grpo"]


# ---------------------------------------------------------------- advantages


@given(forests(), st.sampled_from(ESTIMATORS), st.booleans())
def test_advantages_match_the_reference(built, estimator, scale_std):
    forest, ref = built
    table = pl.DataFrame(forest.advantages(estimator, scale_std=scale_std))
    expect = advantages(ref, estimator, scale_std)
    assert table["leaf"].to_list() == sorted(expect)
    for leaf, tree, group, reward, a_inter, a_intra, adv in table.rows():
        assert (tree, group, reward) == (ref[leaf].tree, ref[leaf].group, ref[leaf].reward)
        assert (a_inter, a_intra, adv) == pytest.approx(expect[leaf], rel=1e-9, abs=1e-9)


@given(forests())
def test_node_statistics_match_the_reference(built):
    forest, ref = built
    forest.advantages("tree")
    expect = node_stats(ref, advantages(ref))
    nodes = pl.DataFrame(forest.nodes())
    assert nodes["node"].to_list() == list(range(len(ref)))
    assert nodes["parent"].to_list() == [n.parent for n in ref]
    for (kept_leaves, value, adv_sum), (k, v, s) in zip(
        nodes.select("kept_leaves", "value", "advantage_sum").rows(), expect, strict=True
    ):
        assert kept_leaves == k
        assert value == (None if v is None else pytest.approx(v, rel=1e-12, abs=1e-12))
        assert adv_sum == pytest.approx(s, rel=1e-9, abs=1e-9)


def worked_example() -> tuple[Forest, list[int]]:
    """algorithm.md: M=2, K=3, tree A rewards [1, 1, 0.2], tree B [0.2, 0, 0.2]."""
    f = Forest()
    leaves = []
    for rewards in ([1.0, 1.0, 0.2], [0.2, 0.0, 0.2]):
        root = f.add_root(0, [1, 2])
        step = f.add_step(root, [3], [4])
        for i, r in enumerate(rewards):
            leaf = f.add_step(root if i == 0 else step, [5], leaf=True)
            f.set_reward(leaf, r)
            leaves.append(leaf)
    return f, leaves


def test_worked_example_of_the_algorithm_doc():
    f, _ = worked_example()
    adv = pa.table(f.advantages()).column("advantage").to_pylist()
    assert [round(a, 3) for a in adv] == [1.849, 1.849, -1.678, 0.054, -2.127, 0.054]


def test_singleton_group_uses_the_raw_reward_and_equal_rewards_give_zero():
    f = Forest()
    lone = f.add_step(f.add_root(0, [1]), [2], leaf=True)
    r1 = f.add_root(1, [1])
    equal = [f.add_step(r1, [2], leaf=True) for _ in range(3)]
    f.set_rewards([lone, *equal], [0.7, 0.2, 0.2, 0.2])
    rows = {row[0]: row for row in pl.DataFrame(f.advantages()).rows()}
    # a one-leaf group and a one-leaf tree: both terms are 0.7 / (1 + 1e-6)
    assert rows[lone][4] == rows[lone][5] == 0.7 / (1 + 1e-6)
    assert all(rows[i][4] == 0.0 and rows[i][5] == 0.0 for i in equal)
    rows = {row[0]: row for row in pl.DataFrame(f.advantages(scale_std=False)).rows()}
    assert rows[lone][6] == 1.4


def test_tree_inter_equals_grpo_over_all_leaves_of_the_prompt():
    f, _ = worked_example()
    inter = pl.DataFrame(f.advantages("tree_inter"))["advantage"]
    grpo = pl.DataFrame(f.advantages("grpo"))["advantage"]
    assert inter.to_list() == grpo.to_list()


@given(forests())
def test_trajectories_match_the_reference(built):
    forest, ref = built
    forest.advantages()
    adv = advantages(ref)
    for leaf in (i for i, n in enumerate(ref) if n.leaf):
        tokens, mask = trajectory(ref, leaf)
        ids, loss_mask = forest.tokens(leaf)
        assert ids.dtype == np.uint32 and loss_mask.dtype == np.bool_
        assert ids.tolist() == tokens and loss_mask.tolist() == mask
        if leaf in adv:
            ids, loss_mask, a = forest.trajectory(leaf)
            assert ids.tolist() == tokens
            np.testing.assert_allclose(a, np.full(len(tokens), adv[leaf][2]), rtol=1e-6, atol=1e-6)
        else:
            with pytest.raises(treegrpo.RewardError, match="no advantage"):
                forest.trajectory(leaf)


# ---------------------------------------------------------------- selection and K


def star(n_open: int = 3, n_leaves: int = 2) -> tuple[Forest, int, list[int], list[int]]:
    f = Forest()
    root = f.add_root(0, [1])
    opened = [f.add_step(root, [2], [3]) for _ in range(n_open)]
    leaves = [f.add_step(opened[0], [4], leaf=True) for _ in range(n_leaves)]
    return f, root, opened, leaves


def test_selection_is_uniform_over_root_and_open_nodes_and_never_draws_leaves():
    f, root, opened, leaves = star()
    draws = Counter(f.select(40_000, seed=1))
    assert set(draws) == {root, *opened}
    for node in (root, *opened):
        assert abs(draws[node] / 40_000 - 0.25) < 0.01
    # many seeds of the reference's n=2 draw: same distribution
    many = Counter(p for s in range(5_000) for p in f.select(2, seed=s))
    assert set(many) == {root, *opened}
    assert all(abs(c / 10_000 - 0.25) < 0.02 for c in many.values())
    assert not set(leaves) & set(many)


def test_selection_options_and_determinism():
    f, root, opened, _ = star()
    assert f.select(7, seed=3) == f.select(7, seed=3)
    assert f.select(50, seed=3) != f.select(50, seed=4)
    assert root not in f.select(200, seed=0, include_root=False)
    distinct = f.select(10, seed=0, replace=False)
    assert sorted(distinct) == [root, *opened]
    assert len(set(f.select(2, seed=0, replace=False))) == 2
    assert f.select(0, seed=0) == []


def test_a_trees_draws_depend_only_on_the_seed_and_its_own_nodes():
    f, *_ = star()
    before = f.select(5, seed=9)
    g = f.add_root(1, [7])
    f.add_step(g, [1], [2])
    after = f.select(5, seed=9)
    assert after[:5] == before and len(after) == 10


def test_select_counts_per_tree_and_skips_trees_without_candidates():
    f = Forest()
    for group in range(3):
        f.add_root(group, [1])
    assert len(f.select(2, seed=0)) == 6
    only_leaves = Forest()
    r = only_leaves.add_root(0, [1])
    only_leaves.add_step(r, [1], leaf=True)
    assert only_leaves.select(3, seed=0, include_root=False) == []


def test_select_refuses_more_draws_than_memory_holds_instead_of_aborting():
    f = Forest()
    for group in range(3):
        f.add_root(group, [1])
    for n in (2**40, 2**63):  # n * trees past the cap; the second overflows usize
        with pytest.raises(treegrpo.InvalidArgumentError, match="draw fewer nodes per tree"):
            f.select(n, seed=0)
        with pytest.raises(treegrpo.InvalidArgumentError, match="draw fewer nodes per tree"):
            f.select_weighted(n, [1.0] * f.num_nodes, seed=0)
    assert len(f.select(2, seed=0)) == 6  # the forest is unchanged and still draws


@given(
    scored_forests(),
    st.sampled_from(["uniform", "surprisal"]),
    st.sampled_from([0.0, 0.5, 3.0]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 4),
    st.lists(st.integers(0, 2**40), min_size=1, max_size=3),
)
def test_select_policies_and_root_fallback_match_the_reference(
    built, policy, penalty, replace, include_root, n, parts
):
    """The rollout's rules as they were in Python (tests/reference.py): weights, the seed
    fold, the fallback to a tree's root; the draws themselves are select's/select_weighted's."""
    forest, ref = built
    seed = mix_seed(*parts)
    opts = {"replace": replace, "include_root": include_root}
    if policy == "uniform" and penalty == 0:
        picks = forest.select(n, seed=seed, **opts)
    else:
        weights = [1.0] * len(ref) if policy == "uniform" else surprisal_weights(ref)
        picks = forest.select_weighted(n, weights, seed=seed, overexpand_penalty=penalty, **opts)
    expect = root_fallback(ref, picks, n, replace) if not include_root else picks
    got = forest.select(
        n,
        seed=parts,
        policy=policy,
        overexpand_penalty=penalty,
        root_fallback=True,
        **opts,
    )
    assert got == expect
    assert forest.select(n, seed=parts, policy=policy, overexpand_penalty=penalty, **opts) == (
        picks
    )


@given(scored_forests())
def test_contexts_paths_places_and_mean_log_probs_read_the_forest(built):
    forest, ref = built
    nodes = pl.DataFrame(forest.nodes())
    for i, n in enumerate(ref):
        tokens, _ = trajectory(ref, i)
        assert forest.context(i) == tokens
        path = forest.path(i)
        assert path[-1] == i and ref[path[0]].parent is None
        assert all(ref[b].parent == a for a, b in itertools.pairwise(path))
        assert forest.place(i) == (n.tree, n.group, len(path) - 1)
        expect = n.mean_log_prob if n.parent is not None else None
        assert nodes["mean_log_prob"][i] == expect
    assert forest.leaf_ids() == [i for i, n in enumerate(ref) if n.leaf]


def test_select_seeds_fold_in_the_core_and_bad_options_are_refused():
    f, _, opened, _ = star()
    assert f.select(9, seed=(1, 2, 3)) == f.select(9, seed=mix_seed(1, 2, 3))
    assert f.select(9, seed=[7, -1]) == f.select(9, seed=mix_seed(7, -1))
    f.keep_leaves(1, seed=(4, 5))
    kept = pl.DataFrame(f.leaves())["kept"].to_list()
    f.keep_leaves(1, seed=mix_seed(4, 5))
    assert pl.DataFrame(f.leaves())["kept"].to_list() == kept
    with pytest.raises(treegrpo.InvalidOptionError, match="'uniform', 'surprisal'"):
        f.select(2, policy="greedy")
    for bad in ("7", [1.5], [True], [2**64]):
        with pytest.raises(treegrpo.InvalidArgumentError, match="seed must be an int"):
            f.select(2, seed=bad)
    with pytest.raises(treegrpo.InvalidArgumentError, match="overexpand penalty"):
        f.select(2, overexpand_penalty=-1.0)
    f.add_step(opened[1], [1], leaf=True, mean_log_prob=-math.inf)
    with pytest.raises(treegrpo.InvalidArgumentError, match="not a finite number"):
        f.select(2, policy="surprisal")
    assert len(f.select(2, policy="uniform")) == 2  # the uniform policy reads no surprisal
    for bad_node in (-1, 99):
        for call in (f.context, f.path, f.place):
            with pytest.raises(treegrpo.UnknownNodeError):
                call(bad_node)


def test_keep_leaves_keeps_k_per_tree_uniformly():
    f, _, _, _ = star(n_open=1, n_leaves=4)
    counts: Counter[int] = Counter()
    for seed in range(4_000):
        f.keep_leaves(2, seed=seed)
        kept = pl.DataFrame(f.leaves()).filter(pl.col("kept"))["leaf"].to_list()
        assert len(kept) == 2
        counts.update(kept)
    assert all(abs(c / 8_000 - 0.25) < 0.02 for c in counts.values())
    f.keep_leaves(2, seed=5)
    first = pl.DataFrame(f.leaves())["kept"].to_list()
    f.keep_leaves(2, seed=5)
    assert pl.DataFrame(f.leaves())["kept"].to_list() == first


# ---------------------------------------------------------------- Arrow


def test_tables_round_trip_through_polars_and_pyarrow():
    f, leaves = worked_example()
    adv = f.advantages()
    assert adv.column_names == [
        "leaf", "tree", "group", "reward", "a_inter", "a_intra", "advantage"
    ]  # fmt: skip
    df = pl.DataFrame(adv)
    table = pa.table(adv)
    batch = pa.record_batch(adv)  # through __arrow_c_array__
    assert df.to_dicts() == table.to_pylist() == batch.to_pylist()
    assert df["leaf"].to_list() == leaves and len(adv) == adv.num_rows == 6
    assert df.schema["leaf"] == pl.UInt32 and df.schema["group"] == pl.Int64
    nodes = pa.table(f.nodes())
    assert nodes.schema.field("parent").nullable and not nodes.schema.field("node").nullable
    assert nodes.num_rows == f.num_nodes == len(f)
    reasons = pl.DataFrame(f.leaves())["leaf_reason"].cast(pl.Utf8).to_list()
    assert reasons == ["answer"] * 6


def test_a_table_outlives_its_forest_and_its_first_reader():
    f, _ = worked_example()
    t = f.nodes()
    del f
    first = pl.DataFrame(t)
    assert pl.DataFrame(t).equals(first)
    assert pa.table(t).num_rows == 10


def test_statistics_reset_when_the_forest_changes():
    f, leaves = worked_example()
    f.advantages()
    assert pl.DataFrame(f.nodes())["value"].null_count() == 0
    f.set_reward(leaves[0], 0.5)
    assert pl.DataFrame(f.nodes())["value"].null_count() == f.num_nodes
    assert len(pl.DataFrame(f.advantages())) == 6


def test_leaf_reasons_and_repr():
    f = Forest()
    r = f.add_root(0, [1, 2])
    f.add_step(r, [3], leaf=True)
    f.add_step(r, [3], reason="forced_final")
    f.add_step(r, [3], reason="truncated")
    f.add_step(r, np.array([5, 6], dtype=np.uint32), np.array([7], dtype=np.int64))
    reasons = pl.DataFrame(f.leaves())["leaf_reason"].cast(pl.Utf8).to_list()
    assert reasons == ["answer", "forced_final", "truncated"]
    assert repr(f) == "Forest(groups=1, trees=1, nodes=5, leaves=3)"
    assert f.tokens(4)[0].tolist() == [1, 2, 5, 6, 7]
    assert (f.num_groups, f.num_trees, f.num_leaves) == (1, 1, 3)


# ---------------------------------------------------------------- bad input


def snapshot(f: Forest) -> pl.DataFrame:
    return pl.DataFrame(f.nodes())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, ids: f.add_step(ids["leaf"], [1]), treegrpo.InvalidStepError, "is a leaf"),
        (lambda f, ids: f.add_step(99, [1]), treegrpo.UnknownNodeError, "unknown node id 99"),
        (lambda f, ids: f.add_step(-1, [1]), treegrpo.UnknownNodeError, "unknown node id -1"),
        (lambda f, ids: f.set_reward(99, 1.0), treegrpo.UnknownNodeError, "unknown node"),
        (lambda f, ids: f.tokens(99), treegrpo.UnknownNodeError, "unknown node"),
        (lambda f, ids: f.set_reward(ids["open"], 1.0), treegrpo.RewardError, "not a leaf"),
        (lambda f, ids: f.set_reward(ids["leaf"], math.nan), treegrpo.RewardError, "finite"),
        (lambda f, ids: f.set_reward(ids["leaf"], math.inf), treegrpo.RewardError, "finite"),
        (
            lambda f, ids: f.set_rewards([ids["leaf"], ids["open"]], [1.0, 1.0]),
            treegrpo.RewardError,
            "not a leaf",
        ),
        (lambda f, ids: f.set_rewards([ids["leaf"]], []), treegrpo.InvalidArgumentError, "one"),
        (lambda f, ids: f.advantages(), treegrpo.RewardError, "no reward"),
        (lambda f, ids: f.keep_leaves(2), treegrpo.InvalidArgumentError, "k <= 1"),
        (lambda f, ids: f.advantages("gae"), treegrpo.InvalidOptionError, "'tree_intra'"),
        (lambda f, ids: f.add_step(0, [1], reason="won"), treegrpo.InvalidOptionError, "answer"),
        (lambda f, ids: f.add_step(0, [-1]), treegrpo.InvalidArgumentError, "position 0"),
        (lambda f, ids: f.add_step(0, [1, 2**32]), treegrpo.InvalidArgumentError, "position 1"),
        (lambda f, ids: f.add_step(0, [1.5]), treegrpo.InvalidArgumentError, "1.5"),
        (lambda f, ids: f.add_step(0, "abc"), treegrpo.InvalidArgumentError, "tokenize"),
        (lambda f, ids: f.add_step(0, 7), treegrpo.InvalidArgumentError, "list or 1-D"),
        (
            lambda f, ids: f.add_step(0, np.array([1, -2])),
            treegrpo.InvalidArgumentError,
            "-2 at position 1",
        ),
        (lambda f, ids: f.trajectory(ids["leaf"]), treegrpo.RewardError, "no advantage"),
    ],
)
def test_bad_input_raises_a_typed_error_and_changes_nothing(call, error, match):
    f = Forest()
    root = f.add_root(0, [1, 2])
    ids = {"open": f.add_step(root, [3], [4])}
    ids["leaf"] = f.add_step(ids["open"], [5], leaf=True)
    before = snapshot(f)
    with pytest.raises(error, match=match):
        call(f, ids)
    assert snapshot(f).equals(before)


def test_errors_are_catchable_by_their_builtin_base():
    f = Forest()
    with pytest.raises(KeyError) as info:
        f.add_step(5, [1])
    assert str(info.value).startswith("unknown node id 5")  # no KeyError quoting
    assert issubclass(treegrpo.InvalidStepError, ValueError)
    assert issubclass(treegrpo.UnknownNodeError, treegrpo.TreeGRPOError)
