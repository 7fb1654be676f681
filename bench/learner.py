"""Learner benchmark (issue 7): tree packing's speedup, and the memory of one update.

1. Throughput: ``Learner.step`` with the default config (reference log-probs for the KL term,
   then one update, whose own detached log-probs are the old ones) in tokens/s, flat vs packed, on
   Tree-GRPO-shaped batches (M=2 trees per prompt, N=2 expansions, L=1: 6 trajectories per
   prompt). Tokens/s counts trajectory tokens (shared prefixes once per trajectory), the work
   the reference does. Target: packed speedup >= 0.8 x total/unique tokens (the sharing ratio).
   Flat and packed runs alternate, each on a fresh copy of the same random model.
2. Peak memory: one ``Learner.step`` over 16 trajectories x 512 tokens with a model of the
   default policy's shape (SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads,
   intermediate 1536, vocab 49152; random init, float32), each configuration in a fresh
   subprocess that reports its peak RSS (VmHWM from /proc/self/status). Target <= 8 GB with the
   default LearnerConfig.
3. Log-prob memory: lm_head + log-softmax + entropy, forward and backward, for 4,096 policy
   tokens (vocab 49152), each way in a fresh subprocess: chunked with a checkpoint per chunk
   (what the learner does) against the whole batch at once without a checkpoint (the naive
   way: every (tokens x vocab) intermediate stays alive until backward).

On a GPU (``--device cuda``, used by bench/gpu_check.py): throughput and memory run on the
device, with torch.cuda.synchronize() around each timed step and untimed warm-up steps first
(``--warmup``, default 1 on CUDA: kernel selection and torch.compile of flex_attention stay
out of the timings); each row also gives the peak GPU memory of its step
(torch.cuda.max_memory_allocated after a reset), and the memory section reports that instead of
RSS (no 8 GB target: that one is issue 7's, for CPU RSS). The log-prob section measures process
RSS and runs on the CPU only, so ``--device cuda`` skips it. ``--packed-attn flex_attention``
runs the packed side with the block-sparse tree mask (all trees of a micro-batch in one row);
the flat side always uses sdpa. A CUDA run writes only where ``--out`` says
(bench/results/learner.json holds the CPU results).

Run: .venv/bin/python bench/learner.py [--layers 30] [--prompts 1] [--repeats 3] [--quick]
     .venv/bin/python bench/learner.py --skip-memory / --skip-throughput
     python bench/learner.py --device cuda --packed-attn flex_attention --out /tmp/l.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, target, write_results

TITLE = "Learner: tree packing speedup and the memory of one update"
ISSUE = 7
MEMORY_TARGET_GB = 8.0
SPEEDUP_FRACTION = 0.8
VOCAB = 49_152


def model_config(layers: int, attn: str = "sdpa") -> Any:
    """A LlamaConfig of SmolLM2-135M's shape (``layers`` decoder layers)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
    )
    config._attn_implementation = attn
    return config


