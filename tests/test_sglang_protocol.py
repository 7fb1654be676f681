"""The protocol module the two SGLang test doubles share: what it reads from a ``/generate``
body, and that it stays apart from the client it helps test."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from treegrpo.testing import sglang_protocol as protocol


def parse(body: Any, **options: Any) -> protocol.GenerateCall:
    def refuse_text(text: Any) -> list[Any]:
        raise protocol.BadRequest("no text")

    kwargs: dict[str, Any] = {
        "server": "the double",
        "tokenize": refuse_text,
        "check_prompt": lambda k, prompt: None,
        "context_length": 1024,
        "in_flight": frozenset(),
        **options,
    }
    return protocol.parse_generate(body, **kwargs)


def test_a_single_prompt_and_a_batch():
    one = parse({"input_ids": [1, 2, 3], "rid": "r", "sampling_params": {"stop": "x"}})
    assert one.prompts == [[1, 2, 3]] and one.single and one.answers_one
    assert one.rids == ["r"] and one.return_logprob == [False]
    assert one.sampling[0].stop == ("x",) and one.sampling[0].max_new_tokens == 128
    batch = parse(
        {
            "input_ids": [[1], [2, 3]],
            "rid": "b",
            "sampling_params": [{"n": 2, "max_new_tokens": 4}, {"max_new_tokens": 5}],
            "return_logprob": [True, False],
        },
    )
    assert batch.prompts == [[1], [2, 3]] and not batch.single and batch.per_prompt_sampling
    assert batch.rids == ["b_0", "b_1"] and batch.return_logprob == [True, False]
    assert [s.n for s in batch.sampling] == [2, 1]
    assert [s.max_new_tokens for s in batch.sampling] == [4, 5]
    n2 = parse({"input_ids": [1], "sampling_params": {"n": 2, "max_new_tokens": 4}})
    assert n2.single and not n2.answers_one  # n > 1: the answer is a list


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        ({"input_ids": [1], "stream": True}, protocol.BadRequest, "the double does not stream"),
        ({}, protocol.BadRequest, "either text or input_ids"),
        ({"text": "hi"}, protocol.BadRequest, "no text"),
        ({"input_ids": [[1], []]}, protocol.BadRequest, "non-empty list"),
        ({"input_ids": [1], "sampling_params": {"seed": 1}}, TypeError, "'seed'"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, protocol.BadRequest, "top_p"),
        ({"input_ids": [1], "sampling_params": {"n": 0}}, protocol.BadRequest, "n must be"),
        (
            {"input_ids": [1], "sampling_params": {"max_new_tokens": 199}},
            protocol.BadRequest,
            "maximum context length",
        ),
        ({"input_ids": [1] * 200}, protocol.BadRequest, "longer than the model's context"),
        ({"input_ids": [[1], [2]], "rid": ["a"]}, protocol.BadRequest, "1 rids for 2"),
        ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, protocol.BadRequest, "duplicate"),
        ({"input_ids": [1], "rid": "busy"}, protocol.BadRequest, "Duplicate request ID"),
    ],
)
def test_refusals(body: dict[str, Any], error: type[Exception], words: str):
    with pytest.raises(error, match=words):
        parse(body, context_length=200, in_flight={"busy"})


def test_not_emulated_keys_and_the_prompt_check():
    with pytest.raises(protocol.BadRequest, match=r"the double does not emulate .*min_p"):
        parse({"input_ids": [1], "sampling_params": {"min_p": 0.1}}, not_emulated={"min_p": 0.0})
    parse({"input_ids": [1], "sampling_params": {"min_p": 0.0}}, not_emulated={"min_p": 0.0})
    seen: list[tuple[int, list[Any]]] = []
    parse({"input_ids": [[1], [2, 3]]}, check_prompt=lambda k, p: seen.append((k, p)))
    assert seen == [(0, [1]), (1, [2, 3])]


def test_meta_info_and_answer_shapes():
    meta = protocol.meta_info(
        id="r",
        finish_reason={"type": "length", "length": 2},
        prompt_tokens=3,
        output_ids=[7, 8],
        cached_tokens=1,
        weight_version="v",
        e2e_latency=0.5,
        output_log_probs=[-0.1, -0.2],
    )
    assert meta["completion_tokens"] == 2 and meta["input_token_logprobs"] == []
    assert meta["output_token_logprobs"] == [[-0.1, 7, None], [-0.2, 8, None]]
    plain = protocol.meta_info(
        id="r",
        finish_reason={"type": "stop", "matched": 8},
        prompt_tokens=3,
        output_ids=[8],
        cached_tokens=0,
        weight_version="v",
        e2e_latency=0.0,
    )
    assert "output_token_logprobs" not in plain
    assert protocol.answer_body([8], plain) == {"output_ids": [8], "meta_info": plain}
    assert protocol.answer_body([8], plain, "t")["text"] == "t"


def test_an_unknown_endpoint_name_is_refused():
    with pytest.raises(ValueError, match="no SGLang endpoint is named 'genrate'"):
        protocol.application({"genrate": lambda request: None})  # type: ignore[dict-item]


def test_the_protocol_module_imports_nothing_of_the_client():
    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert imported and not [m for m in imported if m and m.startswith("treegrpo")]


def test_abort_and_pause_bodies():
    assert protocol.parse_abort({"rid": "req-1"}) == (False, "req-1")
    assert protocol.parse_abort({"rid": "", "abort_all": True}) == (True, "")
    assert protocol.parse_abort({}) == (False, "")  # an empty rid aborts nothing
    with pytest.raises(protocol.BadRequest, match="rid must be a string"):
        protocol.parse_abort({"rid": 3})
    assert protocol.pause_mode({}) == "abort"
    assert protocol.pause_mode({"mode": "in_place"}) == "in_place"
    with pytest.raises(protocol.BadRequest, match="got 'later'"):
        protocol.pause_mode({"mode": "later"})
