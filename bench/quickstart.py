"""Quickstart benchmark (issue 14): `treegrpo train` with no arguments, for 3 seeds.

Each run is the user's command itself, ``python -m treegrpo train trainer.seed=S`` in a fresh
process, timed from outside (imports, the one-time build and every validation included):

- seed 0 from an EMPTY cache (``TREEGRPO_CACHE`` in a temporary directory): the synthetic
  world, the from-scratch policy (tokenizer + random Llama), the BM25 index and the SFT warm
  start are built, as on a first run on a fresh machine. Target: 15 minutes.
- seeds 1 and 2 on that cache (the warm start is shared: ``model.sft_seed`` does not change
  with ``trainer.seed``), so only RL and validation run. Target: 5 minutes each.
- Every seed: held-out EM (greedy, ``val-core/all/acc/mean@1`` on the preset's 200 test
  questions) before and after training. Target: after - before >= +0.10 in every seed.
- The steps' wall time by stage, from the trainer's own timers (``timing_s/*`` in
  metrics.jsonl): median over every step of every run. Target: one Tree-GRPO step over the
  preset's 8 prompts with (M, N, L) = (2, 2, 1) within 10 s.

Run: .venv/bin/python bench/quickstart.py [--seeds 3] [--out FILE]
     .venv/bin/python bench/quickstart.py --quick    # 2 steps, one seed, no JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, target, write_results

TITLE = "Quickstart: treegrpo train end to end (tiny preset), 3 seeds"
ISSUE = 14
COLD_TARGET_S = 15 * 60.0
WARM_TARGET_S = 5 * 60.0
STEP_TARGET_S = 10.0
GAIN_TARGET = 0.10
EM = "val-core/all/acc/mean@1"
# (label, metrics key) of a step's stages, in the order the loop runs them.
STAGES = (
    ("generation (engine)", "timing_s/gen"),
    ("tool calls", "timing_s/tool"),
    ("rewards", "timing_s/reward"),
    ("advantages (Rust)", "timing_s/adv"),
    ("pack, plan, reference (+ old) log-probs", "timing_s/old_log_prob"),
    ("update", "timing_s/update_actor"),
    ("weight sync", "timing_s/weight_sync"),
    ("rollout logs (Parquet)", "timing_s/log"),
    ("whole step", "timing_s/step"),
)


def run(seed: int, run_dir: Path, cache: Path, extra: list[str]) -> dict[str, Any]:
    """One ``treegrpo train`` process; its wall time and metrics records."""
    cmd = [
        sys.executable,
        "-m",
        "treegrpo",
        "train",
        "--no-progress",
        f"trainer.seed={seed}",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "TREEGRPO_CACHE": str(cache)}
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"treegrpo train (seed {seed}) failed with exit code {done.returncode}")
    print((done.stdout.strip().splitlines() or ["(no output)"])[-1], flush=True)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if EM in r]
    return {
        "seed": seed,
        "wall_s": wall,
        "em_before": vals[0][EM],
        "em_after": vals[-1][EM],
        "em_curve": [(r["step"], r[EM]) for r in vals],
        "steps": [r for r in records if "timing_s/step" in r],
        "stdout_tail": done.stdout.strip().splitlines()[-3:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 steps, one seed, no JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    extra = ["trainer.total_steps=2", "trainer.val_every=0"] if args.quick else []
    seeds = 1 if args.quick else args.seeds

    runs = []
    with tempfile.TemporaryDirectory(prefix="treegrpo-quickstart-") as tmp:
        cache = Path(tmp) / "cache"  # empty: the first run builds everything
        for seed in range(seeds):
            runs.append(run(seed, Path(tmp) / f"run-{seed}", cache, extra))

    print()
    rows = [
        [
            r["seed"],
            "empty" if i == 0 else "warm",
            f"{r['wall_s']:.0f}",
            f"{r['em_before']:.3f}",
            f"{r['em_after']:.3f}",
            f"{r['em_after'] - r['em_before']:+.3f}",
            " ".join(f"{em:.3f}" for _, em in r["em_curve"]),
        ]
        for i, r in enumerate(runs)
    ]
    headers = ["seed", "cache", "wall s", "EM before", "EM after", "gain", "EM curve"]
    print(markdown_table(headers, rows))
    steps = [s for r in runs for s in r["steps"]]
    stage_rows = []
    medians: dict[str, float] = {}
    for label, key in STAGES:
        values = [s[key] for s in steps if key in s]
        medians[key] = statistics.median(values) if values else float("nan")
        stage_rows.append(
            [label, f"{medians[key]:.3g}", f"{min(values):.3g}", f"{max(values):.3g}"]
        )
    print()
    print(f"training steps by stage ({len(steps)} steps of {len(runs)} runs, seconds):")
    print(markdown_table(["stage", "median", "min", "max"], stage_rows))
    if args.quick and args.out is None:
        return 0

    gains = [r["em_after"] - r["em_before"] for r in runs]
    warm = [r["wall_s"] for r in runs[1:]]
    targets = [
        target(
            "quickstart from an empty cache (build + warm start included), seed 0",
            runs[0]["wall_s"] / 60,
            "<=",
            COLD_TARGET_S / 60,
            "min",
        ),
        target(
            "quickstart with the policy cached, slowest seed",
            max(warm) / 60 if warm else None,
            "<=",
            WARM_TARGET_S / 60,
            "min",
        ),
        target(
            "held-out EM gain (after - before), worst seed",
            min(gains),
            ">=",
            GAIN_TARGET,
            "",
            note="gains per seed: " + ", ".join(f"{g:+.3f}" for g in gains),
        ),
        target(
            "one Tree-GRPO step, 8 prompts, (2, 2, 1): median over the runs' steps",
            medians["timing_s/step"],
            "<=",
            STEP_TARGET_S,
            "s",
        ),
    ]
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": targets,
        "stage_median_s": medians,
        "runs": runs,
    }
    print(f"wrote {write_results('quickstart', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
