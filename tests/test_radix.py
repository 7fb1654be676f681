"""The RadixIndex against a slow token-level reference trie, plus its API, errors and threads.

The reference (``RefRadix``) stores one dict entry per token, keyed by the token's whole path
from the root, and marks the paths where a radix node ends ("boundaries"); a node is the run of
tokens between two boundaries, and its lock count and last access live on its end boundary.
Every operation is written from the model in ``rust/radix.rs`` with plain scans, no arena and
no heap, so its results can be compared with the Rust index step by step.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treegrpo import InvalidArgumentError, LockError, RadixIndex, StaleHandleError

Path = tuple[int, ...]


class RefRadix:
    """SGLang's radix cache, one token at a time."""

    def __init__(self) -> None:
        self.clock = 0
        self.reset()

    def reset(self) -> None:
        """Drop every token; the clock keeps running."""
        self.value: dict[Path, int] = {}  # every stored token -> its value
        self.boundary: set[Path] = set()  # paths where a node ends
        self.access: dict[Path, int] = {}  # boundary -> last access
        self.locks: dict[Path, int] = {}  # boundary -> lock count

    # ---- structure

    def has_child(self, p: Path) -> bool:
        return any(len(q) == len(p) + 1 and q[:-1] == p for q in self.value)

    def node_start(self, b: Path) -> int:
        """Length of the path above the node that ends at boundary ``b``."""
        return max((k for k in range(len(b)) if b[:k] in self.boundary), default=0)

    def node_len(self, b: Path) -> int:
        return len(b) - self.node_start(b)

    def node_end(self, p: Path) -> Path:
        """The boundary of the node holding token ``p`` (inside a node, a token has one child)."""
        while p not in self.boundary:
            (p,) = [q for q in self.value if len(q) == len(p) + 1 and q[:-1] == p]
        return p

    def path_nodes(self, p: Path) -> list[Path]:
        """Boundaries from the root down to ``p`` (a boundary, or () for the root)."""
        return [p[:k] for k in range(1, len(p) + 1) if p[:k] in self.boundary]

    # ---- operations

    def walk(self, tokens: list[int]) -> Path:
        """Longest stored prefix; split so a node ends there; touch the path."""
        m = 0
        while m < len(tokens) and tuple(tokens[: m + 1]) in self.value:
            m += 1
        end = tuple(tokens[:m])
        if m and end not in self.boundary:  # split: the new upper node copies the lower one
            lower = self.node_end(end)
            self.boundary.add(end)
            self.access[end], self.locks[end] = self.access[lower], self.locks[lower]
        for b in self.path_nodes(end):
            self.access[b] = self.clock
        return end

    def insert(self, tokens: list[int], value: int) -> int:
        self.clock += 1
        if not tokens:
            return 0
        end = self.walk(tokens)
        if len(end) < len(tokens):
            for k in range(len(end) + 1, len(tokens) + 1):
                self.value[tuple(tokens[:k])] = value
            leaf = tuple(tokens)
            self.boundary.add(leaf)
            self.access[leaf], self.locks[leaf] = self.clock, 0
        return len(end)

    def match_prefix(self, tokens: list[int]) -> tuple[Path, int | None]:
        self.clock += 1
        end = self.walk(tokens)
        return end, (self.value[end] if end else None)

    def inc_lock_ref(self, p: Path) -> int:
        nodes = self.path_nodes(p)
        newly = sum(self.node_len(b) for b in nodes if self.locks[b] == 0)
        for b in nodes:
            self.locks[b] += 1
        return newly

    def dec_lock_ref(self, p: Path) -> int | None:
        """None for an underflow (and nothing changes)."""
        nodes = self.path_nodes(p)
        if any(self.locks[b] == 0 for b in nodes):
            return None
        for b in nodes:
            self.locks[b] -= 1
        return sum(self.node_len(b) for b in nodes if self.locks[b] == 0)

    def evict(self, n_tokens: int) -> tuple[int, list[int], list[Path]]:
        """(freed, dropped values, removed boundaries)."""
        freed, dropped, removed = 0, [], []
        while freed < n_tokens:
            leaves = [b for b in self.boundary if self.locks[b] == 0 and not self.has_child(b)]
            if not leaves:
                break
            oldest = min(self.access[b] for b in leaves)
            (victim,) = [b for b in leaves if self.access[b] == oldest]  # the model has no ties
            for k in range(self.node_start(victim) + 1, len(victim) + 1):
                value = self.value.pop(victim[:k])
                if value not in self.value.values():
                    dropped.append(value)
                freed += 1
            self.boundary.remove(victim)
            del self.access[victim], self.locks[victim]
            removed.append(victim)
        return freed, dropped, removed

    # ---- observations

    def total_size(self) -> int:
        return len(self.value)

    def protected_size(self) -> int:
        return sum(self.node_len(b) for b in self.boundary if self.locks[b] > 0)

    def sequences(self) -> list[list[int]]:
        parents = {q[:-1] for q in self.value}
        return sorted(list(p) for p in self.value if p not in parents)


