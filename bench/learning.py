"""Learning experiment (issue 9): Tree-GRPO against chain GRPO at equal generation budget.

Every run is a ``treegrpo train`` run: a :class:`treegrpo.config.TrainConfig` built from dotted
overrides by ``load_config`` (the command line's parser) and a fresh
:class:`treegrpo.train.Trainer` (setup, run, close) in this process. Each run's overrides are
recorded, so ``treegrpo train <overrides>`` repeats it (see "Validation set" for the one
difference).

Grid: seeds x budgets x {chain, tree}, one run each, on the synthetic multi-hop world (1- and
2-hop questions, local BM25). Budgets in chain-equivalents per prompt (algorithm.md section 2;
an expansion from a uniformly drawn node costs about half a chain):

    budget 2: tree (M, N, L) = (1, 2, 1), 3 leaves/prompt  vs  chain M=2 (N=0), 2 leaves/prompt
    budget 4: tree (M, N, L) = (2, 2, 1), 6 leaves/prompt  vs  chain M=4 (N=0), 4 leaves/prompt

Tree runs use ``algorithm.adv_estimator=tree`` (A_inter + A_intra), chain runs ``grpo``. With
M=1 the tree and its group hold the same leaves, so A_inter = A_intra and the tree estimator is
twice the GRPO z-score: the reference's numerics, kept as they are (AdamW is nearly
insensitive to the scale; gradient clipping at 1.0 is not).

What is held equal within a seed: the policy at the start (the cached SFT warm start that
``treegrpo train`` uses, ``model.sft_steps`` at its default), the prompts of every step (same
``trainer.seed``, so the same shuffled order and cursor), the engine's sampling seed and the
selection seed (``tree.seed``), learning rate and schedule, and the validation questions. What
differs between seeds: the prompt order, the sampling and selection seeds.

Choices, and why:

- ``learner.warmup_ratio=0`` for both modes: runs are a handful of steps; the reference's
  warmup (0.285 tree, 0.5 chain, with verl's lr 0 at step 0) would spend most of them at a
  reduced learning rate and make the two modes' schedules differ.
- ``learner.kl_coef=0`` by default (``--kl-coef``): no frozen reference model, so no reference
  forward pass per step and ~0.5 GB less memory on the CPU; a few steps barely leave the
  starting policy, so the KL term would be small anyway.
- ``learner.lr`` default 1e-5 (``--lr``), 10x the reference's 1e-6: the reference trains a 3B
  model for 180 steps of 512 prompts; here a 135M model gets a handful of updates on a few
  prompts each. In the smoke test one step at 1e-5 already flipped a validation answer; 1e-6
  was not tried. Both modes use the same value.
- Validation (``Trainer.validate``): greedy chain rollouts on ``--val-size`` held-out questions,
  exact match per data source. Greedy decoding of the same weights is the same for every seed,
  so the starting policy is validated ONCE ("before"), and every run once after training.
- Validation set: ``data.prepare`` draws the ``val_size`` questions with ``trainer.seed``, so
  each seed would see different questions; the experiment pins them to those of seed 0 (the
  set ``treegrpo train`` uses at ``trainer.seed=0``) by replacing ``trainer.data.val`` after
  ``setup()``, so every run and the "before" number are measured on the same questions.
- Checkpoints: ``trainer.save_every`` = the run's steps (one checkpoint, after the last step,
  as ``treegrpo train`` always writes); deleted after the run unless ``--keep-checkpoints``
  (1.6 GB each: policy + AdamW state).
- Resume: a run whose directory holds ``result.json`` written with the same overrides is
  reused, not rerun; an unfinished run's directory is deleted and the run started over. An
  interrupted experiment continues where it stopped when started again with the same options.

Recorded per run (``<run-dir>/<name>/result.json``, and all of them in
``bench/results/learning.json``): held-out EM after training (all + per data source), the mean
training reward (format-shaped, as trained on) per step, generated tokens, prefill tokens, tool
calls and leaves actually spent (sums over steps of the Trainer's ``tree/*`` metrics), time of
rollout, update and validation, the run's wall time and the load average around it. The
summary is mean +- sample std over seeds per (budget, mode), plus the paired difference tree -
chain per seed; ``bench/results/learning.png`` plots held-out EM against generated tokens.

Time budget (issue 9: the whole grid within 60 minutes on this 2-core machine). Runs are
sequential; the grid costs val_before + sum over runs of (setup + steps x step + val_after +
checkpoint). Measured with ``--quick --batch 4 --threads 1`` (budget 2, 1 step, 4 prompts, 4
validation questions) on 2026-11-23 with other jobs on the machine (load average 3-5):

    phase (1 thread, load ~4)              wall s   notes
    setup (first / later runs)               7 / 1  model from the cached warm start
    validation, 4 questions                 40-46   greedy, up to 4 turns of <= 96 tokens
    chain M=2 step, 4 prompts: rollout         52   1,223 tokens generated, 8 leaves
                               update         106   5,487 trajectory tokens
    tree (1,2,1) step, 4 prompts: rollout      91   1,593 tokens generated, 12 leaves
                                  update       96   5,659 unique tokens (9,396 unpacked)
    checkpoint write                         ~4   1.6 GB, deleted after the run
    whole --quick                         8.3 min  (27.4 min with 2 threads at load ~10)

With the defaults (``--quick``: 2 prompts, 2 threads, OMP_WAIT_POLICY=PASSIVE, load 2-5):
validation of 4 questions 35-50 s; chain M=2 step 28 s rollout + 38 s update (547 tokens
generated); tree (1,2,1) step 64 s + 62 s (714 tokens); whole --quick 5.7 min.

Extrapolated: budget 4 costs about 1.4x the rollout and 2x the update of budget 2; 2 prompts
per step about 0.65x the rollout and 0.5x the update of 4; 16 validation questions ~1.5x of 4
(decode steps are batched: the 8-row chain rollout cost 1.2x the 4-row validation). That
gives, per seed and step at 2 prompts, ~530 s for the four runs, and ~65 s per validation, with
1 thread at load ~4 (the process got ~86% of a core). On a quiet machine: /1.15 for the load,
and /1.0 to /1.4 for the second core (the update's matmuls gain, the few-row decode steps
hardly; algorithm.md section 7's ~17 s for a 2,048-token update is no faster than the 1-thread
~8 s per 1,024 tokens measured here, so the low end is plausible). Hence the defaults, 3 seeds
x 2 budgets x 2 modes, 2 steps x 2 prompts, 16 validation questions:

    3 x 2 x ~460 s  +  13 x ~57 s  +  12 x ~5 s  =  ~59 min  (quiet, no gain from the 2nd core)
    3 x 2 x ~330 s  +  13 x ~40 s  +  12 x ~5 s  =  ~43 min  (quiet, 2nd core 1.4x)
                                                   ~70 min  (1 thread, load ~4, as measured)

So the defaults fit a quiet machine, with little margin at the low end. Check the ETA printed
before each run (mean wall time of the finished runs per budget, times the runs left): after
the first seed's four runs (~1/3 of the grid) the elapsed time should be under ~20 min. With
headroom, ``--steps 3`` or ``--val-size 32``; without, ``--val-size 8``. Four prompt-rollouts
per run is a small experiment: expect held-out differences of a question or two.

Threads. The model's ops are small (decode: a few rows; update: micro-batches of 2,048
tokens), and with the other core busy, torch's OpenMP threads spin-wait at every op for a
thread that is not scheduled: measured at load ~3.5, one forward+backward over 1,024 tokens
took 23 s with 2 threads, 8.3 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE`` and 7.8 s with
1 thread (a 4-row decode step: 0.3-2 s, 0.14 s, 0.14 s). This script therefore sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (no effect on the numbers, only on
waiting); ``--threads 1`` is the steadier choice on a busy machine. Greedy validation and the
runs' results were identical with 1 and 2 threads in the smoke tests.

    .venv/bin/python bench/learning.py                  # the grid (45-60 min on a quiet machine)
    .venv/bin/python bench/learning.py --quick          # smoke test (minutes): no JSON, no plot
    .venv/bin/python bench/learning.py --seeds 5 --steps 8 --batch 4 --val-size 64  # hours
"""

