"""Run the benchmarks in bench/, then regenerate docs/benchmarks.md from their result files.

    .venv/bin/python bench/run_all.py                 # every benchmark (tens of minutes)
    .venv/bin/python bench/run_all.py core env        # a subset (also written core,env)
    .venv/bin/python bench/run_all.py --quick core    # smoke runs: each one's --quick, no JSON
    .venv/bin/python bench/run_all.py --report-only   # only the report, from bench/results/
    .venv/bin/python bench/run_all.py --list          # the benchmarks it finds
    make bench [BENCH=core,env]                       # the same, after `make develop`

A benchmark is any bench/*.py except the helpers (common.py, pure_python_*.py, run_all.py).
Each runs in a subprocess of this Python, one at a time (they time things), with single-threaded
OpenBLAS as bench/common.py sets it. A failure or a time-out is reported and the next benchmark
still runs; the exit status is 1 if any failed. A benchmark without a --quick option is skipped
by --quick.

The report is rebuilt from bench/results/*.json alone (the schema is at the top of
bench/common.py), so --report-only gives the same text as the run that wrote the files. It
replaces the part of docs/benchmarks.md between the generated:begin and generated:end markers
and leaves the hand-written rest alone: a summary of every target, then one table per area
(benchmark) with the measured values, the ratio to the target, the machine, the load, the
versions and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS, check_targets, markdown_table, stop_process_group

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
HELPERS = ("common.py", "run_all.py")
HELPER_PREFIXES = ("pure_python_", "_")
BEGIN = (
    "<!-- generated:begin (bench/run_all.py writes this part from bench/results/*.json; "
    "edit the text outside it) -->"
)
END = "<!-- generated:end -->"
# Why a benchmark may have no result file, where the generic "run it" would mislead.
NO_RESULTS = {
    "gpu_check": 'not run yet: it needs a CUDA device (see "GPU checks" below for the command)',
}
GENERATED = re.compile(r"^<!-- generated:begin.*?^<!-- generated:end -->\n?", re.S | re.M)


# --------------------------------------------------------------------------- running


def benchmarks() -> list[str]:
    """The benchmark names: bench/*.py without the helpers."""
    return sorted(
        p.stem
        for p in HERE.glob("*.py")
        if p.name not in HELPERS and not p.name.startswith(HELPER_PREFIXES)
    )


def chosen(names: list[str]) -> list[str]:
    """``names`` (each may be comma-separated) checked against the benchmarks; all if none."""
    found = benchmarks()
    wanted = [n.removesuffix(".py") for arg in names for n in arg.split(",") if n]
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(found)}")
    return list(dict.fromkeys(wanted)) or found


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit 1)", "timed out after ...", "skipped: ..."
    seconds: float = 0.0
    wrote: bool = False

    @property
    def failed(self) -> bool:
        return not (self.status == "ok" or self.status.startswith("skipped"))


def relative(path: Path) -> Path:
    """``path`` relative to the repository root where it lies inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def run_one(name: str, *, quick: bool, timeout: float | None) -> Outcome:
    script = HERE / f"{name}.py"
    cmd = [sys.executable, str(relative(script))]
    if quick:
        if "--quick" not in script.read_text(encoding="utf-8"):
            return Outcome(name, "skipped: no --quick option")
        cmd.append("--quick")
    result = RESULTS / f"{name}.json"
    before = result.stat().st_mtime if result.exists() else None
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    # Its own process group, so a time-out or Ctrl-C also ends the workers it starts.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        stop_process_group(proc, 30)
        status = f"timed out after {timeout:g} s"
    except KeyboardInterrupt:
        stop_process_group(proc, 30)
        raise
    after = result.stat().st_mtime if result.exists() else None
    return Outcome(name, status, time.perf_counter() - start, after is not None and after != before)


# --------------------------------------------------------------------------- the report


def load_results() -> dict[str, dict[str, Any] | str]:
    """Every result file by benchmark name: its content, or why it could not be read."""
    out: dict[str, dict[str, Any] | str] = {}
    for path in sorted(RESULTS.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            out[path.stem] = doc if isinstance(doc, dict) else "not a JSON object"
        except (OSError, ValueError) as exc:
            out[path.stem] = f"unreadable: {exc}"
    return out


def fmt_number(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 999.5:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def fmt_value(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return fmt_number(x) + (unit if unit in ("x", "%") else f" {unit}")


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def ratio(entry: dict[str, Any]) -> str:
    measured, goal = entry["measured"], entry["target"]
    return "-" if measured is None or not goal else f"{measured / goal:.2f}"


def verdict(entry: dict[str, Any]) -> str:
    if entry["measured"] is None:
        return "not measured"
    return "yes" if entry["pass"] else "**no**"


def date_of(doc: dict[str, Any], *, time_too: bool = True) -> str:
    try:
        when = dt.datetime.fromisoformat(doc["date"]).astimezone(dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return "date not recorded"
    return when.strftime("%Y-%m-%d %H:%M UTC" if time_too else "%Y-%m-%d")


def version(doc: dict[str, Any], name: str) -> str:
    """A package version wherever a result file recorded it (the older files differ)."""
    machine = doc.get("machine", {})
    for source in (machine.get("versions", {}), machine, doc.get("versions", {}), doc):
        if isinstance(source.get(name), str):
            return source[name]
    return "not recorded"


def loads(doc: dict[str, Any]) -> str:
    machine = doc.get("machine", {})
    start = machine.get("loadavg_at_start", doc.get("loadavg_at_start"))
    end = machine.get("loadavg", machine.get("loadavg_at_end"))
    parts = [
        f"{' / '.join(f'{x:.2f}' for x in load)} at the {when}"
        for load, when in ((start, "start"), (end, "end"))
        if load
    ]
    return "load average (1 / 5 / 15 min) " + ", ".join(parts) if parts else "load not recorded"


def run_lines(name: str, doc: dict[str, Any]) -> list[str]:
    """Where, when and with what a result was measured."""
    machine = doc.get("machine", {})
    cores = machine.get("cpu_count")
    usable = machine.get("cpus_usable")
    if usable and usable != cores:
        cores = f"{cores} ({usable} usable)"
    memory = machine.get("memory_gb")
    git = machine.get("git", {})
    commit = (git.get("commit") or "not recorded")[:7]
    if git.get("dirty"):
        commit += " with uncommitted changes"
    build = machine.get("build_profile")
    elapsed = doc.get("elapsed_s")
    command = doc.get("command", f"bench/{name}.py")
    took = f", {elapsed:.0f} s" if isinstance(elapsed, (int, float)) else ""
    return [
        f"- Run: {date_of(doc)}, `{command}`{took}.",
        f"- Machine: {machine.get('cpu', 'CPU not recorded')}, {cores or '?'} cores, "
        f"{memory if memory is not None else '?'} GB RAM; {loads(doc)}.",
        f"- Versions: {machine.get('python', 'Python not recorded')}, "
        + ", ".join(f"{pkg} {version(doc, pkg)}" for pkg in ("numpy", "torch", "polars"))
        + f", treegrpo {machine.get('treegrpo', '?')}"
        + (f" ({build} build)" if build else "")
        + f", commit {commit}.",
    ]


def sort_key(name: str, results: dict[str, dict[str, Any] | str]) -> tuple[int, str]:
    doc = results.get(name)
    issue = doc.get("issue") if isinstance(doc, dict) else None
    return (issue if isinstance(issue, int) else 10**6, name)


def report(results: dict[str, dict[str, Any] | str], benches: list[str]) -> str:
    """The generated part of docs/benchmarks.md (between the markers, markers excluded)."""
    names = sorted(set(results) | set(benches), key=lambda n: sort_key(n, results))
    summary: list[list[str]] = []
    sections: list[str] = []
    met = total = 0
    missing = []
    for name in names:
        doc = results.get(name)
        if not isinstance(doc, dict):
            missing.append(name)
            why = doc or NO_RESULTS.get(name, f"no results yet: run `bench/run_all.py {name}`")
            sections.append(f"### `{name}`\n\n`bench/{name}.py`: {why}.\n")
            continue
        title = doc.get("title") or name
        issue = doc.get("issue")
        head = [f"`bench/{name}.py`" if name in benches else f"`bench/{name}.py` (removed)"]
        if isinstance(issue, int):
            head.append(f"targets from issue {issue}")
        section = [f"### {title} (`{name}`)", "", ", ".join(head) + ".", ""]
        targets = doc.get("targets")
        problems = check_targets(targets) if targets is not None else ["no targets"]
        if problems:
            section += [
                f"No targets in the schema of bench/common.py ({'; '.join(problems)}).",
                "",
            ]
            summary.append([f"`{name}`", "(no targets recorded)", "", "", "", "", ""])
        elif not targets:
            section += ["This benchmark has no target.", ""]
        else:
            rows = []
            day = date_of(doc, time_too=False)
            for t in targets:
                what, goal = cell(t["name"]), f"{t['op']} {fmt_value(t['target'], t['unit'])}"
                measured, r, ok = fmt_value(t["measured"], t["unit"]), ratio(t), verdict(t)
                rows.append([what, goal, measured, r, ok, cell(t.get("note", ""))])
                summary.append([f"`{name}`", what, goal, measured, r, ok, day])
                total += 1
                met += bool(t["pass"])
            section += [
                markdown_table(
                    ["measurement", "target", "measured", "ratio", "pass", "note"], rows
                ),
                "",
            ]
        sections.append("\n".join([*section, *run_lines(name, doc), ""]))

    lines = [
        "## Summary",
        "",
        f"{met} of {total} targets met."
        + (f" No readable results yet: {', '.join(missing)}." if missing else ""),
        "Ratio = measured / target: a `>=` target passes at 1 or more, a `<` or `<=` target "
        "below 1. Each area below gives its run's machine, load, versions and date.",
        "",
        markdown_table(
            ["area", "measurement", "target", "measured", "ratio", "pass", "date"], summary
        ),
        "",
        "## Results by area",
        "",
        *sections,
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(block: str, path: Path = DOC) -> bool:
    """Put ``block`` between the markers of ``path`` (appended if it has none); True if the
    file changed."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    generated = f"{BEGIN}\n\n{block}\n{END}\n"
    if GENERATED.search(text):
        new = GENERATED.sub(lambda _: generated, text, count=1)
    else:
        new = text.rstrip("\n") + "\n\n" + generated
    if new == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
    return True


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. core env")
    ap.add_argument("--quick", action="store_true", help="each benchmark's --quick (no JSON)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; only the report")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and exit")
    ap.add_argument("--doc", type=Path, default=DOC, help="the report (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(benchmarks()))
        return 0
    names = chosen(args.names)
    # Stopped by SIGTERM (a `timeout`, a CI job) as by Ctrl-C: end the running benchmark too.
    signal.signal(signal.SIGTERM, _interrupt)

    outcomes: list[Outcome] = []
    if not args.report_only:
        for name in names:
            try:
                outcomes.append(run_one(name, quick=args.quick, timeout=args.timeout))
            except KeyboardInterrupt:
                print(f"\n=== {name}: interrupted; stopped it and the rest", file=sys.stderr)
                return 130
            o = outcomes[-1]
            print(f"=== {name}: {o.status} ({o.seconds:.0f} s)", flush=True)

    block = report(load_results(), benchmarks())
    changed = write_doc(block, args.doc)
    if outcomes:
        print()
        print(
            markdown_table(
                ["benchmark", "status", "seconds", "result file"],
                [
                    [o.name, o.status, f"{o.seconds:.0f}", "written" if o.wrote else "unchanged"]
                    for o in outcomes
                ],
            )
        )
    print()
    print(block.split("## Results by area")[0].rstrip())
    print(f"\n{relative(args.doc)}: {'updated' if changed else 'unchanged'}")
    failed = [o.name for o in outcomes if o.failed]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
