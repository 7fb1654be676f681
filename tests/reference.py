"""Slow, obviously-correct Python references the Rust core is tested against.

Written from algorithm.md section 3 with plain lists and the statistics module: no arrays,
no incremental sums, nothing clever.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

EPS = 1e-6


@dataclass
class RefNode:
    parent: int | None
    tree: int
    group: int
    leaf: bool = False
    kept: bool = False
    reward: float | None = None
    action: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    mean_log_prob: float | None = None


def z_scores(rewards: list[float], scale_std: bool) -> list[float]:
    """verl's GRPO outcome normalisation: singleton -> mean 0, std 1; unbiased std; eps 1e-6."""
    if len(rewards) == 1:
        mean, std = 0.0, 1.0
    elif len(set(rewards)) == 1:
        return [0.0] * len(rewards)
    else:
        mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    if scale_std:
        return [(r - mean) / (std + EPS) for r in rewards]
    return [r - mean for r in rewards]


def advantages(
    nodes: list[RefNode], estimator: str = "tree", scale_std: bool = True
) -> dict[int, tuple[float, float, float]]:
    """{leaf id: (a_inter, a_intra, advantage)} over the kept leaves."""
    kept = [i for i, n in enumerate(nodes) if n.leaf and n.kept]
    inter: dict[int, float] = {}
    intra: dict[int, float] = {}
    for key, by in (("group", inter), ("tree", intra)):
        for value in {getattr(nodes[i], key) for i in kept}:
            members = [i for i in kept if getattr(nodes[i], key) == value]
            rewards = [float(nodes[i].reward) for i in members]  # type: ignore[arg-type]
            by.update(zip(members, z_scores(rewards, scale_std), strict=True))
    out = {}
    for i in kept:
        total = {
            "tree": inter[i] + intra[i],
            "tree_intra": intra[i],
            "tree_inter": inter[i],
            "grpo": inter[i],
        }[estimator]
        out[i] = (inter[i], intra[i], total)
    return out


def ancestors_or_self(nodes: list[RefNode], i: int) -> list[int]:
    path = [i]
    while nodes[path[-1]].parent is not None:
        path.append(nodes[path[-1]].parent)  # type: ignore[arg-type]
    return path


def node_stats(
    nodes: list[RefNode], adv: dict[int, tuple[float, float, float]]
) -> list[tuple[int, float | None, float]]:
    """Per node: (kept leaves below, V = their mean reward or None, summed advantage)."""
    below: list[list[int]] = [[] for _ in nodes]
    for leaf in adv:
        for a in ancestors_or_self(nodes, leaf):
            below[a].append(leaf)
    return [
        (
            len(leaves),
            statistics.fmean(nodes[j].reward for j in leaves) if leaves else None,  # type: ignore[misc]
            sum(adv[j][2] for j in leaves),
        )
        for leaves in below
    ]


def trajectory(nodes: list[RefNode], leaf: int) -> tuple[list[int], list[bool]]:
    tokens: list[int] = []
    mask: list[bool] = []
    for i in reversed(ancestors_or_self(nodes, leaf)):
        tokens += nodes[i].action + nodes[i].context
        mask += [True] * len(nodes[i].action) + [False] * len(nodes[i].context)
    return tokens, mask


def causal_union(pack) -> list[list[bool]]:
    """The (U, U) tree attention mask (row = query) as the union of every trajectory's causal
    mask over its packed positions: the slow reference of the packed layout's rule."""
    u = pack.unique_tokens
    mask = [[False] * u for _ in range(u)]
    for row in pack.flat["packed_index"].tolist():
        idx = [x for x in row if x >= 0]
        for a, q in enumerate(idx):
            for kv in idx[: a + 1]:
                mask[q][kv] = True
    return mask


# ---------------------------------------------------------------- selection (the rollout's rules)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several ints, splitmix64-style: the fold the rollout derived each
    round's selection seed with, (seed, step, round), before the core did it."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


def surprisal_weights(nodes: list[RefNode]) -> list[float]:
    """Per node: a step weighs max(-mean log-prob, 0) (0 without one); a root the mean weight
    of its tree's steps that have one (0 if none)."""
    weights = [0.0] * len(nodes)
    by_tree: dict[int, list[float]] = {}
    for i, n in enumerate(nodes):
        if n.parent is not None and n.mean_log_prob is not None:
            weights[i] = max(-n.mean_log_prob, 0.0)
            by_tree.setdefault(n.tree, []).append(weights[i])
    for i, n in enumerate(nodes):
        if n.parent is None:
            seen = by_tree.get(n.tree, [])
            weights[i] = sum(seen) / len(seen) if seen else 0.0
    return weights


def root_fallback(nodes: list[RefNode], picks: list[int], n: int, replace: bool) -> list[int]:
    """A tree that got no draw is expanded from its root (n times with replacement, else
    once); the picks stay grouped by tree, in tree order."""
    drawn = {nodes[p].tree for p in picks}
    extra = [
        i
        for i, node in enumerate(nodes)
        if node.parent is None and node.tree not in drawn
        for _ in range(n if replace else min(n, 1))
    ]
    return sorted(picks + extra, key=lambda p: nodes[p].tree)
