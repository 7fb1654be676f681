"""The ``treegrpo`` command line.

A user error (bad input, a missing file, a server that does not answer: any
:class:`~treegrpo.exceptions.TreeGRPOError`) prints one line, ``treegrpo COMMAND: error: ...``,
and exits with code 2; anything else is a bug and keeps its traceback. ``--debug`` (anywhere on
the line) shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from treegrpo import __version__
from treegrpo.exceptions import MissingDependencyError, TreeGRPOError

__all__ = ["USER_ERROR", "main", "run_guarded", "split_debug"]

USER_ERROR = 2
"""The exit code of a user error (argparse's own for a bad command line)."""


def _demo(args: argparse.Namespace) -> int:
    """Build the algorithm doc's worked example as a forest and print what Tree-GRPO computes."""
    import random

    from treegrpo import Forest

    rng = random.Random(args.seed)
    forest = Forest()
    prompt = [rng.randrange(1000) for _ in range(12)]
    # Init: M=2 trees for one prompt, each rolled out as one chain (root -> step -> leaf).
    leaves: list[list[int]] = []
    for _ in range(2):
        root = forest.add_root(group=0, prompt=prompt)
        step = forest.add_step(root, action=[1, 2, 3], observation=[4, 5])
        leaves.append([forest.add_step(step, action=[6, 7], leaf=True)])
    # Expand, L=1 round: N=2 nodes per tree drawn uniformly with replacement from {root} + open
    # nodes; each draw grows a new branch to a leaf. Every tree ends with 1 + L*N = 3 leaves.
    for node in forest.select(2, seed=args.seed):
        tree = 0 if node < 3 else 1
        leaves[tree].append(forest.add_step(node, action=[8, 9], reason="answer"))
    # The algorithm doc's worked example rewards: tree A = [1, 1, 0.2], tree B = [0.2, 0, 0.2].
    forest.set_rewards(leaves[0] + leaves[1], [1.0, 1.0, 0.2, 0.2, 0.0, 0.2])
    table = forest.advantages("tree")
    print(forest)
    print(f"{'leaf':>5} {'tree':>5} {'reward':>7} {'a_inter':>8} {'a_intra':>8} {'advantage':>10}")
    columns = {name: _column(table, name) for name in table.column_names}
    for i in range(len(table)):
        print(
            f"{columns['leaf'][i]:>5} {columns['tree'][i]:>5} {columns['reward'][i]:>7.3f} "
            f"{columns['a_inter'][i]:>8.3f} {columns['a_intra'][i]:>8.3f} "
            f"{columns['advantage'][i]:>10.3f}"
        )
    print("Train a search agent with `treegrpo train` (no arguments: the embedded quickstart).")
    return 0


def _column(table: object, name: str) -> list[float]:
    import pyarrow as pa

    return pa.table(table).column(name).to_pylist()


# The commands other modules own, in help order: (name, the module whose `add_subcommand`
# registers its parser and its `run`, the extra it needs beyond the core dependencies or "",
# the one-line help). Only the module of the command being run is imported: `treegrpo logs`
# and `treegrpo --help` start without loading torch.
_COMMANDS = [
    (
        "train",
        "treegrpo.train",
        "train",
        "Tree-GRPO training (no arguments: the embedded quickstart)",
    ),
    (
        "sft",
        "treegrpo.sft",
        "train",
        "supervised warm start on the synthetic world's gold episodes",
    ),
    ("data", "treegrpo.env.synth", "", "build datasets (the synthetic multi-hop QA world)"),
    ("serve-retriever", "treegrpo.env.retrievers.server", "", "serve a corpus over /retrieve"),
    ("sglang", "treegrpo.engine.sglang_launch", "", "SGLang rollout servers: how to launch them"),
    ("logs", "treegrpo.logs.cli", "", "analyse rollout logs: summary, plots, tree viewer, compare"),
]
# The packages whose absence means an extra is not installed (pyproject.toml lists the rest).
_EXTRA_PROBES = {"train": ("torch", "transformers")}


def _register(commands: Any, argv: list[str]) -> None:
    """Register every command: the one named in ``argv`` by its own module (its full parser),
    the others as one-line entries of the help. A command whose extra is not installed is still
    listed and says what to install, without importing its module: `pip install treegrpo` alone
    keeps every other command, and `--version`."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module, extra, help_ in _COMMANDS:
        if name != chosen:
            commands.add_parser(name, help=help_, add_help=False)
            continue
        missing = [m for m in _EXTRA_PROBES.get(extra, ()) if importlib.util.find_spec(m) is None]
        if missing:
            _needs_extra(name, extra, missing, commands)
        else:
            importlib.import_module(module).add_subcommand(commands)


def _needs_extra(name: str, extra: str, missing: list[str], commands: Any) -> None:
    needs = f"needs {', '.join(missing)}: pip install 'treegrpo[{extra}]'"
    p = commands.add_parser(name, help=f"({needs})")
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        raise MissingDependencyError(f"`treegrpo {name}` {needs}")

    p.set_defaults(run=run)


def run_guarded(name: str, run: Callable[[], int], *, debug: bool = False) -> int:
    """``run()``'s exit code; a :class:`TreeGRPOError` it raises is printed as one line
    (``treegrpo NAME: error: ...``, on stderr) and gives :data:`USER_ERROR`, unless ``debug``
    (then it propagates, traceback and all). Other exceptions propagate: they are bugs."""
    try:
        return int(run())
    except TreeGRPOError as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"treegrpo {name}: error: {message}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"treegrpo {name}: interrupted", file=sys.stderr)
        return 130


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags, and whether there was one (it may follow the
    subcommand: ``treegrpo train --debug tree.m=2``)."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treegrpo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"treegrpo {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a user error too"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a small forest and print its advantages")
    demo.add_argument("--seed", type=int, default=0, help="selection seed")
    demo.set_defaults(run=_demo)
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    # torch's OpenMP threads spin-wait between ops by default; on a shared CPU with a busy core
    # that made forward + backward ~3x slower (measured: bench/learning.py's docstring). Set
    # before torch is imported; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _register(commands, argv)
    args = parser.parse_args(argv)
    verb = getattr(args, f"{args.command}_command", None)
    name = f"{args.command} {verb}" if isinstance(verb, str) else args.command
    return run_guarded(name, lambda: args.run(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
