"""GPU checks (issue 18): the CUDA paths, in one run of at most 8 minutes on a lent GPU.

Each check runs in its own process, in this order, while the time budget lasts:

1. ``tests``: ``pytest tests -k cuda``: packed = flat on CUDA in float32 and under bfloat16
   autocast, sdpa and flex_attention tree masks, and CUDA = CPU (tests/test_learner_cuda.py
   states the tolerances), plus every other test whose name says cuda. The figures each test
   records (``record_property``) come from pytest's JUnit XML: a figure ``x`` with a bound
   ``x_max`` becomes a target.
2. ``train_float32``: ``treegrpo train preset=smollm2`` (the reference settings) for
   ``--train-steps`` steps on CUDA with a tiny random policy (treegrpo.testing.tiny), float32
   weights (the learner autocasts to bfloat16), the embedded engine, a warm start and
   validation: every step logged, its metrics finite, GPU memory used.
3. ``train_scratch``: the same with ``preset=tiny`` and its from-scratch policy
   (``model.path=scratch``, built in process from the synthetic world: nothing to carry).
4. ``train_model_dir`` (only with ``--model-dir``): ``preset=tiny`` on that checkpoint (e.g. a
   cached small model), without a warm start.
5. ``learner_sdpa``: bench/learner.py --device cuda: flat vs packed (dense tree mask) tokens/s
   and peak GPU memory per step, and the peak GPU memory of one update over 16 x 512 tokens.
6. ``learner_flex_attention``: the same throughput with the packed side on flex_attention.
7. ``train_bfloat16``: as 2 with bfloat16 weights.

Result: one JSON (bench/results/gpu_check.json, or ``--out``; bench/common.py's schema, so
bench/run_all.py reports it) with every check's status (passed / failed / error: could not run
/ skipped, with the reason), its figures, the targets read from them, and the torch, CUDA, GPU
and driver versions. It is rewritten after each check, so a run stopped half-way keeps what it
measured. A performance target missed (the packed speedup) is reported, not a failed check.
Exit status: 0 when every selected check passed, 1 when one failed, could not run, or was not
started for lack of time, 2 for bad arguments. Without CUDA it says so, runs nothing, writes
nothing and exits 0.

Before a device is lent (here): ``python bench/gpu_check.py --prepare`` downloads the wheels
the device image lacks into .whl/ and prints the device command and what it must carry
(docs/benchmarks.md, "GPU checks").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))  # this tree's treegrpo first, as in the subprocesses

from common import RESULTS, stop_process_group, target, write_results  # noqa: E402

TITLE = "GPU checks: CUDA tests, learner throughput and memory, treegrpo train on CUDA"
ISSUE = 18
DEFAULT_OUT = RESULTS / "gpu_check.json"
DEFAULT_BUDGET_S = 400.0
MIN_CHECK_S = 30.0  # a check is not started with less time than this left
CHECKS = (
    "tests",
    "train_float32",
    "train_scratch",
    "train_model_dir",
    "learner_sdpa",
    "learner_flex_attention",
    "train_bfloat16",
)
CAP_S = {  # the most one check may take, within what is left of the budget
    "tests": 240.0,
    "train_float32": 150.0,
    "train_scratch": 150.0,
    "train_model_dir": 150.0,
    "learner_sdpa": 150.0,
    "learner_flex_attention": 180.0,
    "train_bfloat16": 150.0,
}
# Python packages each check imports beyond the standard library and numpy.
NEEDS = {
    "tests": ("torch", "transformers", "pytest", "hypothesis", "pyarrow", "polars", "bm25s"),
    "train": ("torch", "transformers", "safetensors", "pyarrow", "polars", "bm25s", "yaml"),
    "learner": ("torch", "transformers", "tqdm"),
}
TRAIN_METRICS = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "critic/score/mean")
WORKER_PREFIX = "gpu_check train worker: "

# What travels to the device (docs/benchmarks.md, "GPU checks"). The device image has torch,
# transformers, pyarrow, pytest, hypothesis, scipy, tqdm, pyyaml, aiohttp, safetensors, but no
# Rust toolchain, no network, and neither polars nor bm25s: the extension travels built, the
# two packages as wheels (pinned in constraints.txt; polars' compiled part is the
# polars-runtime-32 distribution of the same version).
EXTENSION = "python/treegrpo/_core.abi3.so"
WHEELS_DIR = ".whl"
WHEEL_PINS = ("polars", "bm25s")
DEVICE_PYTHON = "3.12"  # the device image's python3
CARRY = (EXTENSION, WHEELS_DIR)
CARRY_LIMIT_MB = 64.0  # MiB: the working tree and the carried paths together
DEVICE_TIMEOUT_S = 480
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1; "
    "PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json "
    "--log $OUT/gpu_check.log"
)


# --------------------------------------------------------------------------- arguments


def _key_value(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. tree.m=2)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="checks, in order: " + ", ".join(CHECKS),
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON (default %(default)s)")
    p.add_argument("--log", type=Path, default=None, help="also write every check's output here")
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for all checks; none starts with less than 30 s left (default %(default)g)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=CHECKS, help="leave a check out (repeat)"
    )
    p.add_argument("--train-steps", type=int, default=3, help="treegrpo train steps per run")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a Hugging Face checkpoint directory to train too (train_model_dir)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="a treegrpo train config override for every train run (repeat)",
    )
    p.add_argument("--learner-layers", type=int, default=30, help="bench/learner.py --layers")
    p.add_argument("--learner-prompts", type=int, default=8, help="bench/learner.py --prompts")
    p.add_argument("--learner-repeats", type=int, default=3, help="bench/learner.py --repeats")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="here, before a device is lent: download the wheels to carry, check the "
        "extension, print the device command",
    )
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        p.error(f"--budget-s must be a number of seconds > 0, got {args.budget_s:g}")
    for name in ("train_steps", "learner_layers", "learner_prompts", "learner_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        p.error(
            f"--model-dir {args.model_dir}: no config.json there; give a Hugging Face checkpoint "
            "directory (model.save_pretrained + tokenizer.save_pretrained), or leave it out"
        )
    if args.out.suffix != ".json":
        p.error(f"--out {args.out}: give a path ending in .json")
    return args


# --------------------------------------------------------------------------- results


@dataclass
class Check:
    """One check's outcome. ``status``: passed, failed (it ran and a condition did not hold),
    error (it could not run), skipped (not selected, or not started: ``selected`` tells)."""

    name: str
    status: str
    reason: str | None = None
    selected: bool = True
    seconds: float = 0.0
    command: list[str] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    output_tail: str = ""


def overall(checks: list[Check]) -> str:
    """passed: every selected check passed; failed: one failed or could not run; incomplete:
    none failed but one was not started; nothing: no check was selected."""
    selected = [c for c in checks if c.selected]
    if any(c.status in ("failed", "error") for c in selected):
        return "failed"
    if any(c.status != "passed" for c in selected):
        return "incomplete"
    return "passed" if selected else "nothing"


def exit_status(checks: list[Check]) -> int:
    return 0 if overall(checks) in ("passed", "nothing") else 1


def payload(
    checks: list[Check],
    info: dict[str, Any],
    args: argparse.Namespace,
    elapsed: float,
    *,
    pending: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What the JSON holds besides bench/common.py's date, command and machine. ``pending``:
    the checks not reached yet (the file is rewritten after each check)."""
    status = overall(checks)
    if pending:
        status = f"running: {len(checks)} of {len(checks) + len(pending)} checks done"
        why = "not run: the run had not reached it when this file was written"
        checks = checks + [Check(name, "skipped", why) for name in pending]
    return {
        "title": TITLE,
        "issue": ISSUE,
        "status": status,
        "cuda": info,
        "budget_s": args.budget_s,
        "elapsed_s": elapsed,
        "args": {k: str(v) for k, v in vars(args).items() if k != "train_worker"},
        "checks": [asdict(c) for c in checks],
        "targets": [t for c in checks for t in c.targets],
    }


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    rc: int | None  # None when it was stopped at its time limit
    output: str
    seconds: float
    timed_out: bool