# ---------------------------------------------------------------- random operation sequences

ALPHABET = st.integers(0, 3)


@st.composite
def token_lists(draw: st.DrawFn, bases: list[list[int]]) -> list[int]:
    """A prefix of one of a few base sequences plus a short random suffix: heavy sharing."""
    base = draw(st.sampled_from(bases))
    cut = draw(st.integers(0, len(base)))
    return base[:cut] + draw(st.lists(ALPHABET, max_size=3))


OPS = ["insert"] * 4 + ["match"] * 3 + ["lock"] + ["unlock"] * 2 + ["evict"] * 2 + ["reset"]
VALUES = st.integers(0, 4) | st.sampled_from([2**63, 2**64 - 1])
BOGUS_HANDLES = [10**6, 2**40 + 1, 2**64 - 1]


def check_same(ix: RadixIndex, ref: RefRadix) -> None:
    assert ix.total_size == len(ix) == ref.total_size()
    assert ix.protected_size == ref.protected_size()
    assert ix.evictable_size == ref.total_size() - ref.protected_size()
    assert ix.num_nodes == len(ref.boundary)
    assert ix.sequences() == ref.sequences()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_operations_match_the_reference(data: st.DataObject) -> None:
    bases = data.draw(st.lists(st.lists(ALPHABET, max_size=10), min_size=1, max_size=3))
    ix, ref = RadixIndex(), RefRadix()
    root = ix.match_prefix([])[1]
    ref.match_prefix([])
    handle_of: dict[Path, int] = {(): root}  # live node (end boundary) -> its handle
    path_of: dict[int, Path] = {root: ()}
    seen: list[int] = [root, *BOGUS_HANDLES]  # every handle ever returned, live or stale

    def forget(paths: list[Path]) -> None:
        for p in paths:
            if p in handle_of:
                del path_of[handle_of.pop(p)]

    for _ in range(data.draw(st.integers(1, 50))):
        op = data.draw(st.sampled_from(OPS))
        if op == "insert":
            tokens, value = data.draw(token_lists(bases)), data.draw(VALUES)
            assert ix.insert(tokens, value) == ref.insert(tokens, value)
        elif op == "match":
            tokens = data.draw(token_lists(bases))
            length, handle, value = ix.match_prefix(tokens)
            end, ref_value = ref.match_prefix(tokens)
            assert (length, value) == (len(end), ref_value)
            # One handle per node, stable across splits until the node is evicted.
            assert handle_of.setdefault(end, handle) == handle
            assert path_of.setdefault(handle, end) == end
            seen.append(handle)
            if data.draw(st.booleans()):  # what a scheduler does: match, then lock the prefix
                assert ix.inc_lock_ref(handle) == ref.inc_lock_ref(end)
        elif op in ("lock", "unlock"):
            # Mostly a live handle (the root included), sometimes any handle ever seen.
            handle = data.draw(st.sampled_from(sorted(path_of)) | st.sampled_from(seen))
            before = ix.pretty_print()
            if handle not in path_of:
                with pytest.raises(StaleHandleError):
                    (ix.inc_lock_ref if op == "lock" else ix.dec_lock_ref)(handle)
                assert ix.pretty_print() == before
            elif op == "lock":
                assert ix.inc_lock_ref(handle) == ref.inc_lock_ref(path_of[handle])
            else:
                expected = ref.dec_lock_ref(path_of[handle])
                if expected is None:
                    with pytest.raises(LockError):
                        ix.dec_lock_ref(handle)
                    assert ix.pretty_print() == before
                else:
                    assert ix.dec_lock_ref(handle) == expected
        elif op == "evict":
            n = data.draw(st.integers(0, 12))
            freed, dropped, removed = ref.evict(n)
            assert ix.evict(n) == (freed, dropped)
            forget(removed)
        else:
            ix.reset()
            ref.reset()
            forget([p for p in handle_of if p])
        check_same(ix, ref)

    # Finally evict everything unlocked: same survivors, same drops.
    freed, dropped, _ = ref.evict(10**9)
    assert ix.evict(10**9) == (freed, dropped)
    check_same(ix, ref)


# ---------------------------------------------------------------- examples and the API


