"""The one generation interface every engine implements (embedded transformers, SGLang client).

Token ids in, token ids out: the rollout never re-tokenises what the policy generated. One call
to :meth:`Engine.generate` takes the requests of one agent step across all active branches;
requests with ``n > 1`` are sibling expansions of one node and share its prefix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "Completion",
    "Engine",
    "FinishReason",
    "GenerateRequest",
    "PolicySource",
    "SamplingParams",
    "WeightSync",
]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling (SGLang's ``sampling_params`` names and meanings).

    ``max_new_tokens``: tokens to generate at most (the per-turn action limit).
    ``temperature``: 0 means greedy. ``top_p``: nucleus mass in (0, 1]. ``top_k``: -1 for all.
    ``stop``: strings that end generation; the matched text stays in the output.
    ``stop_token_ids``: ids that end generation (EOS is added by the engine); kept in the output.
    ``n``: samples from the same prompt (sibling branches).
    """

    max_new_tokens: int = 500
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (all tokens) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class GenerateRequest:
    """Continue ``input_ids``. ``key`` routes requests (e.g. the tree id: all requests of one
    tree go to one server, so its prefixes stay in one cache)."""

    input_ids: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    key: str | None = None


@dataclass(frozen=True)
class FinishReason:
    """Why generation stopped: ``stop`` (``matched`` = the stop string or token id), ``length``
    (``max_new_tokens`` reached) or ``abort`` (``message`` says why)."""

    type: Literal["stop", "length", "abort"]
    matched: str | int | None = None
    message: str | None = None


@dataclass(frozen=True)
class Completion:
    """One sample: ``output_ids`` (including a matched stop token or the tokens of a matched stop
    string), ``log_probs`` of each output token under the sampling policy, how it finished, how
    many prompt tokens were served from a prefix cache, and the weight version that made it."""

    output_ids: tuple[int, ...]
    log_probs: tuple[float, ...]
    finish: FinishReason
    cached_tokens: int
    prompt_tokens: int
    weight_version: str


@runtime_checkable
class Engine(Protocol):
    """Generates continuations. ``generate`` returns, per request, its ``n`` completions."""

    @property
    def weight_version(self) -> str: ...

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- weight sync


@dataclass(frozen=True)
class PolicySource:
    """The trainer's side of a weight sync: where an engine gets the learner's weights.

    ``model`` / ``tokenizer``: the policy the learner trains (a transformers model; under FSDP2
    sharded in place, ``sharded``). ``state_dict(every_rank)``: its full weights, gathered
    from the shards (a collective every rank calls; with ``every_rank=False`` only rank 0 gets
    them). ``directory``: where a sync through disk writes them. ``is_main``: this process
    writes and pushes (rank 0); ``barrier()`` waits for every rank; ``run(awaitable)`` runs a
    coroutine on the trainer's event loop."""

    model: Any
    tokenizer: Any
    state_dict: Callable[[bool], dict[str, Any]]
    directory: Path
    sharded: bool = False
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    run: Callable[[Awaitable[Any]], Any] = lambda awaitable: None


class WeightSync(Protocol):
    """How one engine follows the learner's weights; ``engine.weight_sync(source)`` makes it
    (each engine its own), so the trainer never asks which kind of engine it holds.

    ``on_step`` / ``hold``: given to the learner, which calls ``on_step()`` after each optimizer
    step inside ``with hold():`` (None: nothing to do there). :meth:`start` runs once at
    set-up, before anything is written into the run directory (it forms what the sync needs,
    e.g. a process group with the servers, and fails there if it cannot); :meth:`push` runs
    after every update and once at set-up; :meth:`weights_loaded` after a checkpoint loaded
    weights into
    ``source.model``. :meth:`state_dict` / :meth:`load_state_dict`: the engine's part of a
    checkpoint; ``keeps_state`` False where it keeps nothing (``state_dict`` is then None)."""

    keeps_state: bool
    on_step: Callable[[], Any] | None
    hold: Callable[[], AbstractContextManager[Any]] | None

    def start(self) -> None: ...

    def push(self, version: int) -> None: ...

    def weights_loaded(self) -> None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
