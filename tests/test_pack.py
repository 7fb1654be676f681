"""Packing against NumPy references: trajectories, masks, sharing and the loss it reproduces."""

from __future__ import annotations

import numpy as np
import pytest
import treegrpo
from hypothesis import given
from hypothesis import strategies as st
from reference import causal_union, trajectory
from strategies import forests
from treegrpo import Forest

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
EPS, DUAL_CLIP = 0.2, 3.0


def ppo_token_loss(ratio: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """verl's dual-clip PPO loss per token, written out as the reference does."""
    loss1 = -adv * ratio
    loss2 = -adv * np.clip(ratio, 1 - EPS, 1 + EPS)
    clipped = np.maximum(loss1, loss2)
    dual = np.minimum(-adv * DUAL_CLIP, clipped)
    return np.where(adv < 0, dual, clipped)


def aggregate(loss: np.ndarray, mask: np.ndarray, mode: str) -> float:
    """verl's agg_loss over a (B, T) batch."""
    if mode == "token-mean":
        return float((loss * mask).sum() / max(mask.sum(), 1))
    per_seq = (loss * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / np.maximum(mask.sum(-1), 1)
    return float(per_seq.mean())


def flat_loss(flat: dict, ratio_u: np.ndarray, kl_u: np.ndarray, mode: str) -> float:
    idx = np.where(flat["packed_index"] >= 0, flat["packed_index"], 0)
    ratio, kl = ratio_u[idx], kl_u[idx]
    mask = flat["loss_mask"].astype(np.float64)
    pg = aggregate(ppo_token_loss(ratio, flat["advantages"].astype(np.float64)), mask, mode)
    return pg + 0.001 * aggregate(kl, mask, mode)


def packed_loss(packed: dict, ratio_u: np.ndarray, kl_u: np.ndarray) -> float:
    pos, neg = packed["adv_pos"].astype(np.float64), packed["adv_neg"].astype(np.float64)
    pg = -pos * np.minimum(ratio_u, 1 + EPS) + neg * np.minimum(
        np.maximum(ratio_u, 1 - EPS), DUAL_CLIP
    )
    w = packed["token_weight"].astype(np.float64)
    m = packed["loss_mask"]
    return float((pg * m).sum() + 0.001 * (kl_u * w * m).sum())


@given(forests(), st.sampled_from(AGG_MODES), st.integers(0, 2**32 - 1))
def test_packed_weights_reproduce_the_flat_loss(built, mode, seed):
    forest, _ = built
    forest.advantages("tree")
    if not forest.pack().leaves:
        return
    pack = forest.pack(loss_agg_mode=mode)
    rng = np.random.default_rng(seed)
    # ratios spanning both clip edges and the dual clip; a KL-like per-token term
    ratio_u = rng.uniform(0.3, 4.0, pack.unique_tokens)
    kl_u = rng.uniform(0.0, 1.0, pack.unique_tokens)
    expect = flat_loss(pack.flat, ratio_u, kl_u, mode)
    got = packed_loss(pack.packed, ratio_u, kl_u)
    assert got == pytest.approx(expect, rel=1e-5, abs=1e-6)


@given(forests())
def test_unpacking_gives_back_every_trajectory(built):
    forest, ref = built
    forest.advantages()
    pack = forest.pack()
    flat, packed = pack.flat, pack.packed
    assert (
        flat["input_ids"].shape
        == flat["packed_index"].shape
        == (len(pack), flat["input_ids"].shape[1])
    )
    for row, leaf in enumerate(pack.leaves):
        tokens, mask = trajectory(ref, leaf)
        n = len(tokens)
        idx = flat["packed_index"][row]
        assert (idx[n:] == -1).all() and (idx[:n] >= 0).all()
        assert packed["input_ids"][idx[:n]].tolist() == tokens
        assert packed["loss_mask"][idx[:n]].tolist() == mask
        assert packed["position_ids"][idx[:n]].tolist() == list(range(n))
        assert flat["input_ids"][row, :n].tolist() == tokens
        assert flat["attention_mask"][row].sum() == n
        assert flat["loss_mask"][row, :n].tolist() == mask
    lengths = flat["attention_mask"].sum(-1)
    assert pack.total_tokens == lengths.sum()
    assert (
        pack.unique_tokens
        == len(packed["input_ids"])
        == len(np.unique(flat["packed_index"][flat["packed_index"] >= 0]))
    )


@given(forests())
def test_the_mask_rule_is_the_union_of_per_trajectory_causal_masks(built):
    forest, _ = built
    forest.advantages()
    pack = forest.pack()
    u = pack.unique_tokens
    seg, end = pack.packed["segment_ids"], pack.packed["subtree_end"]
    q, kv = np.indices((u, u))
    assert ((kv <= q) & (end[kv] > seg[q]) == np.array(causal_union(pack), dtype=bool)).all(), (
        "the mask_mod rule"
    )


@given(forests())
def test_layout_is_read_off_the_trajectories(built):
    """Pack.layout against a slow reference over the flat rows and the reference forest."""
    forest, ref = built
    forest.advantages()
    pack = forest.pack()
    flat, packed, lay = pack.flat, pack.packed, pack.layout
    u = pack.unique_tokens
    pred = np.full(u, -1, dtype=np.int64)
    counts = np.zeros((3, u), dtype=np.float32)
    for row, idx in enumerate(flat["packed_index"]):
        idx = idx[idx >= 0]
        pred[idx[1:]] = idx[:-1]
        adv = np.float32(pack.leaf_advantages[row])
        for k, through in enumerate((True, adv > 0, adv < 0)):
            counts[k, idx] += through
    assert lay["pred"].tolist() == pred.tolist()
    assert lay["count"].tolist() == counts[0].tolist()
    assert lay["count_pos"].tolist() == counts[1].tolist()
    assert lay["count_neg"].tolist() == counts[2].tolist()
    roots = [s for s, p in enumerate(packed["segment_parent"].tolist()) if p < 0]
    assert lay["tree_segments"].tolist() == [*roots, len(packed["segment_parent"])]
    starts = packed["segment_start"].tolist()
    assert lay["tree_tokens"].tolist() == [*(starts[s] for s in roots), u]
    root_nodes = [int(packed["segment_node"][s]) for s in roots]
    assert lay["tree_group"].tolist() == [ref[n].group for n in root_nodes]
    tree_of_root = {ref[n].tree: i for i, n in enumerate(root_nodes)}
    assert lay["row_tree"].tolist() == [tree_of_root[ref[leaf].tree] for leaf in pack.leaves]
    assert lay["row_tokens"].tolist() == flat["attention_mask"].sum(1).tolist()
    assert lay["row_loss_tokens"].tolist() == flat["loss_mask"].sum(1).tolist()
    assert {k: v.dtype.type for k, v in lay.items()} == {
        **dict.fromkeys(("pred", "tree_segments", "tree_tokens", "tree_group"), np.int64),
        **dict.fromkeys(("count", "count_pos", "count_neg"), np.float32),
        **dict.fromkeys(("row_tree", "row_tokens", "row_loss_tokens"), np.int64),
    }


def test_sharing_ratio_on_a_hand_built_tree():
    f = Forest()
    root = f.add_root(0, list(range(100)))  # 100 prompt tokens
    step = f.add_step(root, [1] * 40, [2] * 60)  # a 100-token step shared by two leaves
    leaves = [f.add_step(step, [3] * 10, leaf=True) for _ in range(2)]
    leaves.append(f.add_step(root, [4] * 50, leaf=True))
    f.set_rewards(leaves, [1.0, 0.0, 0.5])
    f.advantages()
    pack = f.pack()
    assert pack.total_tokens == 210 + 210 + 150
    assert pack.unique_tokens == 100 + 100 + 10 + 10 + 50
    assert pack.sharing_ratio == pytest.approx(570 / 270)
    assert repr(pack).startswith("Pack(trajectories=3, total_tokens=570, unique_tokens=270")
    # depth-first: root, step, its two leaves, then the root's second child
    assert pack.packed["segment_node"].tolist() == [root, step, leaves[0], leaves[1], leaves[2]]
    assert pack.packed["segment_parent"].tolist() == [-1, 0, 1, 1, 0]


def test_pack_dtypes_are_the_documented_ones():
    """docs/architecture.md: uint32 ids, int32 positions and indices, float32 weights."""
    f = Forest()
    root = f.add_root(0, [2**32 - 1, 5])  # the largest u32 id survives as itself
    leaves = [f.add_step(root, [7, 8], leaf=True), f.add_step(root, [9], leaf=True)]
    f.set_rewards(leaves, [1.0, 0.0])
    f.advantages()
    pack = f.pack()
    want_flat = {
        "input_ids": np.uint32,
        "attention_mask": np.bool_,
        "loss_mask": np.bool_,
        "advantages": np.float32,
        "position_ids": np.int32,
        "packed_index": np.int32,
    }
    want_packed = {
        "input_ids": np.uint32,
        "position_ids": np.int32,
        "loss_mask": np.bool_,
        "segment_ids": np.int32,
        "subtree_end": np.int32,
        "token_weight": np.float32,
        "adv_pos": np.float32,
        "adv_neg": np.float32,
        "segment_node": np.uint32,
        "segment_start": np.int64,
        "segment_len": np.int64,
        "segment_parent": np.int32,
    }
    assert {k: v.dtype.type for k, v in pack.flat.items()} == want_flat
    assert {k: v.dtype.type for k, v in pack.packed.items()} == want_packed
    assert pack.flat["input_ids"][0, :3].tolist() == [2**32 - 1, 5, 7]


def test_pack_errors():
    f = Forest()
    leaf = f.add_step(f.add_root(0, [1]), [2], leaf=True)
    with pytest.raises(treegrpo.InvalidArgumentError, match="advantages"):
        f.pack()
    f.set_reward(leaf, 1.0)
    f.advantages()
    with pytest.raises(treegrpo.InvalidOptionError, match="seq-mean-token-sum"):
        f.pack(loss_agg_mode="sum")
    with pytest.raises(treegrpo.InvalidArgumentError, match="twice"):
        f.pack(leaves=[leaf, leaf])
    with pytest.raises(treegrpo.RewardError, match="no advantage"):
        f.pack(leaves=[0])
    with pytest.raises(treegrpo.UnknownNodeError):
        f.pack(leaves=[-3])