def run_process(
    cmd: list[str],
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    log: TextIO | None = None,
    echo: bool = True,
) -> Proc:
    """Run ``cmd`` in the repository root in its own process group, its output (stdout and
    stderr) echoed as it comes, kept, and written to ``log``; past ``timeout_s`` the group is
    stopped (SIGTERM, then SIGKILL)."""
    start = time.monotonic()
    lines: list[str] = []
    timed_out, rc = False, None
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as proc:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if log is not None:
                    log.write(line)
                    log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process_group(proc, 10.0)
        reader.join(timeout=10)
    return Proc(rc, "".join(lines), time.monotonic() - start, timed_out)


def child_env(work: Path) -> dict[str, str]:
    """This tree's python/ first on the path, unbuffered output, a private treegrpo cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "python"), env.get("PYTHONPATH")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["TREEGRPO_CACHE"] = str(work / "cache")
    return env


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _last_line(text: str) -> str:
    rest = [line for line in text.strip().splitlines() if line.strip()]
    return rest[-1].strip() if rest else "(no output)"


def _ended(proc: Proc, limit: float) -> str | None:
    """Why a process did not end well, or None."""
    if proc.timed_out:
        return f"timed out after {limit:.0f} s (stopped)"
    if proc.rc != 0:
        return f"exit status {proc.rc}: {_last_line(proc.output)}"
    return None


# --------------------------------------------------------------------------- 1. tests


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Each test case of pytest's JUnit XML (junit_family=xunit1): id, outcome, seconds, the
    failure/skip message, and the properties it recorded (numbers where they parse)."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = node.get("message") or (node.text or "").strip()[:500]
                break
        properties: dict[str, Any] = {}
        for prop in case.iter("property"):
            value = prop.get("value", "")
            try:
                properties[prop.get("name", "")] = float(value)
            except ValueError:
                properties[prop.get("name", "")] = value
        where = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        cases.append(
            {
                "test": f"{where}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message,
                "properties": properties,
            }
        )
    return cases


def _unit(figure: str) -> str:
    return "nats" if figure.endswith("log_prob_abs") else "rel"


def figure_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A target per recorded figure ``x`` that has a bound ``x_max``."""
    out = []
    for case in cases:
        props = case["properties"]
        for name, value in props.items():
            bound = props.get(f"{name}_max")
            if name.endswith("_max") or not isinstance(bound, float):
                continue
            measured = value if isinstance(value, float) else None
            out.append(target(f"{case['test']}: {name}", measured, "<=", bound, _unit(name)))
    return out


