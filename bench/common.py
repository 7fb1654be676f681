"""Helpers every benchmark shares: machine description, medians of repeated timings, a
markdown table, and the JSON result file."""

from __future__ import annotations

import os

# NumPy's OpenBLAS threads spin after numeric work and steal one of this machine's two cores
# from whatever is timed next: benchmarks run single-threaded BLAS. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import datetime as dt
import importlib
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _first_line(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine(modules: Sequence[str] = ("numpy",)) -> dict[str, Any]:
    """Where and with what a benchmark ran: platform, CPU, memory, versions, git state."""
    import treegrpo

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
    versions = {}
    for name in modules:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = None
    return {
        "platform": platform.platform(),
        "cpu": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "treegrpo": treegrpo.__version__,
        "build_profile": treegrpo._core.BUILD_PROFILE,
        "versions": versions,
        "git": git,
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


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write bench/results/<name>.json with the machine and date added."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path
