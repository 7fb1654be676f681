"""One agent step: parse the policy's action, run the tools, build the observation.

An agent step (one tree node) is the policy's text for one turn, generated until the first
closing tag of a known action (``</search>``, ``</answer>``; the stop text is kept) or until the
per-turn token limit, followed by the environment's observation. :class:`SearchEnv` takes the
actions of every active branch at one step and returns one :class:`StepResult` each.

Rules (Search-R1's, with the choices below made explicit):

1. The first complete ``<tag>...</tag>`` of any known tag wins (earliest opening tag that has
   its closing tag; DOTALL), as Search-R1's ``<(search|answer)>(.*?)</\1>``. Its content is
   stripped. ``<search>a<answer>b</answer></search>`` is a search for ``a<answer>b</answer>``
   (the rollout lets such a step run on past ``</answer>``: :meth:`SearchEnv.continues_past`).
2. ``<answer>`` ends the episode: leaf ``"answer"``, no observation. This holds on every turn,
   the final one included.
3. The final turn (``turn == max_turns``, after ``max_turns`` search-enabled turns) is a leaf
   whatever it says; a tool call there is not executed. Its reason is ``"forced_final"``, or
   ``"truncated"`` when it hit the length limit without a complete tag.
4. A generation that hit the per-turn token limit and holds no complete tag is an invalid
   action like any other (rule 6; the reference's rule, ``truncated_action="invalid"``), or,
   with ``truncated_action="leaf"``, a leaf ``"truncated"``. One that hit the limit but holds a
   complete tag is treated by its tag: with stop strings a generation ends at its first closing
   tag, and whether an engine reports "stop" or "length" when that tag's last token is also the
   budget's last one varies; the action is complete and well-formed either way.
5. A tool tag runs the tool; the observation is :func:`wrap_information` of its body, the body
   stripped (as the reference does) and cut so that the whole observation fits in
   ``max_obs_tokens`` tokens: the cut falls inside the body, so the closing tags stay (the
   reference cuts the whole string and can lose them). An empty query (``<search> </search>``)
   is sent to the tool as ``""``, as the reference sends it to its retriever (the local
   retrievers answer it with no document).
6. Anything else gets the invalid-action message as its observation; it is not a leaf (except
   on the final turn, rule 3).

Tool calls of one step are batched: each tool is called once with all its queries, and the
tools run concurrently. Every tool's body is wrapped in ``<information>``.

Stop strings are the closing tags of every known tag, on every turn, the final one included:
the final turn runs no search, but a model that opens one is still stopped at ``</search>``
(as in the reference) rather than left to write its own "retrieved" documents.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

from treegrpo.engine.stops import cut_text
from treegrpo.env.prompt import TokenizerLike
from treegrpo.env.tools import SearchTool
from treegrpo.env.types import Retriever, Tool

__all__ = [
    "DEFAULT_TAGS",
    "INVALID_ACTION",
    "STOP_STRINGS",
    "Action",
    "LeafReason",
    "SearchEnv",
    "StepInput",
    "StepResult",
    "TruncatedAction",
    "cut_at_stop",
    "parse_action",
    "stop_strings_for",
    "wrap_information",
]

ActionKind = Literal["tool", "answer", "invalid"]
LeafReason = Literal["answer", "forced_final", "truncated", "context_limit"]
TruncatedAction = Literal["invalid", "leaf"]

DEFAULT_TAGS: tuple[str, ...] = ("search", "answer")

INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)

# Tags with a fixed meaning in the step format; a tool cannot take them.
_RESERVED_TAGS = frozenset({"think", "information"})
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _check_tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str):
        raise TypeError(f"tags must be a sequence of tag names, not the str {tags!r}")
    out = list(tags)
    if not out:
        raise ValueError("no action tags given")
    for t in out:
        if not isinstance(t, str) or not _TAG_NAME.fullmatch(t):
            raise ValueError(
                f"invalid tag name {t!r}: use letters, digits, '_', '-' or '.', starting with a "
                "letter or '_' (e.g. 'search', 'web_search')"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate tag in {out}")
    return out


def stop_strings_for(tags: Sequence[str]) -> list[str]:
    """The closing tag of each action tag, in order: where generation of a step stops."""
    return [f"</{t}>" for t in _check_tags(tags)]


STOP_STRINGS = stop_strings_for(DEFAULT_TAGS)


def wrap_information(body: str) -> str:
    """An observation as the policy sees it: ``body``, stripped as Search-R1 strips its search
    results, between ``<information>`` tags."""
    return "\n\n<information>" + body.strip() + "</information>\n\n"


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to and including its earliest stop string (unchanged if it has none).

    For engines that cannot stop on strings: the step must end at its first closing tag. The rule
    is SGLang's, as every engine applies it (:mod:`treegrpo.engine.stops`)."""
    return cut_text(text, stops)[0]


