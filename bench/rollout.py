"""Rollout benchmark (issue 6): tree (M=2, N=2, L=1) against chain (M=4) rollouts, same prompts.

Both modes run through the same :class:`treegrpo.rollout.Rollout` code, the only difference
being the tree shape (chain GRPO is N=0):

- tree: M=2 chains per prompt, then one round of N=2 uniform draws with replacement per tree
  from the root and the open steps, each continued to a leaf: 6 trajectories per prompt (the
  reference rule);
- tree_open: the same with the root excluded from the draws (``include_root=False``): only
  open steps are expanded, unless a tree has none (its chain answered at once);
- chain: M=4 independent chains per prompt: 4 trajectories per prompt.

Workload: the first ``--prompts`` 2-hop questions of the synthetic world
(``treegrpo.data.prepare`` with the default ``DataConfig``, in its seeded order), rendered with
Search-R1's template in the policy's chat template; BM25 search over the world's corpus (top 3,
observations of at most 500 tokens); the training defaults of ``treegrpo train``: at most 3
search turns + the final turn, 96 tokens per action, temperature 1, top_p 0.95; the policy's
EOS ends a step. Policy: SmolLM2-135M-Instruct in float32 on the CPU, warm-started on the
world's gold episodes when that checkpoint is in the cache (what ``treegrpo train`` would use:
``treegrpo sft`` makes it), else the base model, which rarely follows the tool format; the JSON
records which. Engine: a fresh :class:`EmbeddedEngine` per run (cold prefix cache), seeded with
the repeat's seed; the rollout's selection seed is the same.

Measured per run, from the rollout's budget: generated tokens, prompt tokens computed
(prefill) and served from the prefix cache, tool calls, leaves; leaves per 1,000 generated
tokens (target: tree >= 1.4x chain) and the cache hit rate (cached / (cached + computed)
prompt tokens); wall and process CPU time. Each repeat runs both modes back to back (the order
alternates between repeats, so drifting load from other jobs hits both alike); the table shows
medians over repeats and the per-repeat tree/chain ratios' median.

    .venv/bin/python bench/rollout.py [--prompts 16] [--repeats 1] [--policy auto] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from common import markdown_table, target, write_results
from treegrpo.config import DataConfig, EngineConfig, EnvConfig, TrainConfig
from treegrpo.data import RunData, prepare, retriever, reward_function
from treegrpo.engine.embedded import EmbeddedEngine
from treegrpo.engine.models import DEFAULT_POLICY, cache_root, load_policy
from treegrpo.env import SearchEnv
from treegrpo.rollout import Prompt, Rollout, RolloutConfig

TITLE = "Rollout: tree vs chain at the same prompts and seeds"
ISSUE = 6
TARGET_RATIO = 1.4
SEED = 0
MODES: dict[str, dict[str, Any]] = {
    "tree": {"m": 2, "n": 2, "l": 1},
    "tree_open": {"m": 2, "n": 2, "l": 1, "include_root": False},
    "chain": {"m": 4, "n": 0, "l": 1},
}
LABELS = {
    "tree": "tree (M=2, N=2, L=1)",
    "tree_open": "tree (2,2,1), root excluded",
    "chain": "chain (M=4)",
}
TREES = ("tree", "tree_open")
# Medians reported per mode (keys of a run's record).
COLUMNS = (
    ("generated tokens", "generated_tokens", "{:.0f}"),
    ("prompt tokens computed", "prefill_tokens", "{:.0f}"),
    ("from cache", "cached_tokens", "{:.0f}"),
    ("cache hit %", "cache_hit_pct", "{:.1f}"),
    ("tool calls", "tool_calls", "{:.0f}"),
    ("leaves", "leaves", "{:.0f}"),
    ("leaves / 1k generated", "leaves_per_1k_generated", "{:.2f}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("s per leaf", "wall_s_per_leaf", "{:.2f}"),
    ("mean steps / leaf", "mean_leaf_depth", "{:.2f}"),
    ("answer leaves %", "answer_pct", "{:.0f}"),
    ("mean reward", "mean_reward", "{:.3f}"),
    ("peak RSS GB", "peak_rss_gb", "{:.1f}"),
)


# --------------------------------------------------------------------------- set-up


def pick_policy(choice: str, data: RunData) -> tuple[str, dict[str, Any]]:
    """The checkpoint to load and what it is: ``auto`` = the default warm start of
    ``treegrpo train`` if cached, else the base model; ``sft`` = that warm start (trained now if
    missing: minutes); ``base``; or a checkpoint directory."""
    from treegrpo.sft import _key, warm_start

    base = {"kind": "base", "path": DEFAULT_POLICY}
    if choice == "base":
        return DEFAULT_POLICY, base
    if choice not in ("auto", "sft"):
        return choice, {"kind": "path", "path": choice}
    cfg = TrainConfig()
    if data.sft is None:
        raise SystemExit("the synthetic world has no gold episodes: cannot warm-start")
    # The same key and directory as treegrpo.sft.warm_start, to look without training.
    cached = cache_root() / "sft" / _key(DEFAULT_POLICY, data.sft, cfg.model, cfg.data.max_hops)
    if choice == "auto" and not (cached / "config.json").is_file():
        print(f"no cached warm start at {cached}: using the base model (`treegrpo sft` makes it)")
        return DEFAULT_POLICY, base
    path = warm_start(
        DEFAULT_POLICY, data.sft, cfg.model, max_hops=cfg.data.max_hops, seed=cfg.trainer.seed
    )
    meta_file = path / "treegrpo_sft.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return str(path), {"kind": "sft", "path": str(path), "sft": meta}


def pick_prompts(data: RunData, tokenizer: Any, n: int) -> list[Prompt]:
    """The first `n` multi-hop (2-hop) training questions in the run's seeded order."""
    multi = [data.train[i] for i in data.order if int(data.train[i].extra_info.get("hops", 1)) > 1]
    if len(multi) < n:
        raise SystemExit(f"only {len(multi)} multi-hop questions; ask for fewer --prompts")
    return [data.prompt(x, tokenizer) for x in multi[:n]]