from __future__ import annotations

import os

# Before torch loads (see "Threads" above): OpenMP threads sleep instead of spinning when they
# wait, which keeps a busy 2-core machine from stalling every op.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import HERE, RESULTS, markdown_table, target, write_results

NAME = "learning"
TITLE = "Learning: Tree-GRPO against chain GRPO at equal generation budget"
ISSUE = 9
TIME_LIMIT_MIN = 60.0
VAL_SEED = 0  # the validation questions of every run: those of trainer.seed=0
MODES = ("chain", "tree")
# budget (chain-equivalents per prompt) -> mode -> (M, N, L)
SHAPES: dict[int, dict[str, tuple[int, int, int]]] = {
    2: {"chain": (2, 0, 1), "tree": (1, 2, 1)},
    4: {"chain": (4, 0, 1), "tree": (2, 2, 1)},
}
ESTIMATOR = {"chain": "grpo", "tree": "tree"}
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    budget: int
    mode: str
    seed: int

    @property
    def name(self) -> str:
        return f"budget{self.budget}-{self.mode}-seed{self.seed}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return SHAPES[self.budget][self.mode]

    @property
    def label(self) -> str:
        m, n, l = self.shape  # noqa: E741
        return f"tree ({m}, {n}, {l})" if self.mode == "tree" else f"chain M={m}"


