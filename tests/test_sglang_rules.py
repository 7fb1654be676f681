"""The stand-in's two rules of SGLang's server against treegrpo.engine's, each checking the other.

The stand-in answers prompt ids and stop strings with its own code
(``sglang_protocol.check_input_ids``, ``sglang_protocol.matched_stop_string``), written apart
from what the client and the embedded engine use (``engine.tokens.check_token_ids``,
``engine.stops.StopMatcher``), so that a bug in one shows here as a disagreement rather than
passing the stand-in tests unseen."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import STOPS, decoder, tokenized
from treegrpo.engine.errors import InvalidTokenError
from treegrpo.engine.stops import StopMatcher
from treegrpo.engine.tokens import check_token_ids
from treegrpo.testing import sglang_control, sglang_protocol, sglang_standin
from treegrpo.testing.sglang_protocol import (
    BadRequest,
    InternalError,
    check_input_ids,
    matched_stop_string,
)

NOTE = ": a real SGLang server does not check this and may crash"

# What a JSON body's input_ids may hold: ids in and out of a small vocabulary, and non-ids.
JSON_VALUES = st.one_of(
    st.integers(-3, 12),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(),
    st.text(max_size=2),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)


def outcome(check: Any) -> tuple[str, str]:
    """``("ok", "")``, or the kind of refusal and its message, from either implementation."""
    try:
        check()
    except InvalidTokenError as e:
        return ("out of range" if e.out_of_range else "not an id", str(e))
    except InternalError as e:
        return ("out of range", str(e))
    except BadRequest as e:
        return ("not an id", str(e))
    return ("ok", "")


# --------------------------------------------------------------------------- prompt ids


@given(st.lists(JSON_VALUES, max_size=8), st.integers(1, 12), st.integers(0, 5))
def test_prompt_ids_are_refused_as_the_engine_refuses_them(prompt, vocab, k):
    mine = outcome(lambda: check_input_ids(k, prompt, vocab, note=NOTE))
    engines = outcome(
        lambda: check_token_ids(prompt, vocab, where=f"prompt {k}", note=NOTE),
    )
    assert mine == engines


def test_prompt_id_refusals_by_example():
    check_input_ids(0, [0, 9], 10)
    with pytest.raises(InternalError) as e:
        check_input_ids(2, [1, 10, "x"], 10, note=NOTE)
    assert str(e.value) == f"prompt 2: input_ids[1] = 10 is outside the vocabulary [0, 10){NOTE}"
    with pytest.raises(InternalError, match=r"input_ids\[0\] = -1 is outside"):
        check_input_ids(0, [-1], 10)
    for bad in (True, 1.0, "1", None, [1]):
        with pytest.raises(BadRequest) as e:
            check_input_ids(1, [3, bad], 10)
        assert str(e.value) == f"prompt 1: input_ids[1] is {bad!r}, not an int token id"


def test_the_standin_answers_bad_prompt_ids_as_before(make_standin, policy):
    """Over HTTP: an id beyond the vocabulary is a bare 500 naming it, a non-id a 400."""
    server = make_standin()
    vocab = server.server.vocab_size

    async def go(ids: list[Any]) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/generate", json={"input_ids": ids}) as r,
        ):
            return r.status, await r.text()

    status, text = asyncio.run(go([5, vocab]))
    assert status == 500
    assert f"prompt 0: input_ids[1] = {vocab} is outside the vocabulary [0, {vocab})" in text
    assert "may crash" in text
    status, text = asyncio.run(go([5, 1.5]))
    assert status == 400 and "input_ids[1] is 1.5, not an int token id" in text


# --------------------------------------------------------------------------- stop strings


@given(tokenized(empty=True), STOPS)
def test_stop_strings_match_as_the_engine_matches_after_every_token(pieces, stops):
    # Tokens may decode to nothing here: the engine's matcher decodes the whole output too.
    engine = StopMatcher(stops, decoder(pieces))
    for end in range(len(pieces) + 1):
        ids = list(range(end))
        assert matched_stop_string(ids, stops, decoder(pieces)) == engine.check(ids)


@given(tokenized(empty=True), STOPS)
def test_the_first_stop_is_where_the_client_cuts(pieces, stops):
    ids = list(range(len(pieces)))
    first = next(
        (
            (end, matched)
            for end in range(1, len(ids) + 1)
            if (matched := matched_stop_string(ids[:end], stops, decoder(pieces))) is not None
        ),
        None,
    )
    assert first == StopMatcher(stops, decoder(pieces)).cut(ids)


def test_list_order_decides_between_stops_one_token_completes():
    pieces = ["ab", "xyz"]  # "xyz" completes "x" (which ends first) and "yz"
    assert matched_stop_string([0], ["yz", "x"], decoder(pieces)) is None
    assert matched_stop_string([0, 1], ["yz", "x"], decoder(pieces)) == "yz"
    assert matched_stop_string([0, 1], ["x", "yz"], decoder(pieces)) == "x"
    assert matched_stop_string([0, 1], ["", "b"], decoder(pieces)) == "b"  # "" never matches
    assert matched_stop_string([], ["a"], decoder(pieces)) is None


def first_by_the_old_tail(ids: list[int], stops: list[str], decode: Any) -> Any:
    """Where the stand-in stopped before (the engine's matcher on a tail of the longest stop's
    length + 2 tokens, after each token), and on what."""
    width = max((len(s) for s in stops), default=0) + 2
    matcher = StopMatcher(stops, decode, tail=width)
    for end in range(1, len(ids) + 1):
        matched = matcher.check(ids[:end])
        if matched is not None:
            return end, matched
    return None


def first_by_the_rule(ids: list[int], stops: list[str], decode: Any) -> Any:
    for end in range(1, len(ids) + 1):
        matched = matched_stop_string(ids[:end], stops, decode)
        if matched is not None:
            return end, matched
    return None


@given(tokenized(), STOPS)
def test_the_whole_output_stops_where_the_old_tail_did(pieces, stops):
    """Every token holds a character: decoding the whole output stops the stand-in where its
    tail did, on the same string (the change to the rule changed cost only)."""
    ids = list(range(len(pieces)))
    decode = decoder(pieces)
    assert first_by_the_rule(ids, stops, decode) == first_by_the_old_tail(ids, stops, decode)


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    from treegrpo.testing.tiny import tiny_policy

    return tiny_policy(seed=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 319), max_size=30),
    st.lists(
        st.sampled_from(["</search>", "</answer>", "the", "e", " ", "</", ">", "<|im_end|>"]),
        min_size=1,
        max_size=3,
    ),
)
def test_on_the_tiny_tokenizer_too(ids, stops):
    """The same with the byte-level tokenizer the tests run (context-dependent decoding: a
    character's bytes may be split across tokens) and ASCII stops."""
    from treegrpo.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = [i % len(tok) for i in ids]

    def decode(part: Any) -> str:
        return str(tok.decode(list(part), skip_special_tokens=False))

    assert first_by_the_rule(ids, stops, decode) == first_by_the_old_tail(ids, stops, decode)
    for end in range(len(ids) + 1):
        expected = StopMatcher(stops, decode).check(ids[:end])
        assert matched_stop_string(ids[:end], stops, decode) == expected


# --------------------------------------------------------------------------- apart


def imported(module: Any) -> list[str]:
    """Every module and name ``module``'s source imports (``from m import n``: m and m.n)."""
    tree = ast.parse(Path(module.__file__).read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return out


def test_the_doubles_do_not_import_the_rules_they_check():
    standin = imported(sglang_standin)
    assert "treegrpo.testing.sglang_protocol" in standin  # the reading works
    for name in ("treegrpo.engine.tokens", "treegrpo.engine.stops"):
        assert not [m for m in standin if m.startswith(name)], name
    assert not [m for m in standin if m.endswith(("check_token_ids", "StopMatcher"))]
    for module in (sglang_protocol, sglang_control):
        names = imported(module)
        assert names and not [m for m in names if m.startswith("treegrpo.engine")], module
