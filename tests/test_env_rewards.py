"""Rewards: SQuAD normalisation, EM and F1, answer extraction, the format reward, user functions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from treegrpo.env.rewards import (
    compute_score,
    em_check,
    exact_match_score,
    extract_answer,
    f1_format_reward,
    f1_score,
    format_reward,
    golds_from_ground_truth,
    is_qa_source,
    is_valid_format,
    load_reward_fn,
    normalize_answer,
)
from treegrpo.env.steps import INVALID_ACTION, wrap_information
from treegrpo.exceptions import InvalidArgumentError

# ---- matching


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("The Eiffel Tower", "eiffel tower"),
        ("  Hello,   World! ", "hello world"),
        ("a an the", ""),
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # articles are whole words only
        ("Anthem", "anthem"),
        ("the-end", "theend"),  # punctuation goes first, then no article is left
        ("U.S.A.", "usa"),
        ("Barack Obama's", "barack obamas"),
        ("multiple\n\tspaces", "multiple spaces"),
        ("1,000", "1000"),
        ("Été", "été"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "golds", "em"),
    [
        ("Paris", ["paris"], 1),
        ("the Paris.", ["Paris"], 1),
        ("Paris, France", ["Paris"], 0),
        ("London", ["Paris", "London"], 1),
        ("London", "London", 1),
        ("", [""], 1),
        ("x", [], 0),
    ],
)
def test_exact_match(prediction: str, golds: list[str] | str, em: int) -> None:
    assert em_check(prediction, golds) == em
    assert exact_match_score(prediction, golds) == float(em)


@pytest.mark.parametrize(
    ("prediction", "golds", "f1"),
    [
        ("Paris", ["Paris"], 1.0),
        ("the cat sat", ["cat sat on mat"], 2 / 3),  # P = 2/2, R = 2/4
        ("cat cat", ["cat"], 2 / 3),  # P = 1/2, R = 1
        ("dog", ["cat"], 0.0),
        ("cat dog", ["dog", "cat dog"], 1.0),  # best gold
        ("the", ["a"], 0.0),  # both normalise to nothing: no shared token (Tree-GRPO)
        ("", [""], 0.0),
        ("the", ["cat"], 0.0),
        (None, ["cat"], 0.0),
        # yes / no / noanswer get no partial credit (Tree-GRPO's qa_f1_format)
        ("no", ["no way"], 0.0),
        ("no way", ["no"], 0.0),
        ("yes it is", ["yes"], 0.0),
        ("No.", ["no"], 1.0),
        ("noanswer", ["no answer"], 0.0),
        ("no", ["no way", "no"], 1.0),  # best gold
        ("no way", ["no", "way"], 2 / 3),  # against "way": P = 1/2, R = 1
    ],
)
def test_f1(prediction: str | None, golds: list[str], f1: float) -> None:
    assert f1_score(prediction, golds) == pytest.approx(f1)


def test_no_prediction_scores_zero() -> None:
    assert exact_match_score(None, ["x"]) == 0.0


# ---- reading the response


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("<think>t</think><answer> Paris </answer>", "Paris"),
        ("<answer>a</answer> then <answer>b</answer>", "b"),  # the last one, as Search-R1
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("<think>no answer</think>", None),
        ("<answer>unclosed", None),
        # the invalid-action message mentions <answer> and </answer>: not an answer
        ("<think>t</think> junk" + INVALID_ACTION, None),
        ("junk" + INVALID_ACTION + "<think>t</think><answer> x </answer>", "x"),
        # retrieved documents are not the policy's answer
        ("<search>q</search>" + wrap_information("<answer>doc</answer>"), None),
    ],
)
def test_extract_answer(response: str, answer: str | None) -> None:
    assert extract_answer(response) == answer


OBS = wrap_information("Doc 1(Title: T) text")


@pytest.mark.parametrize(
    ("response", "valid"),
    [
        ("<think>t</think><answer>a</answer>", True),
        ("<think>t</think>\n<answer> a </answer>\n", True),
        (f"<think>t</think><search>q</search>{OBS}<think>u</think><answer>a</answer>", True),
        (
            f"<think>1</think> <search>q</search>{OBS}<think>2</think><search>r</search>{OBS}"
            "<think>3</think><answer>a</answer>",
            True,
        ),
        ("<think></think><answer></answer>", True),  # structure only
        ("<answer>a</answer>", False),  # no think first
        ("<think>t</think>", False),  # no answer
        ("<think>t</think> text <answer>a</answer>", False),  # text between tags
        ("<think>t</think><answer>a</answer> more", False),  # text after the answer
        ("<think>t</think><answer>a</answer><think>u</think>", False),
        ("<think>t</think><search>q</search><think>u</think><answer>a</answer>", False),
        (f"<think>t</think><search>q</search>{OBS}<answer>a</answer>", False),  # think first
        ("<think>t</think><search>q</search>" + INVALID_ACTION, False),
        ("<think>t" + INVALID_ACTION + "</think><answer>a</answer>", False),  # tags inside think
        ("<think>t</think><think>u</think><answer>a</answer>", False),
        ("<think>t<answer>a</answer>", False),
        ("<think>t</answer>", False),
        ("</think><answer>a</answer>", False),
        ("", False),
    ],
)
def test_is_valid_format(response: str, valid: bool) -> None:
    assert is_valid_format(response) is valid


def test_is_valid_format_follows_tool_tags() -> None:
    text = f"<think>t</think><web>q</web>{OBS}<think>u</think><answer>a</answer>"
    assert not is_valid_format(text)
    assert is_valid_format(text, tool_tags=("search", "web"))


def test_is_valid_format_has_no_model_marker() -> None:
    # The reference requires Qwen's "<|im_start|>assistant"; the structure alone decides here.
    assert is_valid_format("<think>t</think><answer>a</answer>")


@pytest.mark.parametrize(
    ("correct", "valid", "has_answer", "reward"),
    [
        (True, True, True, 1.0),
        (True, False, True, 0.8),
        (False, True, True, 0.2),
        (False, False, True, 0.1),
        (False, True, False, 0.2),
        (False, False, False, 0.1),  # no answer scores as a wrong one (the reference's effect)
        (True, True, False, 0.2),  # correct needs an answer
        (True, False, False, 0.1),
    ],
)
def test_format_reward_table(correct: bool, valid: bool, has_answer: bool, reward: float) -> None:
    assert format_reward(correct, valid, has_answer) == reward


# ---- compute_score


@pytest.mark.parametrize(
    "source",
    [
        "nq",
        "triviaqa",
        "popqa",
        "web_questions",
        "hotpotqa",
        "2wikimultihopqa",
        "musique",
        "bamboogle",
        "strategyqa",
    ],
)
def test_qa_sources_use_exact_match(source: str) -> None:
    assert is_qa_source(source)
    response = "<think>t</think><answer> the Cat sat </answer>"
    assert compute_score(source, response, {"target": ["cat sat"]}) == 1.0
    assert compute_score(source, response, {"target": ["cat sat on mat"]}) == 0.0


def test_other_sources_use_f1() -> None:
    assert is_qa_source("synth_2hop") and is_qa_source("NQ") and not is_qa_source("math")
    response = "<think>t</think><answer> cat sat </answer>"
    assert compute_score("math", response, ["cat sat on mat"]) == pytest.approx(2 / 3)
    assert compute_score("synth_2hop", response, ["cat sat on mat"]) == 0.0


@pytest.mark.parametrize(
    "ground_truth",
    [
        {"target": ["Paris"]},
        {"target": np.array(["Paris", "Lutetia"], dtype=object)},
        ["Paris"],
        np.array(["Paris"]),
        "Paris",
    ],
)
def test_ground_truth_shapes(ground_truth: object) -> None:
    assert compute_score("nq", "<answer>paris</answer>", ground_truth) == 1.0
    assert "Paris" in golds_from_ground_truth(ground_truth)


@pytest.mark.parametrize(
    ("ground_truth", "match"),
    [
        ({"answers": ["x"]}, "no 'target'"),
        (3, "got int"),
        ([1, 2], "must be str, got int"),
        (None, "got NoneType"),
    ],
)
def test_bad_ground_truth(ground_truth: object, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        compute_score("nq", "<answer>x</answer>", ground_truth)


def test_only_the_response_is_scored() -> None:
    # The prompt's example answer is "Beijing"; a response without an answer is never correct
    # (the reference reads the prompt's example and scores it 0.8 when the gold is Beijing).
    assert compute_score("nq", "<think>no idea</think>", ["Beijing"]) == 0.0
    assert compute_score("nq", "<think>no idea</think>", ["Beijing"], format_shaped=True) == 0.1


@pytest.mark.parametrize(
    ("response", "gold", "reward"),
    [
        ("<think>t</think><answer>Paris</answer>", "Paris", 1.0),
        ("<answer>Paris</answer>", "Paris", 0.8),
        ("<think>t</think><answer>Rome</answer>", "Paris", 0.2),
        ("<answer>Rome</answer>", "Paris", 0.1),
        # no answer can be extracted: scored as a wrong answer, never as a correct one
        ("<think>t</think> junk", "Paris", 0.1),
        ("<think>t</think><answer>Paris", "Paris", 0.1),  # unclosed (cut by the limit)
        ("<think>t</think><Answer>Paris</Answer>", "Paris", 0.1),  # other case
        ("<think>t</think>< answer >Paris</ answer >", "Paris", 0.1),  # spaced tags
        ("<think>t</think><search> Paris </search>", "Paris", 0.1),  # a final turn searching
    ],
)
def test_format_shaped_score(response: str, gold: str, reward: float) -> None:
    assert compute_score("hotpotqa", response, [gold], format_shaped=True) == reward
    assert compute_score("hotpotqa", response, [gold]) == float(reward == 1.0 or reward == 0.8)


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("<think>t</think><answer> cat sat on mat </answer>", 1.0),
        ("<answer> cat sat on mat </answer>", 0.8),
        ("<think>t</think><answer> cat sat </answer>", 2 / 3),  # the F1 itself, when valid
        ("<answer> cat sat </answer>", 2 / 3 - 0.2),  # F1 - 0.2, when invalid
        ("<answer> cat </answer>", 0.4 - 0.2),
        ("<think>t</think><answer> dog </answer>", 0.2),  # no overlap, valid
        ("<answer> dog </answer>", 0.0),  # no overlap, invalid
        ("<think>t</think> junk", 0.0),  # no answer
    ],
)
def test_format_shaped_f1_is_tree_grpos(response: str, reward: float) -> None:
    gold = {"target": ["cat sat on mat"]}
    valid = is_valid_format(response)
    assert f1_format_reward(f1_score(extract_answer(response), gold["target"]), valid) == (
        pytest.approx(reward)
    )
    assert compute_score("deep_search", response, gold, format_shaped=True) == pytest.approx(reward)


# ---- user reward functions

GOOD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 0.5

def wrong_signature(text):
    return 0.0

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module on sys.path with a unique name (modules are cached per process)."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_reward_fn_from_a_module(reward_module: str) -> None:
    fn = load_reward_fn(f"{reward_module}:compute_score")
    assert fn(data_source="nq", solution_str="x", ground_truth=["y"], extra_info=None) == 0.5


def test_load_reward_fn_from_a_file(tmp_path: Path) -> None:
    file = tmp_path / "my_reward.py"
    file.write_text(GOOD)
    assert load_reward_fn(f"{file}:compute_score")("nq", "x", ["y"]) == 0.5


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_colon_here", "must look like 'module:function'"),
        (":compute_score", "needs both parts"),
        ("{mod}:", "needs both parts"),
        ("surely_no_such_module_xyz:fn", "no module named 'surely_no_such_module_xyz'"),
        ("{mod}.sub:fn", "no module named"),
        ("{mod}:missing", "has no attribute 'missing'.*its functions: compute_score"),
        ("{mod}:NOT_A_FUNCTION", "is a int, not a function"),
        ("{mod}:wrong_signature", "must accept the keyword arguments"),
        ("/no/such/file.py:fn", "does not exist"),
    ],
)
def test_load_reward_fn_errors(reward_module: str, spec: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        load_reward_fn(spec.format(mod=reward_module))


def test_load_reward_fn_rejects_non_str() -> None:
    with pytest.raises(InvalidArgumentError, match="module:function"):
        load_reward_fn(None)  # type: ignore[arg-type]


def test_a_broken_user_module_keeps_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"broken_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import surely_missing_dependency_xyz

            def compute_score(data_source, solution_str, ground_truth, extra_info=None):
                return 0.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="surely_missing_dependency_xyz"):
        load_reward_fn(f"{name}:compute_score")
    sys.modules.pop(name, None)