@dataclass(frozen=True)
class Action:
    """A parsed action. ``tag`` and ``content`` are ``None`` for an invalid action;
    ``end`` is the index in the text just past the closing tag."""

    kind: ActionKind
    tag: str | None = None
    content: str | None = None
    end: int | None = None


def parse_action(
    text: str, tags: Sequence[str] = DEFAULT_TAGS, *, answer_tag: str = "answer"
) -> Action:
    """The first complete ``<tag>...</tag>`` of ``tags`` in ``text`` (rule 1 of the module).

    ``answer_tag`` gives kind ``"answer"``, any other tag kind ``"tool"``; no complete tag gives
    kind ``"invalid"``."""
    m = _action_regex(tuple(_check_tags(tags))).search(text)
    if m is None:
        return Action("invalid")
    tag = m.group(1)
    return Action("answer" if tag == answer_tag else "tool", tag, m.group(2).strip(), m.end())


@dataclass(frozen=True)
class StepInput:
    """One branch's generation for one step.

    ``turn`` is 0-based; ``truncated`` is True when generation stopped at the per-turn token
    limit (finish reason "length") rather than at a stop string or end of sequence."""

    text: str
    turn: int
    truncated: bool = False


@dataclass(frozen=True)
class StepResult:
    """What the environment made of one :class:`StepInput`.

    - ``action_text``: the generated text, as given.
    - ``observation_text`` / ``observation_ids``: what follows the action in the context
      (masked out of the loss); empty for a leaf.
    - ``leaf_reason``: ``None`` while the episode goes on, else ``"answer"``,
      ``"forced_final"`` or ``"truncated"`` (the rollout adds ``"context_limit"``: a trajectory
      that reached ``max_model_len``).
    - ``tool`` / ``query``: the tool's name and the query, when a tool was called.
    - ``answer``: the answer's content, when the step answered.
    - ``valid``: the environment accepted the action (an answer, or a tool call on a
      search-enabled turn, an empty query included)."""

    action_text: str
    observation_text: str = ""
    observation_ids: tuple[int, ...] = ()
    leaf_reason: LeafReason | None = None
    tool: str | None = None
    query: str | None = None
    answer: str | None = None
    valid: bool = False

    @property
    def is_leaf(self) -> bool:
        return self.leaf_reason is not None


