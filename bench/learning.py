"""Learning benchmark (issue 14): the paper's budget claims, in miniature, on the tiny preset.

Every run is a ``treegrpo train`` run of the ``tiny`` preset (the from-scratch policy on the
synthetic world, warm-started once and shared by every run), built from dotted overrides by
``load_config`` and run by a fresh :class:`treegrpo.train.Trainer` in this process; the
overrides are recorded per run, so ``treegrpo train <overrides>`` repeats any of them.

Grid, per seed (budgets in chain-equivalents per prompt, algorithm.md section 2):

    budget 2: tree (1, 2, 1) [adv tree]          vs  chain M=2 [adv grpo]
    budget 4: tree (2, 2, 1) [adv tree]          vs  chain M=4 [adv grpo]
    budget 4, estimator ablation on the same tree (2, 2, 1) rollouts' shape:
              tree_intra, tree_inter, grpo

Hyper-parameters, fixed before the grid ran and the same for every mode (no tuning per mode):
the ``tiny`` preset's (python/treegrpo/config.py, PRESETS["tiny"]) with ``--steps`` training
steps of ``data.train_batch_size`` = 8 prompts. Held equal within a seed: the starting policy,
the prompts of every step (``trainer.seed``: the same shuffled order), the sampling and
selection seeds, and the 200 held-out validation questions (the same for every run and seed).
What differs between seeds: the prompt order and the sampling and selection seeds.

Validation is greedy, so the shared starting policy is validated once ("before", step 0) and
every run after every ``--val-every`` steps. Reported (bench/results/learning.json, the report
docs/benchmarks.md, and bench/results/learning.png):

- per (budget, mode): mean and 95% CI (Student t over seeds) of the final held-out EM, the
  generated tokens and tool calls actually spent, and tool calls per trajectory;
- the paired difference tree - chain per seed with its 95% CI, at each budget, and tree at
  budget 2 against chain at budget 4;
- the estimator ablation at budget 4;
- learning curves (EM against generated tokens, mean +- 95% CI band over seeds);
- the paper's claims with reproduced / not reproduced / inconclusive: reproduced when the CI
  of the paired difference lies on the paper's side of 0, not reproduced when it lies on the
  other side, inconclusive when it holds 0.

Resumable: a run whose directory holds ``result.json`` made with the same overrides is reused;
an unfinished one is started over. An interrupted grid continues when started again.

    .venv/bin/python bench/learning.py                      # the grid
    .venv/bin/python bench/learning.py --quick              # smoke test: 1 seed, 2 steps, no JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see treegrpo.cli: no spinning threads

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, RESULTS, markdown_table, target, write_results

NAME = "learning"
TITLE = "Learning: Tree-GRPO against chain GRPO at equal budget (tiny preset)"
ISSUE = 14
TIME_LIMIT_MIN = 100.0
EM = "val-core/all/acc/mean@1"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Arm:
    """One configuration of the grid (run once per seed)."""

    name: str
    budget: int
    shape: tuple[int, int, int]  # (M, N, L)
    estimator: str

    @property
    def label(self) -> str:
        m, n, l = self.shape  # noqa: E741
        shape = f"chain M={m}" if n == 0 else f"tree ({m}, {n}, {l})"
        return f"{shape} [{self.estimator}]"


ARMS = (
    Arm("b2-chain", 2, (2, 0, 1), "grpo"),
    Arm("b2-tree", 2, (1, 2, 1), "tree"),
    Arm("b4-chain", 4, (4, 0, 1), "grpo"),
    Arm("b4-tree", 4, (2, 2, 1), "tree"),
    Arm("b4-tree_intra", 4, (2, 2, 1), "tree_intra"),
    Arm("b4-tree_inter", 4, (2, 2, 1), "tree_inter"),
    Arm("b4-grpo", 4, (2, 2, 1), "grpo"),
)
ARM = {a.name: a for a in ARMS}


def overrides(arm: Arm, seed: int, args: argparse.Namespace) -> list[str]:
    m, n, l = arm.shape  # noqa: E741
    return [
        "preset=tiny",
        f"tree.m={m}",
        f"tree.n={n}",
        f"tree.l={l}",
        f"tree.seed={seed}",
        f"algorithm.adv_estimator={arm.estimator}",
        f"trainer.seed={seed}",
        f"trainer.total_steps={args.steps}",
        f"trainer.val_every={args.val_every}",
        f"trainer.save_every={args.steps}",
        "trainer.val_before=false",
        "trainer.plot=false",
        "trainer.resume=never",
        "trainer.logger=[jsonl]",
        f"trainer.run_dir={args.run_dir / f'{arm.name}-seed{seed}'}",
    ]


def resolved(ov: list[str]) -> dict[str, Any]:
    """The whole config these overrides give with today's presets and defaults (JSON types)."""
    from treegrpo.config import load_config

    return json.loads(json.dumps(load_config(None, ov).to_dict(), default=str))