# --------------------------------------------------------------------------- configuration


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides every run shares (and the validation of the starting policy)."""
    return [
        f"data.train_batch_size={args.batch}",
        f"data.val_size={args.val_size}",
        f"tree.max_turns={args.max_turns}",
        f"tree.max_action_tokens={args.max_action_tokens}",
        f"learner.lr={args.lr}",
        "learner.warmup_ratio=0",
        f"learner.kl_coef={args.kl_coef}",
        "trainer.val_before=false",
        "trainer.val_after=true",
        "trainer.resume=never",
        "trainer.logger=[console,jsonl]" if args.verbose else "trainer.logger=[jsonl]",
    ]


def run_overrides(run: Run, args: argparse.Namespace) -> list[str]:
    m, n, l = run.shape  # noqa: E741
    return [
        *common_overrides(args),
        f"tree.m={m}",
        f"tree.n={n}",
        f"tree.l={l}",
        f"tree.seed={run.seed}",
        f"algorithm.adv_estimator={ESTIMATOR[run.mode]}",
        f"trainer.total_steps={args.steps}",
        f"trainer.save_every={args.steps}",
        f"trainer.seed={run.seed}",
        f"trainer.run_dir={args.run_dir / run.name}",
    ]


def pinned_val(cfg: Any) -> list[Any]:
    """The validation questions of every run: ``data.prepare``'s draw for ``VAL_SEED``."""
    from treegrpo.data import prepare

    return prepare(cfg.data, seed=VAL_SEED).val


def reuse(run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """A finished run's record if it was made with these overrides; else None, and an
    unfinished or different run's directory is removed."""
    path = run_dir / RESULT_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("overrides") == overrides:
                return record
        except ValueError:
            pass
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return None


def trainer_for(overrides: list[str], args: argparse.Namespace) -> Any:
    """A set-up Trainer of these overrides, validating on the pinned questions."""
    from treegrpo.config import load_config
    from treegrpo.train import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, progress=args.verbose)
    try:
        trainer.setup()
        trainer.data = replace(trainer.data, val=pinned_val(cfg))
    except BaseException:
        trainer.close()
        raise
    return trainer


def val_em(metrics: dict[str, float]) -> dict[str, float]:
    """``val-core/<source>/acc/mean@1`` -> {source: EM}."""
    return {
        k.split("/")[1]: v
        for k, v in metrics.items()
        if k.startswith("val-core/") and k.endswith("/acc/mean@1")
    }