def random_model(layers: int, seed: int = 0, attn: str = "sdpa", device: str = "cpu") -> Any:
    """The same random weights for a seed whatever ``attn`` and ``device`` (drawn on the CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config(layers, attn)).float().to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_gb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def tree_forest(prompts: int, seed: int = 0) -> Any:
    """Per prompt: M=2 trees, each a first chain of 2-4 agent steps to a leaf, then L=1 round of
    N=2 expansions per tree from uniformly drawn nodes (root included), each continued 1-3 steps
    to a leaf. Prompt 150-300 tokens; a step is 60-120 action + 100-200 observation tokens
    (retrieved documents); the final answer step 40-100 tokens. Rewards uniform in [0, 1]."""
    from treegrpo import Forest

    rng = random.Random(seed)
    forest, leaves = Forest(), []

    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))]

    def chain(node: int, steps: int) -> None:
        for _ in range(steps - 1):
            node = forest.add_step(node, tokens(60, 120), tokens(100, 200))
        leaves.append(forest.add_step(node, tokens(40, 100), leaf=True))

    for group in range(prompts):
        prompt = tokens(150, 300)
        for _ in range(2):
            chain(forest.add_root(group, prompt), rng.randint(2, 4))
    for node in forest.select(2, seed=seed):
        chain(node, rng.randint(1, 3))
    forest.set_rewards(leaves, [rng.random() for _ in leaves])
    forest.advantages("tree")
    return forest


def chain_forest(rows: int = 16, length: int = 512, seed: int = 0) -> Any:
    """``rows`` independent trajectories of exactly ``length`` tokens (no sharing): prompt 200,
    one step of 100 action + 112 observation tokens, a 100-token answer."""
    from treegrpo import Forest

    rng = random.Random(seed)
    forest, leaves = Forest(), []

    def tokens(n: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(n)]

    obs = length - 200 - 100 - 100
    for group in range(rows):
        root = forest.add_root(group, tokens(200))
        step = forest.add_step(root, tokens(100), tokens(obs))
        leaves.append(forest.add_step(step, tokens(100), leaf=True))
    forest.set_rewards(leaves, [rng.random() for _ in leaves])
    forest.advantages("grpo")
    return forest


# ------------------------------------------------------------------------------ throughput


def bench_throughput(
    layers: int,
    prompts: int,
    repeats: int,
    micro: int | None,
    *,
    device: str = "cpu",
    packed_attn: str = "sdpa",
    warmup: int = 0,
) -> list[dict]:
    import torch
    from treegrpo.learner import Learner, LearnerConfig

    torch.set_num_threads(torch.get_num_threads())
    # both start from the same weights; the flat side always runs sdpa
    bases = {False: random_model(layers), True: random_model(layers, attn=packed_attn)}
    forest = tree_forest(prompts)
    pack = forest.pack()
    rows = []
    times: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(warmup + repeats):
        for packed in (False, True):
            model = copy.deepcopy(bases[packed]).to(device)
            kw = {"micro_batch_tokens": micro} if micro else {}
            cfg = LearnerConfig(total_steps=100, packed=packed, ppo_mini_batch_size=None, **kw)
            learner = Learner(model, cfg)
            _reset_peak(device)
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            metrics = learner.step(forest)
            _sync(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if i < warmup:
                del learner, model
                continue
            times[packed].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "old_log_prob_s": metrics["timing_s/old_log_prob"],
                    "update_s": metrics["timing_s/update_actor"],
                    "forward_tokens": metrics["perf/forward_tokens"],
                    "padded_tokens": metrics["perf/padded_tokens"],
                    "pg_loss": metrics["actor/pg_loss"],
                    "peak_gpu_memory_gb": _peak_gpu_gb(device),
                }
            )
            del learner, model
    med = {k: sorted(v, key=lambda r: r["wall_s"])[len(v) // 2] for k, v in times.items()}
    ratio = pack.sharing_ratio
    speedup = med[False]["wall_s"] / med[True]["wall_s"]
    cpu_speedup = med[False]["cpu_s"] / med[True]["cpu_s"]
    for packed in (False, True):
        m = med[packed]
        rows.append(
            {
                "mode": "packed" if packed else "flat",
                "device": device,
                "attn": packed_attn if packed else "sdpa",
                "warmup": warmup,
                "layers": layers,
                "prompts": prompts,
                "trajectories": len(pack),
                "total_tokens": pack.total_tokens,
                "unique_tokens": pack.unique_tokens,
                "sharing_ratio": ratio,
                **m,
                "tokens_per_s": pack.total_tokens / m["wall_s"],
                "all_wall_s": [r["wall_s"] for r in times[packed]],
                "all_cpu_s": [r["cpu_s"] for r in times[packed]],
                "max_peak_gpu_memory_gb": max(
                    (r["peak_gpu_memory_gb"] for r in times[packed]), default=None
                )
                if device == "cuda"
                else None,
                "speedup": speedup if packed else 1.0,
                "cpu_speedup": cpu_speedup if packed else 1.0,
                "target_speedup": SPEEDUP_FRACTION * ratio,
                "pass": (speedup >= SPEEDUP_FRACTION * ratio) if packed else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------ memory


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GB
    return float("nan")


def memory_worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process: build, one step, report peak RSS (CPU) or
    peak GPU memory of the step (CUDA: the allocator's peak after a reset, weights included)."""
    import torch
    from treegrpo.learner import Learner, LearnerConfig

    device = spec.get("device", "cpu")
    start_rss = _vm("VmRSS")
    model = random_model(spec["layers"], device=device)
    forest = chain_forest()
    model_rss = _vm("VmRSS")
    cfg = LearnerConfig(total_steps=100, ppo_mini_batch_size=None, **spec["config"])
    learner = Learner(model, cfg)  # one update a step, as measured
    _reset_peak(device)
    start = time.perf_counter()
    metrics = learner.step(forest)
    _sync(device)
    out = {
        "device": device,
        "step_s": time.perf_counter() - start,
        "padded_tokens": metrics["perf/padded_tokens"],
        "torch": torch.__version__,
    }
    if device == "cuda":
        out["peak_gpu_memory_gb"] = _peak_gpu_gb(device)
    else:
        out.update(peak_rss_gb=_vm("VmHWM"), start_rss_gb=start_rss, model_rss_gb=model_rss)
    return out


