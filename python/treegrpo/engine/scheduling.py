"""The embedded engine's scheduling: continuous batching over one KV slab.

The scheduler keeps a *running batch*: the rows (one per sample) of every call admitted and not
yet finished, in one :class:`~treegrpo.engine.kv_cache.Slab`. The engine's worker alternates two
things until the batch is empty and no call waits (:class:`EmbeddedEngine` does the looping):

- :meth:`Scheduler.admit`: calls that arrived since the last step join the batch. Their requests
  with the same ``input_ids`` share one prefill, so ``n`` siblings (or identical requests)
  prefill their prompt once; each sample gets its own slab row. The new prompts are ordered by
  the tokens they will compute, so a prefill chunk holds similar lengths, and prefilled in chunks
  of at most ``max_batch_tokens`` padded new tokens: a chunk first copies each prompt's reusable
  cached prefix into its row, then runs only the remaining tokens (long prompts in several
  pieces); a complete prompt's KV goes into the prefix cache at once, so a later chunk already
  reuses it. Each prompt's KV is copied into its siblings' rows and every new row samples its
  first token.
- :meth:`Scheduler.step`: one decode forward over every row of the batch, one token each, logits
  for the last position only (never the full ``(batch, time, vocab)`` tensor). A call admitted
  while others decode therefore joins them at the next step instead of waiting for them.

Layout: every row holds its sequence left-aligned, prompt at columns ``[0, len(prompt))`` and
output after it, so position = column; each row writes its next token at its own column, and
attention uses an explicit 4-D additive mask (a row sees its columns up to the one it writes) and
explicit ``position_ids``. The slab grows (a copy of the live rows) when the batch needs more
rows or columns than it has; finished rows are compacted out once they are a quarter of the
batch (until then they run on, writing column 0, which nothing reads any more). Attention reads
masked columns too, and ``0 * NaN`` is NaN, so every column a forward may read is finite: the
slab is zeroed column range by column range ahead of the widest read or write
(:meth:`Scheduler._zero_to`), never behind it.

A row finishes on a stop token id or EOS (kept in the output), on a stop string
(:mod:`treegrpo.engine.stops`: the tokens up to the one completing it are kept), at
``max_new_tokens``, at the model's context length, or when its call aborts it. At finish its
sequence goes into the prefix cache by SGLang's rule. A call is done when all its rows are;
:meth:`Scheduler.finished` hands it back with its :class:`Completion` lists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from treegrpo.engine.base import Completion, FinishReason, GenerateRequest, SamplingParams
from treegrpo.engine.kv_cache import PrefixCache, Slab, slab_cache
from treegrpo.engine.sampling import Sampler
from treegrpo.engine.stops import StopMatcher

__all__ = ["Call", "Job", "Prompt", "Row", "Scheduler"]

# Finished rows are dropped from the slab (a copy of the live rows' KV) once they are this share
# of the batch.
_COMPACT_FRACTION = 0.25
# Columns zeroed at a time ahead of the widest read (amortises the zeroing over decode steps).
_ZERO_AHEAD = 64


@dataclass
class Prompt:
    ids: list[int]
    rows: list[int] = field(default_factory=list)  # slab rows sampling from it (first: prefill)
    cached: int = 0
    done: int = 0  # positions whose KV is in the slab
    logits: torch.Tensor | None = None


class Call:
    """One generate call as :meth:`EmbeddedEngine.abort` sees it: the requests' keys, a flag per
    request (abort it at the next token) and ``cancelled`` (its caller went away: if it has
    not joined the batch yet, it never does)."""

    def __init__(self, keys: list[str | None]) -> None:
        self.keys = keys
        self.aborted = [False] * len(keys)
        self.cancelled = False


@dataclass
class Job:
    """A call in the scheduler: its requests, their validated ``ids`` and how to hand back the
    result (``deliver`` gets the completions per request, or the exception that failed it)."""

    requests: Sequence[GenerateRequest]
    ids: list[list[int]]
    call: Call
    deliver: Callable[[list[list[Completion]] | BaseException], None]
    rows: list[Row] = field(default_factory=list)
    version: str = ""
    # Per request: an earlier call admitted in the same step has this prompt (see admit).
    shared: list[bool] = field(default_factory=list)


@dataclass
class Row:
    job: Job
    request: int  # index of the request in its job
    sample: int
    prompt: Prompt
    params: SamplingParams
    limit: int  # max new tokens, capped by the context
    stop_ids: frozenset[int]
    stops: StopMatcher
    output: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def column(self) -> int:
        """The column (= position) where the row's last sampled token is written when fed."""
        return len(self.prompt.ids) + len(self.output) - 1