def starting_policy(trainer: Any) -> dict[str, Any]:
    """What every run starts from: the base model and its cached warm start (path, settings,
    final loss), as ``Trainer.setup`` loaded it."""
    from treegrpo.engine.models import DEFAULT_POLICY
    from treegrpo.sft import warm_start

    cfg = trainer.cfg
    base = DEFAULT_POLICY if cfg.model.path == "default" else cfg.model.path
    if cfg.model.sft_steps == 0 or trainer.data.sft is None:
        return {"base": str(base), "warm_start": None}
    path = warm_start(  # cached by setup(): returns its directory at once
        base,
        trainer.data.sft,
        cfg.model,
        max_hops=cfg.data.max_hops,
        seed=cfg.trainer.seed,
        progress=False,
    )
    meta = path / "treegrpo_sft.json"
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    return {"base": str(base), "warm_start": {"path": str(path), **info}}


# --------------------------------------------------------------------------- runs


def validate_start(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out EM of the shared starting policy (the warm start), measured once."""
    overrides = [
        *common_overrides(args),
        "trainer.total_steps=0",
        f"trainer.run_dir={args.run_dir / 'before'}",
    ]
    run_dir = args.run_dir / "before"
    record = reuse(run_dir, overrides)
    if record is not None:
        print(f"validation before training: reused {run_dir / RESULT_FILE}")
        return record
    print(f"validation before training ({args.val_size} questions)...", flush=True)
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    trainer = trainer_for(overrides, args)
    try:
        setup_s = time.perf_counter() - start
        val_cpu = time.process_time()
        metrics = trainer.validate("before")
        val_cpu = time.process_time() - val_cpu
        policy = starting_policy(trainer)
    finally:
        trainer.close()
        del trainer
        gc.collect()
    record = {
        "overrides": overrides,
        "val_em": val_em(metrics),
        "val_s": metrics.get("timing_s/validate"),
        "val_cpu_s": val_cpu,
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "policy": policy,
        "loadavg": [round(x, 2) for x in (*load, *os.getloadavg())],
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_one(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """One training run; its record (also written to its directory)."""
    overrides = run_overrides(run, args)
    run_dir = args.run_dir / run.name
    record = reuse(run_dir, overrides)
    if record is not None:
        record["reused"] = True
        return record
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    trainer = trainer_for(overrides, args)
    try:
        setup_s = time.perf_counter() - start
        final = trainer.run()
    finally:
        trainer.close()
        del trainer
        gc.collect()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steps = [s for s in steps if "critic/score/mean" in s]

    def total(key: str) -> float:
        return float(sum(s.get(key, 0.0) for s in steps))

    rewards = [s["critic/score/mean"] for s in steps]
    record = {
        "name": run.name,
        "budget": run.budget,
        "mode": run.mode,
        "seed": run.seed,
        "shape": list(run.shape),
        "adv_estimator": ESTIMATOR[run.mode],
        "overrides": overrides,
        "steps": len(steps),
        "val_em": val_em(final),
        "train_reward_per_step": rewards,
        "train_reward_mean": statistics.fmean(rewards) if rewards else math.nan,
        "generated_tokens": total("tree/generated_tokens"),
        "prefill_tokens": total("tree/prefill_tokens"),
        "tool_calls": total("tree/tool_calls"),
        "leaves": total("tree/leaves_per_prompt") * args.batch,
        "rollout_s": total("timing_s/rollout"),
        "update_s": total("timing_s/old_log_prob") + total("timing_s/update_actor"),
        "val_s": final.get("timing_s/validate"),
        "setup_s": setup_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "loadavg": [round(x, 2) for x in (*load, *os.getloadavg())],
    }
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def eta(done: list[dict[str, Any]], remaining: list[Run]) -> float | None:
    """Seconds left: each remaining run at the mean wall time of the finished runs of its
    budget (or of another budget, scaled by the budget ratio)."""
    fresh = [r for r in done if not r.get("reused")]
    if not fresh:
        return None
    by_budget: dict[int, list[float]] = {}
    for r in fresh:
        by_budget.setdefault(r["budget"], []).append(r["wall_s"])
    means = {b: statistics.fmean(ts) for b, ts in by_budget.items()}
    left = 0.0
    for run in remaining:
        if run.budget in means:
            left += means[run.budget]
        else:
            b, t = next(iter(means.items()))
            left += t * run.budget / b
    return left


def repo_path(path: Path) -> Path:
    """``path`` relative to the repository root where it lies inside it."""
    path = path.resolve()
    return path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- summary


def stat(xs: list[float]) -> dict[str, float | int | None]:
    """{"mean", "std" (sample std; None for fewer than two values), "n"} of the finite xs."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def pm(s: dict[str, Any], fmt: str) -> str:
    """A stat() as "mean ± std" ("mean" alone for one value)."""
    if s["mean"] is None:
        return "-"
    mean = fmt.format(s["mean"])
    return mean if s["std"] is None else f"{mean} ± {fmt.format(s['std']).lstrip('+')}"


KEYS = ("train_reward_mean", "generated_tokens", "tool_calls", "leaves", "wall_s")


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (budget, mode), then per budget the paired difference
    tree - chain (same seed: the same prompts and validation questions)."""
    out: list[dict[str, Any]] = []
    for budget in sorted({r["budget"] for r in records}):
        cell = {m: [r for r in records if r["budget"] == budget and r["mode"] == m] for m in MODES}
        for mode in MODES:
            rs = cell[mode]
            if not rs:
                continue
            sources = sorted({s for r in rs for s in r["val_em"]})
            out.append(
                {
                    "budget": budget,
                    "mode": mode,
                    "label": Run(budget, mode, 0).label,
                    "seeds": [r["seed"] for r in rs],
                    **{key: stat([r[key] for r in rs]) for key in KEYS},
                    "val_em": {
                        s: stat([r["val_em"].get(s, math.nan) for r in rs]) for s in sources
                    },
                }
            )
        chain = {r["seed"]: r for r in cell["chain"]}
        pairs = [(t, chain[t["seed"]]) for t in cell["tree"] if t["seed"] in chain]
        if pairs:
            sources = sorted({s for t, c in pairs for s in t["val_em"] if s in c["val_em"]})
            out.append(
                {
                    "budget": budget,
                    "mode": "tree - chain",
                    "label": "tree - chain (paired by seed)",
                    "seeds": [t["seed"] for t, _ in pairs],
                    **{key: stat([t[key] - c[key] for t, c in pairs]) for key in KEYS},
                    "val_em": {
                        s: stat([t["val_em"][s] - c["val_em"][s] for t, c in pairs])
                        for s in sources
                    },
                }
            )
    return out


def tables(summary: list[dict[str, Any]], before: dict[str, float]) -> str:
    """The markdown report: one table of the main numbers, one of EM per data source."""
    sources = sorted({s for row in summary for s in row["val_em"]} - {"all"})
    rows, per_source = [], []
    for row in summary:
        sign = "+" if row["mode"] == "tree - chain" else ""
        em = row["val_em"]
        rows.append(
            [
                f"~{row['budget']}",
                row["label"],
                len(row["seeds"]),
                pm(em.get("all", stat([])), f"{{:{sign}.3f}}"),
                pm(row["train_reward_mean"], f"{{:{sign}.3f}}"),
                pm(row["generated_tokens"], f"{{:{sign},.0f}}"),
                pm(row["tool_calls"], f"{{:{sign}.0f}}"),
                pm(row["leaves"], f"{{:{sign}.0f}}"),
                pm(row["wall_s"], f"{{:{sign}.0f}}"),
            ]
        )
        per_source.append(
            [f"~{row['budget']}", row["label"]]
            + [pm(em.get(s, stat([])), f"{{:{sign}.3f}}") for s in sources]
        )
    head = ["budget", "mode", "seeds", "held-out EM", "mean train reward"]
    head += ["generated tokens", "tool calls", "leaves", "wall s"]
    start = ", ".join(f"{s} {v:.3f}" for s, v in sorted(before.items()))
    return (
        f"Held-out EM of the starting policy (before training): {start or '-'}.\n\n"
        f"{markdown_table(head, rows)}\n\n"
        "Held-out EM after training, per data source:\n\n"
        f"{markdown_table(['budget', 'mode', *sources], per_source)}\n"
    )


def plot(summary: list[dict[str, Any]], before: dict[str, float], out: Path) -> Path | None:
    """Held-out EM against generated tokens, one line per mode over the budgets (mean and std
    over seeds as error bars), and the starting policy's EM."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -c constraints.txt matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode, marker in zip(MODES, ("o", "s"), strict=True):
        rows = [r for r in summary if r["mode"] == mode and r["val_em"].get("all", {}).get("n")]
        if not rows:
            continue
        xs = [r["generated_tokens"]["mean"] for r in rows]
        ys = [r["val_em"]["all"]["mean"] for r in rows]
        ax.errorbar(
            xs,
            ys,
            xerr=[r["generated_tokens"]["std"] or 0.0 for r in rows],
            yerr=[r["val_em"]["all"]["std"] or 0.0 for r in rows],
            marker=marker,
            capsize=4,
            label=mode,
        )
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if "all" in before:
        ax.axhline(
            before["all"], color="grey", linestyle="--", linewidth=1, label="before training"
        )
    seeds = max((len(r["seeds"]) for r in summary), default=0)
    ax.set_xlabel("generated tokens spent in training (sum over steps)")
    ax.set_ylabel("held-out EM (greedy, all sources)")
    ax.set_title(f"Tree-GRPO vs chain GRPO: mean ± std over {seeds} seed(s)")
    ax.margins(x=0.2, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default 3)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per run (%(default)s)")
    ap.add_argument("--batch", type=int, default=2, help="prompts per step (%(default)s)")
    ap.add_argument(
        "--val-size", type=int, default=16, help="held-out validation questions (%(default)s)"
    )
    ap.add_argument(
        "--lr", type=float, default=1e-5, help="learning rate, both modes (%(default)s)"
    )
    ap.add_argument(
        "--kl-coef", type=float, default=0.0, help="KL loss weight (%(default)s: no reference)"
    )
    ap.add_argument("--budgets", default="2,4", help="comma-separated, from: 2, 4 (%(default)s)")
    ap.add_argument(
        "--max-turns", type=int, default=3, help="search turns before the final one (%(default)s)"
    )
    ap.add_argument(
        "--max-action-tokens", type=int, default=96, help="tokens per agent step (%(default)s)"
    )
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where the runs' directories go (bench/results/learning_runs)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); 1 is steadier on a busy machine",
    )
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint")
    ap.add_argument("--verbose", action="store_true", help="the Trainer's progress bars and logs")
    ap.add_argument(
        "--quick", action="store_true", help="1 seed, 1 step, budget 2, 4 val questions"
    )
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: full runs only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.val_size, args.budgets = 1, 1, 4, "2"
    try:
        args.budgets = [int(b) for b in str(args.budgets).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets {args.budgets!r}: give comma-separated integers, e.g. 2,4")
    unknown = [b for b in args.budgets if b not in SHAPES]
    if unknown or not args.budgets:
        ap.error(f"--budgets: choose from {', '.join(map(str, SHAPES))}")
    for name in ("seeds", "steps", "batch", "val_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.run_dir is None:
        sub = "learning_runs_quick" if args.quick else "learning_runs"
        args.run_dir = RESULTS / sub
    args.run_dir = args.run_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    if load > 1.0:
        print(
            f"note: load average {load:.1f} on {os.cpu_count()} cores: other jobs compete for "
            "the CPU, so times (and the 60-minute budget) are not those of a quiet machine"
            + ("; --threads 1 is steadier" if args.threads > 1 else ""),
            flush=True,
        )
    args.run_dir.mkdir(parents=True, exist_ok=True)
    grid = [
        Run(budget, mode, seed)
        for seed in range(args.seeds)  # whole seeds first: a stopped grid is balanced
        for budget in args.budgets
        for mode in MODES
    ]
    print(
        f"learning experiment: {len(grid)} runs ({args.seeds} seed(s) x budgets "
        f"{args.budgets} x {', '.join(MODES)}), {args.steps} steps x {args.batch} prompts, "
        f"{args.val_size} validation questions, lr {args.lr}, kl_coef {args.kl_coef}, "
        f"{args.threads} torch threads; "
        f"runs in {args.run_dir}",
        flush=True,
    )
    start = validate_start(args)
    before = start["val_em"]
    records, failed = [], []
    for i, run in enumerate(grid):
        elapsed = time.perf_counter() - started
        print(
            f"[{i + 1}/{len(grid)}] {run.name}: {run.label}, estimator {ESTIMATOR[run.mode]} "
            f"(elapsed {fmt_duration(elapsed)}, ETA {fmt_duration(eta(records, grid[i:]))})",
            flush=True,
        )
        try:
            record = train_one(run, args)
        except Exception:
            traceback.print_exc()
            failed.append(run.name)
            print(f"[{i + 1}/{len(grid)}] {run.name}: FAILED (continuing)", flush=True)
            continue
        records.append(record)
        em = record["val_em"].get("all", math.nan)
        how = "reused" if record.get("reused") else f"{record['wall_s']:.0f} s"
        print(
            f"[{i + 1}/{len(grid)}] {run.name}: held-out EM {em:.3f} "
            f"(before {before.get('all', math.nan):.3f}), train reward "
            f"{record['train_reward_mean']:.3f}, {record['generated_tokens']:.0f} generated "
            f"tokens, {record['tool_calls']:.0f} tool calls ({how})",
            flush=True,
        )

    summary = summarise(records)
    report = tables(summary, before)
    print()
    print(report)
    grid_s = start["wall_s"] + sum(r["wall_s"] for r in records)
    elapsed = time.perf_counter() - started
    print(
        f"grid wall time (sum of the runs' own times): {grid_s / 60:.1f} min; "
        f"this invocation {elapsed / 60:.1f} min"
    )

    write = args.out is not None or not args.quick
    if write:
        out = args.out or RESULTS / f"{NAME}.json"
        png = plot(summary, before, out.with_suffix(".png"))
        complete = not failed and len(records) == len(grid)
        payload = {
            "title": TITLE,
            "issue": ISSUE,
            "targets": [
                target(
                    "whole grid wall time (val before + every run)",
                    grid_s / 60 if complete else None,
                    "<=",
                    TIME_LIMIT_MIN,
                    "min",
                    note=(
                        f"{len(grid)} runs: {args.seeds} seeds x budgets {args.budgets} x "
                        f"chain/tree, {args.steps} steps x {args.batch} prompts, "
                        f"{args.val_size} val questions"
                    ),
                )
            ],
            "settings": {
                "seeds": args.seeds,
                "steps": args.steps,
                "batch": args.batch,
                "val_size": args.val_size,
                "val_seed": VAL_SEED,
                "lr": args.lr,
                "kl_coef": args.kl_coef,
                "budgets": args.budgets,
                "shapes": {str(b): SHAPES[b] for b in args.budgets},
                "estimators": ESTIMATOR,
                "max_turns": args.max_turns,
                "max_action_tokens": args.max_action_tokens,
                "torch_threads": args.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "quick": args.quick,
            },
            "val_before": start,
            "runs": records,
            "failed": failed,
            "summary": summary,
            "table_md": report,
            "plot": str(repo_path(png)) if png else None,
            "grid_wall_s": grid_s,
            "elapsed_s": elapsed,
        }
        path = write_results(NAME, payload, out)
        print(f"wrote {path}" + (f" and {png}" if png else ""))
    else:
        print("--quick: no result file or plot written (give --out to write them)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
