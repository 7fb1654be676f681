"""A pure-Python rollout forest: the baseline that bench/core.py times treegrpo against.

Written in the style of the reference code (AMAP-ML/Tree-GRPO on an old verl): node objects with
child lists, selection with ``random.Random``, advantages from per-group ``defaultdict(list)``
score statistics with verl's numerics (a one-member group uses mean 0 and std 1; otherwise the
unbiased std; ``(r - mean) / (std + 1e-6)``; ``A = A_inter + A_intra``), per-node statistics by
walking child lists, and export by building column lists for pyarrow.

Deliberately a fair baseline, not a strawman: ``__slots__`` nodes, column lists rather than a list
of dicts, and token ids kept as NumPy arrays (10^6 steps x 300 tokens as Python ints would take
several GB, and none of the timed operations reads token contents).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

EPS = 1e-6


class Node:
    """One node: the root holds the prompt; any other node one agent step (action + observation)."""

    __slots__ = (
        "action",
        "advantage_sum",
        "children",
        "depth",
        "id",
        "kept",
        "kept_leaves",
        "leaf_reason",
        "observation",
        "parent",
        "prompt",
        "reward",
        "tree",
        "value",
    )

    def __init__(
        self,
        node_id: int,
        parent: Node | None,
        tree: int,
        depth: int,
        prompt: np.ndarray | None,
        action: np.ndarray | None,
        observation: np.ndarray | None,
        leaf_reason: str | None,
    ) -> None:
        self.id = node_id
        self.parent = parent
        self.children: list[Node] = []
        self.tree = tree
        self.depth = depth
        self.prompt = prompt
        self.action = action
        self.observation = observation
        self.leaf_reason = leaf_reason
        self.reward: float | None = None
        self.kept = leaf_reason is not None
        self.kept_leaves = 0
        self.value: float | None = None
        self.advantage_sum = 0.0

    @property
    def is_leaf(self) -> bool:
        return self.leaf_reason is not None


def _tokens(values: Any) -> np.ndarray:
    # The forest owns a copy of the ids, as the Rust forest does.
    return np.array(values, dtype=np.uint32)


def walk(root: Node) -> Iterator[Node]:
    """Every node of a tree, depth first (pre-order), through the child lists."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def mean_std(scores: list[float]) -> tuple[float, float]:
    """verl's group statistics: mean 0 and std 1 for one member, else mean and unbiased std."""
    n = len(scores)
    if n == 1:
        return 0.0, 1.0
    if all(s == scores[0] for s in scores):
        # Equal scores: the reference's term is 0 for every member (docs/algorithm.md section 3).
        # The summed mean can be off by one ulp, which the 1e-6 denominator would turn into 1e-10.
        return scores[0], 0.0
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var)


