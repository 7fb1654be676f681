"""Rollout throughput against the SGLang simulator (issue 17): lockstep vs async schedule.

Workload (the paper's shape): ``--prompts`` prompts (512), tree (M, N, L) = (2, 2, 1), 3
search turns + the final one, up to 500 tokens per turn with a long-tailed (lognormal) length,
3 documents per search. The policy is the simulator (:mod:`treegrpo.testing.sglang_sim`, its
default timing model of a ~3B model on one H100, ``docs/simulator.md``): its outputs are
synthetic tokens that end on a search or an answer text (``ENDINGS``), so the rollout's stop
rule, tool calls and tree logic run as in training; the retriever is :class:`SimRetriever`
(its documents, a lognormal latency). The simulator runs in its own process (so the client's
CPU does not slow the server's clock) and sleeps simulated time / ``--time-scale``.

Measured per schedule:

- rollout wall time (in simulated seconds: real x time scale) over the simulator's lower bound,
  its own busy time (prefill + decode at the concurrency it was given). Target: async <= 1.15x;
  lockstep's ratio beside it;
  The bound differs between the schedules (the simulator's busy time depends on how requests
  arrive: async admits many small prefill batches, each holding decoding up), so the simulated
  wall times are compared directly too;
- the client's own cost: requests per second the SGLang client sustains against a zero-latency
  simulator (``time_scale = inf``, output length 4; target >= 2,000/s) and the rollout's
  process CPU seconds per 1,000 trajectories;
- the embedded engine on this CPU (tiny random policy, ``--embedded-prompts`` prompts, 24
  tokens per turn, 2 turns): model forward passes and wall time of both schedules (the async
  schedule relies on the engine running the calls that wait as one batch). On a loaded
  machine the forward passes (the model's work) are the steadier measure; wall and CPU
  seconds are recorded with them.

    .venv/bin/python bench/throughput.py [--prompts 512] [--time-scale 4] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import markdown_table, target, write_results
from treegrpo.engine.base import GenerateRequest, SamplingParams
from treegrpo.engine.sglang_client import SGLangClient
from treegrpo.env import SearchEnv
from treegrpo.env.prompt import PromptBuilder
from treegrpo.rollout import Prompt, Rollout, RolloutConfig
from treegrpo.testing.sglang_sim import SimParams, SimRetriever, start_sim_server
from treegrpo.testing.tiny import tiny_tokenizer

TITLE = "Rollout throughput: lockstep vs async against the SGLang simulator"
ISSUE = 17
ENDINGS = [("<search> who built the bridge </search>", 0.7), ("<answer> Paris </answer>", 0.3)]
TARGET_RATIO = 1.15
TARGET_RPS = 2000.0
SCHEDULES = ("lockstep", "async")


def _serve(options: dict[str, Any], params: SimParams, urls: Any, done: Any) -> None:
    """The simulator in a child process: report its URL, serve until told to stop."""
    tok = tiny_tokenizer() if options.pop("tokenizer", False) else None
    _, url, stop = start_sim_server(params, tokenizer=tok, **options)
    urls.put(url)
    done.wait()
    stop()


class Sim:
    """A simulator process: ``url``, ``stats()``, ``close()``."""

    def __init__(self, params: SimParams, **options: Any) -> None:
        ctx = mp.get_context("spawn")
        urls, self.done = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(options, params, urls, self.done))
        self.proc.start()
        self.url: str = urls.get(timeout=120)

    async def stats(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/sim_stats") as r:
            return dict(await r.json())

    def close(self) -> None:
        self.done.set()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def rollout_once(schedule: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    tok = tiny_tokenizer()
    builder = PromptBuilder()
    prompts = [
        Prompt(
            g, builder.render(f"question {g} about the bridge", tok), "nq", {"target": ["Paris"]}
        )
        for g in range(args.prompts)
    ]
    params = SimParams(
        vocab_size=len(tok),
        filler_low=3,
        eos_token_id=2,
        output_median=args.output_median,
        output_sigma=args.output_sigma,
        seed=seed,
    )
    sim = Sim(params, time_scale=args.time_scale, tokenizer=True, endings=ENDINGS)
    try:
        retriever = SimRetriever(
            latency_s=args.tool_latency, sigma=0.5, time_scale=args.time_scale, seed=seed
        )
        env = SearchEnv(tok, retriever=retriever, topk=3, max_turns=3, max_obs_tokens=500)
        cfg = RolloutConfig(
            m=2, n=2, l=1, max_turns=3, max_action_tokens=500, seed=seed, schedule=schedule
        )  # type: ignore[arg-type]

        async def go() -> tuple[Any, dict[str, float], float, float]:
            client = SGLangClient(sim.url, tokenizer=tok)
            runner = Rollout(client, env, lambda *a, **k: 0.0, cfg, tokenizer=tok)
            try:
                before = await sim.stats()
                wall, cpu = time.perf_counter(), time.process_time()
                result = await runner.run(prompts, step=seed)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                after = await sim.stats()
            finally:
                await client.close()
            return result, {k: after[k] - before[k] for k in after}, wall, cpu

        result, stats, wall, cpu = asyncio.run(go())
    finally:
        sim.close()
    leaves = result.total.leaves
    simulated = wall * args.time_scale
    return {
        "schedule": schedule,
        "seed": seed,
        "wall_s": wall,
        "simulated_wall_s": simulated,
        "sim_busy_s": stats["busy_s"],
        "ratio_to_bound": simulated / stats["busy_s"],
        "cpu_s": cpu,
        "cpu_s_per_1k_trajectories": 1000 * cpu / leaves,
        "leaves": leaves,
        "requests": result.total.requests,
        "sim_requests": stats["requests"],
        "generated_tokens": result.total.generated_tokens,
        "tool_calls": result.total.tool_calls,
        "cache_hit_rate": result.total.cache_hit_rate,
        "timing": result.timing,
    }


def client_rate(requests: int, concurrency: int) -> dict[str, float]:
    """Requests per second the SGLang client sustains against a simulator that takes no time
    (its outputs 4 tokens long): ``concurrency`` callers each sending one request at a time."""
    params = SimParams(output_median=4, output_sigma=0.0, vocab_size=1000, filler_low=3)
    sim = Sim(params, time_scale=math.inf)
    try:

        async def go() -> tuple[float, float]:
            client = SGLangClient(sim.url, vocab_size=1000)
            sp = SamplingParams(max_new_tokens=8, stop_token_ids=(2,))
            left = requests

            async def caller(i: int) -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    ids = [5 + (i * 7 + left) % 900 for _ in range(64)]
                    await client.generate([GenerateRequest(ids, sp, key=f"k{i}")])

            try:
                await asyncio.gather(*(caller(i) for i in range(min(concurrency, 8))))  # warm
                left = requests
                wall, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*(caller(i) for i in range(concurrency)))
                return time.perf_counter() - wall, time.process_time() - cpu
            finally:
                await client.close()

        wall, cpu = asyncio.run(go())
    finally:
        sim.close()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "client_cpu_s_per_request": cpu / requests,
    }


def embedded(prompts_n: int, repeats: int) -> dict[str, Any]:
    """Both schedules through the embedded engine (tiny random policy) on this CPU."""
    from dataclasses import replace

    from treegrpo.engine.embedded import EmbeddedEngine
    from treegrpo.testing.tiny import tiny_policy

    model, tok = tiny_policy(seed=0)
    builder = PromptBuilder()
    prompts = [
        Prompt(g, builder.render(f"question {g} about a bridge", tok), "nq", {"target": ["x"]})
        for g in range(prompts_n)
    ]
    stops = (2, *range(100, 124))  # about half of the steps end on one (as tests/ do)
    cfg = RolloutConfig(m=2, n=2, l=1, max_turns=2, max_action_tokens=24, seed=7)
    out: dict[str, list[dict[str, float]]] = {s: [] for s in SCHEDULES}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for schedule in SCHEDULES if repeat % 2 else tuple(reversed(SCHEDULES)):
            engine = EmbeddedEngine(model, tok, seed=repeat)
            retriever = SimRetriever(latency_s=0.0, doc_words=8, seed=repeat)
            env = SearchEnv(tok, retriever=retriever, max_turns=2, max_obs_tokens=64)
            runner = Rollout(
                engine,
                env,
                lambda *a, **k: 0.0,
                replace(cfg, schedule=schedule),  # type: ignore[arg-type]
                tokenizer=tok,
                eos_token_ids=stops,
            )
            wall, cpu = time.perf_counter(), time.process_time()
            result = asyncio.run(runner.run(prompts, step=repeat))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if repeat:
                out[schedule].append(
                    {
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "forward_passes": engine.stats.forward_passes,
                        "engine_calls_requests": engine.stats.requests,
                        "generated_tokens": result.total.generated_tokens,
                        "generated_tokens_per_s": result.total.generated_tokens / wall,
                    }
                )
    return {
        "prompts": prompts_n,
        "runs": out,
        "medians": {
            s: {k: statistics.median(r[k] for r in out[s]) for k in out[s][0]} for s in SCHEDULES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="seeds, each runs both schedules")
    parser.add_argument("--time-scale", type=float, default=4.0, help="simulated s per real s")
    parser.add_argument("--output-median", type=float, default=120.0, help="tokens per turn")
    parser.add_argument("--output-sigma", type=float, default=1.0, help="log-space spread")
    parser.add_argument("--tool-latency", type=float, default=0.3, help="median search, s")
    parser.add_argument("--client-requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--embedded-prompts", type=int, default=16)
    parser.add_argument("--embedded-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 prompts, 1 repeat, no JSON")
    parser.add_argument("--out", default=None, help="result file (default bench/results/...)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.repeats, args.client_requests = 32, 1, 1000
        args.embedded_prompts, args.embedded_repeats = 4, 1

    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCHEDULES}
    for repeat in range(args.repeats):
        order = SCHEDULES if repeat % 2 == 0 else tuple(reversed(SCHEDULES))
        for schedule in order:
            record = rollout_once(schedule, args, seed=repeat)
            runs[schedule].append(record)
            print(
                f"  seed {repeat} {schedule:8s}: {record['wall_s']:.1f} s wall, "
                f"{record['ratio_to_bound']:.2f}x the bound, {record['leaves']} leaves, "
                f"{record['requests']} requests",
                flush=True,
            )
    rate = client_rate(args.client_requests, args.concurrency)
    print(f"  client: {rate['requests_per_s']:.0f} requests/s", flush=True)
    cpu = embedded(args.embedded_prompts, args.embedded_repeats)
    em = cpu["medians"]

    def med(schedule: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[schedule])

    headers = [
        "schedule",
        "wall (s)",
        "simulated wall (s)",
        "simulator busy (s)",
        "wall / bound",
        "requests",
        "CPU s / 1k traj.",
    ]
    rows = [
        [
            s,
            f"{med(s, 'wall_s'):.1f}",
            f"{med(s, 'simulated_wall_s'):.1f}",
            f"{med(s, 'sim_busy_s'):.1f}",
            f"{med(s, 'ratio_to_bound'):.2f}x",
            f"{med(s, 'requests'):.0f}",
            f"{med(s, 'cpu_s_per_1k_trajectories'):.2f}",
        ]
        for s in SCHEDULES
    ]
    print()
    print(
        f"{args.prompts} prompts, (2,2,1), 3 turns, lognormal turns (median "
        f"{args.output_median:.0f}, sigma {args.output_sigma}), time scale {args.time_scale}; "
        f"medians of {args.repeats}:"
    )
    print(markdown_table(headers, rows))
    print(
        f"client against a zero-latency simulator: {rate['requests_per_s']:.0f} requests/s "
        f"({args.concurrency} concurrent callers)"
    )
    wall_ratio = med("async", "simulated_wall_s") / med("lockstep", "simulated_wall_s")
    print(f"simulated wall, async / lockstep: {wall_ratio:.2f}x")
    print(f"embedded engine, {args.embedded_prompts} prompts (medians of {args.embedded_repeats}):")
    print(
        markdown_table(
            ["schedule", "wall (s)", "process CPU (s)", "forward passes", "generated tokens/s"],
            [
                [
                    s,
                    f"{em[s]['wall_s']:.2f}",
                    f"{em[s]['cpu_s']:.2f}",
                    f"{em[s]['forward_passes']:.0f}",
                    f"{em[s]['generated_tokens_per_s']:.0f}",
                ]
                for s in SCHEDULES
            ],
        )
    )
    print(f"total {time.perf_counter() - started:.0f} s")

    note = f"{args.prompts} prompts, time scale {args.time_scale}, median of {args.repeats}"
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "targets": [
            target(
                "async rollout wall time / simulator busy time",
                med("async", "ratio_to_bound"),
                "<=",
                TARGET_RATIO,
                "x",
                note=(
                    f"{note}; lockstep {med('lockstep', 'ratio_to_bound'):.2f}x; simulated "
                    f"wall async / lockstep {wall_ratio:.2f}x"
                ),
            ),
            target(
                "SGLang client requests/s against a zero-latency simulator",
                rate["requests_per_s"],
                ">=",
                TARGET_RPS,
                "q/s",
                note=f"{args.concurrency} concurrent callers, 64-token prompts",
            ),
        ],
        "workload": {
            "prompts": args.prompts,
            "tree": [2, 2, 1],
            "max_turns": 3,
            "max_action_tokens": 500,
            "topk": 3,
            "output_median": args.output_median,
            "output_sigma": args.output_sigma,
            "tool_latency_s": args.tool_latency,
            "time_scale": args.time_scale,
            "endings": ENDINGS,
            "repeats": args.repeats,
        },
        "runs": [r for s in SCHEDULES for r in runs[s]],
        "medians": {
            s: {
                k: med(s, k)
                for k in ("wall_s", "sim_busy_s", "ratio_to_bound", "cpu_s_per_1k_trajectories")
            }
            for s in SCHEDULES
        },
        "client": rate,
        "simulated_wall_async_over_lockstep": wall_ratio,
        "embedded": cpu,
    }
    if not args.quick or args.out is not None:  # a smoke run keeps the full run's file
        out = write_results("throughput", payload, None if args.out is None else Path(args.out))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