def reuse(run_dir: Path, ov: list[str]) -> dict[str, Any] | None:
    """A finished run's record made with this config (the overrides AND what they resolve to,
    so an edit of the preset or a default reruns it); else None (and the directory of an
    unfinished or different run is removed)."""
    path = run_dir / RESULT_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("overrides") == ov and record.get("config") == resolved(ov):
                return record
        except ValueError:
            pass
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return None


def train(ov: list[str], *, validate_only: bool = False) -> dict[str, Any]:
    """One run of these overrides in this process; its record."""
    from treegrpo.config import load_config
    from treegrpo.train import Trainer

    cfg = load_config(None, ov)
    start = time.perf_counter()
    with Trainer(cfg, progress=False) as trainer:
        trainer.setup()
        if validate_only:
            curve = [(0, trainer.validate("before")[EM], 0.0)]
            records: list[dict[str, Any]] = []
        else:
            trainer.run()
            lines = (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(x) for x in lines]
    if not validate_only:
        spent, tokens = 0.0, {0: 0.0}
        for r in records:
            if "tree/generated_tokens" in r:
                spent += r["tree/generated_tokens"]
                tokens[r["step"]] = spent
        curve = [(r["step"], r[EM], tokens.get(r["step"], spent)) for r in records if EM in r]
    steps = [r for r in records if "tree/generated_tokens" in r]
    leaves = sum(r["tree/leaves_per_prompt"] for r in steps) * cfg.data.train_batch_size
    tools = sum(r["tree/tool_calls"] for r in steps)
    # steps along a kept trajectory, its final step aside: the searches (or invalid actions)
    # that trajectory made, shared prefixes counted once per trajectory as in the paper
    turns = [r["num_turns/mean"] - 1 for r in steps if "num_turns/mean" in r]
    return {
        "overrides": ov,
        "config": resolved(ov),
        "curve": curve,  # (step, held-out EM, generated tokens so far)
        "final_em": curve[-1][1],
        "generated_tokens": sum(r["tree/generated_tokens"] for r in steps),
        "tool_calls": tools,
        "trajectories": leaves,
        "tool_calls_per_trajectory": statistics.fmean(turns) if turns else None,
        "train_reward": [r["critic/score/mean"] for r in steps],
        "step_s": [r["timing_s/step"] for r in steps],
        "wall_s": time.perf_counter() - start,
    }


