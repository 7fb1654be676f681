"""``treegrpo sglang command``: the SGLang launch lines treegrpo expects.

Printing how to start the servers is no job of the client (:mod:`treegrpo.engine.sglang_client`),
so it lives here: :func:`launch_command` (one server, or ``--dp-size`` ranks behind one URL) and
:func:`router_command` (``sglang_router`` in front of separate servers), and the ``sglang``
subcommand of the ``treegrpo`` command line. Nothing here imports aiohttp or SGLang.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Literal

from treegrpo.exceptions import InvalidArgumentError

__all__ = ["add_subcommand", "launch_command", "router_command"]


def launch_command(
    model_path: str, *, port: int = 30000, dp: int = 1, host: str = "127.0.0.1"
) -> str:
    """The recommended SGLang launch line for ``model_path`` (run it in SGLang's own
    environment): longest-prefix-match scheduling, 30% of GPU memory left for activations.
    ``dp > 1`` adds ``--dp-size`` (one URL, SGLang balances its ranks); for cache-aware routing
    over separate servers see :func:`router_command`."""
    if dp < 1:
        raise InvalidArgumentError(f"dp must be >= 1, got {dp}")
    parts = [
        "python -m sglang.launch_server",
        f"--model-path {model_path}",
        f"--host {host}",
        f"--port {port}",
        "--mem-fraction-static 0.7",
        "--schedule-policy lpm",
    ]
    if dp > 1:
        parts.append(f"--dp-size {dp}")
    return " ".join(parts)


def router_command(
    worker_urls: Sequence[str],
    *,
    port: int = 30000,
    host: str = "127.0.0.1",
    policy: Literal["cache_aware", "consistent_hashing"] = "cache_aware",
) -> str:
    """``sglang_router`` in front of ``worker_urls``. ``cache_aware`` routes each request to the
    worker whose cache holds its longest prefix; ``consistent_hashing`` routes on the
    ``X-SMG-Routing-Key`` header that ``SGLangClient(routing="router")`` sends (tree affinity)."""
    return (
        f"python -m sglang_router.launch_router --worker-urls {' '.join(worker_urls)} "
        f"--policy {policy} --host {host} --port {port}"
    )


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sglang`` (with ``sglang command --model PATH [--dp K] [--port P]``) on the
    ``treegrpo`` command's subparsers; sets ``run`` to a function of the parsed args."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sglang", help="SGLang rollout servers: print how to launch them"
    )
    verbs = parser.add_subparsers(dest="sglang_command", required=True)
    command = verbs.add_parser(
        "command",
        help="print the recommended SGLang launch line",
        description="Print the SGLang launch line treegrpo expects (prefix-cache friendly "
        "scheduling, memory left for long trees). Run it in SGLang's own environment.",
    )
    command.add_argument("--model", required=True, help="model path or hub id")
    command.add_argument("--dp", type=int, default=1, help="data-parallel servers (default 1)")
    command.add_argument("--port", type=int, default=30000, help="port (default 30000)")
    command.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    command.set_defaults(run=_print_command)
    return parser


def _print_command(args: argparse.Namespace) -> int:
    if args.dp < 1:
        print(f"--dp must be >= 1, got {args.dp}", file=sys.stderr)
        return 2
    print(launch_command(args.model, port=args.port, dp=args.dp, host=args.host))
    if args.dp > 1:
        workers = [f"http://{args.host}:{args.port + 1 + i}" for i in range(args.dp)]
        print(
            f"\n# Or {args.dp} separate servers (one GPU each, CUDA_VISIBLE_DEVICES=i) on ports "
            f"{args.port + 1}..{args.port + args.dp}, each launched as above without --dp-size,"
            "\n# behind sglang_router with cache-aware routing (pip install sglang-router):"
        )
        print(router_command(workers, port=args.port, host=args.host))
        print(
            "# or give treegrpo the worker URLs themselves: SGLangClient routes each tree to "
            "one server (tree affinity). engine.weight_sync=distributed needs separate "
            "servers: one with --dp-size is refused."
        )
    return 0
