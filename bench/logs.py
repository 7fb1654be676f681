"""Rollout-log analysis benchmark (issue 8): ``treegrpo logs summary`` over 10^6 nodes.

Writes a synthetic run directory in a temporary folder: ``--steps`` steps of Tree-GRPO-shaped
forests (two trees per group, ``--tree-nodes`` nodes a tree, each node's parent drawn among the
earlier nodes of depth < 4, so depths run 0..4 as with max_turns 3; leaves are the nodes without
children, 80% of them kept, rewards in {0, 0.1, 1}) with every column ``write_rollout`` writes,
texts included, through the same atomic Parquet writer. Generation is vectorised NumPy (one
pass per node position, not per node), so it takes seconds.

Then it times, as medians over ``--repeats`` runs:

- the command itself, ``python -m treegrpo logs summary RUN`` in a fresh process (interpreter
  start and every import included: what a user waits for); target < 5 s;
- the same through ``python -m treegrpo.logs summary RUN``, which imports only the logs
  package (``treegrpo`` registers every subcommand at start, torch included);
- in this process, ``load_run`` (footer checks), ``summary`` (every query, one collect_all)
  and the terminal formatting.

    .venv/bin/python bench/logs.py [--nodes 1000000] [--repeats 5] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from common import markdown_table, median_time, target, write_results
from treegrpo.logs import load_run, summary, write_table_atomic
from treegrpo.logs.cli import format_summary

TITLE = "Rollout-log analysis: treegrpo logs summary"
ISSUE = 8
TARGET_S = 5.0
SEED = 8
MAX_DEPTH = 4
SOURCES = np.array(["nq", "hotpotqa", "2wiki", "musique"])
REASONS = ["answer", "forced_final", "truncated"]


def make_step(rng: np.random.Generator, trees: int, size: int) -> tuple[pa.Table, pa.Table]:
    """One step's nodes and trajectories tables: ``trees`` trees of ``size`` nodes."""
    # Parent of local node i (i >= 1): a uniform draw among the earlier nodes of depth < 4.
    parent = np.zeros((trees, size), dtype=np.int64)
    depth = np.zeros((trees, size), dtype=np.int64)
    for i in range(1, size):
        open_ = depth[:, :i] < MAX_DEPTH
        pick = np.argmax(rng.random((trees, i)) * open_, axis=1)
        parent[:, i] = pick
        depth[:, i] = depth[np.arange(trees), pick] + 1
    rows = np.arange(trees)[:, None]
    children = np.zeros((trees, size), dtype=np.int64)
    np.add.at(children, (np.broadcast_to(rows, (trees, size - 1)), parent[:, 1:]), 1)
    leaf = children == 0
    kept = leaf & (rng.random((trees, size)) < 0.8)
    reward = np.where(leaf, rng.choice([0.0, 0.1, 1.0], size=(trees, size)), np.nan)
    advantage = np.where(kept, rng.normal(size=(trees, size)), 0.0)
    # Bottom-up sums over kept leaves: children come after their parent, so one reverse pass.
    count = kept.astype(np.int64)
    total = np.where(kept, reward, 0.0)
    adv_sum = advantage.copy()
    for i in range(size - 1, 0, -1):
        p = parent[:, i]
        count[np.arange(trees), p] += count[:, i]
        total[np.arange(trees), p] += total[:, i]
        adv_sum[np.arange(trees), p] += adv_sum[:, i]

    n = trees * size
    tree = np.repeat(np.arange(trees), size)
    group = tree // 2
    node = np.arange(n)
    is_root = (np.arange(n) % size) == 0
    glob_parent = tree * size + parent.ravel()
    flat_leaf, flat_kept, flat_depth = leaf.ravel(), kept.ravel(), depth.ravel()
    reason_idx = rng.integers(0, 3, size=n)
    action_len = np.where(is_root, 0, rng.integers(20, 200, size=n))
    obs_len = np.where(is_root | flat_leaf, 0, rng.integers(50, 500, size=n))
    tool = ~is_root & ~flat_leaf & (rng.random(n) < 0.9)
    source = SOURCES[group % len(SOURCES)]
    cnt = count.ravel()
    has = cnt > 0

    def opt(values: np.ndarray, mask: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.array(values, type=kind, mask=~mask)

    texts = np.array(["<think>look it up</think> <search> who founded x </search>",
                      "<think>found it</think> <answer> Paris </answer>"])  # fmt: skip
    nodes = pa.table(
        {
            "node": pa.array(node, pa.uint32()),
            "parent": opt(glob_parent, ~is_root, pa.uint32()),
            "tree": pa.array(tree, pa.uint32()),
            "group": pa.array(group, pa.int64()),
            "depth": pa.array(flat_depth, pa.uint32()),
            "prompt_len": pa.array(np.where(is_root, 180, 0), pa.uint32()),
            "action_len": pa.array(action_len, pa.uint32()),
            "observation_len": pa.array(obs_len, pa.uint32()),
            "num_children": pa.array(children.ravel(), pa.uint32()),
            "is_leaf": pa.array(flat_leaf),
            "leaf_reason": pa.DictionaryArray.from_arrays(
                opt(reason_idx, flat_leaf, pa.int8()), pa.array(REASONS)
            ),
            "kept": pa.array(flat_kept),
            "reward": opt(reward.ravel(), flat_leaf, pa.float64()),
            "kept_leaves": pa.array(cnt, pa.uint32()),
            "value": opt(np.divide(total.ravel(), np.maximum(cnt, 1)), has, pa.float64()),
            "advantage_sum": opt(adv_sum.ravel(), has, pa.float64()),
            "action_text": opt(texts[flat_leaf.astype(int)], ~is_root, pa.string()),
            "observation_text": opt(
                np.full(n, "<information>Doc 1 ...</information>"), tool, pa.string()
            ),
            "mean_log_prob": opt(-rng.random(n), ~is_root, pa.float64()),
            "surprisal": opt(rng.random(n), ~is_root, pa.float64()),
            "finish_reason": opt(np.full(n, "stop"), ~is_root, pa.string()),
            "tool": opt(np.full(n, "search"), tool, pa.string()),
            "query": opt(np.full(n, "who founded x"), tool, pa.string()),
            "answer": opt(np.full(n, "Paris"), flat_leaf, pa.string()),
            "valid": opt(tool | flat_leaf, ~is_root, pa.bool_()),
            "weight_version": opt(np.full(n, "1"), ~is_root, pa.string()),
            "data_source": pa.array(source),
        }
    )
    k = np.flatnonzero(flat_kept)
    a = advantage.ravel()[k]
    trajectories = pa.table(
        {
            "leaf": pa.array(k, pa.uint32()),
            "tree": pa.array(tree[k], pa.uint32()),
            "group": pa.array(group[k], pa.int64()),
            "reward": pa.array(reward.ravel()[k]),
            "a_inter": pa.array(a / 2),
            "a_intra": pa.array(a / 2),
            "advantage": pa.array(a),
            "turns": pa.array(flat_depth[k], pa.uint32()),
            "leaf_reason": pa.DictionaryArray.from_arrays(
                pa.array(reason_idx[k], pa.int8()), pa.array(REASONS)
            ),
            "length": pa.array(180 + flat_depth[k] * 300, pa.uint32()),
            "action_tokens": pa.array(flat_depth[k] * 100, pa.uint32()),
            "data_source": pa.array(source[k]),
            "response": pa.array(np.full(len(k), "<think>...</think> <answer> Paris </answer>")),
        }
    )
    return nodes, trajectories


def make_run(root: Path, nodes: int, steps: int, tree_nodes: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    trees = max(nodes // (steps * tree_nodes), 1)
    for step in range(1, steps + 1):
        n, t = make_step(rng, trees, tree_nodes)
        part = f"step={step:06d}/part-0.parquet"
        write_table_atomic(n, root / "nodes" / part, name="nodes")
        write_table_atomic(t, root / "trajectories" / part, name="trajectories")
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    return {"steps": steps, "trees_per_step": trees, "tree_nodes": tree_nodes,
            "nodes": steps * trees * tree_nodes, "parquet_mb": round(size / 2**20, 1)}  # fmt: skip


def run_child(command: list[str]) -> tuple[str, float]:
    """Run ``command``; its stdout and the CPU seconds (user + system, every thread) it used.

    CPU time moves much less with the machine's load than wall time: on a shared machine it
    shows what the command costs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1_000_000, help="nodes in the run (10^6)")
    ap.add_argument("--steps", type=int, default=20, help="training steps (partitions)")
    ap.add_argument("--tree-nodes", type=int, default=10, help="nodes per tree")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="10^5 nodes, 2 repeats, no JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/logs.json)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.repeats = 100_000, 2

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="treegrpo-bench-logs-") as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        shape = make_run(run_dir, args.nodes, args.steps, args.tree_nodes)
        shape["generate_s"] = round(time.perf_counter() - t, 2)
        print(f"synthetic run: {shape}", flush=True)

        command = [sys.executable, "-m", "treegrpo", "logs", "summary", str(run_dir)]
        cli_s, cli_times, (text, cli_cpu) = median_time(lambda: run_child(command), args.repeats)
        print(text, flush=True)
        light = [sys.executable, "-m", "treegrpo.logs", "summary", str(run_dir)]
        light_s, light_times, (_, light_cpu) = median_time(lambda: run_child(light), args.repeats)
        # What the process pays before it reads a byte of the run.
        startup_s, _, (_, startup_cpu) = median_time(
            lambda: run_child([*command[:3], "--help"]), args.repeats
        )
        load_s, load_times, run = median_time(lambda: load_run(run_dir), args.repeats)
        summary_s, summary_times, tables = median_time(lambda: summary(run), args.repeats)
        format_s, _, _ = median_time(lambda: format_summary(run_dir, tables), args.repeats)
        assert tables["run"]["nodes"].item() == shape["nodes"]

    passed = cli_s < TARGET_S
    in_process = load_s + summary_s + format_s
    rows = [
        [f"`treegrpo logs summary`, {shape['nodes']:,} nodes, fresh process",
         f"{cli_s:.2f} s", f"{cli_cpu:.2f} s", f"< {TARGET_S:g} s", "yes" if passed else "NO"],
        ["  of which: interpreter start + CLI imports (`treegrpo --help`)",
         f"{startup_s:.2f} s", f"{startup_cpu:.2f} s", "", ""],
        ["`python -m treegrpo.logs summary`, fresh process", f"{light_s:.2f} s",
         f"{light_cpu:.2f} s", f"< {TARGET_S:g} s", "yes" if light_s < TARGET_S else "NO"],
        ["in process: load_run + summary + format", f"{in_process:.2f} s", "", "", ""],
        ["  load_run (Parquet footers checked)", f"{load_s * 1e3:.0f} ms", "", "", ""],
        ["  summary (every query, one collect_all)", f"{summary_s:.2f} s", "", "", ""],
        ["  terminal formatting", f"{format_s * 1e3:.0f} ms", "", "", ""],
    ]  # fmt: skip
    table = markdown_table(["measurement", "median wall", "CPU (last run)", "target", "pass"], rows)
    print(table)
    notes = [
        f"Synthetic run: {shape['steps']} steps x {shape['trees_per_step']:,} trees x "
        f"{shape['tree_nodes']} nodes ({shape['parquet_mb']} MB of Parquet, every column "
        "write_rollout writes); depths 0-4, two trees per group, 80% of leaves kept.",
        f"Medians of {args.repeats} runs. The command's time includes Python's start and the "
        "imports of the CLI and of the logs command's module only (the CLI imports the module "
        "of the command it runs; torch is not loaded). CPU is user + system seconds of the last "
        "run, all threads: on a shared machine it moves far less with the load than wall time "
        "does.",
    ]
    for note in notes:
        print("-", note)
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s)")
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": [
            target(
                f"treegrpo logs summary over {shape['nodes']:,} nodes (fresh process)",
                cli_s,
                "<",
                TARGET_S,
                "s",
                note=f"of which start + imports of every subcommand {startup_s:.2f} s",
            ),
            target(
                f"python -m treegrpo.logs summary over {shape['nodes']:,} nodes (fresh process)",
                light_s,
                "<",
                TARGET_S,
                "s",
                note=f"in process (load_run + summary + format) {in_process:.2f} s",
            ),
        ],
        "repeats": args.repeats,
        "run": shape,
        "measured": {
            "cli_s": cli_s,
            "cli_times_s": cli_times,
            "startup_s": startup_s,
            "cli_cpu_s_last": cli_cpu,
            "light_cli_cpu_s_last": light_cpu,
            "startup_cpu_s_last": startup_cpu,
            "light_cli_s": light_s,
            "light_cli_times_s": light_times,
            "load_run_s": load_s,
            "load_run_times_s": load_times,
            "summary_s": summary_s,
            "summary_times_s": summary_times,
            "format_s": format_s,
        },
        "output": text,
        "table": table,
        "notes": notes,
        "elapsed_s": round(elapsed, 1),
    }
    if not args.quick or args.out is not None:
        path = write_results("logs", payload, args.out)
        print(f"wrote {path}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
