"""Core benchmark (issue 2): treegrpo's Rust forest against a pure-Python one, side by side.

Builds forests of realistic shape (groups of M=4 trees, depth <= 6, ~300 tokens per step) and
times, for both implementations in this one process: build, select, advantages, Arrow export
(the nodes and advantages tables into pyarrow) and the Parquet write of those tables. The
advantages and per-node statistics of the two implementations must agree (max abs diff < 1e-9),
checked before anything is timed, so a wrong baseline fails loudly.

    .venv/bin/python bench/core.py [--sizes 100000 1000000] [--repeats 5] [--quick] [--check]

Prints a Markdown table and writes bench/results/core.json (``--quick``: 10^4 nodes, one repeat,
no JSON unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import treegrpo
from common import LOADAVG_AT_START, fmt_seconds, markdown_table, target, write_results
from pure_python_forest import PyForest

TITLE = "Core: the Rust forest against pure Python"
ISSUE = 2

TREES_PER_GROUP = 4  # M
MAX_DEPTH = 6  # steps below the root
BRANCHES = 2  # N: nodes drawn per tree and expansion round
REWARDS_GOOD = (0.8, 1.0)
REWARDS_BAD = (0.0, 0.1, 0.2)
VOCAB = 32_000
POOL = 1 << 22  # token ids that node contents are sliced from
STRIDE = 7_919
TOLERANCE = 1e-9

TARGET_RATIO, TARGET_RATIO_SIZE = 50.0, 100_000
TARGET_SECONDS, TARGET_SECONDS_SIZE = 0.2, 1_000_000
SELECT_ADVANTAGES = "select + advantages"  # the operations that have a target
ADVANTAGES_EXPORT = "advantages + Arrow export"


# --------------------------------------------------------------------------- forest shape


@dataclass
class Shape:
    """A forest as a plain description: one entry per node, in creation (= id) order."""

    parent: list[int] = field(default_factory=list)  # -1 for a root
    group: list[int] = field(default_factory=list)
    action_len: list[int] = field(default_factory=list)  # 0 for a root
    context_len: list[int] = field(default_factory=list)  # observation, or the root's prompt
    reason: list[str | None] = field(default_factory=list)  # leaf reason, None if open
    reward: list[float | None] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.parent)

    def add(
        self,
        parent: int,
        group: int,
        action: int,
        context: int,
        reason: str | None = None,
        reward: float | None = None,
    ) -> int:
        self.parent.append(parent)
        self.group.append(group)
        self.action_len.append(action)
        self.context_len.append(context)
        self.reason.append(reason)
        self.reward.append(reward)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        return len(self.parent) - 1

    def leaves(self) -> tuple[list[int], list[float]]:
        ids = [i for i, r in enumerate(self.reason) if r is not None]
        return ids, [float(self.reward[i]) for i in ids]  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        leaves, _ = self.leaves()
        steps = [i for i, p in enumerate(self.parent) if p >= 0]
        step_tokens = sum(self.action_len[i] + self.context_len[i] for i in steps)
        prompt_tokens = sum(c for p, c in zip(self.parent, self.context_len, strict=True) if p < 0)
        return {
            "nodes": len(self),
            "groups": len(set(self.group)),
            "trees": len(self) - len(steps),
            "leaves": len(leaves),
            "max_depth": max(self.depth),
            "mean_leaf_depth": round(statistics.fmean(self.depth[i] for i in leaves), 3),
            "tokens": step_tokens + prompt_tokens,
            "mean_tokens_per_step": round(step_tokens / len(steps), 1),
        }


def make_shape(num_nodes: int, seed: int = 2025) -> Shape:
    """Whole groups of M trees until there are at least ``num_nodes`` nodes.

    Each tree: a root (prompt of 50-200 tokens), an initial chain of 2-5 steps ending in a leaf,
    then L in {1, 1, 2} rounds that each draw N=2 nodes uniformly with replacement from the root
    and the open nodes existing at the start of the round and continue each to a leaf. Every
    step has 100-200 action and 100-200 observation tokens; the depth never exceeds 6. Rewards
    come from {0, 0.1, 0.2, 0.8, 1.0}, with a per-question solve rate (some questions are always
    or never solved).
    """
    rng = random.Random(seed)
    shape = Shape()
    group = 0
    while len(shape) < num_nodes:
        solve = rng.choice((0.0, 1.0, rng.random(), rng.random(), rng.random()))
        for _ in range(TREES_PER_GROUP):
            _make_tree(shape, rng, group, solve)
        group += 1
    return shape


def _make_tree(shape: Shape, rng: random.Random, group: int, solve: float) -> None:
    root = shape.add(-1, group, 0, rng.randint(50, 200))
    open_nodes: list[int] = []

    def chain(start: int, length: int) -> None:
        node = start
        for k in range(1, length + 1):
            depth = shape.depth[start] + k
            reason, reward = None, None
            if k == length:
                if depth == MAX_DEPTH:
                    reason = "forced_final"
                elif rng.random() < 0.05:
                    reason = "truncated"
                else:
                    reason = "answer"
                good = reason != "truncated" and rng.random() < solve
                reward = rng.choice(REWARDS_GOOD if good else REWARDS_BAD)
            node = shape.add(
                node, group, rng.randint(100, 200), rng.randint(100, 200), reason, reward
            )
            if reason is None:
                open_nodes.append(node)

    chain(root, rng.randint(2, 5))
    for _ in range(rng.choice((1, 1, 2))):  # L expansion rounds
        candidates = [root, *open_nodes]
        for _ in range(BRANCHES):
            start = rng.choice(candidates)
            chain(start, rng.randint(1, MAX_DEPTH - shape.depth[start]))


def build(forest: Any, shape: Shape, pool: np.ndarray) -> Any:
    """Add every node of ``shape`` to ``forest`` (either implementation), then the rewards."""
    add_root, add_step = forest.add_root, forest.add_step
    span = POOL - 1_000
    columns = (shape.parent, shape.group, shape.action_len, shape.context_len, shape.reason)
    for i, (parent, group, action, context, reason) in enumerate(zip(*columns, strict=True)):
        o = (i * STRIDE) % span
        if parent < 0:
            add_root(group, pool[o : o + context])
        else:
            add_step(
                parent, pool[o : o + action], pool[o + action : o + action + context], reason=reason
            )
    forest.set_rewards(*shape.leaves())
    return forest


# --------------------------------------------------------------------------- operations


def rust_ops(forest: treegrpo.Forest, out_dir: Path) -> dict[str, Callable[[int], Any]]:
    state: dict[str, Any] = {}

    def select(seed: int) -> list[int]:
        return forest.select(BRANCHES, seed=seed)

    def advantages(seed: int) -> Any:
        state["adv"] = forest.advantages("tree")
        return state["adv"]

    def export(seed: int) -> tuple[pa.Table, pa.Table]:
        state["tables"] = (pa.table(state["adv"]), pa.table(forest.nodes()))
        return state["tables"]

    def parquet(seed: int) -> None:
        adv, nodes = state["tables"]
        pq.write_table(adv, out_dir / "rust_advantages.parquet")
        pq.write_table(nodes, out_dir / "rust_nodes.parquet")

    def polars(seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        return pl.DataFrame(state["adv"]), pl.DataFrame(forest.nodes())

    return {
        "select": select,
        "advantages": advantages,
        "export": export,
        "parquet": parquet,
        "polars": polars,
    }


def python_ops(forest: PyForest, out_dir: Path) -> dict[str, Callable[[int], Any]]:
    state: dict[str, Any] = {}

    def select(seed: int) -> list[int]:
        return forest.select(BRANCHES, seed=seed)

    def advantages(seed: int) -> dict[str, list]:
        state["adv"] = forest.advantages()
        return state["adv"]

    def export(seed: int) -> tuple[pa.Table, pa.Table]:
        state["tables"] = (PyForest.advantages_table(state["adv"]), forest.nodes_table())
        return state["tables"]

    def parquet(seed: int) -> None:
        adv, nodes = state["tables"]
        pq.write_table(adv, out_dir / "python_advantages.parquet")
        pq.write_table(nodes, out_dir / "python_nodes.parquet")

    return {"select": select, "advantages": advantages, "export": export, "parquet": parquet}


def timed(fn: Callable[[int], Any], seed: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(seed)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- verification


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if len(a) else 0.0


def verify(
    shape: Shape,
    rust: dict[str, Any],
    python: dict[str, Any],
) -> dict[str, float]:
    """Both implementations hold the same forest and give the same advantages and statistics."""
    n_trees = shape.summary()["trees"]
    is_leaf = np.array([r is not None for r in shape.reason])
    for name, picks in (("rust", rust["picks"]), ("python", python["picks"])):
        picks = np.asarray(picks)
        assert len(picks) == BRANCHES * n_trees, f"{name} select drew {len(picks)} nodes"
        assert not is_leaf[picks].any(), f"{name} select drew a leaf"

    ra, pya = rust["adv"], python["adv"]
    assert ra.num_rows == pya.num_rows, f"kept leaves: rust {ra.num_rows}, python {pya.num_rows}"
    pya = pya.sort_by("leaf")
    assert ra["leaf"].to_pylist() == pya["leaf"].to_pylist(), "different kept leaves"
    diffs = {}
    for col in ("reward", "a_inter", "a_intra", "advantage"):
        diffs[col] = max_diff(ra[col].to_numpy(), pya[col].to_numpy())
    assert ra["group"].to_pylist() == pya["group"].to_pylist(), "different groups"

    rn, pn = rust["nodes"], python["nodes"]
    structure = (
        "node parent tree group depth prompt_len action_len observation_len num_children "
        "is_leaf kept kept_leaves"
    ).split()
    for col in structure:
        assert rn[col].to_pylist() == pn[col].to_pylist(), f"nodes column {col!r} differs"
    assert rn["leaf_reason"].to_pylist() == pn["leaf_reason"].to_pylist(), "leaf reasons differ"
    for col in ("reward", "value", "advantage_sum"):
        r, p = rn[col], pn[col]
        assert r.is_null().to_pylist() == p.is_null().to_pylist(), f"nulls of {col!r} differ"
        diffs[f"node_{col}"] = max_diff(r.drop_null().to_numpy(), p.drop_null().to_numpy())
    for col, d in diffs.items():
        assert d < TOLERANCE, f"rust and python disagree on {col}: max abs diff {d:.3g}"
    return diffs


# --------------------------------------------------------------------------- the run


@dataclass
class Row:
    size: int
    nodes: int
    operation: str
    rust_s: float | None
    python_s: float | None
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.rust_s and self.python_s is not None:
            return self.python_s / self.rust_s
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "nodes": self.nodes,
            "operation": self.operation,
            "rust_s": self.rust_s,
            "python_s": self.python_s,
            "ratio": self.ratio,
            "target": self.target or None,
            "pass": self.passed,
            "note": self.note or None,
        }


def run_size(size: int, repeats: int, pool: np.ndarray, python_build_max: int) -> dict[str, Any]:
    print(f"\n== {size:,} nodes: generating the shape ...", flush=True)
    shape = make_shape(size)
    info = shape.summary()
    print("   ", info, flush=True)
    n = info["nodes"]

    gc.collect()
    t_rust_build, rust = timed(lambda _: build(treegrpo.Forest(), shape, pool), 0)
    assert rust.num_nodes == n
    print(f"   rust build {t_rust_build:.3f} s", flush=True)
    gc.collect()
    t_py_build, py = timed(lambda _: build(PyForest(), shape, pool), 0)
    assert len(py.nodes) == n
    print(f"   python build {t_py_build:.3f} s", flush=True)
    gc.collect()

    with tempfile.TemporaryDirectory(prefix="treegrpo-bench-") as tmp:
        out_dir = Path(tmp)
        r_ops, p_ops = rust_ops(rust, out_dir), python_ops(py, out_dir)

        # Untimed first pass: warms both up and checks that they agree.
        checked: dict[str, dict[str, Any]] = {}
        for name, ops in (("rust", r_ops), ("python", p_ops)):
            picks = ops["select"](0)
            ops["advantages"](0)
            adv, nodes = ops["export"](0)
            ops["parquet"](0)
            checked[name] = {"picks": picks, "adv": adv, "nodes": nodes}
        diffs = verify(shape, checked["rust"], checked["python"])
        parquet_bytes = sum(
            (out_dir / f"rust_{t}.parquet").stat().st_size for t in ("advantages", "nodes")
        )
        del checked
        print(f"    agree: max abs diffs {diffs}", flush=True)

        times: dict[str, dict[str, list[float]]] = {"rust": {}, "python": {}}
        for rep in range(repeats):
            gc.collect()
            for name, ops in (("rust", r_ops), ("python", p_ops)):
                for op, fn in ops.items():
                    times[name].setdefault(op, []).append(timed(fn, rep + 1)[0])
            print(f"    repeat {rep + 1}/{repeats} done", flush=True)

    del rust, py
    gc.collect()

    def med(impl: str, *ops: str) -> float:
        # The median over repeats of the per-repeat sum, not a sum of medians.
        per_rep = [sum(times[impl][op][i] for op in ops) for i in range(repeats)]
        return statistics.median(per_rep)

    def row(operation: str, *ops: str, python: bool = True) -> Row:
        return Row(size, n, operation, med("rust", *ops), med("python", *ops) if python else None)

    py_build = t_py_build if n <= python_build_max else None
    rows = [
        Row(size, n, "build (add_root/add_step + set_rewards)", t_rust_build, py_build),
        row("select (N=2 per tree)", "select"),
        row("advantages (tree)", "advantages"),
        row(SELECT_ADVANTAGES, "select", "advantages"),
        row("Arrow export (nodes + advantages -> pyarrow)", "export"),
        row("Parquet write (both tables)", "parquet"),
        row("Arrow export + Parquet write", "export", "parquet"),
        row(ADVANTAGES_EXPORT, "advantages", "export"),
        row("polars.DataFrame of both tables", "polars", python=False),
    ]
    rows[0].note = "timed once"
    rows[-1].note = "rust only"
    if size == TARGET_RATIO_SIZE:
        r = rows[3]
        r.target, r.passed = f">= {TARGET_RATIO:g}x", (r.ratio or 0.0) >= TARGET_RATIO
    if size == TARGET_SECONDS_SIZE:
        r = rows[7]
        r.target, r.passed = f"rust < {TARGET_SECONDS:g} s", (r.rust_s or 1e9) < TARGET_SECONDS
    return {
        "rows": rows,
        "forest": {**info, "parquet_bytes": parquet_bytes},
        "agreement_max_abs_diff": diffs,
        "raw_times_s": times,
    }


def table(rows: list[Row]) -> str:
    head = ["size", "operation", "rust_s", "python_s", "ratio", "target", "pass"]
    cells = []
    for r in rows:
        ratio = f"{r.ratio:.1f}x" if r.ratio is not None else "-"
        ok = "" if r.passed is None else ("yes" if r.passed else "NO")
        op = r.operation + (f" ({r.note})" if r.note else "")
        cells.append(
            [f"{r.size:,}", op, fmt_seconds(r.rust_s), fmt_seconds(r.python_s), ratio, r.target, ok]
        )
    return markdown_table(head, cells)


def core_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 2's targets (schema: bench/common.py) from the "results" rows of the sizes they
    name; a target whose size was not run is left out."""
    out = []
    for r in results:
        if r["size"] == TARGET_RATIO_SIZE and r["operation"] == SELECT_ADVANTAGES:
            times = f"Rust {r['rust_s']:.3g} s, Python {r['python_s']:.3g} s"
            name = f"select + advantages, {r['size']:,} nodes: speedup over pure Python"
            out.append(target(name, r["ratio"], ">=", TARGET_RATIO, "x", note=times))
        if r["size"] == TARGET_SECONDS_SIZE and r["operation"] == ADVANTAGES_EXPORT:
            name = f"advantages + Arrow export, {r['size']:,} nodes: Rust time"
            out.append(target(name, r["rust_s"], "<", TARGET_SECONDS, "s"))
    return out


