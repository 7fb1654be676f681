"""Outcome rewards: exact match and token F1 on the answer, Search-R1's format-shaped reward,
and loading a user's reward function.

Choices:

1. Only the RESPONSE is scored (everything the policy and the environment added after the
   prompt); the prompt holds an example answer (``<answer> Beijing </answer>``).
2. :func:`extract_answer` takes the LAST ``<answer>...</answer>`` of the response, as Search-R1's
   ``extract_solution`` does, after removing observations: ``<information>`` blocks and the
   invalid-action message. That message itself contains ``<answer> and </answer>``, which the
   reference would read as the answer "and". With stop strings an episode holds at most one
   answer, so first and last agree on well-formed episodes.
3. :func:`is_valid_format` checks the step structure
   ``think -> (tool -> information -> think)* -> answer`` with only whitespace between tags.
   The reference also requires Qwen's chat marker in the text, so runs with other models never
   got the format bonus; here the structure alone decides.
4. :func:`compute_score` uses exact match for the QA sources (those Tree-GRPO scores with EM:
   Search-R1's seven, ``web_questions``, ``strategyqa``, and any ``synth*`` source) and
   Tree-GRPO's token F1 (:func:`f1_score`) for others. With ``format_shaped=True`` an EM
   source gets the table of :func:`format_reward` (the answer counts as correct when EM is 1)
   and an F1 source :func:`f1_format_reward` (Tree-GRPO's ``qa_f1_format``).
5. No extractable answer (no ``<answer>`` pair, an unclosed one, other case or spacing of the
   tags, a final turn that searches) is never correct. Format-shaped, it scores what a wrong
   answer scores: the reference's extraction runs over prompt + response, whose prompt holds
   two example answer pairs, so it always finds an answer and an invalid response without one
   effectively gets ``final_format_score`` = 0.1 (F1: 0), not the 0 its code writes for "no
   answer". Unlike the reference, the prompt's example ("Beijing") never scores, even when it
   is the gold answer.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from treegrpo.env.steps import INVALID_ACTION
from treegrpo.exceptions import InvalidArgumentError

__all__ = [
    "QA_DATA_SOURCES",
    "RewardFn",
    "compute_score",
    "em_check",
    "exact_match_score",
    "extract_answer",
    "f1_format_reward",
    "f1_score",
    "format_reward",
    "golds_from_ground_truth",
    "is_qa_source",
    "is_valid_format",
    "load_reward_fn",
    "normalize_answer",
]

# verl's reward signature: compute_score(data_source, solution_str, ground_truth, extra_info=None)
RewardFn = Callable[..., Any]

# The sources Tree-GRPO's reward manager scores with (format-shaped) exact match; others get F1.
QA_DATA_SOURCES = frozenset(
    {
        "nq",
        "triviaqa",
        "popqa",
        "web_questions",
        "hotpotqa",
        "2wikimultihopqa",
        "musique",
        "bamboogle",
        "strategyqa",
    }
)
# Answers F1 does not give partial credit: a prediction or gold that normalises to one of these
# scores 0 against anything but itself (Tree-GRPO's qa_f1_format).
_NO_PARTIAL_CREDIT = frozenset({"yes", "no", "noanswer"})

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---- answer matching


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop the articles a/an/the (whole
    words), collapse whitespace. The order matters ("the-end" -> "theend", no article left)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def em_check(prediction: str, golds: str | Iterable[str]) -> int:
    """1 if the normalised prediction equals any normalised gold answer, else 0."""
    pred = normalize_answer(prediction)
    return int(any(pred == normalize_answer(g) for g in _gold_list(golds)))


def exact_match_score(prediction: str | None, golds: str | Iterable[str]) -> float:
    """Exact match as a float; no prediction scores 0."""
    return 0.0 if prediction is None else float(em_check(prediction, golds))


def f1_score(prediction: str | None, golds: str | Iterable[str]) -> float:
    """Best token F1 of the prediction against the gold answers, as Tree-GRPO's
    ``qa_f1_format`` computes it; no prediction scores 0.

    SQuAD token F1 over the normalised answers, except that when either side normalises to
    ``yes``, ``no`` or ``noanswer`` and the two differ, that gold scores 0 (``"no"`` against
    ``"no way"``: 0, not 2/3); and an answer that normalises to nothing (empty, punctuation or
    articles only) shares no token with anything, so it scores 0 even against an empty gold."""
    if prediction is None:
        return 0.0
    norm = normalize_answer(prediction)
    pred = norm.split()
    best = 0.0
    for gold in _gold_list(golds):
        ref_norm = normalize_answer(gold)
        if norm != ref_norm and (norm in _NO_PARTIAL_CREDIT or ref_norm in _NO_PARTIAL_CREDIT):
            continue
        ref = ref_norm.split()
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---- reading the response

_INFORMATION = re.compile(r"<information>.*?</information>", re.DOTALL)


def extract_answer(response: str, *, answer_tag: str = "answer") -> str | None:
    """The last answer of the response (stripped), ignoring observations; ``None`` if none."""
    text = _INFORMATION.sub(" ", response).replace(INVALID_ACTION, " ")
    found = _tag_regex(answer_tag).findall(text)
    return found[-1].strip() if found else None


def is_valid_format(
    response: str, *, tool_tags: Sequence[str] = ("search",), answer_tag: str = "answer"
) -> bool:
    """Whether the response follows ``think -> (tool -> information -> think)* -> answer``.

    Every step is one ``<think>`` block then one action; a tool call is followed by its
    ``<information>`` block; only whitespace may stand between tags, and nothing but whitespace
    after the answer. Contents of tags are not inspected (beyond holding no other tag)."""
    tag = _any_tag_regex(("think", "information", answer_tag, *tool_tags))
    # States: what may come next. Each block is: open tag, content without tags, close tag.
    expected = {"start": {"think"}, "think": {answer_tag, *tool_tags}, "information": {"think"}}
    for t in tool_tags:
        expected[t] = {"information"}
    state, pos = "start", 0
    while True:
        m = tag.search(response, pos)
        if m is None:
            return state == answer_tag and not response[pos:].strip()
        if response[pos : m.start()].strip() or state == answer_tag:
            return False
        name = m.group(1)
        if m.group(0).startswith("</") or name not in expected[state]:
            return False
        close = tag.search(response, m.end())
        if close is None or close.group(0) != f"</{name}>":
            return False
        state, pos = name, close.end()


def format_reward(correct: bool, valid: bool, has_answer: bool) -> float:
    """The Tree-GRPO QA runs' format-shaped EM reward (Search-R1's ``compute_score_em`` with
    structure 0.2, final format 0.1, retrieval 0): ``correct`` counts only with an answer, and
    no answer scores as a wrong one (module docstring, choice 5).

    ==========  ===========  =============
    answer      valid format invalid format
    ==========  ===========  =============
    correct     1.0          0.8
    wrong       0.2          0.1
    none        0.2          0.1
    ==========  ===========  =============

    (A valid format ends with an answer, so "none" is always invalid in practice.)"""
    if correct and has_answer:
        return 1.0 if valid else 0.8
    return 0.2 if valid else 0.1


def f1_format_reward(f1: float, valid: bool) -> float:
    """Tree-GRPO's format-shaped F1 reward (``qa_f1_format.compute_score_f1`` with structure
    0.2, retrieval 0): a response with some overlap gets its F1 (valid format) or F1 - 0.2
    (invalid; below 0 for F1 < 0.2); one with none (F1 0, or no answer) gets 0.2 (valid) or 0
    (invalid)."""
    if f1 > 0:
        return f1 if valid else f1 - 0.2
    return 0.2 if valid else 0.0


# ---- the reward of one response


def is_qa_source(data_source: str) -> bool:
    """Whether ``data_source`` is scored by exact match: :data:`QA_DATA_SOURCES` (Tree-GRPO's
    EM sources) and ``synth*``."""
    ds = data_source.lower()
    return ds in QA_DATA_SOURCES or ds.startswith("synth")


def golds_from_ground_truth(ground_truth: Any) -> list[str]:
    """The gold answers of a ``ground_truth`` value: ``{"target": [...]}``, a list (or NumPy
    array, as read from Parquet) of strings, or one string."""
    if isinstance(ground_truth, Mapping):
        if "target" not in ground_truth:
            raise InvalidArgumentError(
                f"ground_truth has no 'target' (keys: {sorted(ground_truth)}); expected "
                "{'target': [gold answers]} as in Search-R1's reward_model.ground_truth"
            )
        ground_truth = ground_truth["target"]
    return _gold_list(ground_truth)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    format_shaped: bool = False,
) -> float:
    """The outcome reward of one response, with verl's signature.

    ``solution_str`` is the response only (not the prompt). Exact match for QA sources, token
    F1 otherwise (:func:`is_qa_source`); ``format_shaped`` applies :func:`format_reward` (EM,
    "correct" meaning EM 1) or :func:`f1_format_reward` (F1). ``extra_info`` is accepted for
    verl's signature, unused."""
    del extra_info
    golds = golds_from_ground_truth(ground_truth)
    answer = extract_answer(solution_str)
    if is_qa_source(data_source):
        score = exact_match_score(answer, golds)
        if not format_shaped:
            return score
        return format_reward(score == 1.0, is_valid_format(solution_str), answer is not None)
    score = f1_score(answer, golds)
    if not format_shaped:
        return score
    return f1_format_reward(score, is_valid_format(solution_str))