def test_insert_match_and_sizes() -> None:
    ix = RadixIndex()
    assert ix.insert([1, 2, 3, 4], 10) == 0
    assert ix.insert([1, 2, 5], 11) == 2
    assert ix.insert(np.array([1, 2, 3, 4, 6], dtype=np.int64), 12) == 4
    assert ix.insert([], 13) == 0
    length, handle, value = ix.match_prefix([1, 2, 3, 9])
    assert (length, value) == (3, 10)
    assert ix.match_prefix([7]) == (0, ix.match_prefix([])[1], None)
    assert (ix.total_size, ix.num_nodes, len(ix)) == (6, 5, 6)
    assert repr(ix) == "RadixIndex(tokens=6, nodes=5, protected=0)"
    assert ix.inc_lock_ref(handle) == 3
    assert (ix.protected_size, ix.evictable_size) == (3, 3)
    assert repr(ix) == "RadixIndex(tokens=6, nodes=5, protected=3)"
    text = ix.pretty_print()
    assert text.splitlines()[0].startswith(repr(ix))
    assert len(text.splitlines()) == 1 + ix.num_nodes
    assert ix.sequences() == [[1, 2, 3, 4, 6], [1, 2, 5]]


def test_lru_eviction_locks_and_dropped_values() -> None:
    ix = RadixIndex()
    ix.insert([1, 1, 1], 1)
    ix.insert([2, 2], 2)
    ix.insert([3], 3)
    _, h, _ = ix.match_prefix([1, 1])  # splits [1 1 1]; the lower [1] stays the oldest
    assert ix.evict(2) == (3, [2])
    assert ix.sequences() == [[1, 1], [3]]
    ix.inc_lock_ref(h)
    assert ix.evict(100) == (1, [3])
    assert ix.sequences() == [[1, 1]]
    assert ix.dec_lock_ref(h) == 2
    with pytest.raises(LockError):
        ix.dec_lock_ref(h)
    assert ix.evict(1) == (2, [1])
    with pytest.raises(StaleHandleError):
        ix.inc_lock_ref(h)
    assert len(ix) == 0


def test_reset_stales_every_handle_but_the_roots() -> None:
    ix = RadixIndex()
    ix.insert([5, 6], 1)
    _, h, _ = ix.match_prefix([5, 6])
    _, root, _ = ix.match_prefix([])
    ix.reset()
    assert (len(ix), ix.num_nodes, ix.sequences()) == (0, 0, [])
    with pytest.raises(StaleHandleError):
        ix.inc_lock_ref(h)
    assert ix.inc_lock_ref(root) == 0
    assert ix.dec_lock_ref(root) == 0


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("insert", ([1, -1], 0)),
        ("insert", ([1, 2**32], 0)),
        ("insert", ("abc", 0)),
        ("insert", ([1.5], 0)),
        ("insert", ([1], -1)),
        ("insert", ([1], 2**64)),
        ("insert", ([1], True)),
        ("insert", ([1], "7")),
        ("match_prefix", ([True],)),
        ("match_prefix", (np.array([[1, 2]]),)),
        ("inc_lock_ref", (-1,)),
        ("dec_lock_ref", (2**64,)),
        ("evict", (-3,)),
    ],
)
def test_bad_arguments_raise_and_change_nothing(call: str, args: tuple) -> None:
    ix = RadixIndex()
    ix.insert([1, 2], 3)
    before = ix.pretty_print()
    with pytest.raises(InvalidArgumentError):
        getattr(ix, call)(*args)
    assert ix.pretty_print() == before


def test_error_classes_refine_builtin_exceptions() -> None:
    ix = RadixIndex()
    with pytest.raises(KeyError, match="evicted radix node handle 12345"):
        ix.inc_lock_ref(12345)
    ix.insert([1], 0)
    _, h, _ = ix.match_prefix([1])
    with pytest.raises(ValueError, match="lock count is 0"):
        ix.dec_lock_ref(h)


def test_long_sequences_and_threads() -> None:
    """Long walks release the GIL; concurrent calls from threads stay consistent."""
    ix = RadixIndex()
    shared = list(range(3000))

    def work(t: int) -> None:
        for i in range(20):
            ix.insert([*shared, t, i, *range(2000)], t)
            ix.match_prefix([*shared, t])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert ix.total_size == 3000 + 4 * (1 + 20 * 2001)
    assert sorted(ix.evict(10**9)[1]) == [0, 1, 2, 3]
    assert len(ix) == 0


def test_batch_calls_equal_one_call_per_sequence():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 50, 40, dtype=np.uint32)
    seqs = [
        np.concatenate([base[: rng.integers(0, 40)], rng.integers(0, 50, 10, dtype=np.uint32)])
        for _ in range(30)
    ]
    one, many = RadixIndex(), RadixIndex()
    expect = [one.insert(s, i) for i, s in enumerate(seqs)]
    assert many.insert_many(seqs, list(range(30))) == expect
    assert many.sequences() == one.sequences()
    assert many.match_prefix_many([s.tolist() for s in seqs]) == [
        one.match_prefix(s)[0] for s in seqs
    ]
    with pytest.raises(InvalidArgumentError, match="one value per sequence"):
        many.insert_many(seqs, [1])
    with pytest.raises(InvalidArgumentError, match="value must be"):
        many.insert_many([[999]], [-1])
    assert many.match_prefix([999])[0] == 0, "a rejected batch inserts nothing"
