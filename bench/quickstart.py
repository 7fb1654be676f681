"""Quickstart benchmark (issue 7): `treegrpo train` with no arguments, end to end, and each
training step's wall time split by stage.

The run goes through the code `treegrpo train` runs (load_config -> Trainer.setup -> Trainer.run),
in this process so that setup and checkpoint saves can be timed around the trainer's own
methods. By default it starts from an empty cache (TREEGRPO_CACHE in a temporary directory):
the GGUF conversion of the default policy, the synthetic world, the BM25 index and the SFT warm
start are all part of the time, as on a first run on a fresh machine. ``--cache DIR`` reuses a
cache (a warm run: all of those are loaded instead). The run directory is temporary.

Target: the whole run, imports included, within 15 minutes on this 2-core machine.

Stages of a step come from the trainer's own timers (metrics.jsonl, ``timing_s/*``):
generation (engine), tool calls, rewards, advantages, old log-probs, the update, weight sync and
the Parquet rollout logs; checkpoint saves are timed around ``Trainer.checkpoint``.

Run: .venv/bin/python bench/quickstart.py [--cache DIR] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, target, write_results

STARTED = time.perf_counter()  # before torch and treegrpo are imported (inside run())

TITLE = "Quickstart: treegrpo train end to end, and a step by stage"
ISSUE = 7
TARGET_S = 15 * 60.0
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
)
# --quick: one short step from the default cache, to check that this script runs.
QUICK = [
    "trainer.total_steps=1",
    "trainer.val_before=false",
    "trainer.val_after=false",
    "data.train_batch_size=1",
]


def timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    """``fn``, appending the wall time of each call to ``into``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    return wrapper


def seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def run(overrides: list[str]) -> dict[str, Any]:
    """One quickstart run; the wall time of its parts and its metrics records."""
    from treegrpo import distributed
    from treegrpo.config import load_config
    from treegrpo.train import Trainer

    imported = time.perf_counter()
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, progress=True)
    policy_s: list[float] = []
    checkpoint_s: list[float] = []
    validate_s: list[float] = []
    trainer._load_policy = timed(trainer._load_policy, policy_s)  # type: ignore[method-assign]
    trainer.checkpoint = timed(trainer.checkpoint, checkpoint_s)  # type: ignore[method-assign]
    trainer.validate = timed(trainer.validate, validate_s)  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        trainer.run()
        run_s = time.perf_counter() - start
    finally:
        trainer.close()
        distributed.shutdown()
    total_s = time.perf_counter() - STARTED
    lines = (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r for r in records if "timing_s/step" in r]
    return {
        "overrides": overrides,
        "total_s": total_s,
        "imports_s": imported - STARTED,
        "setup_s": setup_s,
        "policy_s": policy_s[0] if policy_s else None,
        "validate_s": validate_s,
        "train_loop_s": run_s,
        "checkpoint_s": checkpoint_s,
        "steps": steps,
        "validation": [r for r in records if any(k.startswith("val-core/") for k in r)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help="reuse this cache (default: empty)")
    ap.add_argument("--quick", action="store_true", help="one short step, default cache, no JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="treegrpo-quickstart-") as tmp:
        if args.cache is not None:
            cache, cold = args.cache.resolve(), False
        elif args.quick:
            cache, cold = None, False
        else:
            cache, cold = Path(tmp) / "cache", True
        if cache is not None:
            os.environ["TREEGRPO_CACHE"] = str(cache)
        overrides = [f"trainer.run_dir={Path(tmp) / 'run'}", "trainer.resume=never"]
        result = run(overrides + (QUICK if args.quick else []))

    steps = result["steps"]
    median_step = statistics.median(s["timing_s/step"] for s in steps)
    rows = []
    for label, key in (*STAGES, ("whole step", "timing_s/step")):
        values = [s[key] for s in steps if key in s]
        share = statistics.median(values) / median_step
        rows.append([label, *(seconds(v) for v in values), f"{100 * share:.1f}%"])
    saves = result["checkpoint_s"]
    rows.insert(-1, ["checkpoint save", *(seconds(v) for v in saves), "-"])
    headers = ["stage", *(f"step {s['step']} (s)" for s in steps), "share of the median step"]
    print()
    print(markdown_table(headers, rows))
    print()
    parts = [
        ("imports", result["imports_s"]),
        ("setup (data, retriever, engine, learner)", result["setup_s"] - (result["policy_s"] or 0)),
        ("policy (conversion, SFT warm start, load)", result["policy_s"] or 0.0),
        ("validation", sum(result["validate_s"])),
        ("training steps", sum(s["timing_s/step"] for s in steps)),
        ("checkpoint saves", sum(saves)),
    ]
    accounted = sum(v for _, v in parts)
    parts.append(("other (logging, progress bars, teardown)", result["total_s"] - accounted))
    parts.append(("total", result["total_s"]))
    print(markdown_table(["part of the run", "wall s"], [[n, f"{v:.1f}"] for n, v in parts]))
    cache_kind = "empty cache (first run)" if cold else "warm cache"
    print(f"\ntotal {result['total_s']:.0f} s, {cache_kind} (target {TARGET_S:.0f} s)")

    if args.quick and args.out is None:
        return 0
    name = f"treegrpo train (quickstart), {cache_kind}, imports included"
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": [
            target(
                name,
                result["total_s"] / 60,
                "<=",
                TARGET_S / 60,
                "min",
                note=(
                    f"{len(steps)} steps, median step {median_step:.0f} s; policy (with SFT "
                    f"on a first run) {result['policy_s'] or 0:.0f} s"
                ),
            )
        ],
        "cold_cache": cold,
        "parts_s": dict(parts),
        **result,
    }
    print(f"wrote {write_results('quickstart', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