# ---- a user's reward function


def load_reward_fn(spec: str) -> RewardFn:
    """Load a reward function from ``"module:function"`` or ``"path/to/file.py:function"``.

    The function must accept verl's arguments, called by keyword:
    ``(data_source, solution_str, ground_truth, extra_info=None)``, and return a float (or a
    dict with a ``"score"``, as verl allows)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InvalidArgumentError(
            f"reward function {spec!r} must look like 'module:function' or "
            "'path/to/file.py:function' (e.g. 'my_rewards:compute_score')"
        )
    where, _, name = spec.rpartition(":")
    where, name = where.strip(), name.strip()
    if not where or not name:
        raise InvalidArgumentError(
            f"reward function {spec!r} needs both parts, 'module:function' "
            "(e.g. 'my_rewards:compute_score')"
        )
    module = _load_file(where) if where.endswith(".py") else _import(where, spec)
    if not hasattr(module, name):
        defined = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
        )
        raise InvalidArgumentError(
            f"{where!r} has no attribute {name!r} (reward function {spec!r}); "
            f"its functions: {', '.join(defined) or 'none'}"
        )
    fn = getattr(module, name)
    if not callable(fn):
        raise InvalidArgumentError(
            f"{spec!r} is a {type(fn).__name__}, not a function; point it at a function "
            "(data_source, solution_str, ground_truth, extra_info=None) -> float"
        )
    try:
        inspect.signature(fn).bind(
            data_source="", solution_str="", ground_truth=None, extra_info=None
        )
    except TypeError as e:
        raise InvalidArgumentError(
            f"reward function {spec!r} must accept the keyword arguments (data_source, "
            f"solution_str, ground_truth, extra_info=None), verl's signature: {e}"
        ) from None
    except ValueError:
        pass  # no signature to inspect (some builtins): trust it
    return fn


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing module named by the spec is the user's typo; a missing dependency
        # inside their module is their module's error and is raised as is.
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise InvalidArgumentError(
            f"cannot import module {module_name!r} for reward function {spec!r}: no module "
            f"named {e.name!r}; check the name, and that its directory is on sys.path / "
            "PYTHONPATH (or pass 'path/to/file.py:function')"
        ) from None


def _load_file(path: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidArgumentError(f"reward function file {str(file)!r} does not exist")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"_treegrpo_reward_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise InvalidArgumentError(f"cannot load {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _gold_list(golds: Any) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    if isinstance(golds, (bytes, Mapping)) or not hasattr(golds, "__iter__"):
        raise InvalidArgumentError(
            f"gold answers must be a str or a list of str, got {type(golds).__name__}"
        )
    out = list(golds)
    for g in out:
        if not isinstance(g, str):
            raise InvalidArgumentError(
                f"gold answers must be str, got {type(g).__name__} ({g!r:.60})"
            )
    return out


@lru_cache(maxsize=16)
def _tag_regex(tag: str) -> re.Pattern[str]:
    return re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)


@lru_cache(maxsize=16)
def _any_tag_regex(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("</?(" + "|".join(re.escape(n) for n in names) + ")>")
