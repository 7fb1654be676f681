"""``treegrpo logs``: look at what a run's rollouts did.

treegrpo logs summary RUN [--json]
treegrpo logs plot RUN --out DIR
treegrpo logs tree RUN --step S --group G --out FILE.html
treegrpo logs compare RUN_A RUN_B [--labels A B] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from treegrpo.exceptions import TreeGRPOError

__all__ = ["add_commands", "add_subcommand", "format_summary"]


def add_subcommand(commands: Any) -> argparse.ArgumentParser:
    """Register ``logs`` (with ``summary``, ``plot``, ``tree``, ``compare``) on the main
    parser's subcommands; returns the ``logs`` parser."""
    logs = commands.add_parser(
        "logs",
        help="analyse rollout logs: summary, plots, tree viewer, run comparison",
        description=(
            "Analyse a run directory's rollout logs (nodes/ and trajectories/ Parquet "
            "partitions, metrics.jsonl). docs/analysis.md explains every number."
        ),
    )
    add_commands(logs)
    return logs


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add ``summary``, ``plot``, ``tree`` and ``compare`` to ``parser``."""
    sub = parser.add_subparsers(dest="logs_command", required=True, metavar="COMMAND")

    def run_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", metavar="RUN", type=Path, help="run directory")

    p = sub.add_parser("summary", help="a compact table: rewards, signal by depth, budget")
    run_arg(p)
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead")
    p.set_defaults(run=_summary)

    p = sub.add_parser("plot", help="PNG plots of the curves and distributions")
    run_arg(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.set_defaults(run=_plot)

    p = sub.add_parser("tree", help="one group's forest as a self-contained HTML page")
    run_arg(p)
    p.add_argument("--step", required=True, type=int, help="training step")
    p.add_argument("--group", required=True, type=int, help="group (prompt) id")
    p.add_argument("--out", required=True, type=Path, help="output .html file")
    p.set_defaults(run=_tree)

    p = sub.add_parser("compare", help="several runs' curves on the same axes")
    p.add_argument("run_dirs", metavar="RUN", type=Path, nargs="+", help="two or more runs")
    p.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.set_defaults(run=_compare)


def _guarded(command: str, args: argparse.Namespace, body: Any) -> int:
    # Our errors (a missing run, a malformed file, a step that is not there) are one-line
    # messages and exit code 2, not tracebacks; so are our warnings (a step left out).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            return int(body(args))
        except TreeGRPOError as e:
            print(f"treegrpo logs {command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            for warning in caught:
                print(f"treegrpo logs {command}: warning: {warning.message}", file=sys.stderr)


def _summary(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from treegrpo.logs.analysis import load_run, summary

        run = load_run(args.run_dir)
        tables = summary(run)
        if args.json:
            out: dict[str, Any] = {k: v.to_dicts() for k, v in tables.items()}
            out["incomplete_steps"] = list(run.incomplete_steps)
            print(json.dumps(out, indent=1))
        else:
            print(format_summary(args.run_dir, tables, incomplete=run.incomplete_steps))
        return 0

    return _guarded("summary", args, body)


def _plot(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from treegrpo.logs.analysis import load_run
        from treegrpo.logs.plots import plot_run

        for path in plot_run(load_run(args.run_dir), args.out):
            print(path)
        return 0

    return _guarded("plot", args, body)


def _tree(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from treegrpo.logs.analysis import load_run
        from treegrpo.logs.viewer import write_tree_html

        print(write_tree_html(load_run(args.run_dir), args.step, args.group, args.out))
        return 0

    return _guarded("tree", args, body)


def _compare(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from treegrpo.exceptions import InvalidArgumentError
        from treegrpo.logs.analysis import load_run
        from treegrpo.logs.plots import plot_compare

        dirs: list[Path] = args.run_dirs
        if len(dirs) < 2:
            raise InvalidArgumentError("compare needs two or more runs")
        labels = args.labels or [d.resolve().name for d in dirs]
        if len(labels) != len(dirs):
            raise InvalidArgumentError(f"{len(labels)} labels for {len(dirs)} runs")
        if len(set(labels)) != len(labels):
            if args.labels:
                raise InvalidArgumentError(f"labels must differ, got {labels}")
            labels = [str(d) for d in dirs]  # same directory names: label by the paths
        runs = {label: load_run(d) for label, d in zip(labels, dirs, strict=True)}
        for path in plot_compare(runs, args.out):
            print(path)
        return 0

    return _guarded("compare", args, body)


def format_summary(
    path: str | Path, tables: dict[str, Any], *, incomplete: tuple[int, ...] = ()
) -> str:
    """The terminal form of :func:`treegrpo.logs.analysis.summary`'s tables; ``incomplete``:
    the steps left out (:attr:`treegrpo.logs.analysis.Run.incomplete_steps`)."""
    import polars as pl

    run = tables["run"].row(0, named=True)
    bud = tables["budget"].row(0, named=True)
    fail = tables["failures"].row(0, named=True)
    br = tables["branching_all"].row(0, named=True)

    def f(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    left_out = (
        f" (left out, a table missing: step {', '.join(map(str, incomplete))})"
        if incomplete
        else ""
    )
    lines = [
        f"run {path}: {run['steps']} steps, {run['trees']} trees, {run['nodes']} nodes, "
        f"{run['leaves']} leaves ({run['kept_leaves']} kept){left_out}",
        f"budget per leaf: {f(bud['generated_tokens_per_leaf'], 1)} generated tokens, "
        f"{f(bud['tool_calls_per_leaf'], 2)} tool calls spent; on a kept leaf's path "
        f"{f(bud['path_tokens_mean'], 1)} tokens, {f(bud['path_tool_calls_mean'], 2)} tool calls; "
        f"token reuse {f(bud['token_reuse'], 2)}x (trained / generated)",
        f"branch points: {br['branch_points']}, with a preference signal {br['with_signal']} "
        f"({f(br['signal_share'])}), mean sibling reward gap {f(br['gap_mean'])}",
        f"failures: invalid actions {fail['invalid_actions']} of {fail['steps']} steps "
        f"({f(fail['invalid_share'])}); of {fail['leaves']} leaves: truncated "
        f"{fail['truncated']} ({f(fail['truncated_share'])}), forced final "
        f"{fail['forced_final']} ({f(fail['forced_final_share'])}), out of context "
        f"{fail['context_limit']} ({f(fail['context_limit_share'])})",
    ]
    sections = [
        ("reward of kept leaves per data source, validation EM", tables["rewards"]),
        ("V and advantage by depth (nodes with a kept leaf below)", tables["depth"]),
        ("branching by depth", tables["branching"]),
    ]
    with pl.Config(
        tbl_formatting="ASCII_MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=200,
        float_precision=3,
    ):
        for title, frame in sections:
            lines += ["", f"{title}:", str(frame) if frame.height else "(none)"]
    return "\n".join(lines)
