"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import polars as pl
from hypothesis import strategies as st
from reference import RefNode
from treegrpo import Forest


@st.composite
def forests(draw: st.DrawFn) -> tuple[Forest, list[RefNode]]:
    """A random forest built in the same order in Rust and in the reference: interleaved roots
    of several groups, steps under random open nodes, rewards from a small set (ties, equal
    rewards, singletons) or arbitrary floats, and a random K-leaf subsample."""
    forest, ref = Forest(), []
    n_trees = draw(st.integers(1, 6))
    groups = draw(st.lists(st.integers(-3, 3), min_size=n_trees, max_size=n_trees))
    tokens = st.lists(st.integers(0, 2**32 - 1), max_size=4)
    for g in groups:
        prompt = draw(tokens)
        root = forest.add_root(g, prompt)
        ref.append(RefNode(parent=None, tree=len({n.tree for n in ref}), group=g, context=prompt))
        assert root == len(ref) - 1
    for _ in range(draw(st.integers(0, 25))):
        open_nodes = [i for i, n in enumerate(ref) if not n.leaf]
        parent = draw(st.sampled_from(open_nodes))
        action, obs = draw(tokens), draw(tokens)
        leaf = draw(st.booleans())
        node = forest.add_step(parent, action, obs, leaf=leaf)
        ref.append(
            RefNode(parent, ref[parent].tree, ref[parent].group, leaf, leaf, None, action, obs)
        )
        assert node == len(ref) - 1
    rewards = st.sampled_from([0.0, 0.1, 0.2, 0.8, 1.0]) | st.floats(-5, 5)
    leaves = [i for i, n in enumerate(ref) if n.leaf]
    values = [draw(rewards) for _ in leaves]
    forest.set_rewards(leaves, values)
    for i, r in zip(leaves, values, strict=True):
        ref[i].reward = r
    per_tree = Counter(n.tree for n in ref if n.leaf)
    smallest = min(per_tree.get(t, 0) for t in range(n_trees))
    if smallest > 0 and draw(st.booleans()):
        forest.keep_leaves(draw(st.integers(1, smallest)), seed=draw(st.integers(0, 2**32)))
        kept = pl.DataFrame(forest.leaves()).select("leaf", "kept").rows()
        for leaf, is_kept in kept:
            ref[leaf].kept = is_kept
    return forest, ref


@st.composite
def scored_forests(draw: st.DrawFn) -> tuple[Forest, list[RefNode]]:
    """A random forest without rewards whose steps carry a mean log-prob (or none), as the
    rollout adds them: several trees, some with no open step (a lone answer)."""
    forest, ref = Forest(), []
    n_trees = draw(st.integers(1, 5))
    for t in range(n_trees):
        forest.add_root(t % 3, [t])
        ref.append(RefNode(parent=None, tree=t, group=t % 3, context=[t]))
    log_probs = st.none() | st.sampled_from([0.0, -0.5, -1.0, 0.25]) | st.floats(-8, 1)
    for _ in range(draw(st.integers(0, 30))):
        open_nodes = [i for i, n in enumerate(ref) if not n.leaf]
        parent = draw(st.sampled_from(open_nodes))
        leaf, mlp = draw(st.booleans()), draw(log_probs)
        node = forest.add_step(parent, [1], [2], leaf=leaf, mean_log_prob=mlp)
        ref.append(
            RefNode(parent, ref[parent].tree, ref[parent].group, leaf, leaf, None, [1], [2], mlp)
        )
        assert node == len(ref) - 1
    return forest, ref


# --------------------------------------------------------------------------- stop strings

# A small alphabet, so stop strings occur, overlap and share prefixes often.
STOP_ALPHABET = "ab</>"
TEXT = st.text(alphabet=STOP_ALPHABET, max_size=30)
STOPS = st.lists(st.text(alphabet=STOP_ALPHABET, min_size=0, max_size=4), max_size=4)


@st.composite
def tokenized(draw: st.DrawFn, *, empty: bool = False) -> list[str]:
    """A text cut into tokens of 1 to 3 characters (the token id is the piece's index); with
    ``empty``, also up to 3 tokens that decode to nothing, anywhere (as a byte of a character
    split across tokens may)."""
    text = draw(TEXT)
    pieces, at = [], 0
    while at < len(text):
        width = draw(st.integers(1, 3))
        pieces.append(text[at : at + width])
        at += width
    if empty:
        for _ in range(draw(st.integers(0, 3))):
            pieces.insert(draw(st.integers(0, len(pieces))), "")
    return pieces


def decoder(pieces: list[str]) -> Callable[[Sequence[int]], str]:
    """Token ids (indexes into ``pieces``) -> their text, the pieces joined."""
    return lambda ids: "".join(pieces[i] for i in ids)