class Scheduler:
    """The running batch on ``model`` with ``cache`` and ``sampler`` (see the module
    docstring); ``count(**deltas)`` adds to the engine's counters (:class:`EngineStats` names).
    Not thread-safe: the engine calls it from one worker at a time, under its model lock."""

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
        self.jobs: list[Job] = []
        self._slab: Slab | None = None
        self._cache_view: Any = None
        self._live: list[Row] = []  # slab row i holds _live[i]
        self._used = 0  # slab rows ever used since the slab was made: finite below _zeroed
        self._zeroed = 0  # columns [0, _zeroed) of the used rows are finite

    # ---- state

    @property
    def idle(self) -> bool:
        """No call in the batch."""
        return not self.jobs

    def reset(self) -> None:
        """Drop the batch and its slab (after a failure: the caller fails the jobs)."""
        self.jobs = []
        self._live = []
        self._slab = None
        self._cache_view = None
        self._used = self._zeroed = 0

    def uncached(self, ids: list[int]) -> int:
        """Tokens of ``ids`` a prefill would compute if the cache stays as it is."""
        return len(ids) - self.cache.reuse(ids)[0]

    def _decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    # ---- joining the batch

    def plan(self, jobs: Sequence[Job]) -> tuple[list[Prompt], list[Row]]:
        """The jobs' prompts (one per distinct ``input_ids`` over all of them) and rows (one per
        sample), in slab order: each prompt's first row (it runs the prefill), prompts ordered by
        the tokens they will compute, then the other rows."""
        prompts: list[Prompt] = []
        by_ids: dict[tuple[int, ...], Prompt] = {}
        rows: list[Row] = []
        for job in jobs:
            for r, (req, prompt_ids) in enumerate(zip(job.requests, job.ids, strict=True)):
                key = tuple(prompt_ids)
                prompt = by_ids.get(key)
                if prompt is None:
                    prompt = by_ids[key] = Prompt(prompt_ids)
                    prompts.append(prompt)
                sp = req.sampling
                stop = (sp.stop,) if isinstance(sp.stop, str) else sp.stop
                stops = StopMatcher(stop, self._decode_text)
                limit = min(sp.max_new_tokens, self.context_length - len(prompt_ids))
                stop_ids = self.eos_token_ids | frozenset(int(t) for t in sp.stop_token_ids)
                for s in range(sp.n):
                    row = Row(job, r, s, prompt, sp, limit, stop_ids, stops)
                    rows.append(row)
                    job.rows.append(row)
        prompts.sort(key=lambda p: self.uncached(p.ids))
        firsts: dict[int, Row] = {}
        for row in rows:
            firsts.setdefault(id(row.prompt), row)
        first_rows = [firsts[id(p)] for p in prompts]
        taken = {id(r) for r in first_rows}
        return prompts, first_rows + [r for r in rows if id(r) not in taken]

    def admit(self, jobs: Sequence[Job], version: str) -> None:
        """Add the jobs' rows to the batch: prefill their prompts, copy each prompt's KV to its
        siblings, sample every new row's first token (see the module docstring). A request whose
        prompt an earlier job of ``jobs`` has shares that prefill and reports (and counts) what it
        would have after that job ran: all but its last token cached, SGLang's rule, so a call's
        accounting does not depend on which calls happened to join together."""
        jobs = [j for j in jobs if j.requests]
        if not jobs:
            return
        start = time.perf_counter()
        evicted = self.cache.evicted
        seen: set[tuple[int, ...]] = set()
        for job in jobs:
            job.version = version
            job.shared = [tuple(x) in seen for x in job.ids]
            seen.update(tuple(x) for x in job.ids)
            for x, shared in zip(job.ids, job.shared, strict=True):
                if shared:
                    self.count(prompt_tokens=len(x), cached_tokens=len(x) - 1, prefill_tokens=1)
        prompts, rows = self.plan(jobs)
        self.jobs.extend(jobs)
        first = self._place(rows)
        for i, row in enumerate(rows, start=first):
            row.prompt.rows.append(i)
        self._zero_to(max(len(p.ids) for p in prompts))
        self._prefill(prompts)
        slab = self._slab
        assert slab is not None
        # Siblings: copy each prompt's KV into the rest of its rows.
        src = [p.rows[0] for p in prompts for _ in p.rows[1:]]
        dst = [r for p in prompts for r in p.rows[1:]]
        if dst:
            width = max(len(p.ids) for p in prompts)
            slab.buf[:, :, dst, :, :width] = slab.buf[:, :, src, :, :width]
        for row in rows:
            if row.limit == 0:
                row.finish = FinishReason("length")
            elif row.job.call.aborted[row.request]:
                row.finish = FinishReason("abort", message="aborted before generation")
        self._sample(rows, torch.stack([r.prompt.logits for r in rows]))  # type: ignore[misc]
        for p in prompts:
            p.logits = None
        self._finish(rows, first)
        self.count(
            prefill_seconds=time.perf_counter() - start,
            evicted_tokens=self.cache.evicted - evicted,
        )

    def _place(self, rows: list[Row]) -> int:
        """Put ``rows`` after the live ones, growing the slab if it is too small (the copy then
        leaves the finished rows behind); returns the slab row of the first."""
        self._compact()
        need_columns = max(max(len(r.prompt.ids) + max(r.limit - 1, 0) for r in rows), 1)
        slab = self._slab
        old_rows = 0 if slab is None else slab.buf.shape[2]
        old_columns = 0 if slab is None else slab.buf.shape[4]
        if slab is None or len(self._live) + len(rows) > old_rows or need_columns > old_columns:
            keep = [i for i, r in enumerate(self._live) if r.finish is None]
            need_rows = len(keep) + len(rows)
            # Geometric growth: a stream of small joins copies the live KV O(log) times, and
            # torch.empty leaves the pages nobody writes untouched. The first slab is the size
            # of its first rows.
            if slab is not None and need_rows > old_rows:
                need_rows = max(need_rows, 2 * old_rows)
            if slab is not None and need_columns > old_columns:
                need_columns = max(need_columns, min(2 * old_columns, self.context_length))
            param = next(self.model.parameters())
            grown = Slab(
                self.layers,
                max(need_rows, old_rows),
                self.kv_heads,
                max(need_columns, old_columns),
                self.head_dim,
                param.dtype,
                param.device,
            )
            if slab is not None and keep:
                index = torch.tensor(keep, device=slab.buf.device)
                grown.buf[:, :, : len(keep), :, : self._zeroed] = slab.buf[
                    :, :, index, :, : self._zeroed
                ]
            self._live = [self._live[i] for i in keep]
            self._slab, slab = grown, grown
            self._cache_view = slab_cache(slab, self.layers)
            self._used = len(keep)
        live = len(self._live)
        end = live + len(rows)
        if end > self._used and self._zeroed:
            slab.buf[:, :, self._used : end, :, : self._zeroed].zero_()
        self._used = max(self._used, end)
        self._live.extend(rows)
        return live

    def _zero_to(self, columns: int) -> None:
        """Make columns ``[0, columns)`` of every used row finite (zeroing ahead of what was)."""
        slab = self._slab
        assert slab is not None
        if columns <= self._zeroed:
            return
        hi = min(slab.buf.shape[4], max(columns, self._zeroed + _ZERO_AHEAD))
        slab.buf[:, :, : self._used, :, self._zeroed : hi].zero_()
        self._zeroed = hi

    def _prefill(self, prompts: list[Prompt]) -> None:
        """Run every prompt's uncached tokens; leaves each prompt's last-position logits."""
        # Prompt p's first slab row is row first + p, so a chunk of consecutive prompts is a
        # contiguous row range. Cut where rows x widest piece would pass max_batch_tokens.
        chunks: list[list[Prompt]] = []
        current: list[Prompt] = []
        widest = 0
        for prompt in prompts:
            width = self.uncached(prompt.ids)
            if current and (len(current) + 1) * max(widest, width) > self.max_batch_tokens:
                chunks.append(current)
                current, widest = [], 0
            current.append(prompt)
            widest = max(widest, width)
        if current:
            chunks.append(current)
        slab = self._slab
        assert slab is not None
        for chunk in chunks:
            for prompt in chunk:
                self._load_prefix(prompt, slab)
            while True:
                active = [p for p in chunk if p.done < len(p.ids)]
                if not active:
                    break
                self._prefill_forward(active, chunk, slab)
            for prompt in chunk:
                self.cache.insert(prompt.ids, slab.buf[:, :, prompt.rows[0]], 0)

    def _load_prefix(self, prompt: Prompt, slab: Slab) -> None:
        """Copy the prompt's reusable cached prefix (all but its last token) into its first row."""
        length, pieces = self.cache.reuse(prompt.ids)
        row = prompt.rows[0]
        for kv, first in pieces:
            slab.buf[:, :, row, :, first : first + kv.shape[3]] = kv
        prompt.cached = prompt.done = length
        self.count(
            prompt_tokens=len(prompt.ids),
            cached_tokens=length,
            prefill_tokens=len(prompt.ids) - length,
        )

    def _prefill_forward(self, active: list[Prompt], chunk: list[Prompt], slab: Slab) -> None:
        """One forward over the chunk's rows: each active prompt runs its next piece."""
        # Rows of the chunk are contiguous; inactive ones ride along with one pad query.
        r0, r1 = chunk[0].rows[0], chunk[-1].rows[0] + 1
        n_rows = r1 - r0
        width = max(1, self.max_batch_tokens // max(1, len(active)))
        spans = {id(p): (p.done, min(len(p.ids), p.done + width)) for p in active}
        q_len = max(e - s for s, e in spans.values())
        device = slab.buf.device

        input_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        position_ids = torch.zeros((n_rows, q_len), dtype=torch.long)
        # Per row: the slab column of each query (-1 for pads) and the end of its valid keys.
        q_cols = torch.full((n_rows, q_len), -1, dtype=torch.long)
        key_hi = torch.zeros(n_rows, dtype=torch.long)
        w_rows, w_cols, s_rows, s_cols = [], [], [], []
        for prompt in chunk:
            i = prompt.rows[0] - r0
            if id(prompt) not in spans:
                key_hi[i] = len(prompt.ids)
                continue
            s, e = spans[id(prompt)]
            n = e - s
            input_ids[i, q_len - n :] = torch.tensor(prompt.ids[s:e])
            position_ids[i, q_len - n :] = torch.arange(s, e)
            q_cols[i, q_len - n :] = torch.arange(s, e)
            key_hi[i] = e
            w_rows.append(torch.full((n,), prompt.rows[0]))
            w_cols.append(torch.arange(s, e))
            s_rows.append(torch.full((n,), i))
            s_cols.append(torch.arange(q_len - n, q_len))
        hi = int(key_hi.max())
        k_cols = torch.arange(hi)
        valid = k_cols[None, :] < key_hi[:, None]
        causal = k_cols[None, None, :] <= q_cols[:, :, None]
        pad = (q_cols < 0)[:, :, None]
        allowed = valid[:, None, :] & (causal | pad)
        mask = _additive(allowed[:, None], slab.buf.dtype).to(device)

        slab.rows = (r0, r1)
        slab.read = (0, hi)
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
            past_key_values=self._cache_view,
            use_cache=True,
            logits_to_keep=1,
        )
        slab.scatter = None
        self.count(forward_passes=1)
        logits = out.logits[:, -1].float()
        for prompt in active:
            _, e = spans[id(prompt)]
            prompt.done = e
            if e == len(prompt.ids):
                prompt.logits = logits[prompt.rows[0] - r0]

    # ---- decoding

    def step(self) -> None:
        """One decode forward over the batch's rows (nothing when none is unfinished)."""
        slab = self._slab
        if slab is None or all(r.finish is not None for r in self._live):
            return
        start = time.perf_counter()
        evicted = self.cache.evicted
        self._compact()
        live = self._live
        device = slab.buf.device
        # A finished row still in the slab runs on at column 0 (its KV is no longer read).
        columns = [0 if r.finish is not None else r.column for r in live]
        tokens = [r.output[-1] if r.finish is None else 0 for r in live]
        width = max(columns) + 1
        self._zero_to(width)
        cols = torch.tensor(columns)
        allowed = torch.arange(width)[None, :] <= cols[:, None]
        mask = _additive(allowed[:, None, None, :], slab.buf.dtype).to(device)
        slab.rows = (0, len(live))
        slab.read = (0, width)
        slab.decode = (torch.arange(len(live), device=device), cols.to(device))
        out = self.model(
            input_ids=torch.tensor(tokens, dtype=torch.long)[:, None].to(device),
            attention_mask=mask,
            position_ids=cols[:, None].to(device),
            past_key_values=self._cache_view,
            use_cache=True,
            logits_to_keep=1,
        )
        slab.decode = None
        self.count(forward_passes=1)
        self._sample(live, out.logits[:, -1].float())
        self._finish(live, 0)
        self.count(
            decode_seconds=time.perf_counter() - start,
            evicted_tokens=self.cache.evicted - evicted,
        )

    def finished(self) -> list[tuple[Job, list[list[Completion]]]]:
        """The jobs whose rows have all finished, with their completions per request (removed
        from the batch; the slab goes when the batch is empty)."""
        done = [j for j in self.jobs if all(r.finish is not None for r in j.rows)]
        if not done:
            return []
        self.jobs = [j for j in self.jobs if any(r.finish is None for r in j.rows)]
        if not self.jobs:
            self.reset()
        return [(job, self._completions(job)) for job in done]

    def _completions(self, job: Job) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in job.requests]
        for row in sorted(job.rows, key=lambda x: (x.request, x.sample)):
            assert row.finish is not None
            ids = row.prompt.ids
            out[row.request].append(
                Completion(
                    output_ids=tuple(row.output),
                    log_probs=tuple(row.log_probs),
                    finish=row.finish,
                    cached_tokens=len(ids) - 1 if job.shared[row.request] else row.prompt.cached,
                    prompt_tokens=len(ids),
                    weight_version=job.version,
                )
            )
        return out

    def _finish(self, rows: list[Row], first: int) -> None:
        """Check the rows (slab rows ``first, first + 1, ...``) that just got a token; cache the
        KV of the ones that finished."""
        slab = self._slab
        assert slab is not None
        for i, row in enumerate(rows, start=first):
            if row.finish is None:
                row.finish = self._check_finish(row)
                if row.finish is not None:
                    # Prompt at [0, len), output token j (fed at step j + 1) at len + j.
                    self.cache.insert_finished(row.prompt.ids, row.output, slab.buf[:, :, i], 0)

    def _check_finish(self, row: Row) -> FinishReason | None:
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
        if row.job.call.aborted[row.request]:
            return FinishReason("abort", message="aborted")
        return None

    def _compact(self) -> None:
        """Once finished rows are a quarter of the batch, drop them from the slab: the
        unfinished rows beyond the first ``kept`` slab rows move into the finished rows' places
        among them (a copy of at most as many rows as finished; until then finished rows run
        on, which is cheaper than a copy every time one finishes)."""
        slab = self._slab
        live = self._live
        kept = sum(r.finish is None for r in live)
        dropped = len(live) - kept
        if slab is None or dropped == 0 or dropped < _COMPACT_FRACTION * len(live):
            return
        holes = [i for i in range(kept) if live[i].finish is not None]
        movers = [i for i in range(kept, len(live)) if live[i].finish is None]
        if movers:
            hi = max(live[i].column for i in movers) + 1
            device = slab.buf.device
            src, dst = torch.tensor(movers, device=device), torch.tensor(holes, device=device)
            slab.buf[:, :, dst, :, :hi] = slab.buf[:, :, src, :, :hi]
            for i, j in zip(holes, movers, strict=True):
                live[i] = live[j]
        del live[kept:]

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token for every unfinished row of ``rows`` from ``logits`` (one per row,
        float32)."""
        todo = [i for i, r in enumerate(rows) if r.finish is None]
        if not todo:
            return
        tokens, log_probs = self.sampler.step(logits[todo], [rows[i].params for i in todo])
        self.count(decode_tokens=len(todo))
        for i, t, lp in zip(todo, tokens, log_probs, strict=True):
            rows[i].output.append(t)
            rows[i].log_probs.append(lp)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask as an additive float mask (0 / most negative finite)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
