"""Test doubles for rollouts: a scripted engine whose 'policy' is a plain function of the
decoded context, and a retriever that returns one fixed page per query."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from treegrpo.engine.base import Completion, FinishReason, GenerateRequest
from treegrpo.env import Document

Policy = Callable[[str, int], tuple[str, str]]  # (context text, sample index) -> (text, finish)


class ScriptedEngine:
    """Deterministic engine: each sample's text is ``policy(context, sample index)`` and every
    token's log-prob ``log_prob(sample index)``. Records the requests it got.

    With ``stops=True`` it also ends a text as a real engine does: at its first stop string
    (kept), else at ``max_new_tokens`` (finish ``length``), else with the policy's finish; and
    ``context_length`` then refuses a prompt that leaves no room to generate."""

    def __init__(
        self,
        tokenizer: Any,
        policy: Policy,
        log_prob: Callable[[int], float] = lambda i: -0.5 - 0.1 * i,
        *,
        stops: bool = False,
        context_length: int | None = None,
    ) -> None:
        self.tokenizer, self.policy, self.log_prob = tokenizer, policy, log_prob
        self.stops = stops
        if context_length is not None:
            self.context_length = context_length
        self.requests: list[GenerateRequest] = []

    @property
    def weight_version(self) -> str:
        return "0"

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        self.requests.extend(requests)
        return [[self._sample(r, i) for i in range(r.sampling.n)] for r in requests]

    def _sample(self, r: GenerateRequest, i: int) -> Completion:
        text, finish = self.policy(self.tokenizer.decode(list(r.input_ids)), i)
        if self.stops:
            limit = getattr(self, "context_length", None)
            if limit is not None and len(r.input_ids) + r.sampling.max_new_tokens >= limit:
                raise ValueError(f"{len(r.input_ids)} + {r.sampling.max_new_tokens} >= {limit}")
            ends = [(text.find(s) + len(s), s) for s in r.sampling.stop if s in text]
            if ends:
                text, finish = text[: min(ends)[0]], "stop"
            if len(self.tokenizer.encode(text, add_special_tokens=False)) > (
                r.sampling.max_new_tokens
            ):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                text, finish = self.tokenizer.decode(ids[: r.sampling.max_new_tokens]), "length"
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        matched = next((s for s in r.sampling.stop if text.endswith(s)), None)
        return Completion(
            output_ids=ids,
            log_probs=tuple(self.log_prob(i) for _ in ids),
            finish=FinishReason(finish, matched=matched if finish == "stop" else None),
            cached_tokens=0,
            prompt_tokens=len(r.input_ids),
            weight_version="0",
        )

    async def close(self) -> None:
        pass


class FixedRetriever:
    """One page per query, titled "Page", whose text names the query."""

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        return [[Document("1", f'"Page"\nabout {q}')] for q in queries]
