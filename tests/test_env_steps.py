"""One agent step: action parsing, the step rules, observations and tool batching."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from fake_tokenizer import ChunkTokenizer, MergingTokenizer
from treegrpo.env.steps import (
    INVALID_ACTION,
    STOP_STRINGS,
    Action,
    SearchEnv,
    StepInput,
    StepResult,
    cut_at_stop,
    parse_action,
    stop_strings_for,
    wrap_information,
)
from treegrpo.env.types import Document

# ---- fakes


class FakeRetriever:
    """Two documents per query, naming the query; records every call."""

    def __init__(self, text: str = "some text") -> None:
        self.calls: list[list[str]] = []
        self.text = text

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        self.calls.append(list(queries))
        return [
            [Document(str(k), f'"{q} page {k}"\n{self.text}') for k in (1, 2)][:topk]
            for q in queries
        ]


class CountingTool:
    """A tool with its own tag; one call per step is what batching promises."""

    def __init__(self, name: str, tag: str) -> None:
        self.name, self.tag = name, tag
        self.calls: list[list[str]] = []

    async def call(self, queries: list[str]) -> list[str]:
        self.calls.append(list(queries))
        return [f"{self.name} says {q}" for q in queries]


def make_env(**kwargs: object) -> tuple[SearchEnv, FakeRetriever]:
    retriever = FakeRetriever()
    return SearchEnv(ChunkTokenizer(), retriever=retriever, **kwargs), retriever  # type: ignore[arg-type]


def step(env: SearchEnv, *inputs: StepInput) -> list[StepResult]:
    return asyncio.run(env.step(list(inputs)))


# ---- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think>\n<search> paris </search>", ("tool", "search", "paris")),
        ("<answer> Paris </answer>", ("answer", "answer", "Paris")),
        ("<search>\n  multi\nline  \n</search>", ("tool", "search", "multi\nline")),
        ("<search></search>", ("tool", "search", "")),
        ("<search>   </search>", ("tool", "search", "")),
        # first complete tag wins, by where it opens
        ("<answer>a</answer><search>q</search>", ("answer", "answer", "a")),
        ("<search>q</search><answer>a</answer>", ("tool", "search", "q")),
        ("<search>a</search> <search>b</search>", ("tool", "search", "a")),
        # an unclosed tag does not count; a later complete one does
        ("<search> never closed <answer> x </answer>", ("answer", "answer", "x")),
        # nested: the outer tag opened first and is complete
        ("<search> a <answer> b </answer> </search>", ("tool", "search", "a <answer> b </answer>")),
        # a closing tag of another kind does not close
        ("<search> q </answer>", ("invalid", None, None)),
        ("<search> q", ("invalid", None, None)),
        ("I think the answer is Paris.", ("invalid", None, None)),
        ("<Search>q</Search>", ("invalid", None, None)),
        ("<query>q</query>", ("invalid", None, None)),
        ("", ("invalid", None, None)),
    ],
)  # fmt: skip
def test_parse_action(text: str, expected: tuple[str, str | None, str | None]) -> None:
    a = parse_action(text)
    assert (a.kind, a.tag, a.content) == expected


def test_parse_action_end_and_custom_tags() -> None:
    a = parse_action("<think>t</think><search>q</search> trailing")
    assert a.end == len("<think>t</think><search>q</search>")
    tags = ("search", "web_search", "answer")
    assert parse_action("<web_search> news </web_search>", tags) == Action(
        "tool", "web_search", "news", 31
    )
    assert parse_action("<web_search> news </web_search>").kind == "invalid"
    assert parse_action("<final> x </final>", ("search", "final"), answer_tag="final").kind == (
        "answer"
    )


@pytest.mark.parametrize("tags", [(), ("se arch",), ("<search>",), ("a", "a"), "search"])
def test_parse_action_rejects_bad_tags(tags: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_action("x", tags)  # type: ignore[arg-type]


def test_stop_strings_and_cut() -> None:
    assert STOP_STRINGS == ["</search>", "</answer>"]
    assert stop_strings_for(["search", "web", "answer"]) == ["</search>", "</web>", "</answer>"]
    assert cut_at_stop("<search>q</search> <information>made up") == "<search>q</search>"
    assert cut_at_stop("<answer>a</answer><search>q</search>") == "<answer>a</answer>"
    assert cut_at_stop("no stop here") == "no stop here"
    assert wrap_information("D") == "\n\n<information>D</information>\n\n"


# ---- the step rules


def test_search_gives_wrapped_documents() -> None:
    env, retriever = make_env()
    (r,) = step(env, StepInput("<think>hm</think>\n<search> paris </search>", 0))
    body = 'Doc 1(Title: "paris page 1") some text\nDoc 2(Title: "paris page 2") some text'
    assert r.observation_text == wrap_information(body)  # stripped body, as the reference
    assert env.tokenizer.decode(r.observation_ids) == r.observation_text
    assert (r.leaf_reason, r.tool, r.query, r.answer, r.valid) == (
        None,
        "search",
        "paris",
        None,
        True,
    )
    assert not r.is_leaf
    assert retriever.calls == [["paris"]]


def test_answer_is_a_leaf_without_observation() -> None:
    env, retriever = make_env()
    (r,) = step(env, StepInput("<think>ok</think><answer> Paris </answer>", 1))
    assert (r.leaf_reason, r.answer, r.valid) == ("answer", "Paris", True)
    assert (r.observation_text, r.observation_ids, r.tool, r.query) == ("", (), None, None)
    assert retriever.calls == []


@pytest.mark.parametrize("text", ["no tags at all", "<search> unclosed", "<Search> q </Search>"])
def test_invalid_action_gets_the_message(text: str) -> None:
    env, retriever = make_env()
    (r,) = step(env, StepInput(text, 0))
    assert r.observation_text == INVALID_ACTION
    assert env.tokenizer.decode(r.observation_ids) == INVALID_ACTION
    assert (r.leaf_reason, r.valid, r.tool, r.query) == (None, False, None, None)
    assert retriever.calls == []


def test_empty_query_is_sent_to_the_retriever_as_the_reference_sends_it() -> None:
    env, retriever = make_env()
    (r,) = step(env, StepInput("<think>x</think><search>  </search>", 0))
    assert retriever.calls == [[""]]  # Search-R1 posts the stripped content, ""
    assert (r.leaf_reason, r.valid, r.tool, r.query) == (None, True, "search", "")
    body = 'Doc 1(Title: " page 1") some text\nDoc 2(Title: " page 2") some text'
    assert r.observation_text == wrap_information(body)


def test_first_complete_tag_decides_as_the_references_regex() -> None:
    env, _ = make_env()
    # <(search|answer)>(.*?)</\1> with re.search: the search opens first and closes last
    a = env.parse("<search>a<answer>b</answer></search>")
    assert (a.kind, a.content) == ("tool", "a<answer>b</answer>")
    assert env.parse("<answer>b</answer><search>q</search>").kind == "answer"


@pytest.mark.parametrize(
    ("text", "goes_on"),
    [
        ("<search> a <answer> b </answer>", True),  # the answer inside an unclosed search
        ("thinking </answer>", True),  # a stray closing tag: no action yet
        ("<think>x</think><answer> b </answer>", False),  # an answer: the same either way
        ("<answer> b </answer>", False),
        ("<search> q </search>", False),  # stopped at a tool's tag: the reference's cut
        ("<search> unclosed", False),  # not stopped at </answer>
    ],
)
def test_continues_past_answer_where_the_reference_would_cut_later(
    text: str, goes_on: bool
) -> None:
    env, _ = make_env()
    assert env.continues_past(text) is goes_on
    assert env.ends_tool_call("<search> q </search>") and not env.ends_tool_call(text[:-1])


def test_invalid_action_message_is_verbatim() -> None:
    assert INVALID_ACTION == (
        "\nMy previous action is invalid. If I want to search, I should put the query between "
        "<search> and </search>. If I want to give the final answer, I should put the answer "
        "between <answer> and </answer>. Let me try again.\n"
    )


@pytest.mark.parametrize(
    ("text", "truncated", "reason", "answer"),
    [
        ("<search> more </search>", False, "forced_final", None),
        ("rambling", False, "forced_final", None),
        ("<answer> x </answer>", False, "answer", "x"),
        ("<answer> x </answer>", True, "answer", "x"),
        ("rambling on and on", True, "truncated", None),
        ("<search> q </search>", True, "forced_final", None),
    ],
)
def test_final_turn_is_always_a_leaf(
    text: str, truncated: bool, reason: str, answer: str | None
) -> None:
    env, retriever = make_env(max_turns=2)
    assert not env.is_final_turn(1) and env.is_final_turn(2)
    (r,) = step(env, StepInput(text, 2, truncated=truncated))
    assert (r.leaf_reason, r.answer, r.observation_text, r.tool) == (reason, answer, "", None)
    assert retriever.calls == []  # no search on the final turn


def test_max_turns_zero_allows_no_search() -> None:
    env, retriever = make_env(max_turns=0)
    (r,) = step(env, StepInput("<search> q </search>", 0))
    assert r.leaf_reason == "forced_final" and retriever.calls == []


@pytest.mark.parametrize("rule", ["invalid", "leaf"])
def test_length_limit(rule: str) -> None:
    env = SearchEnv(ChunkTokenizer(), retriever=FakeRetriever(), truncated_action=rule)  # type: ignore[arg-type]
    no_tag, search, answer = step(
        env,
        StepInput("<think> went on and on", 0, truncated=True),
        # A complete tag wins over the length limit (module docstring, rule 4).
        StepInput("<search> q </search>", 0, truncated=True),
        StepInput("<answer> a </answer>", 0, truncated=True),
    )
    if rule == "invalid":  # the reference: the invalid-action message, the episode goes on
        assert (no_tag.leaf_reason, no_tag.valid) == (None, False)
        assert no_tag.observation_text == INVALID_ACTION
    else:
        assert (no_tag.leaf_reason, no_tag.valid, no_tag.observation_ids) == (
            "truncated",
            False,
            (),
        )
    assert (search.leaf_reason, search.query, search.valid) == (None, "q", True)
    assert (answer.leaf_reason, answer.answer) == ("answer", "a")


def test_default_truncation_rule_is_the_references_and_bad_values_are_refused() -> None:
    env, _ = make_env()
    assert env.truncated_action == "invalid"
    with pytest.raises(ValueError, match="truncated_action must be 'invalid'"):
        make_env(truncated_action="stop")


@pytest.mark.parametrize("turn", [-1, 4, True, 1.0])
def test_turn_out_of_range(turn: object) -> None:
    env, _ = make_env(max_turns=3)
    with pytest.raises(ValueError, match=r"turn must be an int in \[0, max_turns=3\]"):
        step(env, StepInput("x", turn))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="turn must be"):
        env.stop_strings(turn)  # type: ignore[arg-type]


def test_stop_strings_every_turn() -> None:
    env, _ = make_env(max_turns=1)
    assert env.stop_strings(0) == env.stop_strings(1) == ["</search>", "</answer>"]


# ---- observations and the token limit


@pytest.mark.parametrize("tokenizer", [ChunkTokenizer(), ChunkTokenizer(3), MergingTokenizer()])
def test_long_observation_is_cut_inside_the_body(tokenizer: ChunkTokenizer) -> None:
    env = SearchEnv(tokenizer, retriever=FakeRetriever("word " * 2000), max_obs_tokens=100)
    (r,) = step(env, StepInput("<search> q </search>", 0))
    assert len(r.observation_ids) <= 100
    assert len(r.observation_ids) >= 97  # cut, not emptied
    assert r.observation_text.startswith('\n\n<information>Doc 1(Title: "q page 1") word word')
    assert r.observation_text.endswith("</information>\n\n")
    assert list(r.observation_ids) == tokenizer.encode(r.observation_text, add_special_tokens=False)


def test_short_observation_is_kept_whole() -> None:
    env, _ = make_env(max_obs_tokens=500)
    text, ids = env.observation("  short body \n")
    assert text == wrap_information("short body") and len(ids) == len(text)


def test_max_obs_tokens_must_leave_room() -> None:
    wrapper = len(wrap_information(""))
    with pytest.raises(ValueError, match=f"tags alone take {wrapper} tokens"):
        make_env(max_obs_tokens=wrapper)
    env, _ = make_env(max_obs_tokens=wrapper + 1)
    text, ids = env.observation("abc")
    assert text == wrap_information("a") and len(ids) == wrapper + 1


# ---- batching and tools


def test_one_retriever_call_per_step_in_input_order() -> None:
    env, retriever = make_env()
    results = step(
        env,
        StepInput("<search> a </search>", 0),
        StepInput("<answer> x </answer>", 0),
        StepInput("<search> b </search>", 1),
        StepInput("junk", 1),
        StepInput("<search> c </search>", 2),
    )
    assert retriever.calls == [["a", "b", "c"]]
    assert [r.query for r in results] == ["a", None, "b", None, "c"]
    assert [r.leaf_reason for r in results] == [None, "answer", None, None, None]
    assert "a page 1" in results[0].observation_text and "c page 1" in results[4].observation_text


def test_empty_batch() -> None:
    env, retriever = make_env()
    assert step(env) == [] and retriever.calls == []


def test_custom_tool_with_its_own_tag() -> None:
    search, web = CountingTool("search", "search"), CountingTool("web", "web_search")
    env = SearchEnv(ChunkTokenizer(), tools=[search, web])
    assert env.tags == ("search", "web_search", "answer")
    assert env.stop_strings(0) == ["</search>", "</web_search>", "</answer>"]
    results = step(
        env,
        StepInput("<web_search> w1 </web_search>", 0),
        StepInput("<search> s1 </search>", 0),
        StepInput("<web_search> w2 </web_search>", 1),
        StepInput("<search> s2 </search>", 0),
    )
    assert search.calls == [["s1", "s2"]] and web.calls == [["w1", "w2"]]
    assert [r.tool for r in results] == ["web", "search", "web", "search"]
    assert results[0].observation_text == wrap_information("web says w1")
    assert env.parse("<web_search>x</web_search>").tag == "web_search"


def test_tools_run_concurrently() -> None:
    """Each of two tools waits for the other to start: sequential calls would time out."""
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    class Waiting:
        def __init__(self, tag: str, other: str) -> None:
            self.name = self.tag = tag
            self.other = other

        async def call(self, queries: list[str]) -> list[str]:
            started[self.tag].set()
            await asyncio.wait_for(started[self.other].wait(), timeout=5)
            return queries

    env = SearchEnv(ChunkTokenizer(), tools=[Waiting("a", "b"), Waiting("b", "a")])
    results = step(env, StepInput("<a>1</a>", 0), StepInput("<b>2</b>", 0))
    assert [r.observation_text for r in results] == [wrap_information("1"), wrap_information("2")]


def test_a_tool_returning_the_wrong_count_is_an_error() -> None:
    class Short(CountingTool):
        async def call(self, queries: list[str]) -> list[str]:
            return []

    env = SearchEnv(ChunkTokenizer(), tools=[Short("short", "search")])
    with pytest.raises(RuntimeError, match="returned 0 observations for 1 queries"):
        step(env, StepInput("<search> q </search>", 0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs a retriever"),
        ({"retriever": FakeRetriever(), "tools": []}, "not both"),
        ({"tools": [CountingTool("a", "x"), CountingTool("b", "x")]}, "two tools use the tag <x>"),
        ({"tools": [CountingTool("a", "answer")]}, "reserved"),
        ({"tools": [CountingTool("a", "think")]}, "reserved"),
        ({"tools": [CountingTool("a", "bad tag")]}, "invalid tag name"),
        ({"retriever": FakeRetriever(), "max_turns": -1}, "max_turns"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchEnv(ChunkTokenizer(), **kwargs)  # type: ignore[arg-type]


def test_repr() -> None:
    env, _ = make_env()
    assert repr(env) == (
        "SearchEnv(tools=[search:<search>], answer_tag='answer', max_turns=3, max_obs_tokens=500, "
        "truncated_action='invalid')"
    )
