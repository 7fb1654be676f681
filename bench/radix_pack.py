"""RadixIndex and tree packing benchmark (issue 3).

1. RadixIndex: match_prefix + insert of 10^4 sequences of 2,000 tokens with tree-shaped sharing,
   against a pure-Python radix tree (bench/pure_python_radix.py) in the same process.
   Target: >= 30x.
2. Packing: Forest.pack() of 512 prompts x 6 trajectories (M=2, N=2, L=1, ~2,000 tokens each).
   Target: < 100 ms.

Run: .venv/bin/python bench/radix_pack.py [--repeats 11] [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import treegrpo
from common import fmt_seconds, markdown_table, median_time, target, write_results
from pure_python_radix import PyRadix

TITLE = "Radix index and tree packing"
ISSUE = 3
RADIX_TARGET = 30.0
PACK_TARGET_S = 0.100
RADIX_TARGET_OP = "match_prefix + insert per call"  # insert_many has no target of its own


def tree_sequences(n_seqs: int, length: int, seed: int) -> list[np.ndarray]:
    """Token sequences shaped like Tree-GRPO rollouts: per prompt, M=2 trees of 3 leaves, each
    expansion branching from a step boundary of an earlier trajectory of its tree."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    seqs: list[np.ndarray] = []
    while len(seqs) < n_seqs:
        prompt = nrng.integers(0, 49_152, rng.randint(150, 400), dtype=np.uint32)
        for _ in range(2):  # M trees
            steps = max(1, rng.randint(2, 5))
            chain = [nrng.integers(0, 49_152, 300, dtype=np.uint32) for _ in range(steps)]
            first = np.concatenate([prompt, *chain])[:length]
            seqs.append(first)
            for _ in range(2):  # N expansions from a random step boundary (root included)
                cut = rng.randint(0, steps - 1)
                tail = nrng.integers(0, 49_152, max(0, length - 150 - 300 * cut), dtype=np.uint32)
                seqs.append(np.concatenate([prompt, *chain[:cut], tail])[:length])
    return seqs[:n_seqs]


def bench_radix(n_seqs: int, length: int, repeats: int) -> list[dict]:
    seqs = tree_sequences(n_seqs, length, seed=0)
    lists = [s.tolist() for s in seqs]

    def rust() -> tuple[int, int]:
        idx = treegrpo.RadixIndex()
        matched = 0
        for i, s in enumerate(seqs):
            matched += idx.match_prefix(s)[0]
            idx.insert(s, i)
        return matched, idx.total_size

    def python() -> tuple[int, int]:
        idx = PyRadix()
        matched = 0
        for i, s in enumerate(lists):
            matched += idx.match_prefix(s)
            idx.insert(s, i)
        return matched, idx.size

    def rust_batch() -> tuple[int, int]:
        idx = treegrpo.RadixIndex()
        return sum(idx.insert_many(seqs, list(range(len(seqs))))), idx.total_size

    def python_batch() -> tuple[int, int]:
        idx = PyRadix()
        return sum(idx.insert(s, i) for i, s in enumerate(lists)), idx.size

    rows = []
    total = sum(len(s) for s in seqs)
    for name, r_fn, p_fn in (
        (RADIX_TARGET_OP, rust, python),
        ("insert_many (cached prefix per sequence)", rust_batch, python_batch),
    ):
        rust_s, rust_times, rust_out = median_time(r_fn, repeats)
        py_s, py_times, py_out = median_time(p_fn, repeats)
        if rust_out != py_out:
            raise SystemExit(f"{name}: implementations disagree: {rust_out} vs {py_out}")
        rows.append(
            {
                "operation": f"{name}, {n_seqs:,} x {length:,} tokens",
                "rust_s": rust_s,
                "python_s": py_s,
                "ratio": py_s / rust_s,
                "target": f">= {RADIX_TARGET:g}x" if name == RADIX_TARGET_OP else "-",
                "passed": py_s / rust_s >= RADIX_TARGET if name == RADIX_TARGET_OP else None,
                "tokens": total,
                "matched_tokens": rust_out[0],
                "stored_tokens": rust_out[1],
                "raw_rust_s": rust_times,
                "raw_python_s": py_times,
            }
        )
    return rows


