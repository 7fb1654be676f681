"""The learner on CUDA: packed = flat in float32 and under bfloat16 autocast, for the dense
tree mask (sdpa) and the block-sparse one (flex_attention), and CUDA = CPU in float32.

Skipped without CUDA. bench/gpu_check.py runs them (``pytest -k cuda``) and reads the figures
each test records with ``record_property`` from pytest's JUnit XML: a figure ``x`` and, where
the test bounds it, ``x_max``. Figures are recorded before they are asserted on, so a failing
test still reports them.

Tolerances (relative differences are ||a - b|| / ||b|| over the loss, the whole gradient, or
per-token log-probs as max |a - b|):

- float32 (``autocast="none"``): packed vs flat, and CUDA vs CPU, within ``FLOAT32_TOL`` (only
  the order of floating-point sums differs; TF32 matmuls are off by default in torch).
- bfloat16 autocast (the learner's CUDA default): both layouts round differently, so each is
  compared with the float32 flat result; packed must be as close to it as flat is, within
  ``BF16_FACTOR`` x flat's own error + ``BF16_FLOOR``, and within ``BF16_CAP`` of flat bf16
  (a wrong mask moves the gradient by O(1)). Flat bf16 must differ from float32 by more than
  ``BF16_MIN_EFFECT``, which shows the autocast ran at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from treegrpo import Forest  # noqa: E402
from treegrpo.learner import Learner, LearnerConfig  # noqa: E402
from treegrpo.testing.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB = 320  # tiny_model's default; hidden 64 over 4 heads: head_dim 16
FLOAT32_TOL = 1e-4
BF16_FACTOR = 2.0
BF16_FLOOR = 1e-3
BF16_CAP = 0.1
BF16_MIN_EFFECT = 1e-4
ATTNS = ["sdpa", "flex_attention"]


def forest(prompts: int = 3, seed: int = 0) -> Forest:
    """Tree-GRPO-shaped rollouts: per prompt M=2 trees, each a chain of 1-3 steps to a leaf,
    then N=2 expansions from uniformly drawn nodes; both signs of advantage."""
    rng = random.Random(seed)
    out, leaves = Forest(), []

    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    def chain(node: int) -> None:
        for _ in range(rng.randint(0, 2)):
            node = out.add_step(node, tokens(3, 12), tokens(2, 10))
        leaves.append(out.add_step(node, tokens(2, 8), leaf=True))

    for group in range(prompts):
        prompt = tokens(6, 20)
        for _ in range(2):
            chain(out.add_root(group, prompt))
    for node in out.select(2, seed=seed):
        chain(node)
    rewards = [rng.choice([0.0, 0.3, 1.0]) for _ in leaves]
    rewards[:2] = [0.0, 1.0]
    out.set_rewards(leaves, rewards)
    out.advantages("tree")
    return out


@dataclass
class Result:
    log_probs: list[tuple[int, float]]  # (packed position, old log-prob) of every loss token
    loss: float
    grad: torch.Tensor  # float64, CPU


def run(device: str, attn: str, *, packed: bool, autocast: str) -> Result:
    """One mini-batch: old log-probs (prepare, no grad), then the loss and its gradient."""
    model = tiny_model(VOCAB, attn_implementation=attn).to(device)
    cfg = LearnerConfig(
        total_steps=1, warmup_steps=0, kl_coef=0.0, packed=packed, autocast=autocast
    )
    learner = Learner(model, cfg)
    batch = learner.prepare(forest())
    log_probs = []
    for mb in batch.micro_batches:
        assert mb.old_log_probs is not None
        values = mb.old_log_probs.double().cpu().tolist()
        log_probs += list(zip(mb.pack_index.tolist(), values, strict=True))
    loss, _ = learner.mini_batch_loss(batch.mini_batches[0])
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return Result(log_probs, loss, grad.double().cpu())


def rel(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def log_prob_err(a: Result, b: Result) -> float:
    """max |a - b| over every loss token of ``a`` (duplicates of flat included) against ``b``."""
    ref = dict(b.log_probs)
    assert {i for i, _ in a.log_probs} == set(ref), "both runs score the same loss tokens"
    return max(abs(v - ref[i]) for i, v in a.log_probs)


def errors(a: Result, b: Result) -> dict[str, float]:
    return {
        "log_prob_abs": log_prob_err(a, b),
        "loss_rel": rel(a.loss, b.loss),
        "grad_rel": rel(a.grad, b.grad),
    }


def test_cuda_float32_equals_cpu_float32(record_property: Any) -> None:
    cuda = run("cuda", "sdpa", packed=False, autocast="none")
    cpu = run("cpu", "sdpa", packed=False, autocast="none")
    found = errors(cuda, cpu)
    for name, value in found.items():
        record_property(name, value)
        record_property(f"{name}_max", FLOAT32_TOL)
    assert all(v <= FLOAT32_TOL for v in found.values()), found


@pytest.mark.parametrize("attn", ATTNS)
def test_cuda_packed_equals_flat_float32(attn: str, record_property: Any) -> None:
    flat = run("cuda", "sdpa", packed=False, autocast="none")
    packed = run("cuda", attn, packed=True, autocast="none")
    found = errors(packed, flat)
    for name, value in found.items():
        record_property(name, value)
        record_property(f"{name}_max", FLOAT32_TOL)
    assert all(v <= FLOAT32_TOL for v in found.values()), found


@pytest.mark.parametrize("attn", ATTNS)
def test_cuda_packed_equals_flat_bfloat16_autocast(attn: str, record_property: Any) -> None:
    ref = run("cuda", "sdpa", packed=False, autocast="none")
    flat = run("cuda", "sdpa", packed=False, autocast="bfloat16")
    packed = run("cuda", attn, packed=True, autocast="bfloat16")
    flat_err, packed_err, between = errors(flat, ref), errors(packed, ref), errors(packed, flat)
    bounds = {k: BF16_FACTOR * flat_err[k] + BF16_FLOOR for k in flat_err}
    for name in flat_err:
        record_property(f"flat_vs_float32_{name}", flat_err[name])
        record_property(f"packed_vs_float32_{name}", packed_err[name])
        record_property(f"packed_vs_float32_{name}_max", bounds[name])
        record_property(f"packed_vs_flat_{name}", between[name])
        record_property(f"packed_vs_flat_{name}_max", BF16_CAP)
    assert flat_err["grad_rel"] > BF16_MIN_EFFECT, f"autocast changed nothing: {flat_err}"
    for name in flat_err:
        assert packed_err[name] <= bounds[name], (name, packed_err, flat_err)
        assert between[name] <= BF16_CAP, (name, between)