def run_cached(run_dir: Path, ov: list[str], **kw: Any) -> dict[str, Any]:
    record = reuse(run_dir, ov)
    if record is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = train(ov, **kw)
        (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        gc.collect()
    return record


# --------------------------------------------------------------------------- statistics


def t95(n: int) -> float:
    """Two-sided 95% Student t quantile for n - 1 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.inf


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t interval over seeds."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, -math.inf, math.inf
    half = t95(len(xs)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def verdict(low: float, high: float, paper_sign: int) -> str:
    """The paper claims a difference of ``paper_sign`` (+1: the first arm is better)."""
    if paper_sign * low > 0 and paper_sign * high > 0:
        return "reproduced"
    if paper_sign * low < 0 and paper_sign * high < 0:
        return "not reproduced (opposite sign)"
    return "inconclusive (CI holds 0)"


def fmt_ci(m: float, lo: float, hi: float) -> str:
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else f"{m:+.3f}"


def summarise(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    per_arm = {}
    ran = [a for a in ARMS if a.name in results]
    for arm in ran:
        runs = [results[arm.name][s] for s in seeds]
        em = mean_ci([r["final_em"] for r in runs])
        per_arm[arm.name] = {
            "label": arm.label,
            "budget": arm.budget,
            "final_em": [r["final_em"] for r in runs],
            "final_em_mean_ci": em,
            "generated_tokens_mean": statistics.fmean(r["generated_tokens"] for r in runs),
            "tool_calls_mean": statistics.fmean(r["tool_calls"] for r in runs),
            "trajectories_mean": statistics.fmean(r["trajectories"] for r in runs),
            "tool_calls_per_trajectory_mean": _mean_or_none(
                [r["tool_calls_per_trajectory"] for r in runs]
            ),
        }

    def paired(a: str, b: str) -> dict[str, Any]:
        diffs = [results[a][s]["final_em"] - results[b][s]["final_em"] for s in seeds]
        base = statistics.fmean(results[b][s]["final_em"] for s in seeds)
        m, lo, hi = mean_ci(diffs)
        return {"diffs": diffs, "mean_ci": (m, lo, hi), "relative": m / base if base else None}

    pairs = {
        "b2: tree - chain": ("b2-tree", "b2-chain"),
        "b4: tree - chain": ("b4-tree", "b4-chain"),
        "tree@2 - chain@4": ("b2-tree", "b4-chain"),
        "b4: tree - tree_intra": ("b4-tree", "b4-tree_intra"),
        "b4: tree - tree_inter": ("b4-tree", "b4-tree_inter"),
        "b4: tree - grpo (same tree rollouts)": ("b4-tree", "b4-grpo"),
    }
    comparisons = {k: paired(a, b) for k, (a, b) in pairs.items() if a in results and b in results}
    if len(comparisons) < len(pairs):  # a subset of the arms ran: no claims table
        return {"arms": per_arm, "comparisons": comparisons, "claims": []}
    # The paper's claims (Ji et al. 2025, Table 3 and the ablations) and what we measured.
    c = comparisons
    claims = [
        ("budget ~2: tree beats chain (paper: +112% relative EM)", c["b2: tree - chain"], +1),
        ("budget ~4: tree beats chain (paper: +16% relative EM)", c["b4: tree - chain"], +1),
        (
            "tree at budget ~2 reaches chain at ~4 (paper: with a quarter of the tool calls); "
            "read as: tree@2 - chain@4 is not negative",
            c["tree@2 - chain@4"],
            +1,
        ),
        (
            "inter + intra beats intra alone (paper: intra alone is unstable)",
            c["b4: tree - tree_intra"],
            +1,
        ),
    ]
    verdicts = []
    for text, comp, sign in claims:
        m, lo, hi = comp["mean_ci"]
        v = verdict(lo, hi, sign)
        if text.startswith("tree at budget ~2") and lo <= 0 <= hi:
            v = "inconclusive (CI holds 0; consistent with 'reaches')"
        verdicts.append({"claim": text, "measured": fmt_ci(m, lo, hi), "verdict": v})
    spent = per_arm["b4-chain"]["tool_calls_mean"]
    ratio = per_arm["b2-tree"]["tool_calls_mean"] / spent if spent else math.nan
    b2t = per_arm["b2-tree"]["tool_calls_per_trajectory_mean"] or math.nan
    b4c = per_arm["b4-chain"]["tool_calls_per_trajectory_mean"] or math.nan
    verdicts.append(
        {
            "claim": "tool calls per trajectory (paper: 2.4 chain -> 3.0 tree)",
            "measured": ", ".join(
                f"{a.label}: {per_arm[a.name]['tool_calls_per_trajectory_mean'] or math.nan:.2f}"
                for a in ARMS[:4]
            ),
            "verdict": "see the numbers (our 1-2 hop questions need 1-2 searches)",
        }
    )
    verdicts.append(
        {
            "claim": "tool calls spent: tree@2 against chain@4 (paper: a quarter)",
            "measured": (
                f"{per_arm['b2-tree']['tool_calls_mean']:.0f} vs "
                f"{per_arm['b4-chain']['tool_calls_mean']:.0f} per run "
                f"({ratio:.2f}x;"
                f" per trajectory {b2t:.2f} vs {b4c:.2f})"
            ),
            "verdict": "measured",
        }
    )
    return {"arms": per_arm, "comparisons": comparisons, "claims": verdicts}


def _mean_or_none(xs: list[float | None]) -> float | None:
    kept = [x for x in xs if x is not None]
    return statistics.fmean(kept) if kept else None


def _finite(x: Any) -> Any:
    """JSON has no infinities: an unbounded interval end (one seed) is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def plot(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int], out: Path) -> Path:
    """EM against generated tokens per arm: mean over seeds, 95% CI band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    panels = (
        ("budget ~2", ["b2-chain", "b2-tree"]),
        ("budget ~4", ["b4-chain", "b4-tree"]),
        (
            "budget ~4: estimators on tree (2, 2, 1)",
            ["b4-tree", "b4-tree_intra", "b4-tree_inter", "b4-grpo"],
        ),
    )
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in (n for n in names if n in results):
            curves = [results[name][s]["curve"] for s in seeds]
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][2] for c in curves) for i in range(n)]
            stats = [mean_ci([c[i][1] for c in curves]) for i in range(n)]
            ys = [m for m, _, _ in stats]
            ax.plot(xs, ys, marker="o", markersize=3, label=ARM[name].label)
            if len(seeds) > 1:
                ax.fill_between(
                    xs, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], alpha=0.15
                )
        ax.set_title(title)
        ax.set_xlabel("generated tokens (mean over seeds)")
        ax.set_ylabel("held-out EM (greedy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny preset, {len(seeds)} seeds, mean and 95% CI")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--arms", default=",".join(ARM), help="comma-separated arm names")
    ap.add_argument("--run-dir", type=Path, default=RESULTS / "learning_runs")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 steps, 2 arms, no JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.val_every, args.arms = 1, 2, 1, "b2-chain,b2-tree"
        args.run_dir = args.run_dir.with_name(args.run_dir.name + "_quick")
    if args.seeds < 1 or args.steps < 1:
        ap.error("--seeds and --steps must be >= 1")
    unknown = [a for a in args.arms.split(",") if a not in ARM]
    if unknown:
        ap.error(f"unknown arm {', '.join(unknown)}: choose from {', '.join(ARM)}")
    arms = [ARM[a] for a in args.arms.split(",")]
    seeds = list(range(args.seeds))
    started = time.perf_counter()

    # the shared starting policy, validated once (greedy: the same for every run)
    before_ov = [*overrides(ARMS[0], 0, args)[:1], f"trainer.run_dir={args.run_dir / 'before'}"]
    before = run_cached(args.run_dir / "before", before_ov, validate_only=True)
    print(f"starting policy: held-out EM {before['final_em']:.3f}", flush=True)

    results: dict[str, dict[int, dict[str, Any]]] = {a.name: {} for a in arms}
    todo = [(a, s) for s in seeds for a in arms]
    for i, (arm, seed) in enumerate(todo, 1):
        ov = overrides(arm, seed, args)
        t = time.perf_counter()
        record = run_cached(args.run_dir / f"{arm.name}-seed{seed}", ov)
        record["curve"] = [before["curve"][0], *record["curve"]]
        results[arm.name][seed] = record
        elapsed = (time.perf_counter() - started) / 60
        print(
            f"[{i}/{len(todo)}] {arm.label} seed {seed}: EM {before['final_em']:.3f} -> "
            f"{record['final_em']:.3f}, {record['generated_tokens']:.0f} tokens, "
            f"{time.perf_counter() - t:.0f} s (grid {elapsed:.1f} min)",
            flush=True,
        )
    total_min = (time.perf_counter() - started) / 60
    if args.quick and args.out is None:
        return 0

    summary = summarise(results, seeds)
    rows = []
    for a in summary["arms"].values():
        m, lo, hi = a["final_em_mean_ci"]
        rows.append(
            [
                a["label"],
                a["budget"],
                f"{m:.3f} [{lo:.3f}, {hi:.3f}]",
                f"{a['generated_tokens_mean']:.0f}",
                f"{a['tool_calls_mean']:.0f}",
                f"{a['tool_calls_per_trajectory_mean'] or math.nan:.2f}",
            ]
        )
    headers = [
        "arm",
        "budget",
        "final EM, mean [95% CI]",
        "gen tokens",
        "tool calls",
        "tool calls / traj",
    ]
    print(markdown_table(headers, rows))
    print()
    comp_rows = [
        [
            k,
            fmt_ci(*v["mean_ci"]),
            " ".join(f"{d:+.3f}" for d in v["diffs"]),
            f"{100 * v['relative']:+.0f}%" if v["relative"] is not None else "-",
        ]
        for k, v in summary["comparisons"].items()
    ]
    print(markdown_table(["paired difference", "mean [95% CI]", "per seed", "relative"], comp_rows))
    print()
    print(
        markdown_table(
            ["claim", "measured", "verdict"],
            [[c["claim"], c["measured"], c["verdict"]] for c in summary["claims"]],
        )
    )
    png = plot(results, seeds, RESULTS / "learning.png")
    print(f"\nwrote {png}; grid {total_min:.1f} min")
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": [
            target(
                "whole grid wall time",
                total_min,
                "<=",
                TIME_LIMIT_MIN,
                "min",
                note="includes reused runs at 0 s when resumed",
            ),
        ],
        "settings": {
            "seeds": args.seeds,
            "steps": args.steps,
            "val_every": args.val_every,
            "preset": "tiny",
        },
        "before": before,
        "summary": summary,
        "runs": {k: {str(s): r for s, r in v.items()} for k, v in results.items()},
        "plot": str(png.relative_to(HERE.parent)),
    }
    print(f"wrote {write_results(NAME, _finite(payload), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
