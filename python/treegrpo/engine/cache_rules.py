"""SGLang's radix-cache rules, written once: what a request reuses and what it leaves cached.

- *admission* (prefill): a request reuses the longest cached prefix of its prompt, capped at
  ``prompt_len - 1`` (the last prompt token always runs, for its logits) and rounded down to
  whole pages (``--page-size``); the prompt (its whole pages) is cached once prefilled;
- *finish*: prompt + output minus the last output token is cached (the last sampled token was
  never fed through the model, so it has no KV);
- eviction drops least-recently-used unlocked leaves; a weight update flushes everything.

:class:`~treegrpo.engine.cache_model.RadixCacheModel` (the SGLang client's prediction of a
server's cache) and :class:`~treegrpo.engine.kv_cache.PrefixCache` (the embedded engine's real
KV cache) both apply these functions, so the prediction and the stand-in's measured reuse follow
one rule.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["aligned", "reusable_length", "sequence_at_finish", "stored_at_prefill"]


def aligned(n: int, page_size: int = 1) -> int:
    """``n`` rounded down to a multiple of ``page_size``."""
    return n - n % page_size


def reusable_length(prompt_len: int, page_size: int = 1) -> int:
    """Prompt tokens a prefix match may cover: all but the last, in whole pages."""
    return aligned(max(prompt_len - 1, 0), page_size)


def stored_at_prefill(prompt: Sequence[int], page_size: int = 1) -> list[int]:
    """The tokens of ``prompt`` cached once it is prefilled (its whole pages)."""
    return list(prompt[: aligned(len(prompt), page_size)])


def sequence_at_finish(
    prompt: Sequence[int], output: Sequence[int], page_size: int = 1
) -> list[int]:
    """The tokens a finished request leaves cached: prompt + output minus the last output token
    (none of the output when it is empty), in whole pages."""
    sequence = [*prompt, *output][: len(prompt) + max(len(output) - 1, 0)]
    return sequence[: aligned(len(sequence), page_size)]
