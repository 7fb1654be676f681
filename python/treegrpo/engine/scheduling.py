"""The embedded engine's scheduling: one generate call laid out in a KV slab, prefilled in
chunks, then decoded in lock step.

1. :meth:`Scheduler.plan`: requests with the same ``input_ids`` share one prefill, so ``n``
   siblings (or identical requests) prefill their prompt once; each sample gets its own row.
   Prompts are ordered by the tokens they will compute, so a prefill chunk holds similar
   lengths; slab rows: each prompt's first row (it runs the prefill) in that order, then the
   other rows.
2. The slab (:class:`~treegrpo.engine.kv_cache.Slab`): every prompt right-aligned at column
   ``P`` (the longest prompt), generated tokens after it. Rows of different lengths are
   left-padded; attention uses an explicit 4-D additive mask and explicit per-row
   ``position_ids``, so the RoPE positions baked into cached keys stay right.
3. Prefill in chunks of at most ``max_batch_tokens`` padded new tokens. A chunk first copies
   each prompt's reusable cached prefix into the slab, then runs only the remaining tokens
   (long prompts in several pieces). Once a prompt is complete its KV is inserted into the
   cache, so a later chunk of the same call already reuses it.
4. Copy each prompt's KV into its siblings' rows and decode all rows in lock step, one token per
   forward, logits for the last position only (never the full ``(batch, time, vocab)`` tensor).
   A row finishes on a stop token id or EOS (kept in the output), on a stop string
   (:mod:`treegrpo.engine.stops`: the tokens up to the one completing it are kept), at
   ``max_new_tokens``, at the model's context length, or when aborted. At finish its sequence
   goes into the cache by SGLang's rule. Finished rows are compacted out of the slab once they
   are a quarter of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from treegrpo.engine.base import FinishReason, GenerateRequest, SamplingParams
from treegrpo.engine.kv_cache import PrefixCache, Slab, slab_cache
from treegrpo.engine.sampling import Sampler
from treegrpo.engine.stops import StopMatcher

__all__ = ["Call", "Prompt", "Row", "Scheduler"]

# A row is dropped from the slab (a copy of its live KV) once this share of rows has finished.
_COMPACT_FRACTION = 0.25


@dataclass
class Prompt:
    ids: list[int]
    rows: list[int] = field(default_factory=list)  # slab rows sampling from it (first: prefill)
    cached: int = 0
    done: int = 0  # positions whose KV is in the slab
    logits: torch.Tensor | None = None


@dataclass
class Row:
    request: int
    sample: int
    prompt: int
    params: SamplingParams
    limit: int  # max new tokens, capped by the context
    stop_ids: frozenset[int]
    stops: StopMatcher
    output: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


class Call:
    """One generate call as :meth:`EmbeddedEngine.abort` sees it."""

    def __init__(self, keys: list[str | None]) -> None:
        self.keys = keys
        self.aborted = [False] * len(keys)


class Aborts(Protocol):
    """What a run reads of its call: ``aborted[request]`` (a :class:`Call`, or several calls
    run as one)."""

    @property
    def aborted(self) -> Any: ...


class Scheduler:
    """Runs calls on ``model`` with ``cache`` and ``sampler`` (see the module docstring);
    ``count(**deltas)`` adds to the engine's counters (:class:`EngineStats` names)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache: PrefixCache,
        sampler: Sampler,
        count: Callable[..., None],
        *,
        max_batch_tokens: int,
        context_length: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.sampler = sampler
        self.count = count
        self.max_batch_tokens = max_batch_tokens
        self.context_length = context_length
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.eos_token_ids = eos_token_ids

    def _decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def plan(
        self, requests: Sequence[GenerateRequest], ids: list[list[int]]
    ) -> tuple[list[Prompt], list[Row]]:
        """The call's prompts (one per distinct ``input_ids``) and rows (one per sample), in
        slab order (see the module docstring)."""
        prompts: list[Prompt] = []
        by_ids: dict[tuple[int, ...], int] = {}
        rows: list[Row] = []
        for r, (req, prompt_ids) in enumerate(zip(requests, ids, strict=True)):
            p = by_ids.setdefault(tuple(prompt_ids), len(prompts))
            if p == len(prompts):
                prompts.append(Prompt(prompt_ids))
            sp = req.sampling
            stop = (sp.stop,) if isinstance(sp.stop, str) else sp.stop
            stops = StopMatcher(stop, self._decode_text)
            limit = min(sp.max_new_tokens, self.context_length - len(prompt_ids))
            stop_ids = self.eos_token_ids | frozenset(int(t) for t in sp.stop_token_ids)
            for s in range(sp.n):
                rows.append(Row(r, s, p, sp, limit, stop_ids, stops))
        ranked = sorted(range(len(prompts)), key=lambda p: self.uncached(prompts[p].ids))
        new_index = {old: new for new, old in enumerate(ranked)}
        prompts = [prompts[p] for p in ranked]
        for row in rows:
            row.prompt = new_index[row.prompt]
        firsts: dict[int, int] = {}
        for i, row in enumerate(rows):
            firsts.setdefault(row.prompt, i)
        first_rows = [firsts[p] for p in range(len(prompts))]
        taken = set(first_rows)
        rows = [rows[i] for i in first_rows] + [r for i, r in enumerate(rows) if i not in taken]
        for i, row in enumerate(rows):
            prompts[row.prompt].rows.append(i)
        return prompts, rows

    def run(self, prompts: list[Prompt], rows: list[Row], call: Aborts) -> None:
        longest = max(len(p.ids) for p in prompts)
        decode_columns = max(0, max(row.limit for row in rows) - 1)
        param = next(self.model.parameters())
        slab = Slab(
            self.layers,
            len(rows),
            self.kv_heads,
            longest + decode_columns,
            self.head_dim,
            param.dtype,
            param.device,
        )
        # Attention reads masked columns too, and 0 * NaN is NaN: zero each prompt's left padding
        # (its other prompt columns are all written before they are read; siblings copy them).
        for prompt in prompts:
            slab.buf[:, :, prompt.rows[0], :, : longest - len(prompt.ids)].zero_()
        cache = slab_cache(slab, self.layers)

        evicted = self.cache.evicted
        start = time.perf_counter()
        self._prefill(prompts, slab, cache, longest)
        # Siblings: copy each prompt's KV into the rest of its rows.
        src = [p.rows[0] for p in prompts for _ in p.rows[1:]]
        dst = [r for p in prompts for r in p.rows[1:]]
        if dst:
            slab.buf[:, :, dst, :, :longest] = slab.buf[:, :, src, :, :longest]
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        self._decode(prompts, rows, slab, cache, longest, call)
        self.count(
            prefill_seconds=prefill_s,
            decode_seconds=time.perf_counter() - start,
            evicted_tokens=self.cache.evicted - evicted,
        )

    def uncached(self, ids: list[int]) -> int:
        """Tokens of ``ids`` a prefill would compute if the cache stays as it is."""
        return len(ids) - self.cache.reuse(ids)[0]

    def _prefill(self, prompts: list[Prompt], slab: Slab, cache: Any, longest: int) -> None:
        """Run every prompt's uncached tokens; leaves each prompt's last-position logits."""
        # Prompt p's first slab row is row p, so a chunk of consecutive prompts is a contiguous
        # row range. Cut where rows x widest piece would pass max_batch_tokens.
        chunks: list[list[int]] = []
        current: list[int] = []
        widest = 0
        for p in range(len(prompts)):
            width = self.uncached(prompts[p].ids)
            if current and (len(current) + 1) * max(widest, width) > self.max_batch_tokens:
                chunks.append(current)
                current, widest = [], 0
            current.append(p)
            widest = max(widest, width)
        if current:
            chunks.append(current)

        for chunk in chunks:
            for p in chunk:
                self._load_prefix(prompts[p], slab, longest)
            while True:
                active = [p for p in chunk if prompts[p].done < len(prompts[p].ids)]
                if not active:
                    break
                self._prefill_forward(prompts, active, chunk, slab, cache, longest)
            for p in chunk:
                prompt = prompts[p]
                row = prompt.rows[0]
                base = longest - len(prompt.ids)
                self.cache.insert(prompt.ids, slab.buf[:, :, row], base)

    def _load_prefix(self, prompt: Prompt, slab: Slab, longest: int) -> None:
        """Copy the prompt's reusable cached prefix (all but its last token) into its first row."""
        length, pieces = self.cache.reuse(prompt.ids)
        row = prompt.rows[0]
        base = longest - len(prompt.ids)
        for kv, first in pieces:
            slab.buf[:, :, row, :, base + first : base + first + kv.shape[3]] = kv
        prompt.cached = prompt.done = length
        self.count(
            prompt_tokens=len(prompt.ids),
            cached_tokens=length,
            prefill_tokens=len(prompt.ids) - length,
        )

    def _prefill_forward(
        self,
        prompts: list[Prompt],
        active: list[int],
        chunk: list[int],
        slab: Slab,
        cache: Any,
        longest: int,
    ) -> None:
        """One forward over the chunk's rows: each active prompt runs its next piece."""
        # Rows of the chunk are contiguous; inactive ones ride along with one pad query.
        r0, r1 = prompts[chunk[0]].rows[0], prompts[chunk[-1]].rows[0] + 1
        n_rows = r1 - r0
        width = max(1, self.max_batch_tokens // max(1, len(active)))
        spans = {
            p: (prompts[p].done, min(len(prompts[p].ids), prompts[p].done + width)) for p in active
        }
        q_len = max(e - s for s, e in spans.values())
        device = slab.buf.device

        input_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        position_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        # Per row: the slab column of each query (-1 for pads) and the valid key columns.
        q_cols = torch.full((n_rows, q_len), -1, dtype=torch.long)
        key_lo = torch.zeros(n_rows, dtype=torch.long)
        key_hi = torch.zeros(n_rows, dtype=torch.long)
        w_rows, w_cols, s_rows, s_cols = [], [], [], []
        for p in chunk:
            prompt = prompts[p]
            i = prompt.rows[0] - r0
            base = longest - len(prompt.ids)
            key_lo[i] = base
            if p not in spans:
                key_hi[i] = base + len(prompt.ids)
                continue
            s, e = spans[p]
            n = e - s
            input_ids[i, q_len - n :] = torch.tensor(prompt.ids[s:e])
            position_ids[i, q_len - n :] = torch.arange(s, e)
            q_cols[i, q_len - n :] = torch.arange(base + s, base + e)
            key_hi[i] = base + e
            w_rows.append(torch.full((n,), prompt.rows[0]))
            w_cols.append(torch.arange(base + s, base + e))
            s_rows.append(torch.full((n,), i))
            s_cols.append(torch.arange(q_len - n, q_len))
        lo, hi = int(key_lo.min()), int(key_hi.max())
        # A row whose piece ends before ``hi`` has unwritten (masked) columns in the window:
        # make them finite.
        for p in chunk:
            end = int(key_hi[prompts[p].rows[0] - r0])
            if end < hi:
                slab.buf[:, :, prompts[p].rows[0], :, end:hi].zero_()
        k_cols = torch.arange(lo, hi)
        valid = (k_cols[None, :] >= key_lo[:, None]) & (k_cols[None, :] < key_hi[:, None])
        causal = k_cols[None, None, :] <= q_cols[:, :, None]
        pad = (q_cols < 0)[:, :, None]
        allowed = valid[:, None, :] & (causal | pad)
        mask = _additive(allowed[:, None], slab.buf.dtype).to(device)

        slab.rows = (r0, r1)
        slab.read = (lo, hi)
        slab.scatter = (
            torch.cat(w_rows).to(device),
            torch.cat(w_cols).to(device),
            torch.cat(s_rows).to(device),
            torch.cat(s_cols).to(device),
        )
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        slab.scatter = None
        self.count(forward_passes=1)
        logits = out.logits[:, -1].float()
        for p, (_, e) in spans.items():
            prompts[p].done = e
            if e == len(prompts[p].ids):
                prompts[p].logits = logits[prompts[p].rows[0] - r0]

    def _decode(
        self,
        prompts: list[Prompt],
        rows: list[Row],
        slab: Slab,
        cache: Any,
        longest: int,
        call: Aborts,
    ) -> None:
        """Sample the first token of every row from its prompt's logits, then decode."""
        device = slab.buf.device
        live = list(range(len(rows)))  # slab row i holds rows[live[i]]
        for row in rows:
            if row.limit == 0:
                row.finish = FinishReason("length")
            elif call.aborted[row.request]:
                row.finish = FinishReason("abort", message="aborted before generation")
        logits = torch.stack([prompts[row.prompt].logits for row in rows])  # type: ignore[misc]
        self._sample_step(rows, live, logits)
        step = 0
        while True:
            self._finish_rows(prompts, rows, live, slab, longest, step, call)
            active = [i for i, r in enumerate(live) if rows[r].finish is None]
            if not active:
                return
            if len(active) < len(live) and len(live) - len(active) >= _COMPACT_FRACTION * len(live):
                lo = longest - max(len(prompts[rows[live[i]].prompt].ids) for i in active)
                self._compact(slab, active, lo, longest + step)
                live = [live[i] for i in active]
            # Feed each row's last sampled token at column longest + step.
            column = longest + step
            input_ids = torch.tensor(
                [[rows[r].output[-1] if rows[r].output else 0] for r in live], dtype=torch.long
            )
            # Finished rows still in the slab run on: keep their positions inside the context.
            position_ids = torch.tensor(
                [
                    [min(len(prompts[rows[r].prompt].ids) + step, self.context_length - 1)]
                    for r in live
                ],
                dtype=torch.long,
            )
            lo = longest - max(len(prompts[rows[r].prompt].ids) for r in live)
            k_cols = torch.arange(lo, column + 1)
            starts = torch.tensor([longest - len(prompts[rows[r].prompt].ids) for r in live])
            allowed = k_cols[None, :] >= starts[:, None]
            mask = _additive(allowed[:, None, None, :], slab.buf.dtype).to(device)
            slab.rows = (0, len(live))
            slab.read = (lo, column + 1)
            slab.column = column
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=mask,
                position_ids=position_ids.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.count(forward_passes=1)
            step += 1
            self._sample_step(rows, live, out.logits[:, -1].float())

    def _finish_rows(
        self,
        prompts: list[Prompt],
        rows: list[Row],
        live: list[int],
        slab: Slab,
        longest: int,
        step: int,
        call: Aborts,
    ) -> None:
        """Check the rows that just got a token; cache the KV of the ones that finished."""
        for i, r in enumerate(live):
            row = rows[r]
            if row.finish is None:
                row.finish = self._check_finish(row, call)
                if row.finish is None:
                    continue
                prompt = prompts[row.prompt]
                base = longest - len(prompt.ids)
                # Prompt at [base, longest), output token j (fed at step j + 1) at longest + j.
                assert len(row.output) - 1 <= step
                self.cache.insert_finished(prompt.ids, row.output, slab.buf[:, :, i], base)

    def _check_finish(self, row: Row, call: Aborts) -> FinishReason | None:
        if not row.output:
            return None
        last = row.output[-1]
        if last in row.stop_ids:
            return FinishReason("stop", matched=last)
        matched = row.stops.check(row.output)
        if matched is not None:
            return FinishReason("stop", matched=matched)
        if len(row.output) >= row.limit:
            return FinishReason("length")
        if call.aborted[row.request]:
            return FinishReason("abort", message="aborted")
        return None

    def _compact(self, slab: Slab, keep: list[int], lo: int, hi: int) -> None:
        """Move the slab rows ``keep`` to the front (columns ``[lo, hi)``, the ones in use)."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=slab.buf.device)
        slab.buf[:, :, : len(keep), :, lo:hi] = slab.buf[:, :, index, :, lo:hi]

    def _sample_step(self, rows: list[Row], live: list[int], logits: torch.Tensor) -> None:
        """Sample one token for every unfinished row of ``live`` from ``logits`` (one per live
        slab row, float32)."""
        todo = [i for i, r in enumerate(live) if rows[r].finish is None]
        if not todo:
            return
        tokens, log_probs = self.sampler.step(logits[todo], [rows[live[i]].params for i in todo])
        self.count(decode_tokens=len(todo))
        for i, t, lp in zip(todo, tokens, log_probs, strict=True):
            row = rows[live[i]]
            row.output.append(t)
            row.log_probs.append(lp)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask as an additive float mask (0 / most negative finite)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