class PyForest:
    """Groups (prompts) of trees of ``Node`` objects."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.roots: list[Node] = []
        self.tree_group: list[int] = []

    def add_root(self, group: int, prompt: Any) -> int:
        node = Node(len(self.nodes), None, len(self.roots), 0, _tokens(prompt), None, None, None)
        self.nodes.append(node)
        self.roots.append(node)
        self.tree_group.append(group)
        return node.id

    def add_step(
        self, parent: int, action: Any, observation: Any = None, reason: str | None = None
    ) -> int:
        p = self.nodes[parent]
        if p.is_leaf:
            raise ValueError(f"node {parent} is a leaf: it cannot be expanded")
        obs = _tokens(observation if observation is not None else [])
        node = Node(len(self.nodes), p, p.tree, p.depth + 1, None, _tokens(action), obs, reason)
        self.nodes.append(node)
        p.children.append(node)
        return node.id

    def set_rewards(self, leaves: list[int], rewards: list[float]) -> None:
        for leaf, reward in zip(leaves, rewards, strict=True):
            node = self.nodes[leaf]
            if not node.is_leaf:
                raise ValueError(f"node {leaf} is not a leaf")
            if not math.isfinite(reward):
                raise ValueError(f"reward {reward} of leaf {leaf} is not finite")
            node.reward = reward

    def select(self, n: int, seed: int = 0) -> list[int]:
        """Per tree, ``n`` draws with replacement from the root and every non-leaf node."""
        rng = random.Random(seed)
        picks = []
        for root in self.roots:
            candidates = [node for node in walk(root) if not node.is_leaf]
            for _ in range(n):
                picks.append(rng.choice(candidates).id)
        return picks

    def advantages(self) -> dict[str, list]:
        """Tree-GRPO advantages of every kept leaf (A_inter + A_intra), and per-node statistics.

        Returns the per-leaf columns (leaf, tree, group, reward, a_inter, a_intra, advantage) and
        stores kept_leaves, value (mean reward of the kept leaves below) and advantage_sum on
        every node.
        """
        # The batch of trajectories, one per kept leaf, with its group and tree index.
        batch = [node for root in self.roots for node in walk(root) if node.is_leaf and node.kept]
        missing = [leaf.id for leaf in batch if leaf.reward is None]
        if missing:
            raise ValueError(f"{len(missing)} kept leaves have no reward, first {missing[:5]}")
        group_scores: defaultdict[int, list[float]] = defaultdict(list)
        tree_scores: defaultdict[int, list[float]] = defaultdict(list)
        for leaf in batch:
            group_scores[self.tree_group[leaf.tree]].append(leaf.reward)
            tree_scores[leaf.tree].append(leaf.reward)
        group_stats = {g: mean_std(s) for g, s in group_scores.items()}
        tree_stats = {t: mean_std(s) for t, s in tree_scores.items()}

        out: dict[str, list] = {
            k: [] for k in ("leaf", "tree", "group", "reward", "a_inter", "a_intra", "advantage")
        }
        by_leaf: dict[int, float] = {}
        for leaf in batch:
            group = self.tree_group[leaf.tree]
            g_mean, g_std = group_stats[group]
            t_mean, t_std = tree_stats[leaf.tree]
            a_inter = (leaf.reward - g_mean) / (g_std + EPS)
            a_intra = (leaf.reward - t_mean) / (t_std + EPS)
            advantage = a_inter + a_intra
            by_leaf[leaf.id] = advantage
            out["leaf"].append(leaf.id)
            out["tree"].append(leaf.tree)
            out["group"].append(group)
            out["reward"].append(leaf.reward)
            out["a_inter"].append(a_inter)
            out["a_intra"].append(a_intra)
            out["advantage"].append(advantage)

        def accumulate(node: Node) -> tuple[int, float, float]:
            if node.is_leaf:
                if node.id in by_leaf:
                    count, reward_sum, adv_sum = 1, node.reward, by_leaf[node.id]
                else:
                    count, reward_sum, adv_sum = 0, 0.0, 0.0
            else:
                count, reward_sum, adv_sum = 0, 0.0, 0.0
                for child in node.children:
                    c, r, a = accumulate(child)
                    count += c
                    reward_sum += r
                    adv_sum += a
            node.kept_leaves = count
            node.value = reward_sum / count if count else None
            node.advantage_sum = adv_sum
            return count, reward_sum, adv_sum

        for root in self.roots:
            accumulate(root)
        return out

    def nodes_table(self) -> pa.Table:
        """One row per node, the same columns as ``treegrpo.Forest.nodes()``."""
        names = (
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
            "leaf_reason",
            "kept",
            "reward",
            "kept_leaves",
            "value",
            "advantage_sum",
        )
        cols: dict[str, list] = {name: [] for name in names}
        for node in self.nodes:
            root = node.parent is None
            cols["node"].append(node.id)
            cols["parent"].append(None if root else node.parent.id)
            cols["tree"].append(node.tree)
            cols["group"].append(self.tree_group[node.tree])
            cols["depth"].append(node.depth)
            cols["prompt_len"].append(len(node.prompt) if root else 0)
            cols["action_len"].append(0 if root else len(node.action))
            cols["observation_len"].append(0 if root else len(node.observation))
            cols["num_children"].append(len(node.children))
            cols["is_leaf"].append(node.is_leaf)
            cols["leaf_reason"].append(node.leaf_reason)
            cols["kept"].append(node.kept)
            cols["reward"].append(node.reward)
            cols["kept_leaves"].append(node.kept_leaves)
            cols["value"].append(node.value)
            cols["advantage_sum"].append(node.advantage_sum)
        u32, i64, f64, b = pa.uint32(), pa.int64(), pa.float64(), pa.bool_()
        types = {
            "group": i64,
            "is_leaf": b,
            "kept": b,
            "reward": f64,
            "value": f64,
            "advantage_sum": f64,
            "leaf_reason": pa.string(),
        }
        arrays = [pa.array(cols[name], types.get(name, u32)) for name in names]
        arrays[names.index("leaf_reason")] = arrays[names.index("leaf_reason")].dictionary_encode()
        return pa.Table.from_arrays(arrays, names=list(names))

    @staticmethod
    def advantages_table(adv: dict[str, list]) -> pa.Table:
        """The per-leaf columns of ``advantages()`` as a pyarrow table."""
        u32, f64 = pa.uint32(), pa.float64()
        types = {"leaf": u32, "tree": u32, "group": pa.int64()}
        return pa.table({name: pa.array(col, types.get(name, f64)) for name, col in adv.items()})