class SearchEnv:
    """The search-agent environment (Search-R1's rules, see the module docstring).

    - ``tokenizer``: the policy's tokenizer; observations are encoded (and cut) with it.
    - ``retriever`` / ``topk``: shorthand for ``tools=[SearchTool(retriever, topk)]``.
    - ``tools``: the tools, each called with ``<tool.tag> query </tool.tag>``; tags unique.
    - ``answer_tag``: the tag that ends the episode.
    - ``max_turns``: search-enabled turns (turns ``0 .. max_turns - 1``); turn ``max_turns``
      is the final turn, a leaf whatever it says. The reference uses 3.
    - ``max_obs_tokens``: the most tokens of one observation, tags included (reference: 500).
    - ``invalid_action_message``: the observation after an invalid action; the default is
      Search-R1's, verbatim (it names ``<search>``: reword it for other tools).
    - ``truncated_action``: a step cut by the per-turn token limit without a complete tag gets
      the invalid-action message and the episode goes on (``"invalid"``, the reference), or
      ends as a leaf ``"truncated"`` (``"leaf"``: no turn is spent on an action the budget cut,
      but trees then hold more short leaves).
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        *,
        retriever: Retriever | None = None,
        tools: Sequence[Tool] | None = None,
        topk: int = 3,
        answer_tag: str = "answer",
        max_turns: int = 3,
        max_obs_tokens: int = 500,
        invalid_action_message: str = INVALID_ACTION,
        truncated_action: TruncatedAction = "invalid",
    ) -> None:
        if truncated_action not in ("invalid", "leaf"):
            raise ValueError(
                f"truncated_action must be 'invalid' (the reference: the invalid-action message, "
                f"the episode goes on) or 'leaf', got {truncated_action!r}"
            )
        if tools is None:
            if retriever is None:
                raise ValueError(
                    "SearchEnv needs a retriever (for the default <search> tool) or tools=[...]"
                )
            tools = [SearchTool(retriever, topk=topk)]
        elif retriever is not None:
            raise ValueError(
                "give either retriever= or tools=, not both; to keep the search tool next to "
                "others, add SearchTool(retriever) to tools"
            )
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 0:
            raise ValueError(f"max_turns must be an int >= 0, got {max_turns!r}")
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            for attr in ("name", "tag", "call"):
                if not hasattr(tool, attr):
                    raise TypeError(f"{tool!r} is not a Tool: it has no '{attr}' (env/types.py)")
            if tool.tag in self.tools:
                raise ValueError(f"two tools use the tag <{tool.tag}>; each needs its own tag")
            if tool.tag == answer_tag or tool.tag in _RESERVED_TAGS:
                raise ValueError(
                    f"tool {tool.name!r} uses the tag <{tool.tag}>, which is reserved "
                    f"(answer tag <{answer_tag}>, <think>, <information>); pick another"
                )
            self.tools[tool.tag] = tool
        self.answer_tag = answer_tag
        self.tags: tuple[str, ...] = tuple(_check_tags([*self.tools, answer_tag]))
        self.max_turns = max_turns
        self.tokenizer = tokenizer
        self.invalid_action_message = invalid_action_message
        self.truncated_action: TruncatedAction = truncated_action
        self._invalid_ids = self._encode(invalid_action_message)
        wrapper = len(self._encode(wrap_information("")))
        if max_obs_tokens <= wrapper:
            raise ValueError(
                f"max_obs_tokens={max_obs_tokens} leaves no room for documents: the "
                f"<information> tags alone take {wrapper} tokens"
            )
        self.max_obs_tokens = max_obs_tokens

    def __repr__(self) -> str:
        tools = ", ".join(f"{t.name}:<{tag}>" for tag, t in self.tools.items())
        return (
            f"SearchEnv(tools=[{tools}], answer_tag={self.answer_tag!r}, "
            f"max_turns={self.max_turns}, max_obs_tokens={self.max_obs_tokens}, "
            f"truncated_action={self.truncated_action!r})"
        )

    # ---- what the rollout asks before generating

    def is_final_turn(self, turn: int) -> bool:
        """Whether ``turn`` is the final turn (no tool runs; it is a leaf)."""
        return self._check_turn(turn) == self.max_turns

    def stop_strings(self, turn: int) -> list[str]:
        """Stop strings for generating ``turn``: every action's closing tag, on every turn."""
        self._check_turn(turn)
        return stop_strings_for(self.tags)

    # ---- one step of a batch of branches

    def parse(self, text: str) -> Action:
        """:func:`parse_action` with this environment's tags."""
        return parse_action(text, self.tags, answer_tag=self.answer_tag)

    def continues_past(self, text: str) -> bool:
        """Whether a step whose generation stopped at the answer's closing tag should go on.

        Search-R1 generates each turn's whole budget and cuts it at the first ``</search>`` when
        there is one, else at the first ``</answer>``; stop strings end a step at the first
        closing tag of either kind instead. The two give the same action except when the step
        stopped at ``</answer>`` and either holds no complete tag (a stray ``</answer>``) or
        its answer opens inside an unclosed tool tag (``<search>a<answer>b</answer>``): a
        later tool closing tag would then make the reference's step a tool call. The rollout
        continues such a step up to its next closing tag, and keeps the first segment alone if
        no tool closing tag comes (the reference's cut at the first ``</answer>``)."""
        if not text.endswith(f"</{self.answer_tag}>"):
            return False
        m = _action_regex(self.tags).search(text)
        if m is None:
            return True
        if m.group(1) != self.answer_tag:
            return False
        before = text[: m.start()]
        return any(f"<{tag}>" in before for tag in self.tools)

    def ends_tool_call(self, text: str) -> bool:
        """Whether ``text`` ends with a tool's closing tag (where the reference cuts a step)."""
        return any(text.endswith(f"</{tag}>") for tag in self.tools)

    async def step(self, inputs: Sequence[StepInput]) -> list[StepResult]:
        """Results for the actions of one agent step across branches, in input order.

        Each tool is called once with all of its queries; the tools run concurrently."""
        results: list[StepResult] = []
        pending: dict[str, list[int]] = {}  # tool tag -> indices of inputs calling it
        for i, x in enumerate(inputs):
            result, tag = self._decide(x)
            results.append(result)
            if tag is not None:
                pending.setdefault(tag, []).append(i)
        tags = list(pending)
        bodies = await asyncio.gather(
            *(self.tools[t].call([results[i].query or "" for i in pending[t]]) for t in tags)
        )
        for tag, out in zip(tags, bodies, strict=True):
            indices = pending[tag]
            name = self.tools[tag].name
            if not isinstance(out, list) or len(out) != len(indices):
                got = len(out) if isinstance(out, list) else type(out).__name__
                raise RuntimeError(
                    f"tool {name!r} returned {got} observations for {len(indices)} queries; "
                    "Tool.call must return one str per query, in order"
                )
            for i, body in zip(indices, out, strict=True):
                if not isinstance(body, str):
                    raise TypeError(f"tool {name!r} returned a {type(body).__name__}, not a str")
                text, ids = self.observation(body)
                results[i] = replace(results[i], observation_text=text, observation_ids=ids)
        return results

    def observation(self, body: str) -> tuple[str, tuple[int, ...]]:
        """A tool's body as an observation: stripped, wrapped, cut inside the body to fit
        ``max_obs_tokens``. Returns the text and its token ids (the ids encode the text)."""
        text = wrap_information(body)
        ids = self._encode(text)
        if len(ids) <= self.max_obs_tokens:
            return text, ids
        body_ids = self._encode(body.strip())
        budget = self.max_obs_tokens - len(self._encode(wrap_information("")))
        while True:
            # Decoding a cut can end inside a multi-byte character: drop the replacement char.
            cut = self.tokenizer.decode(list(body_ids[: max(budget, 0)]), skip_special_tokens=False)
            text = wrap_information(cut.rstrip("\ufffd"))
            ids = self._encode(text)
            # Tokens can merge differently across the cut and the tags: re-check and shrink.
            if len(ids) <= self.max_obs_tokens or budget <= 0:
                return text, ids
            budget -= len(ids) - self.max_obs_tokens

    # ---- internals

    def _decide(self, x: StepInput) -> tuple[StepResult, str | None]:
        """The result of one input, and the tag of the tool to call (whose observation
        :meth:`step` fills in after the batched calls)."""
        if not isinstance(x, StepInput):
            raise TypeError(f"SearchEnv.step takes StepInput items, got {type(x).__name__}")
        final = self.is_final_turn(x.turn)
        a = self.parse(x.text)
        if a.kind == "answer":
            return StepResult(x.text, leaf_reason="answer", answer=a.content, valid=True), None
        if a.kind == "invalid" and x.truncated and (final or self.truncated_action == "leaf"):
            return StepResult(x.text, leaf_reason="truncated"), None
        if final:
            return StepResult(x.text, leaf_reason="forced_final"), None
        if a.kind == "tool":  # an empty query goes to the tool as "" (rule 5)
            assert a.tag is not None and a.content is not None
            tool = self.tools[a.tag].name
            return StepResult(x.text, tool=tool, query=a.content, valid=True), a.tag
        return StepResult(x.text, self.invalid_action_message, self._invalid_ids), None

    def _check_turn(self, turn: int) -> int:
        if isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn <= self.max_turns:
            raise ValueError(
                f"turn must be an int in [0, max_turns={self.max_turns}] (turn max_turns is the "
                f"final turn), got {turn!r}"
            )
        return turn

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))


@lru_cache(maxsize=64)
def _action_regex(tags: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t) for t in tags)
    return re.compile(rf"<({alternatives})>(.*?)</\1>", re.DOTALL)
