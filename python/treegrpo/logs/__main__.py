"""``python -m treegrpo.logs summary|plot|tree|compare ...``: the ``treegrpo logs`` commands
without the start-up cost of the other subcommands (``treegrpo`` imports them all, torch
included)."""

from __future__ import annotations

import argparse
import sys

from treegrpo.logs.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treegrpo.logs", description=__doc__)
    add_commands(parser)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