def tree_forest(prompts: int, length: int, seed: int) -> treegrpo.Forest:
    """M=2 trees per prompt, each: a 4-step chain to a leaf, then N=2 expansions (L=1) from
    uniformly drawn nodes, each continued to ~`length` tokens."""
    rng = np.random.default_rng(seed)
    f = treegrpo.Forest()
    step = 400
    for g in range(prompts):
        prompt = rng.integers(0, 49_152, 300, dtype=np.uint32)
        for _ in range(2):
            root = f.add_root(g, prompt)
            node, leaves = root, []
            for k in range(4):
                action = rng.integers(0, 49_152, step // 2, dtype=np.uint32)
                obs = rng.integers(0, 49_152, step // 2 if k < 3 else 0, dtype=np.uint32)
                node = f.add_step(node, action, obs, leaf=k == 3)
            leaves.append(node)
        picks = f.select(2, seed=g)
        for p in picks[-4:]:
            ids, _ = f.tokens(p)
            rest = max(1, length - len(ids))
            leaf = f.add_step(p, rng.integers(0, 49_152, rest, dtype=np.uint32), leaf=True)
            leaves.append(leaf)
    table = f.leaves()
    import pyarrow as pa

    leaf_ids = pa.table(table).column("leaf").to_pylist()
    f.set_rewards(leaf_ids, [float(x) for x in rng.choice([0.0, 0.2, 1.0], len(leaf_ids))])
    f.advantages("tree")
    return f


def bench_pack(prompts: int, length: int, repeats: int) -> list[dict]:
    f = tree_forest(prompts, length, seed=1)
    rows = []
    for mode in ("token-mean", "seq-mean-token-mean"):
        # One untimed warm-up call: on this VM the first writes to memory the process has not
        # used before cost up to ~10x more (host-side faults), whatever the code. Training packs
        # every step, so the steady state is what counts; the first call is recorded too.
        start = time.perf_counter()
        f.pack(loss_agg_mode=mode)
        first_s = time.perf_counter() - start
        secs, times, pack = median_time(lambda m=mode: f.pack(loss_agg_mode=m), repeats)
        rows.append(
            {
                "operation": f"pack {len(pack)} trajectories ({mode})",
                "rust_s": secs,
                "python_s": None,
                "ratio": None,
                "target": f"< {PACK_TARGET_S * 1000:g} ms",
                "passed": secs < PACK_TARGET_S,
                "total_tokens": pack.total_tokens,
                "unique_tokens": pack.unique_tokens,
                "sharing_ratio": pack.sharing_ratio,
                "raw_rust_s": times,
                "first_call_s": first_s,
            }
        )
    return rows


def radix_pack_targets(rows: list[dict]) -> list[dict]:
    """Issue 3's targets (schema: bench/common.py) from the "results" rows."""
    out = []
    for r in rows:
        if r["operation"].startswith(RADIX_TARGET_OP):
            name = f"RadixIndex {r['operation']}: speedup over pure Python"
            times = f"Rust {r['rust_s']:.3g} s, Python {r['python_s']:.3g} s"
            out.append(target(name, r["ratio"], ">=", RADIX_TARGET, "x", note=times))
        elif r["operation"].startswith("pack "):
            tokens = (
                f"{r['total_tokens']:,} tokens, sharing {r['sharing_ratio']:.2f}x; untimed first "
                f"call {r['first_call_s'] * 1e3:.0f} ms"
            )
            ms, target_ms = r["rust_s"] * 1e3, PACK_TARGET_S * 1e3
            out.append(target(f"Forest.{r['operation']}", ms, "<", target_ms, "ms", note=tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n_seqs, prompts, repeats = (500, 32, 1) if args.quick else (10_000, 512, args.repeats)
    rows = bench_radix(n_seqs, 2_000, repeats) + bench_pack(prompts, 2_000, repeats)
    print(
        markdown_table(
            ["operation", "rust_s", "python_s", "ratio", "target", "pass", "notes"],
            [
                [
                    r["operation"],
                    fmt_seconds(r["rust_s"]),
                    fmt_seconds(r["python_s"]),
                    f"{r['ratio']:.1f}x" if r["ratio"] else "-",
                    r["target"],
                    {True: "yes", False: "NO", None: "-"}[r["passed"]],
                    f"sharing {r['sharing_ratio']:.2f}x" if "sharing_ratio" in r else "",
                ]
                for r in rows
            ],
        )
    )
    if not args.quick or args.out:
        payload = {
            "title": TITLE,
            "issue": ISSUE,
            "targets": radix_pack_targets(rows),
            "repeats": repeats,
            "results": rows,
        }
        path = write_results("radix_pack", payload, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