NOTES = [
    "Times are medians over the repeats (build: one run) with time.perf_counter, both "
    "implementations in the same process on the same forest shape; ratio = python_s / rust_s.",
    "Composite rows take the median of per-repeat sums.",
    "The pure-Python baseline (bench/pure_python_forest.py) keeps token ids as NumPy arrays, not "
    "lists of Python ints: the timed operations never read token contents, and 10^6 steps x 300 "
    "tokens as Python ints would need several GB. Its build therefore copies NumPy slices, as "
    "the Rust forest does.",
    "Arrow export: rust = Forest.advantages() table and Forest.nodes() read by pyarrow.table via "
    "the Arrow PyCapsule interface (no copy); python = column lists built from the node objects, "
    "then pyarrow arrays. Parquet: pyarrow.parquet.write_table (snappy) of both tables to a "
    "temporary directory.",
    "Before timing, the advantage, a_inter, a_intra and per-node value/advantage_sum columns of "
    "the two implementations are checked to agree within 1e-9, and every structural column of "
    "the nodes tables to be equal.",
    "Select draws differ between the implementations (PCG64 per tree in Rust, one random.Random "
    "in Python); both are checked to draw N=2 non-leaf nodes per tree.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="10^4 nodes, 1 repeat (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/core.json)")
    ap.add_argument(
        "--python-build-max",
        type=int,
        default=10**9,
        help="report the pure-Python build time only up to this many nodes",
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [10_000], 1
    if treegrpo._core.BUILD_PROFILE != "release":
        print("warning: treegrpo is a debug build; run `make develop` first", file=sys.stderr)

    started = time.perf_counter()
    if LOADAVG_AT_START[0] > 0.5:
        print(f"note: 1-min load average {LOADAVG_AT_START[0]} before start: timings may be noisy")
    pool = np.random.default_rng(0).integers(0, VOCAB, size=POOL, dtype=np.uint32)
    results = [run_size(size, args.repeats, pool, args.python_build_max) for size in args.sizes]
    rows = [r for res in results for r in res["rows"]]

    print()
    print(table(rows))
    print()
    for note in NOTES:
        print("-", note)
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s)")

    if not args.quick or args.out is not None:
        by_size = dict(zip(map(str, args.sizes), results, strict=True))
        results_json = [r.as_json() for r in rows]
        payload = {
            "title": TITLE,
            "issue": ISSUE,
            "targets": core_targets(results_json),
            "repeats": args.repeats,
            "shape": {
                "trees_per_group": TREES_PER_GROUP,
                "max_depth": MAX_DEPTH,
                "branches_per_round": BRANCHES,
                "rounds": "1 or 2 (p = 2/3, 1/3)",
                "initial_chain_steps": "2-5",
                "action_tokens": "100-200",
                "observation_tokens": "100-200",
                "prompt_tokens": "50-200",
                "rewards": sorted({*REWARDS_GOOD, *REWARDS_BAD}),
            },
            "forests": {s: res["forest"] for s, res in by_size.items()},
            "agreement_max_abs_diff": {
                s: res["agreement_max_abs_diff"] for s, res in by_size.items()
            },
            "results": results_json,
            "raw_times_s": {s: res["raw_times_s"] for s, res in by_size.items()},
            "notes": NOTES,
            "elapsed_s": round(elapsed, 1),
        }
        print(f"wrote {write_results('core', payload, args.out)}")
    missed = [r for r in rows if r.passed is False]
    if missed:
        print("missed targets:", ", ".join(f"{r.operation} at {r.size:,}" for r in missed))
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