# --------------------------------------------------------------------------- one run


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gb() -> float:
    """Peak RSS since the last reset (Linux), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_once(
    model: Any,
    tokenizer: Any,
    env: SearchEnv,
    reward_fn: Any,
    prompts: list[Prompt],
    cfg: RolloutConfig,
    seed: int,
) -> dict[str, Any]:
    """One rollout on a fresh engine; its budget, times and what the leaves are."""
    engine = EmbeddedEngine(
        model, tokenizer, kv_budget_tokens=EngineConfig().kv_budget_tokens, seed=seed
    )
    runner = Rollout(
        engine,
        env,
        reward_fn,
        cfg,
        tokenizer=tokenizer,
        eos_token_ids=sorted(engine.eos_token_ids),
    )
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    result = asyncio.run(runner.run(prompts))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    leaves = pa.table(result.forest.leaves()).to_pydict()
    nodes = pa.table(result.forest.nodes()).to_pydict()
    by_depth: dict[int, list[int]] = {}
    for depth, action in zip(nodes["depth"], nodes["action_len"], strict=True):
        if depth > 0:
            by_depth.setdefault(depth, []).append(action)
    reasons = Counter(str(r) for r in leaves["leaf_reason"])
    budget = result.total.as_dict()
    stats = engine.stats
    return {
        **budget,
        "cache_hit_pct": 100 * budget["cache_hit_rate"],
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_s_per_leaf": wall / max(1, budget["leaves"]),
        "peak_rss_gb": peak_rss_gb(),
        "engine_prefill_s": stats.prefill_seconds,
        "engine_decode_s": stats.decode_seconds,
        "engine_prefill_tokens": stats.prefill_tokens,
        "engine_cached_tokens": stats.cached_tokens,
        "mean_leaf_depth": statistics.fmean(leaves["depth"]),
        "leaf_reasons": dict(reasons),
        "answer_pct": 100 * reasons["answer"] / len(leaves["leaf"]),
        "mean_reward": statistics.fmean(leaves["reward"]),
        "nodes": result.forest.num_nodes,
        # steps and their mean action tokens at each depth (1 = the first step)
        "steps_by_depth": {d: len(v) for d, v in sorted(by_depth.items())},
        "action_tokens_by_depth": {d: statistics.fmean(v) for d, v in sorted(by_depth.items())},
    }


# --------------------------------------------------------------------------- report


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="2-hop questions (default 16)")
    parser.add_argument("--repeats", type=int, default=1, help="seeds, each runs both modes")
    parser.add_argument("--seed", type=int, default=SEED, help="the first repeat's seed")
    parser.add_argument(
        "--policy",
        default="auto",
        help="auto (cached warm start, else base), sft (warm-start now if missing), base, or a "
        "checkpoint directory",
    )
    parser.add_argument("--max-action-tokens", type=int, default=None, help="default: train's")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 repeat, no JSON")
    parser.add_argument("--out", default=None, help="result file (default bench/results/...)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.repeats = 4, 1

    started = time.perf_counter()
    train = TrainConfig()
    data = prepare(DataConfig(), seed=train.trainer.seed)
    path, policy = pick_policy(args.policy, data)
    model, tokenizer = load_policy(path, dtype=torch.float32)
    prompts = pick_prompts(data, tokenizer, args.prompts)
    env_cfg = EnvConfig()
    tree = train.tree
    env = SearchEnv(
        tokenizer,
        retriever=retriever(env_cfg, data.corpus),
        topk=env_cfg.topk,
        max_turns=tree.max_turns,
        max_obs_tokens=env_cfg.max_obs_tokens,
    )
    reward_fn = reward_function(env_cfg)
    max_action = args.max_action_tokens or tree.max_action_tokens
    print(
        f"policy: {policy['kind']} ({path}); {len(prompts)} prompts "
        f"({statistics.fmean(len(p.input_ids) for p in prompts):.0f} tokens on average), "
        f"{args.repeats} repeat(s); torch threads {torch.get_num_threads()}",
        flush=True,
    )

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for mode in order:
            cfg = RolloutConfig(
                **MODES[mode],
                max_turns=tree.max_turns,
                max_action_tokens=max_action,
                temperature=tree.temperature,
                top_p=tree.top_p,
                top_k=tree.top_k,
                seed=seed,
            )
            record = run_once(model, tokenizer, env, reward_fn, prompts, cfg, seed)
            record.update(mode=mode, seed=seed)
            runs[mode].append(record)
            print(
                f"  seed {seed} {mode:5s}: {record['generated_tokens']} tokens, "
                f"{record['leaves']} leaves, {record['wall_s']:.1f} s",
                flush=True,
            )

    def per_repeat(mode: str, key: str, invert: bool = False) -> list[float]:
        pairs = zip(runs[mode], runs["chain"], strict=True)
        return [c[key] / t[key] if invert else t[key] / c[key] for t, c in pairs]

    ratios = {mode: per_repeat(mode, "leaves_per_1k_generated") for mode in TREES}
    wall_per_leaf = {mode: per_repeat(mode, "wall_s_per_leaf", invert=True) for mode in TREES}
    ratio = {mode: statistics.median(ratios[mode]) for mode in TREES}
    leaf_speedup = {mode: statistics.median(wall_per_leaf[mode]) for mode in TREES}
    # Step-count model: chains of D steps. An expansion from a uniform draw over the root and
    # the D-1 open steps costs (D+1)/2 steps, so (2,2,1) spends 4D+2 steps on 6 leaves against
    # chain's 4D on 4: a ratio of 6D / (4D+2) (1.29 at D=3). Without the root, a draw over the
    # D-1 open steps costs D/2: 6D / (4D) = 1.5 at any depth (if no chain answers at once).
    depth = median_of(runs["chain"], "mean_leaf_depth")
    predicted = {"tree": 6 * depth / (4 * depth + 2), "tree_open": 1.5}

    headers = ["mode", *(name for name, _, _ in COLUMNS)]
    rows = [
        [LABELS[mode]] + [fmt.format(median_of(runs[mode], key)) for _, key, fmt in COLUMNS]
        for mode in MODES
    ]
    print()
    print(
        f"{len(prompts)} synthetic 2-hop prompts, policy {policy['kind']}, medians of "
        f"{args.repeats} repeat(s):"
    )
    print(markdown_table(headers, rows))
    print()
    for mode in TREES:
        print(
            f"leaves per 1k generated tokens, {LABELS[mode]} / chain: {ratio[mode]:.2f}x "
            f"(target >= {TARGET_RATIO}x; per repeat {', '.join(f'{r:.2f}' for r in ratios[mode])})"
            f"; the step-count model predicts {predicted[mode]:.2f}x at chain depth {depth:.2f}"
        )
        print(f"wall time per leaf, chain / {LABELS[mode]}: {leaf_speedup[mode]:.2f}x")
    print(f"total {time.perf_counter() - started:.0f} s")

    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": [
            target(
                f"leaves per 1,000 generated tokens, {name} / chain (4 chains)",
                ratio[mode],
                ">=",
                TARGET_RATIO,
                "x",
                note=(
                    f"{policy['kind']} policy, {len(prompts)} prompts, median of "
                    f"{args.repeats}; step-count model {predicted[mode]:.2f}x at depth {depth:.2f}"
                ),
            )
            for mode, name in (
                ("tree", "tree (2,2,1), reference rule (root drawable)"),
                ("tree_open", "tree (2,2,1), root excluded"),
            )
        ],
        "policy": policy,
        "workload": {
            "prompts": len(prompts),
            "prompt_groups": [p.group for p in prompts],
            "prompt_lengths": [len(p.input_ids) for p in prompts],
            "repeats": args.repeats,
            "seeds": [args.seed + r for r in range(args.repeats)],
            "modes": MODES,
            "max_turns": tree.max_turns,
            "max_action_tokens": max_action,
            "max_obs_tokens": env_cfg.max_obs_tokens,
            "topk": env_cfg.topk,
            "temperature": tree.temperature,
            "top_p": tree.top_p,
            "kv_budget_tokens": EngineConfig().kv_budget_tokens,
        },
        "runs": [r for mode in MODES for r in runs[mode]],
        "medians": {
            mode: {key: median_of(runs[mode], key) for _, key, _ in COLUMNS} for mode in MODES
        },
        "leaves_per_1k_ratio": ratio,
        "leaves_per_1k_ratio_per_repeat": ratios,
        "predicted_ratio_from_depth": predicted,
        "wall_per_leaf_chain_over_tree": leaf_speedup,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.quick or args.out is not None:  # a smoke run keeps the full run's file
        out = write_results("rollout", payload, None if args.out is None else Path(args.out))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