def logprob_worker(spec: dict) -> dict:
    """lm_head + log-softmax + entropy, forward and backward, one way; peak RSS above start."""
    import torch
    from treegrpo.learner.logprobs import _chunk_log_probs, token_log_probs

    torch.manual_seed(0)
    head = torch.nn.Linear(576, VOCAB, bias=False)
    hidden = torch.randn(spec["tokens"], 576, requires_grad=True)
    targets = torch.randint(0, VOCAB, (spec["tokens"],))
    base = _vm("VmRSS")
    start = time.perf_counter()
    if spec["chunk"]:
        lp, ent = token_log_probs(hidden, head, targets, chunk_tokens=spec["chunk"])
    else:
        lp, ent = _chunk_log_probs(head, 1.0, True, hidden, targets)
    assert ent is not None
    (lp.sum() + ent.sum()).backward()
    return {
        "extra_peak_gb": _vm("VmHWM") - base,
        "seconds": time.perf_counter() - start,
        "logits_gb": spec["tokens"] * VOCAB * 4 / 2**30,
    }


LOGPROB_TOKENS = 4096
LOGPROB_CASES: list[tuple[str, int | None]] = [
    ("chunks of 1024, checkpointed (learner default)", 1024),
    ("chunks of 256, checkpointed", 256),
    ("all at once, no checkpoint (naive)", None),
]


