"""Helpers every benchmark shares: machine description, medians of repeated timings, a
markdown table, target entries, and the JSON result file.

The result file
---------------
Every benchmark writes bench/results/<name>.json with ``write_results(name, payload)``, which
adds "benchmark", "date" (UTC, ISO 8601), "command" and "machine" (``machine()``: CPU, cores,
memory, load average at start and end, Python and package versions, git commit).
bench/run_all.py regenerates docs/benchmarks.md from these files alone. Besides the fields
above it reads three keys of the payload; everything else in the file is the benchmark's own:

    "title":   "Radix index and tree packing",   # the area's heading in the report
    "issue":   3,                                 # the issue that set the targets, or None
    "targets": [                                  # one entry per target; [] if none
        {
            "name": "match_prefix + insert, 10,000 x 2,000 tokens: speedup vs pure Python",
            "measured": 28.75,   # a number; None when this run did not measure it
            "op": ">=",          # how measured must compare with target: >=, >, <= or <
            "target": 30.0,
            "unit": "x",         # printed after the numbers: "x", "%", "s", "ms", "GB", "q/s"
            "pass": False,       # measured <op> target (False when not measured)
            "note": "...",       # optional: one line for the reader of the report
        },
    ],

Build the entries with ``target()``, which computes "pass"; the report adds the ratio
measured / target. A smoke run (``--quick``) must not overwrite the full run's file: write it
only when ``--out`` is given.
"""

from __future__ import annotations

import os

# NumPy's OpenBLAS threads spin after numeric work and steal one of this machine's two cores
# from whatever is timed next: benchmarks run single-threaded BLAS. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import datetime as dt
import importlib.metadata
import json
import math
import operator
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The benchmark imports this module first thing: the load average before it started working.
LOADAVG_AT_START = [round(x, 2) for x in os.getloadavg()]
VERSIONS_OF = ("numpy", "torch", "polars", "pyarrow", "transformers")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


def _first_line(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    """The version of a package: the imported module's if loaded, else the installed one's."""
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(modules: Sequence[str] = ()) -> dict[str, Any]:
    """Where and with what a benchmark ran: platform, CPU, memory, load, versions, git state.

    Versions are recorded for numpy, torch, polars, pyarrow, transformers and ``modules``
    (None when not installed); nothing is imported to find them. treegrpo's version and build
    are None when it does not import (bench/gpu_check.py reports that as an error).
    """
    try:
        import treegrpo

        ours = {"treegrpo": treegrpo.__version__, "build_profile": treegrpo._core.BUILD_PROFILE}
    except ImportError:
        ours = {"treegrpo": None, "build_profile": None}
    mem = _first_line("/proc/meminfo", "MemTotal")
    git: dict[str, Any] = {}
    for key, cmd in (("commit", ["rev-parse", "HEAD"]), ("dirty", ["status", "--porcelain"])):
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=HERE, capture_output=True, text=True, check=True
            )
            git[key] = out.stdout.strip() if key == "commit" else bool(out.stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            git[key] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        **ours,
        "versions": {name: _version(name) for name in dict.fromkeys([*VERSIONS_OF, *modules])},
        "git": git,
        "loadavg_at_start": LOADAVG_AT_START,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median wall time of `repeats` calls (perf_counter), all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def fmt_seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x >= 0.01 else f"{x:.2e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target(
    name: str,
    measured: float | None,
    op: str,
    target: float,
    unit: str,
    *,
    note: str | None = None,
) -> dict[str, Any]:
    """One entry of a result file's "targets" list (schema at the top of this module)."""
    if op not in OPS:
        raise ValueError(f"target op {op!r}: use one of {', '.join(OPS)}")
    if measured is not None:
        measured = None if math.isnan(measured) else float(measured)
    passed = measured is not None and OPS[op](measured, target)
    entry = {"name": name, "measured": measured, "op": op, "target": float(target), "unit": unit}
    entry["pass"] = passed
    if note:
        entry["note"] = note
    return entry


def check_targets(targets: Any) -> list[str]:
    """What is wrong with a "targets" list, as messages (empty: nothing)."""
    if not isinstance(targets, list):
        return [f'"targets" is a {type(targets).__name__}, not a list of target() entries']
    problems = []
    for i, entry in enumerate(targets):
        if not isinstance(entry, dict):
            problems.append(f"targets[{i}] is not an object")
            continue
        missing = {"name", "measured", "op", "target", "unit", "pass"} - entry.keys()
        if missing:
            problems.append(f"targets[{i}] lacks {', '.join(sorted(missing))}")
        elif entry["op"] not in OPS:
            problems.append(f"targets[{i}]: op {entry['op']!r} is not one of {', '.join(OPS)}")
        elif not isinstance(entry["target"], (int, float)) or not math.isfinite(entry["target"]):
            problems.append(f"targets[{i}]: target {entry['target']!r} is not a number")
    return problems


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write bench/results/<name>.json (or ``out``) with the date, command and machine added.

    A payload without a well-formed "targets" list is still written, with a warning: the
    report then shows the benchmark without targets.
    """
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        **payload,
    }
    problems = check_targets(payload["targets"]) if "targets" in payload else ["no targets"]
    for problem in problems:
        print(f"warning: {path.name}: {problem} (see bench/common.py)", file=sys.stderr)
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """End a child started with ``start_new_session=True`` and everything it started: SIGTERM
    to its process group, then SIGKILL if it is still there after ``grace_s`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
