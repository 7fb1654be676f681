"""Data parallelism on CPU (gloo, two processes): one learner step split over two ranks equals
the single-process step on the union batch, in every aggregation mode, packed and flat; and
``torchrun --nproc-per-node 2 -m treegrpo.train`` runs a step end to end."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from treegrpo import Forest  # noqa: E402
from treegrpo.learner import Learner, LearnerConfig  # noqa: E402
from treegrpo.testing.tiny import tiny_model  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
WORLD = 2
PROMPTS_PER_RANK = 2
MINI_BATCHES = 2  # each rank's share splits into this many updates
M, N = 2, 2  # trees per prompt, expansions per tree
VOCAB = 320  # tiny_model's default


# ---------------------------------------------------------------------- a fixed batch


def group_forest(groups: list[int], seed: int = 0) -> Forest:
    """Tree-GRPO-shaped rollouts of prompt ``groups``, in that order. A group's trees (prompt,
    chains, expansions from drawn nodes, rewards) depend only on (seed, group), so a group is
    the same in any forest that holds it, and its advantages too (they are per group)."""
    forest, leaves, rewards = Forest(), [], []
    for group in groups:
        rng = random.Random(seed * 100_003 + group)

        def tokens(lo: int, hi: int) -> list[int]:
            return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]  # noqa: B023

        def chain(node: int, candidates: list[int]) -> None:
            for _ in range(rng.randint(0, 2)):  # noqa: B023
                node = forest.add_step(node, tokens(2, 6), tokens(0, 4))
                candidates.append(node)
            leaves.append(forest.add_step(node, tokens(1, 5), leaf=True))

        prompt = tokens(3, 8)
        for _ in range(M):
            root = forest.add_root(group, prompt)
            candidates = [root]
            chain(root, candidates)
            for _ in range(N):  # uniform with replacement over root + open nodes
                chain(rng.choice(candidates), list(candidates))
        new = len(leaves) - len(rewards)
        rewards += [rng.choice([0.0, 0.2, 1.0]) for _ in range(new)]
        rewards[-new] = 1.0 - rewards[-new + 1]  # the group has a spread of rewards
    forest.set_rewards(leaves, rewards)
    forest.advantages("tree")
    return forest


def rank_groups(rank: int) -> list[int]:
    """The trainer's split: rank r rolls out the r-th contiguous share of the step's prompts."""
    return list(range(rank * PROMPTS_PER_RANK, (rank + 1) * PROMPTS_PER_RANK))


def union_groups() -> list[int]:
    """The union batch in the order whose mini-batches are the union of the ranks' i-th
    mini-batches (each rank splits its own share into MINI_BATCHES runs of whole trees)."""
    per_mini = PROMPTS_PER_RANK // MINI_BATCHES
    return [
        g
        for i in range(MINI_BATCHES)
        for r in range(WORLD)
        for g in rank_groups(r)[i * per_mini : (i + 1) * per_mini]
    ]


# SGD without clipping: the parameters move by exactly -lr x the gradient, so comparing the
# updates compares the gradients. AdamW with clipping (what training runs) divides each
# element by its own gradient's magnitude, which amplifies float rounding in near-zero
# gradient elements (packed vs flat on ONE process differ by ~2e-5 in its update): there the
# parameters are compared.
CASES = [
    *({"mode": m, "packed": p, "optimizer": "sgd"} for m in AGG_MODES for p in (True, False)),
    *({"mode": m, "packed": True, "optimizer": "adamw"} for m in AGG_MODES),
    # FSDP2: parameters, gradients and optimizer state sharded over the two ranks. With these
    # micro-batch sizes one rank has fewer micro-batches than the other in the last two cases
    # (flat 40: 5+4 vs 5+5; packed 80: 2+1 vs 2+2) and pads them with empty passes.
    *({"mode": m, "packed": True, "optimizer": "sgd", "strategy": "fsdp2"} for m in AGG_MODES),
    *(
        {"mode": m, "packed": p, "optimizer": o, "strategy": "fsdp2", "micro_batch_tokens": t}
        for m, p, o, t in (
            ("seq-mean-token-mean", False, "sgd", 40),
            ("token-mean", True, "adamw", 80),
        )
    ),
]


def one_step(case: dict[str, Any], groups: list[int], data_parallel: bool) -> tuple[Any, dict]:
    """One learner step (MINI_BATCHES updates) from tiny_model(seed=0) on ``groups``: the
    (full) parameters after it, and its metrics (plus ``empty_micro_batches``, the passes an
    FSDP2 rank added to match the busiest rank's count)."""
    model = tiny_model(seed=0)
    cfg = LearnerConfig(
        lr=1e-3 if case["optimizer"] == "adamw" else 1.0,
        warmup_steps=0,
        loss_agg_mode=case["mode"],
        packed=case["packed"],
        # verl's meaning: prompts per update over both ranks (one of each rank's per update)
        ppo_mini_batch_size=WORLD * PROMPTS_PER_RANK // MINI_BATCHES,
        micro_batch_tokens=case.get("micro_batch_tokens", 60),  # several: gradient accumulation
        logprob_chunk_tokens=16,
        kl_coef=0.1,
        entropy_coeff=0.01,
        grad_clip=1.0 if case["optimizer"] == "adamw" else None,
        strategy=case.get("strategy", "ddp"),
    )
    learner = Learner(model, cfg, data_parallel=data_parallel)
    if case["optimizer"] == "sgd":
        learner.optimizer = torch.optim.SGD(learner.params, lr=cfg.lr)
    batch = learner.prepare(group_forest(groups))
    metrics = learner.update(batch)
    metrics["empty_micro_batches"] = sum(
        mb.num_tokens == 0 for mini in batch.mini_batches for mb in mini
    )
    params = learner.model_state_dict(every_rank=True)
    return {k: v.detach().clone() for k, v in params.items()}, metrics


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    from treegrpo import distributed

    w = distributed.init_from_env()
    assert (w.rank, w.size, w.backend) == (rank, WORLD, "gloo")
    try:
        results = [one_step(case, rank_groups(rank), True) for case in CASES]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------- tests


def test_union_order_makes_the_same_mini_batches() -> None:
    assert union_groups() == [0, 2, 1, 3]
    # a group's advantages do not depend on the forest that holds it
    import polars as pl

    alone = pl.DataFrame(group_forest([2]).advantages("tree")).sort("leaf")
    both = pl.DataFrame(group_forest([0, 2]).advantages("tree")).filter(pl.col("group") == 2)
    assert alone["advantage"].to_list() == both.sort("leaf")["advantage"].to_list()


def test_two_rank_update_equals_the_single_process_update(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    start = tiny_model(seed=0).state_dict()
    for i, case in enumerate(CASES):
        expect, expect_metrics = one_step(case, union_groups(), False)
        assert expect_metrics["empty_micro_batches"] == 0
        (params, metrics), (params1, _) = ranks[0][i], ranks[1][i]
        for name, p in params.items():
            assert torch.equal(p, params1[name]), f"{case}: replicas differ at {name}"
        worst = max(rel(params[k], expect[k]) for k in expect)
        assert worst <= 1e-5, f"{case}: max relative difference of a parameter {worst:.2e}"
        if case["optimizer"] == "sgd":  # the update itself (= the gradient) must agree
            delta = torch.cat([(params[k] - start[k]).flatten() for k in expect])
            expect_delta = torch.cat([(expect[k] - start[k]).flatten() for k in expect])
            assert rel(delta, expect_delta) <= 1e-5, f"{case}: {rel(delta, expect_delta):.2e}"
        assert expect_metrics["actor/updates"] == MINI_BATCHES
        for key, value in expect_metrics.items():
            if key.startswith("actor/"):
                assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (case, key)
    # the second update of each step saw ratios off 1: clipping was exercised
    assert any(r[1]["actor/pg_clipfrac"] > 0 for r in ranks[0])
    # FSDP2 ranks with fewer micro-batches than the other padded them with empty passes
    fsdp = [i for i, case in enumerate(CASES) if case.get("strategy") == "fsdp2"]
    assert any(ranks[r][i][1]["empty_micro_batches"] > 0 for i in fsdp for r in range(WORLD))


def test_learner_refuses_data_parallel_without_a_process_group() -> None:
    from treegrpo.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="torchrun"):
        Learner(tiny_model(), LearnerConfig(warmup_steps=0), data_parallel=True)


def test_shard_and_metric_reduction_outside_torchrun() -> None:
    from treegrpo.distributed import World, reduce_metrics, shard

    items = list(range(7))
    shares = [shard(items, World(rank=r, size=3)) for r in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5, 6]]
    assert reduce_metrics({"a": 1.0}) == {"a": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes_end_to_end(tmp_path: Path, strategy: str) -> None:
    from treegrpo.testing.tiny import tiny_policy

    model, tokenizer = tiny_policy(seed=0)
    tiny_dir = tmp_path / "tiny"
    model.save_pretrained(tiny_dir, safe_serialization=True)
    tokenizer.save_pretrained(tiny_dir)
    run = tmp_path / "run"
    overrides = {
        "preset": "smollm2",  # the reference settings, on a tiny random model
        "model.path": str(tiny_dir),
        "model.sft_steps": "1",
        "model.sft_batch_size": "2",
        "data.synth_docs": "80",
        "data.synth_train": "16",
        "data.synth_test": "8",
        "data.train_batch_size": "2",
        "data.val_size": "2",
        "tree.max_action_tokens": "6",
        "env.max_obs_tokens": "48",
        "trainer.total_steps": "1",
        "trainer.run_dir": str(run),
        "trainer.logger": "[jsonl]",
        "engine.kv_budget_tokens": "4096",
        # explicit, as auto depends on the CPU: under DDP a bfloat16 engine replica per rank
        # (synced after each update); FSDP2 has a replica of the policy's dtype anyway
        "engine.dtype": "bfloat16" if strategy == "ddp" else "policy",
        "learner.strategy": strategy,
    }
    env = {**os.environ, "TREEGRPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "-m",
        "treegrpo.train",
        "--no-progress",
        *(f"{k}={v}" for k, v in overrides.items()),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("validation (before)") == 1  # printed by rank 0 only

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "critic/score/mean" in x]
    assert steps == [1]
    step1 = next(x for x in lines if "actor/pg_loss" in x)
    assert step1["tree/leaves_per_prompt"] == 6
    assert "val-core/all/acc/mean@1" in lines[-1]
    assert (run / "checkpoints" / "step_000001" / "COMPLETE").exists()

    import polars as pl

    parts = sorted(p.name for p in (run / "trajectories" / "step=000001").glob("*.parquet"))
    assert parts == ["part-0.parquet", "part-1.parquet"]
    traj = pl.scan_parquet(
        run / "trajectories" / "**" / "*.parquet", hive_partitioning=True
    ).collect()
    assert len(traj) == 2 * M * (1 + N)  # prompts x trees x leaves, over both ranks
    assert sorted(traj["rank"].unique().to_list()) == [0, 1]
    assert traj.group_by("rank").len()["len"].to_list() == [M * (1 + N)] * WORLD
    assert traj["group"].n_unique() == 2  # each rank rolled out its own prompt

    # resume: one more step continues from rank 0's checkpoint on both ranks
    more = [c.replace("trainer.total_steps=1", "trainer.total_steps=2") for c in cmd]
    more += ["trainer.val_before=false", "trainer.val_after=false"]
    done = subprocess.run(more, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("resumed from") == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "critic/score/mean" in x] == [1, 2]
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").exists()