def bench_logprob_memory() -> list[dict]:
    rows = []
    for name, chunk in LOGPROB_CASES:
        spec = {"tokens": LOGPROB_TOKENS, "chunk": chunk}
        proc = subprocess.run(
            [sys.executable, __file__, "--logprob-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            result: dict[str, Any] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"case": name, "tokens": LOGPROB_TOKENS, "chunk": chunk, **result})
        print(f"  {name}: {result}", flush=True)
    return rows


MEMORY_CASES: list[tuple[str, dict]] = [
    ("flat, default config", {"packed": False}),
    ("packed, default config", {"packed": True}),
    ("flat, micro_batch_tokens=4096", {"packed": False, "micro_batch_tokens": 4096}),
    (
        "flat, one pass (micro_batch_tokens=None) + gradient checkpointing",
        {"packed": False, "micro_batch_tokens": None, "gradient_checkpointing": True},
    ),
    (
        "flat, one pass + gradient checkpointing, log-probs unchunked",
        {
            "packed": False,
            "micro_batch_tokens": None,
            "gradient_checkpointing": True,
            "logprob_chunk_tokens": 1 << 30,
        },
    ),
]


def _in_process(spec: dict) -> dict[str, Any]:
    """memory_worker in this process (CUDA), its error caught; the GPU cache emptied after."""
    import gc

    import torch

    try:
        return memory_worker(spec)
    except Exception as exc:  # an out-of-memory error is a result of this benchmark
        return {"error": [f"{type(exc).__name__}: {exc}"]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def bench_memory(layers: int, cases: list[tuple[str, dict]], device: str = "cpu") -> list[dict]:
    rows = []
    for name, cfg in cases:
        spec = {"layers": layers, "config": cfg, "device": device}
        result: dict[str, Any]
        if device == "cuda":  # the allocator's peak resets: no fresh process needed
            result = _in_process(spec)
        else:
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                result = {"error": proc.stderr.strip().splitlines()[-1:]}
                if proc.returncode < 0:
                    result["error"] = f"killed by signal {-proc.returncode} (out of memory?)"
            else:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = result.get("peak_rss_gb")
        row = {"case": name, "layers": layers, "config": cfg, **result}
        if device == "cpu":  # issue 7's target is for CPU RSS; none is set for GPU memory
            row["target_gb"] = MEMORY_TARGET_GB
            row["pass"] = (peak <= MEMORY_TARGET_GB) if peak is not None else False
        rows.append(row)
        print(f"  {name}: {result}", flush=True)
    return rows


# ------------------------------------------------------------------------------ main


def learner_targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets (schema: bench/common.py) from the payload's throughput and memory
    rows; the memory target is for the default LearnerConfig only (flat and packed)."""
    carried = payload.get("carried_over", {})

    def note(*parts: str, section: str) -> str:
        when = f"carried over from the result of {carried[section]}" if section in carried else ""
        return "; ".join(part for part in (*parts, when) if part)

    out = []
    for r in payload.get("throughput", []):
        if r["mode"] == "packed":
            on = ""  # CPU rows keep the names of the results recorded before --device existed
            if r.get("device", "cpu") != "cpu":
                on = f", {r['attn']}, {r['device'].upper()}"
            out.append(
                target(
                    f"Learner.step speedup, packed over flat, {r['trajectories']} tree "
                    f"trajectories, {r['layers']} layers{on}",
                    r["speedup"],
                    ">=",
                    SPEEDUP_FRACTION * r["sharing_ratio"],
                    "x",
                    note=note(
                        f"target {SPEEDUP_FRACTION:g} x sharing ratio {r['sharing_ratio']:.2f}",
                        f"median wall time of {len(r['all_wall_s'])} runs",
                        f"CPU-time speedup {r['cpu_speedup']:.2f}x",
                        section="throughput",
                    ),
                )
            )
    for r in payload.get("memory", []):
        if set(r["config"]) <= {"packed"} and r.get("device", "cpu") == "cpu":
            out.append(
                target(
                    f"peak RSS of one update, 16 x 512 tokens, {r['case']}, {r['layers']} layers",
                    r.get("peak_rss_gb"),
                    "<=",
                    MEMORY_TARGET_GB,
                    "GB",
                    note=note(str(r.get("error", "")), section="memory"),
                )
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (default 30)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per throughput batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-tokens", type=int, default=None)
    parser.add_argument("--memory-layers", type=int, default=30)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-cases", help="comma-separated indices of MEMORY_CASES to (re)run; merged"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 prompt, no JSON")
    parser.add_argument("--skip-logprob", action="store_true")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--logprob-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where throughput and memory run (cuda: needs --out; skips the CPU-only log-prob "
        "section)",
    )
    parser.add_argument(
        "--packed-attn",
        choices=("sdpa", "flex_attention"),
        default="sdpa",
        help="attention of the packed side (flat always runs sdpa)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per mode before the timed ones (default 1 on CUDA, 0 on CPU)",
    )
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    if args.logprob_worker:
        print(json.dumps(logprob_worker(json.loads(args.logprob_worker))))
        return
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        if args.out is None and not args.quick:
            parser.error(
                "--device cuda writes its results only to --out (bench/results/learner.json "
                "holds the CPU results): give --out PATH"
            )
        if not args.skip_logprob:
            print("log-prob memory: skipped (it measures process RSS, on the CPU only)")
            args.skip_logprob = True
    if args.quick:
        args.layers, args.prompts, args.memory_layers = 2, 1, 2
    payload: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_throughput:
        print(
            f"throughput: {args.layers} layers, {args.prompts} prompts, {args.device}, "
            f"packed with {args.packed_attn}, {args.warmup} warm-up step(s) per mode",
            flush=True,
        )
        rows = bench_throughput(
            args.layers,
            args.prompts,
            args.repeats,
            args.micro_batch_tokens,
            device=args.device,
            packed_attn=args.packed_attn,
            warmup=args.warmup,
        )
        payload["throughput"] = rows
        gpu = args.device == "cuda"
        print(
            markdown_table(
                [
                    "mode",
                    "attn",
                    "layers",
                    "traj",
                    "total tok",
                    "unique tok",
                    "ratio",
                    "padded tok",
                    "old_lp s",
                    "update s",
                    "wall s",
                    "cpu s",
                    "tok/s",
                    "speedup",
                    "target",
                    "pass",
                    *(["peak GPU GB"] if gpu else []),
                ],
                [
                    [
                        r["mode"],
                        r["attn"],
                        r["layers"],
                        r["trajectories"],
                        r["total_tokens"],
                        r["unique_tokens"],
                        f"{r['sharing_ratio']:.2f}",
                        int(r["padded_tokens"]),
                        f"{r['old_log_prob_s']:.1f}",
                        f"{r['update_s']:.1f}",
                        f"{r['wall_s']:.1f}",
                        f"{r['cpu_s']:.1f}",
                        f"{r['tokens_per_s']:.0f}",
                        f"{r['speedup']:.2f}x",
                        f">= {r['target_speedup']:.2f}x" if r["mode"] == "packed" else "",
                        {True: "yes", False: "NO", None: ""}[r["pass"]],
                        *([f"{r['max_peak_gpu_memory_gb']:.2f}"] if gpu else []),
                    ]
                    for r in rows
                ],
            )
        )
    if not args.skip_memory:
        print(f"memory: one step over 16 x 512 tokens, {args.memory_layers} layers", flush=True)
        cases = MEMORY_CASES
        if args.memory_cases:
            cases = [MEMORY_CASES[int(i)] for i in args.memory_cases.split(",")]
        rows = bench_memory(args.memory_layers, cases, args.device)
        if args.memory_cases:  # merge into the last full run's rows, by case name
            out = args.out or RESULTS / "learner.json"
            previous = json.loads(out.read_text()).get("memory", []) if out.exists() else []
            ran = {r["case"] for r in rows}
            order = [name for name, _ in MEMORY_CASES]
            rows = sorted(
                [r for r in previous if r["case"] not in ran and r["case"] in order] + rows,
                key=lambda r: order.index(r["case"]),
            )
        payload["memory"] = rows
        peak = "peak_gpu_memory_gb" if args.device == "cuda" else "peak_rss_gb"
        print(
            markdown_table(
                ["case", "layers", "padded tok", "step s", peak, "target", "pass"],
                [
                    [
                        r["case"],
                        r["layers"],
                        int(r.get("padded_tokens", 0)),
                        f"{r.get('step_s', float('nan')):.1f}",
                        f"{r[peak]:.2f}" if peak in r else r.get("error"),
                        f"<= {MEMORY_TARGET_GB:g}" if "target_gb" in r else "",
                        {True: "yes", False: "NO", None: ""}[r.get("pass")],
                    ]
                    for r in rows
                ],
            )
        )
    if not args.skip_logprob:
        print(f"log-prob memory: {LOGPROB_TOKENS} tokens x vocab {VOCAB}", flush=True)
        rows = bench_logprob_memory()
        payload["logprob_memory"] = rows
        print(
            markdown_table(
                ["way", "tokens", "(tokens x vocab) GB", "fwd+bwd s", "peak RSS above start GB"],
                [
                    [
                        r["case"],
                        r["tokens"],
                        f"{r.get('logits_gb', float('nan')):.2f}",
                        f"{r.get('seconds', float('nan')):.1f}",
                        f"{r['extra_peak_gb']:.2f}" if "extra_peak_gb" in r else r.get("error"),
                    ]
                    for r in rows
                ],
            )
        )
    if not args.quick:
        out = args.out or RESULTS / "learner.json"
        if out.exists():  # a section not run this time keeps its last result
            previous = json.loads(out.read_text())
            for section in ("throughput", "memory", "logprob_memory"):
                if section not in payload and section in previous:
                    payload[section] = previous[section]
                    payload.setdefault("carried_over", {})[section] = previous["date"]
        payload.update(title=TITLE, issue=ISSUE, targets=learner_targets(payload))
        path = write_results("learner", payload, out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
