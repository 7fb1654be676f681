"""The SGLang client's cache report: predicted vs reported ``cached_tokens`` per sample.

One :class:`~treegrpo.engine.cache_model.RadixCacheModel` per server mirrors what that server's
radix cache should hold (SGLang's rules, :mod:`treegrpo.engine.cache_rules`). A request is
admitted to it before it is sent (:func:`admit`), released if it fails (:func:`release`), and on
its answer :meth:`CacheLedger.record` finishes it in the model and keeps a :class:`CacheRecord`
of the prediction beside what the server reported; :meth:`CacheLedger.report` sums them up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treegrpo.engine.base import Completion
from treegrpo.engine.cache_model import Admission, RadixCacheModel

__all__ = ["CacheLedger", "CacheRecord", "CacheReport", "admit", "release"]


@dataclass(frozen=True)
class CacheRecord:
    """One sample's prefix-cache outcome: ``predicted`` by the client's model of the server's
    radix cache, ``reported`` by the server (``meta_info.cached_tokens``). ``warm`` marks a
    :meth:`SGLangClient.warm_prefix` request."""

    rid: str
    url: str
    prompt_tokens: int
    predicted: int
    reported: int
    warm: bool = False


@dataclass(frozen=True)
class CacheReport:
    """The cache records since the last reset (:meth:`SGLangClient.cache_report`)."""

    records: tuple[CacheRecord, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.records)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the servers reported as served from their caches."""
        return sum(r.reported for r in self.records)

    @property
    def predicted_tokens(self) -> int:
        return sum(r.predicted for r in self.records)

    @property
    def hit_rate(self) -> float:
        """Reported cached tokens / prompt tokens (0 when there was no request)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mismatches(self) -> tuple[CacheRecord, ...]:
        """Records whose prediction differs from the report (eviction under memory pressure,
        requests sharing an uncached prefix in one prefill batch, a restarted server)."""
        return tuple(r for r in self.records if r.predicted != r.reported)

    def __str__(self) -> str:
        return (
            f"CacheReport(samples={len(self.records)}, prompt_tokens={self.prompt_tokens}, "
            f"hit_rate={self.hit_rate:.3f}, predicted_hit_rate={self.predicted_hit_rate:.3f}, "
            f"mismatches={len(self.mismatches)})"
        )


def admit(cache: RadixCacheModel, input_ids: list[int], n: int) -> list[Admission]:
    """Predict each sample's ``cached_tokens``. With ``n > 1`` SGLang first prefills the
    prompt alone (``max_new_tokens: 0``), then runs the n samples on the cached prompt."""
    if n > 1:
        prefill = cache.admit(input_ids)
        cache.finish(prefill, input_ids)
    return [cache.admit(input_ids) for _ in range(n)]


def release(cache: RadixCacheModel, admissions: Sequence[Admission]) -> None:
    """A request that failed: release its samples' locks (nothing of it is cached)."""
    for admission in admissions:
        cache.release(admission)


class CacheLedger:
    """The :class:`CacheRecord` of every sample since the last reset."""

    def __init__(self) -> None:
        self.records: list[CacheRecord] = []

    def record(
        self,
        cache: RadixCacheModel,
        url: str,
        rid: str,
        input_ids: list[int],
        admissions: Sequence[Admission],
        completions: Sequence[Completion],
        warm: bool,
    ) -> None:
        """The answer to an admitted request: finish each sample in ``cache``, record it."""
        for k, (admission, completion) in enumerate(zip(admissions, completions, strict=True)):
            cache.finish(admission, input_ids, completion.output_ids)
            self.records.append(
                CacheRecord(
                    rid=rid if len(completions) == 1 else f"{rid}/{k}",
                    url=url,
                    prompt_tokens=completion.prompt_tokens,
                    predicted=admission.cached_tokens,
                    reported=completion.cached_tokens,
                    warm=warm,
                )
            )

    def report(self, *, reset: bool = False) -> CacheReport:
        """The records so far as a :class:`CacheReport`; ``reset`` starts a new window."""
        report = CacheReport(tuple(self.records))
        if reset:
            self.records.clear()
        return report
