"""Data parallelism: process-group set-up from torchrun's environment, and the few collectives
the trainer and the learner need.

``torchrun --nproc-per-node K -m treegrpo.train ...`` starts K processes; each reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` from its environment and
joins one default process group (gloo on CPU, NCCL on CUDA, one GPU per local rank). What runs
where (docs/architecture.md, "Data parallel"):

1. Every rank holds a full replica of the policy (or, with ``learner.strategy=fsdp2``, a 1/K
   shard of it, the engine then holding its own replica) and its own embedded engine; a step's
   prompts are cut into K contiguous shares of the same seeded order (the data cursor stays the
   same on every rank), and each rank rolls out its share.
2. Advantages are computed per prompt group, so splitting by prompt leaves them unchanged.
3. The learner normalises every rank's loss by the GLOBAL normaliser of the mini-batch (loss
   tokens or trajectories, summed over ranks) and sums the gradients over ranks before
   clipping: the update equals a single-process update on the union batch, in every
   aggregation mode. Replicas stay identical because every rank applies the same update.
4. Rank 0 writes metrics and checkpoints; each rank writes its own rollout-log part.

Outside torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) everything here is a no-op: rank 0 of
a world of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "all_reduce_grads",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "gather_objects",
    "init_from_env",
    "main_first",
    "reduce_metrics",
    "shard",
    "shutdown",
    "world",
]

T = TypeVar("T")

# Gradients cross the wire in buckets of at most this many elements (64 MB in float32): one
# collective per bucket rather than per parameter, without a second copy of every gradient.
_BUCKET_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its
    machine (the GPU it uses), and the process-group ``backend`` (None outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics and checkpoints and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """More than one process: collectives are needed."""
        return self.size > 1


def world() -> World:
    """The current process group's view (rank 0 of 1 when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def init_from_env() -> World:
    """Join torchrun's process group if the environment names one (``WORLD_SIZE`` > 1).

    The backend is NCCL when CUDA is available (each process then uses GPU ``LOCAL_RANK``),
    gloo otherwise. Idempotent: an initialised group is returned as is."""
    if dist.is_available() and dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: start data-parallel runs with "
            "torchrun --nproc-per-node K -m treegrpo.train ..."
        )
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return world()


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], w: World | None = None) -> list[T]:
    """This rank's contiguous share of ``items`` (shares differ in length by at most one)."""
    w = w or world()
    n, k = len(items), w.size
    start, end = (w.rank * n) // k, ((w.rank + 1) * n) // k
    return list(items[start:end])


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world().parallel:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks: for work that fills an on-disk
    cache (synthetic world, model conversion, warm start, retriever index) that the others
    then read instead of racing to write it."""
    w = world()
    if w.parallel and not w.is_main:
        dist.barrier()
    yield
    if w.parallel and w.is_main:
        dist.barrier()


def _device() -> torch.device:
    """Where collective buffers live: NCCL reduces CUDA tensors, gloo CPU ones."""
    if world().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over ranks (float64; the same length on every rank)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maxima of ``values`` over ranks (float64; the same length on every rank)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values: Sequence[float], op: Any) -> list[float]:
    if not world().parallel:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's ``.grad`` over ranks, in place (a missing grad counts as zeros:
    a rank whose micro-batches had no loss token still takes part)."""
    if not world().parallel:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        grad = p.grad
        assert grad is not None
        if bucket and (size + grad.numel() > _BUCKET_ELEMENTS or grad.dtype != bucket[0].dtype):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (pickled; for small things)."""
    if not world().parallel:
        return [obj]
    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


# Metric names reduced by sum (counts and totals over the step's data) rather than mean.
_SUMMED = ("tree/generated_tokens", "tree/prefill_tokens", "tree/tool_calls")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over ranks, the same on every rank: totals (``perf/*_tokens``,
    ``tree/generated_tokens``, ...) are summed, ``*/max`` and ``timing_s/*`` (the slowest rank)
    take the max, ``*/min`` the min, everything else the mean over ranks. Means over ranks are
    exact for per-leaf means when ranks hold the same number of prompts (the trainer's split)
    and approximate for ratios of per-rank totals (``tree/prefix_cache_hit_rate``); the
    learner's ``actor/*`` metrics are already global (the same on every rank)."""
    if not world().parallel:
        return dict(metrics)
    every = gather_objects(metrics)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in every for k in m):
        values = [float(m[key]) for m in every if key in m]
        if key in _SUMMED or (key.startswith("perf/") and key.endswith("_tokens")):
            out[key] = sum(values)
        elif key.endswith("/max") or key.startswith("timing_s/"):
            out[key] = max(values)
        elif key.endswith("/min"):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out
