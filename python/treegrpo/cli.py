"""The ``treegrpo`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from treegrpo import __version__


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
    print("(full training arrives with `treegrpo train`; see README)")
    return 0


def _column(table: object, name: str) -> list[float]:
    import pyarrow as pa

    return pa.table(table).column(name).to_pylist()


def _subcommands() -> list[Callable[[Any], Any]]:
    """Each module that owns a command registers it (its parser and its `run`)."""
    from treegrpo.engine.sglang_client import add_subcommand as sglang
    from treegrpo.env.retrievers.server import add_subcommand as serve_retriever
    from treegrpo.env.synth import add_subcommand as data
    from treegrpo.sft import add_subcommand as sft
    from treegrpo.train import add_subcommand as train

    return [train, sft, data, serve_retriever, sglang]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treegrpo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"treegrpo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a small forest and print its advantages")
    demo.add_argument("--seed", type=int, default=0, help="selection seed")
    demo.set_defaults(run=_demo)
    for register in _subcommands():
        register(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