def tests_check(proc: Proc, junit: Path, cmd: list[str], limit: float) -> Check:
    cases = parse_junit(junit) if junit.is_file() else []
    counts = Counter(c["outcome"] for c in cases)
    bad = counts["failed"] + counts["error"]
    check = Check("tests", "passed", command=cmd, output_tail=tail(proc.output))
    check.figures = {"counts": dict(counts), "tests": cases}
    check.targets = figure_targets(cases)
    if cases:
        check.targets.append(target("CUDA tests failed or in error", bad, "<=", 0, "tests"))
    ended = _ended(proc, limit)
    first_bad = next((c for c in cases if c["outcome"] in ("failed", "error")), None)
    if proc.timed_out:
        check.status, check.reason = "failed", ended
    elif proc.rc == 5 or not cases:
        check.status = "failed"
        check.reason = "no test ran" + (f" ({ended})" if ended else " (none matched -k cuda)")
    elif bad or proc.rc != 0:
        check.status = "failed"
        check.reason = f"{bad} failed or in error" + (
            f"; first: {first_bad['test']}: {first_bad['message']}" if first_bad else f"; {ended}"
        )
    elif counts["passed"] == 0:
        check.status = "failed"
        check.reason = f"all {counts['skipped']} CUDA tests were skipped: " + "; ".join(
            sorted({str(c["message"]) for c in cases})
        )
    else:
        check.reason = f"{counts['passed']} passed, {counts['skipped']} skipped"
    return check


def pytest_command(junit: Path, where: str = "tests") -> list[str]:
    """``pytest <where> -k cuda`` writing JUnit XML (junit_family=xunit1: the family that
    keeps record_property's figures)."""
    cmd = [sys.executable, "-m", "pytest", where, *"-k cuda -q -p no:cacheprovider".split()]
    return [*cmd, "-o", "junit_family=xunit1", f"--junitxml={junit}"]


