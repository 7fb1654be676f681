"""The one stop-string rule, SGLang's, for every place that ends a generation on a string.

SGLang (``Req.check_finished`` in its scheduler) checks a request after every generated token:
length first, then the stop token ids, then the stop strings: it decodes the tail of the output
and reports the *first stop string in the request's list* that the text contains. So:

- generation ends at the first token after which the decoded output contains any stop string
  (for text, the shortest prefix that contains one: the *earliest end*);
- the tokens up to and including that one stay in the output (the stop text is kept);
- the stop string reported (``finish_reason.matched``) is the first one of the list that the
  text holds at that point; when one token completes two stop strings, list order decides.

The users: the embedded engine checks each row after each token (:meth:`StopMatcher.check`);
the SGLang client cuts the output of a ``--skip-tokenizer-init`` server, which cannot match
strings, afterwards (:meth:`StopMatcher.cut`); the SGLang stand-in checks like the engine but
decodes only the last tokens, as SGLang does (``tail``); the environment cuts text from engines
that cannot stop on strings at all (:func:`cut_text`). The one parameter that differs is how much
is decoded, and it changes only cost: SGLang decodes ``stop_str_max_len + 1`` tail tokens, which
hold every stop string that the newest token can have completed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["StopMatcher", "cut_text", "first_stop", "stop_end"]


def first_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop string SGLang reports for ``text``: the first of ``stops`` (in list order) that
    ``text`` contains; None when it holds none. Empty strings never match."""
    for stop in stops:
        if stop and stop in text:
            return stop
    return None


def stop_end(text: str, stops: Sequence[str]) -> int | None:
    """The length of the shortest prefix of ``text`` that contains a stop string (the earliest
    end of one); None when ``text`` holds none."""
    ends = [at + len(s) for s in stops if s and (at := text.find(s)) >= 0]
    return min(ends) if ends else None


def cut_text(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to and including its first stop string, and that string as SGLang reports it
    (``(text, None)`` unchanged when it holds none)."""
    end = stop_end(text, stops)
    if end is None:
        return text, None
    kept = text[:end]
    return kept, first_stop(kept, stops)


class StopMatcher:
    """Stop strings over token ids, with the tokenizer's ``decode``.

    Args:
        stops: the request's stop strings, in its order (empty ones are dropped).
        decode: token ids -> text, e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=False)``.
        tail: decode only the last ``tail`` tokens on each :meth:`check` (SGLang's
            ``stop_str_max_len + 1``); None (default) decodes the whole output. A tail at least as
            long, in tokens, as the longest stop string finds the same stops.
    """

    def __init__(
        self,
        stops: Sequence[str],
        decode: Callable[[Sequence[int]], str],
        *,
        tail: int | None = None,
    ) -> None:
        if tail is not None and tail < 1:
            raise ValueError(f"tail must be >= 1 token or None, got {tail}")
        self.stops = tuple(s for s in stops if s)
        self.decode = decode
        self.tail = tail

    def __bool__(self) -> bool:
        return bool(self.stops)

    def check(self, output: Sequence[int]) -> str | None:
        """After a new token: the stop string ``output`` now holds (see the module docstring),
        or None. Call it after every token, so that the first match is the earliest."""
        if not self.stops or not output:
            return None
        ids = output if self.tail is None else output[-self.tail :]
        return first_stop(self.decode(list(ids)), self.stops)

    def cut(self, output: Sequence[int]) -> tuple[int, str] | None:
        """For an output made without stop strings: the fewest leading tokens that hold a stop
        string and the string :meth:`check` reports there, or None (nothing to cut)."""
        if not self.stops or first_stop(self.decode(list(output)), self.stops) is None:
            return None
        for end in range(1, len(output) + 1):
            matched = self.check(output[:end])
            if matched is not None:
                return end, matched
        return None  # pragma: no cover - only the whole decodes to it (a character split)
