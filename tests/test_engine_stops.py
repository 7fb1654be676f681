"""The one stop-string rule (treegrpo.engine.stops) and the one token-id check
(treegrpo.engine.tokens) against slow, obviously correct references on random strings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import STOPS, TEXT, decoder, tokenized
from treegrpo.engine.errors import InvalidTokenError
from treegrpo.engine.stops import StopMatcher, cut_text, first_stop, stop_end
from treegrpo.engine.tokens import check_token_ids
from treegrpo.env.steps import cut_at_stop
from treegrpo.exceptions import InvalidArgumentError


def reference_tokens(pieces: list[str], stops: list[str]) -> tuple[int, str] | None:
    """SGLang's rule spelled out: after each token, decode everything so far; the first stop
    string of the list that the text holds ends it there."""
    for k in range(1, len(pieces) + 1):
        text = "".join(pieces[:k])
        for stop in stops:
            if stop and stop in text:
                return k, stop
    return None


def reference_text(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The same rule with one character per token."""
    for k in range(1, len(text) + 1):
        for stop in stops:
            if stop and stop in text[:k]:
                return text[:k], stop
    return text, None


@given(tokenized(), STOPS)
def test_check_after_every_token_is_sglangs_rule(pieces, stops):
    matcher = StopMatcher(stops, decoder(pieces))
    found = None
    for k in range(1, len(pieces) + 1):
        matched = matcher.check(list(range(k)))
        if matched is not None:
            found = (k, matched)
            break
    assert found == reference_tokens(pieces, stops)


@given(tokenized(), STOPS)
def test_cut_after_the_fact_is_the_same_rule(pieces, stops):
    assert StopMatcher(stops, decoder(pieces)).cut(list(range(len(pieces)))) == (
        reference_tokens(pieces, stops)
    )


@given(tokenized(), STOPS)
def test_a_tail_as_long_as_the_longest_stop_finds_the_same(pieces, stops):
    # Every token holds at least one character, so a stop string of L characters lies within
    # the last L tokens once the newest token completes it (the stand-in's tail).
    tail = max((len(s) for s in stops), default=0) + 1
    full = StopMatcher(stops, decoder(pieces))
    tailed = StopMatcher(stops, decoder(pieces), tail=tail)
    for k in range(1, len(pieces) + 1):
        assert tailed.check(list(range(k))) == full.check(list(range(k)))
        if full.check(list(range(k))) is not None:
            break


@given(TEXT, STOPS)
def test_text_cut_is_the_earliest_end_and_list_order(text, stops):
    kept, matched = cut_text(text, stops)
    assert (kept, matched) == reference_text(text, stops)
    assert cut_at_stop(text, stops) == kept
    end = stop_end(text, stops)
    assert (end is None) == (matched is None)
    if end is not None:
        assert end == len(kept)
        assert first_stop(kept, stops) == matched


def test_list_order_decides_between_stops_one_token_completes():
    # One token "xyz" completes "x" (ending first) and "yz": SGLang reports the list's first.
    pieces = ["ab", "xyz"]
    assert StopMatcher(["yz", "x"], decoder(pieces)).cut([0, 1]) == (2, "yz")
    assert StopMatcher(["x", "yz"], decoder(pieces)).cut([0, 1]) == (2, "x")
    # In text, one character per token: "x" ends first.
    assert cut_text("abxyz", ["yz", "x"]) == ("abx", "x")


def test_empty_stop_strings_never_match():
    assert first_stop("abc", ["", "c"]) == "c"
    assert StopMatcher(["", ""], decoder(["a"])).check([0]) is None
    assert not StopMatcher([""], decoder(["a"]))
    with pytest.raises(ValueError, match="tail"):
        StopMatcher(["a"], decoder(["a"]), tail=0)


# --------------------------------------------------------------------------- token ids


@given(st.lists(st.one_of(st.integers(-3, 12), st.booleans(), st.floats(0, 5)), max_size=8))
def test_token_ids_are_checked_like_the_reference(ids):
    vocab = 10
    problem = None
    for pos, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            problem = (pos, False)
            break
        if not 0 <= t < vocab:
            problem = (pos, True)
            break
    if problem is None:
        assert check_token_ids(ids, vocab, where="request 2") == ids
        return
    with pytest.raises(InvalidTokenError, match=rf"request 2: input_ids\[{problem[0]}\]") as e:
        check_token_ids(ids, vocab, where="request 2")
    assert e.value.out_of_range is problem[1]
    assert isinstance(e.value, InvalidArgumentError) and isinstance(e.value, ValueError)


def test_token_ids_from_arrays_and_without_a_vocabulary():
    assert check_token_ids(np.array([3, 4], dtype=np.int64), 10, where="r") == [3, 4]
    assert check_token_ids([np.int32(7)], None, where="r") == [7]
    assert check_token_ids([10**9], None, where="r") == [10**9]
    with pytest.raises(InvalidTokenError, match=r"r: stop_token_ids\[0\] = -1 .* >= 0"):
        check_token_ids([-1], None, where="r", name="stop_token_ids")
    with pytest.raises(InvalidTokenError, match="not a string"):
        check_token_ids("12", 10, where="r")
    with pytest.raises(InvalidTokenError, match=r"\[0, 10\); SGLang"):
        check_token_ids([10], 10, where="r", note="; SGLang does not check")


# --------------------------------------------------------------------------- in the engine


def test_the_embedded_engine_stops_by_the_rule():
    """Two stop strings first held after the same token, one ending inside it: the engine
    stops at that token and reports the first of the list (not the earliest end)."""
    from treegrpo.engine.base import GenerateRequest, SamplingParams
    from treegrpo.engine.embedded import EmbeddedEngine
    from treegrpo.testing.tiny import tiny_policy

    model, tok = tiny_policy()
    engine = EmbeddedEngine(model, tok)
    prompt = [5, 17, 42, 8]

    def greedy(stops: tuple[str, ...]):
        params = SamplingParams(max_new_tokens=40, temperature=0, stop=stops)
        [[completion]] = engine.generate_sync([GenerateRequest(prompt, params)])
        return completion

    out = list(greedy(()).output_ids)
    texts = [tok.decode(out[:k], skip_special_tokens=False) for k in range(len(out) + 1)]
    for k in range(2, len(out) + 1):
        prev, cur = texts[k - 1], texts[k]
        new = cur[len(prev) :]
        if not cur.startswith(prev) or len(new) < 2:
            continue
        inside = prev[-2:] + new[:1]  # ends inside token k
        whole = prev[-1:] + new  # ends with it
        if inside in prev or whole in prev or inside == whole:
            continue
        break
    else:
        pytest.skip("no token of this output completes two fresh stop strings")
    for stops, expected in (((whole, inside), whole), ((inside, whole), inside)):
        completion = greedy(stops)
        assert list(completion.output_ids) == out[:k]
        assert completion.finish.type == "stop" and completion.finish.matched == expected
        assert StopMatcher(stops, lambda ids: tok.decode(ids)).cut(out) == (k, expected)