def run_tests(left: float, work: Path, log: TextIO | None) -> Check:
    junit = work / "junit.xml"
    cmd = pytest_command(junit)
    limit = min(CAP_S["tests"], left)
    return tests_check(run_process(cmd, limit, env=child_env(work), log=log), junit, cmd, limit)


# --------------------------------------------------------------------------- learner


def learner_check(
    name: str, proc: Proc, result: dict[str, Any] | None, cmd: list[str], limit: float
) -> Check:
    check = Check(name, "passed", command=cmd, output_tail=tail(proc.output))
    ended = _ended(proc, limit)
    if ended or result is None:
        check.status, check.reason = "failed", ended or "bench/learner.py wrote no result"
        return check
    keep = (
        "attn trajectories total_tokens unique_tokens sharing_ratio padded_tokens wall_s "
        "all_wall_s tokens_per_s speedup target_speedup max_peak_gpu_memory_gb pg_loss"
    ).split()
    rows = result.get("throughput", [])
    check.figures["throughput"] = {r["mode"]: {k: r.get(k) for k in keep} for r in rows}
    memory = result.get("memory", [])
    check.figures["memory"] = [
        {k: r.get(k) for k in ("case", "layers", "padded_tokens", "step_s", "peak_gpu_memory_gb")}
        | ({"error": r["error"]} if "error" in r else {})
        for r in memory
    ]
    check.targets = list(result.get("targets", []))
    problems = [
        f"{r['mode']}: pg_loss {r.get('pg_loss')}" for r in rows if not _is_finite(r.get("pg_loss"))
    ]
    problems += [f"memory, {r['case']}: {r['error']}" for r in memory if "error" in r]
    if not rows:
        problems.append("no throughput rows")
    if problems:
        check.status, check.reason = "failed", "; ".join(problems)
    else:
        packed = next((r for r in rows if r["mode"] == "packed"), None)
        if packed is not None:
            met = "met" if packed["pass"] else "missed (reported, not a failure)"
            check.reason = (
                f"packed {packed['speedup']:.2f}x flat; target {packed['target_speedup']:.2f}x "
                f"{met}"
            )
    return check


def run_learner(attn: str, left: float, work: Path, log: TextIO | None, args: Any) -> Check:
    name = f"learner_{attn}"
    out = work / f"{name}.json"
    cmd = [sys.executable, "bench/learner.py", "--device", "cuda", "--packed-attn", attn]
    cmd += ["--layers", str(args.learner_layers), "--prompts", str(args.learner_prompts)]
    cmd += ["--repeats", str(args.learner_repeats), "--skip-logprob", "--out", str(out)]
    if attn == "sdpa":  # the memory of one update (flat, packed: default config) once
        cmd += ["--memory-layers", str(args.learner_layers), "--memory-cases", "0,1"]
    else:
        cmd += ["--skip-memory"]
    limit = min(CAP_S[name], left)
    proc = run_process(cmd, limit, env=child_env(work), log=log)
    result = json.loads(out.read_text()) if out.is_file() else None
    return learner_check(name, proc, result, cmd, limit)


# --------------------------------------------------------------------------- treegrpo train


def train_overrides(
    run_dir: Path, steps: int, dtype: str, *, preset: str, warm_start: bool, extra: list[str]
) -> list[str]:
    """`treegrpo train` overrides of a short CUDA run on a small world (model.path is the
    worker's); ``extra`` last, so it wins."""
    base = {
        "preset": preset,
        "model.device": "cuda",
        "model.dtype": dtype,
        "model.sft_steps": "2" if warm_start else "0",
        "model.sft_batch_size": "2",
        "data.synth_docs": "80",
        "data.synth_train": "16",
        "data.synth_test": "8",
        "data.train_batch_size": "2",
        "data.val_size": "2",
        "tree.max_action_tokens": "16",
        "env.max_obs_tokens": "48",
        "engine.kv_budget_tokens": "8192",
        "trainer.total_steps": str(steps),
        "trainer.run_dir": str(run_dir),
        "trainer.logger": "[jsonl]",
    }
    return [f"{k}={v}" for k, v in base.items()] + list(extra)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is left out)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def train_check(
    name: str,
    proc: Proc,
    worker: dict[str, Any] | None,
    records: list[dict[str, Any]],
    steps: int,
    cmd: list[str],
    limit: float,
) -> Check:
    check = Check(name, "passed", command=cmd, output_tail=tail(proc.output))
    train = [r for r in records if "actor/pg_loss" in r]
    shown = (*TRAIN_METRICS, "actor/skipped_updates", "timing_s/step", "timing_s/gen")
    check.figures = {
        "steps": [{"step": r.get("step"), **{k: r.get(k) for k in shown}} for r in train],
        "validation": [
            {k: v for k, v in r.items() if k == "step" or k.startswith("val-core/")}
            for r in records
            if any(k.startswith("val-core/") for k in r)
        ],
        "peak_gpu_memory_gb": (worker or {}).get("peak_gpu_memory_gb"),
    }
    logged = [r.get("step") for r in train]
    peak = check.figures["peak_gpu_memory_gb"]
    on_gpu = isinstance(peak, (int, float)) and peak > 0
    what = f"treegrpo train steps logged on CUDA ({name})"
    check.targets = [target(what, len(logged) if on_gpu else None, ">=", steps, "steps")]
    problems = []
    ended = _ended(proc, limit)
    if ended:
        problems.append(ended)
    elif worker is None:
        problems.append("the worker reported nothing")
    elif worker.get("rc") != 0:
        problems.append(f"treegrpo train exit status {worker.get('rc')}")
    if logged != list(range(1, steps + 1)):
        problems.append(f"steps logged {logged}, expected 1..{steps}")
    for r in train:
        bad = [k for k in TRAIN_METRICS if not _is_finite(r.get(k))]
        if bad:
            problems.append(f"step {r.get('step')}: {', '.join(bad)} missing or not finite")
    if worker is not None and not on_gpu:
        problems.append("no GPU memory was allocated: the run did not use CUDA")
    if problems:
        check.status, check.reason = "failed", "; ".join(problems)
    else:
        per_step = [r["timing_s/step"] for r in train if _is_finite(r.get("timing_s/step"))]
        check.reason = f"{len(logged)} steps" + (
            f", median {sorted(per_step)[len(per_step) // 2]:.1f} s a step" if per_step else ""
        )
    return check


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_train(
    name: str,
    dtype: str,
    left: float,
    work: Path,
    log: TextIO | None,
    args: Any,
    *,
    model: str = "tiny",
) -> Check:
    """``model``: "tiny" (treegrpo.testing.tiny, preset smollm2), "scratch" (preset tiny's
    from-scratch policy) or a checkpoint directory (preset tiny, no warm start)."""
    run_dir = work / name
    given = model not in ("tiny", "scratch")
    spec = {
        "model": str(Path(model).resolve()) if given else model,
        "tiny_dir": str(work / "tiny-policy"),
        "overrides": train_overrides(
            run_dir,
            args.train_steps,
            dtype,
            preset="smollm2" if model == "tiny" else "tiny",
            warm_start=not given,
            extra=args.overrides,
        ),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-worker", json.dumps(spec)]
    limit = min(CAP_S[name], left)
    proc = run_process(cmd, limit, env=child_env(work), log=log)
    found = [x for x in proc.output.splitlines() if x.startswith(WORKER_PREFIX)]
    worker = json.loads(found[-1][len(WORKER_PREFIX) :]) if found else None
    records = read_metrics(run_dir / "metrics.jsonl")
    return train_check(name, proc, worker, records, args.train_steps, cmd, limit)


def train_worker(spec: dict[str, Any]) -> int:
    """In this process: `treegrpo train` (the command's own entry point) on the given
    checkpoint, the from-scratch policy or a freshly saved tiny random one, then one line with
    its exit status and the peak GPU memory."""
    import torch

    model_dir = spec["model"]
    if model_dir == "tiny":
        model_dir = spec["tiny_dir"]
        if not Path(model_dir, "config.json").is_file():
            from treegrpo.testing.tiny import tiny_policy

            model, tokenizer = tiny_policy(seed=0)
            model.save_pretrained(model_dir, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
            del model
    from treegrpo.cli import main as treegrpo_main

    argv = ["train", "--no-progress", f"model.path={model_dir}", *spec["overrides"]]
    print("treegrpo " + shlex.join(argv), flush=True)
    try:
        rc = treegrpo_main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        traceback.print_exc()
        rc = 1
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(WORKER_PREFIX + json.dumps({"rc": rc, "peak_gpu_memory_gb": peak}), flush=True)
    return 0


# --------------------------------------------------------------------------- the run


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA can run here, and if not, why."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, (
            f"torch.cuda.is_available() is False; torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}"
        )
    return True, torch.cuda.get_device_name(0)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_info() -> dict[str, Any]:
    """torch, CUDA, cuDNN, GPU and driver, and the versions of what the checks run on."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        driver: str | None = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        driver = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "driver": driver,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "versions": {
            name: _dist_version(name)
            for name in ("transformers", "triton", "pytest", "polars", "pyarrow", "bm25s")
        },
    }


def missing(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def extension_problem() -> str | None:
    try:
        import treegrpo
    except ImportError as exc:
        return (
            f"treegrpo does not import ({exc}): build the extension here (make develop) and "
            f"carry {EXTENSION}"
        )
    if treegrpo._core.BUILD_PROFILE != "release":
        profile = treegrpo._core.BUILD_PROFILE
        return f"treegrpo's extension is a {profile} build: build and carry a release one"
    return None


def plan(
    args: argparse.Namespace, work: Path, log: TextIO | None
) -> list[tuple[str, Callable[[float], Check] | Check]]:
    """Each check in order: the function that runs it (given the seconds left), or its
    outcome already when it is not selected or cannot run here."""
    runs: dict[str, tuple[str, Callable[[float], Check]]] = {
        "tests": ("tests", lambda left: run_tests(left, work, log)),
        "train_float32": (
            "train",
            lambda left: run_train("train_float32", "float32", left, work, log, args),
        ),
        "train_scratch": (
            "train",
            lambda left: run_train(
                "train_scratch", "float32", left, work, log, args, model="scratch"
            ),
        ),
        "train_model_dir": (
            "train",
            lambda left: run_train(
                "train_model_dir", "float32", left, work, log, args, model=str(args.model_dir)
            ),
        ),
        "learner_sdpa": ("learner", lambda left: run_learner("sdpa", left, work, log, args)),
        "learner_flex_attention": (
            "learner",
            lambda left: run_learner("flex_attention", left, work, log, args),
        ),
        "train_bfloat16": (
            "train",
            lambda left: run_train("train_bfloat16", "bfloat16", left, work, log, args),
        ),
    }
    broken = extension_problem()
    out: list[tuple[str, Callable[[float], Check] | Check]] = []
    for name in CHECKS:
        kind, fn = runs[name]
        if name in args.skip:
            out.append((name, Check(name, "skipped", "--skip", selected=False)))
        elif name == "train_model_dir" and args.model_dir is None:
            out.append((name, Check(name, "skipped", "no --model-dir", selected=False)))
        elif broken:
            out.append((name, Check(name, "error", broken)))
        elif lacking := missing(NEEDS[kind]):
            why = f"missing Python packages: {', '.join(lacking)} (carry them as wheels: "
            out.append((name, Check(name, "error", why + "bench/gpu_check.py --prepare)")))
        else:
            out.append((name, fn))
    return out


def run_checks(
    steps: list[tuple[str, Callable[[float], Check] | Check]],
    budget_s: float,
    *,
    on_done: Callable[[list[Check]], None] = lambda _: None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Check]:
    """Run the checks in order while the budget lasts; a check that raises is an error."""
    start = clock()
    done: list[Check] = []
    for name, step in steps:
        left = budget_s - (clock() - start)
        if isinstance(step, Check):
            check = step
        elif left < MIN_CHECK_S:
            check = Check(
                name,
                "skipped",
                f"not started: {max(left, 0):.0f} s of the {budget_s:g} s budget left",
            )
        else:
            print(f"\n=== {name} ({left:.0f} s of the budget left)", flush=True)
            began = clock()
            try:
                check = step(left)
            except Exception as exc:
                traceback.print_exc()
                check = Check(name, "error", f"{type(exc).__name__}: {exc}")
            check.seconds = clock() - began
            print(f"=== {name}: {check.status}: {check.reason or ''}", flush=True)
        done.append(check)
        on_done(done)
    return done


def summary(checks: list[Check]) -> str:
    lines = [f"{'check':<24} {'status':<8} {'seconds':>7}  reason"]
    for c in checks:
        lines.append(f"{c.name:<24} {c.status:<8} {c.seconds:>7.0f}  {c.reason or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.train_worker:
        return train_worker(json.loads(args.train_worker))
    if args.prepare:
        return prepare()
    ok, why = cuda_status()
    if not ok:
        print(f"gpu_check: no CUDA device here ({why}): nothing run, nothing written")
        return 0
    started = time.monotonic()
    try:
        info = cuda_info()
    except Exception as exc:  # the checks still run; the JSON says what could not be read
        info = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"gpu_check: {why}; {json.dumps(info)}", flush=True)
    log = args.log.open("w") if args.log else None
    try:
        with tempfile.TemporaryDirectory(prefix="treegrpo-gpu-check-") as tmp:

            def write(done: list[Check]) -> None:
                elapsed = time.monotonic() - started
                body = payload(done, info, args, elapsed, pending=CHECKS[len(done) :])
                write_results("gpu_check", body, args.out)

            write([])  # the versions, even if the first check never ends
            checks = run_checks(plan(args, Path(tmp), log), args.budget_s, on_done=write)
    finally:
        if log is not None:
            log.close()
    print("\n" + summary(checks))
    status = overall(checks)
    print(f"\ngpu_check: {status}; wrote {args.out}")
    return exit_status(checks)


# --------------------------------------------------------------------------- --prepare


def pinned_versions(constraints: Path, names: tuple[str, ...]) -> dict[str, str]:
    """``name==version`` pins of constraints.txt, for ``names``."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() in names:
            pins[name.strip().lower()] = version.strip()
    absent = [n for n in names if n not in pins]
    if absent:
        raise SystemExit(f"{constraints} pins no version of {', '.join(absent)}")
    return pins


def wheels_to_carry(pins: dict[str, str]) -> list[str]:
    reqs = [f"{name}=={version}" for name, version in pins.items()]
    if "polars" in pins:  # its compiled part, a distribution of its own
        reqs.append(f"polars-runtime-32=={pins['polars']}")
    return reqs


def wheel_download_command(reqs: list[str], dest: Path) -> list[str]:
    """pip download of binary wheels for the device's CPython and x86-64 Linux."""
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", DEVICE_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in platforms:
        cmd += ["--platform", platform]
    return cmd + reqs


def travelling_mb() -> float:
    """MiB of what a device call sends: tracked and untracked-not-ignored files, and CARRY."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [ROOT / os.fsdecode(f) for f in listed if f]
    for carried in CARRY:
        path = ROOT / carried
        files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files if p.is_file()) / 2**20


def prepare() -> int:
    problem = extension_problem()
    if problem or not (ROOT / EXTENSION).is_file():
        print(f"gpu_check --prepare: {problem or f'{EXTENSION} is missing'}", file=sys.stderr)
        return 1
    dest = ROOT / WHEELS_DIR
    dest.mkdir(exist_ok=True)
    reqs = wheels_to_carry(pinned_versions(ROOT / "constraints.txt", WHEEL_PINS))
    stale = [p for p in dest.glob("*.whl") if not any(_wheel_is(p, r) for r in reqs)]
    for path in stale:  # one version of each, or the install on the device stops
        path.unlink()
    subprocess.run(wheel_download_command(reqs, dest), check=True)
    size = travelling_mb()
    print(f"\nready: {EXTENSION} (release build) and {', '.join(reqs)} in {WHEELS_DIR}/")
    print(f"a device call sends {size:.1f} MiB of the {CARRY_LIMIT_MB:g} MiB allowed")
    print(f"run (from the repository root, timeout_s={DEVICE_TIMEOUT_S}):")
    print(f"  carry: {json.dumps(list(CARRY))}")
    print(f"  command: {DEVICE_COMMAND}")
    return 0 if size < CARRY_LIMIT_MB else 1


def _wheel_is(path: Path, req: str) -> bool:
    name, _, version = req.partition("==")
    return path.name.lower().startswith(f"{name.replace('-', '_')}-{version}-".lower())


if __name__ == "__main__":
    sys.exit(main())
