"""Search-R1 Parquet files: writing, loading, group ids across files, and schema errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from treegrpo.env.datasets import Example, load_search_r1, write_search_r1
from treegrpo.env.prompt import SEARCH_R1_TEMPLATE, PromptBuilder
from treegrpo.exceptions import InvalidArgumentError


def search_r1_row(question: str, golds: list[str], index: int, **extra: Any) -> dict[str, Any]:
    """A row as Search-R1's data scripts write it (pandas -> Parquet, types inferred)."""
    return {
        "id": f"train_{index}",
        "question": question,
        "golden_answers": golds,
        "data_source": "nq",
        "prompt": [{"role": "user", "content": PromptBuilder().text(question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
        "extra_info": {"split": "train", "index": index, **extra},
    }


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


RECORDS = [
    {"question": "who wrote hamlet", "golds": ["Shakespeare"], "data_source": "synth_1hop"},
    {
        "question": "capital of france?",
        "golds": ["Paris", "paris, france"],
        "data_source": "synth_2hop",
        "split": "test",
        "extra_info": {"hops": 2},
    },
]


# ---- writing and reading back


def test_write_then_load(tmp_path: Path) -> None:
    path = write_search_r1(RECORDS, tmp_path / "sub" / "train.parquet")
    examples = load_search_r1(path)
    assert [e.group_id for e in examples] == [0, 1]
    first, second = examples
    assert first.question == "who wrote hamlet"
    assert first.prompt == [{"role": "user", "content": PromptBuilder().text("who wrote hamlet")}]
    assert first.golds == ["Shakespeare"] and first.data_source == "synth_1hop"
    assert first.extra_info == {"split": "train", "index": 0, "hops": None}
    assert second.extra_info == {"split": "test", "index": 1, "hops": 2}
    assert (second.source, second.row, second.ability) == (str(path), 1, "fact-reasoning")


def test_written_schema_is_search_r1(tmp_path: Path) -> None:
    schema = pq.read_schema(write_search_r1(RECORDS, tmp_path / "t.parquet"))
    assert schema.names[:5] == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert schema.field("prompt").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert schema.field("reward_model").type == pa.struct(
        [
            ("style", pa.string()),
            ("ground_truth", pa.struct([("target", pa.list_(pa.string()))])),
        ]
    )
    extra = schema.field("extra_info").type
    assert extra.field(0).name == "split" and extra.field(1).name == "index"
    assert extra.field("index").type == pa.int64()
    row = pq.read_table(tmp_path / "t.parquet").slice(0, 1).to_pylist()[0]
    assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": ["Shakespeare"]}}


def test_examples_round_trip(tmp_path: Path) -> None:
    examples = load_search_r1(write_search_r1(RECORDS, tmp_path / "a.parquet"))
    again = load_search_r1(write_search_r1(examples, tmp_path / "b.parquet"))
    for a, b in zip(examples, again, strict=True):
        assert (a.question, a.prompt, a.golds, a.extra_info, a.data_source) == (
            b.question,
            b.prompt,
            b.golds,
            b.extra_info,
            b.data_source,
        )


def test_custom_template_and_prompt(tmp_path: Path) -> None:
    records = [
        {"question": "q1", "golds": ["a"], "data_source": "nq"},
        {
            "question": "q2",
            "golds": ["b"],
            "data_source": "nq",
            "prompt": [{"role": "user", "content": "given"}],
        },
    ]
    examples = load_search_r1(
        write_search_r1(records, tmp_path / "t.parquet", template="Q={question}")
    )
    assert [e.prompt[0]["content"] for e in examples] == ["Q=q1?", "given"]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"question": "q", "golds": ["a"]}, "record 0: missing data_source"),
        ({"question": "q", "golds": ["a"], "data_source": "nq", "gold": 1}, "unknown keys gold"),
        ({"question": "q", "golds": "a", "data_source": "nq"}, "golds must be a non-empty list"),
        ({"question": "q", "golds": [], "data_source": "nq"}, "golds must be a non-empty list"),
        ({"question": "q", "golds": [1], "data_source": "nq"}, "golds must be a non-empty list"),
        ({"question": " ", "golds": ["a"], "data_source": "nq"}, "question must be a non-empty"),
        ({"question": "q", "golds": ["a"], "data_source": ""}, "data_source must be"),
    ],
)
def test_write_rejects_bad_records(tmp_path: Path, record: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        write_search_r1([record], tmp_path / "t.parquet")


def test_write_rejects_no_records(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no records"):
        write_search_r1([], tmp_path / "t.parquet")


# ---- loading files as users have them


def test_search_r1_style_file_with_extra_columns(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "nq.parquet",
        [search_r1_row("who wrote hamlet", ["Shakespeare"], 0), search_r1_row("b", ["c"], 1)],
    )
    first, _ = load_search_r1(path)
    assert first.question == "who wrote hamlet" and first.golds == ["Shakespeare"]
    assert first.extra_info == {"split": "train", "index": 0}


def test_question_from_the_prompt_when_no_question_column(tmp_path: Path) -> None:
    rows = [search_r1_row("who wrote hamlet", ["x"], 0)]
    del rows[0]["question"]
    rows.append({**search_r1_row("z", ["y"], 1), "prompt": [{"role": "user", "content": "bare"}]})
    rows[1].pop("question")
    examples = load_search_r1(write_rows(tmp_path / "t.parquet", rows))
    assert [e.question for e in examples] == ["who wrote hamlet?", "bare"]


def test_group_ids_are_unique_across_files(tmp_path: Path) -> None:
    # Both files number their rows 0, 1, 2 in extra_info.index (the reference's group id).
    a = write_rows(tmp_path / "a.parquet", [search_r1_row(f"a{i}", ["x"], i) for i in range(3)])
    b = write_rows(tmp_path / "b.parquet", [search_r1_row(f"b{i}", ["x"], i) for i in range(3)])
    examples = load_search_r1([a, b])
    assert [e.group_id for e in examples] == list(range(6))
    assert [e.extra_info["index"] for e in examples] == [0, 1, 2, 0, 1, 2]
    assert [(Path(e.source).name, e.row) for e in examples][3] == ("b.parquet", 0)
    # a directory stands for its Parquet files, sorted; so does a glob
    assert [e.question for e in load_search_r1(tmp_path)] == [e.question for e in examples]
    globbed = load_search_r1(str(tmp_path / "*.parquet"))
    assert [e.question for e in globbed] == [e.question for e in examples]
    with pytest.raises(InvalidArgumentError, match="matches no dataset file"):
        load_search_r1(str(tmp_path / "nothing-*.parquet"))


def test_split_filter(tmp_path: Path) -> None:
    path = write_search_r1(RECORDS, tmp_path / "t.parquet")
    (test,) = load_search_r1(path, split="test")
    assert test.question == "capital of france?" and test.group_id == 0
    with pytest.raises(InvalidArgumentError, match=r"no row has extra_info.split == 'dev'.*'test'"):
        load_search_r1(path, split="dev")


def test_polars_written_file_with_large_types(tmp_path: Path) -> None:
    path = tmp_path / "polars.parquet"
    pl.DataFrame([search_r1_row("q", ["a"], 0)]).write_parquet(path)
    assert pa.types.is_large_string(pq.read_schema(path).field("data_source").type)
    (ex,) = load_search_r1(path)
    assert ex.golds == ["a"] and ex.question == "q"


# ---- broken files: every error names the file, the column or field, and the row


def broken(tmp_path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def without(key: str) -> list[dict[str, Any]]:
    row = search_r1_row("q", ["a"], 0)
    del row[key]
    return [row]


def with_row(i: int, **changes: Any) -> list[dict[str, Any]]:
    rows = [search_r1_row(f"q{k}", ["a"], k) for k in range(3)]
    rows[i].update(changes)
    return rows


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (without("prompt"), "column 'prompt' is missing"),
        (without("reward_model"), "column 'reward_model' is missing"),
        (without("data_source"), "column 'data_source' is missing"),
        (
            [{**r, "reward_model": {"ground_truth": {"answers": ["a"]}}} for r in with_row(0)],
            "column 'reward_model' has no field ground_truth.target",
        ),
        (
            [{**r, "reward_model": {"style": "rule"}} for r in with_row(0)],
            "column 'reward_model' has no field ground_truth.target",
        ),
        (
            [{**r, "reward_model": {"ground_truth": {"target": "a"}}} for r in with_row(0)],
            "field ground_truth.target must be a list of strings",
        ),
        (
            [{**r, "reward_model": {"ground_truth": {"target": [1]}}} for r in with_row(0)],
            "field ground_truth.target must be a list of strings",
        ),
        ([{**r, "prompt": "text"} for r in with_row(0)], "column 'prompt' must be a list"),
        (
            [{**r, "prompt": [{"text": "x"}]} for r in with_row(0)],
            "column 'prompt' messages need a string field 'role'",
        ),
        ([{**r, "data_source": 1} for r in with_row(0)], "column 'data_source' must be a string"),
        ([{**r, "extra_info": 1} for r in with_row(0)], "column 'extra_info' must be a struct"),
        ([{**r, "question": 1} for r in with_row(0)], "column 'question' must be a string"),
        (with_row(2, prompt=None), "row 2: prompt is null or empty"),
        (with_row(1, prompt=[]), "row 1: prompt is null or empty"),
        (
            with_row(1, prompt=[{"role": "user", "content": None}]),
            r"row 1: prompt\[0\] has a null role or content",
        ),
        (
            with_row(1, reward_model={"style": "rule", "ground_truth": {"target": None}}),
            "row 1: reward_model.ground_truth.target is null or empty",
        ),
        (
            with_row(2, reward_model={"style": "rule", "ground_truth": {"target": []}}),
            "row 2: reward_model.ground_truth.target is null or empty",
        ),
        (
            with_row(0, reward_model={"style": "rule", "ground_truth": {"target": ["a", None]}}),
            "row 0: reward_model.ground_truth.target holds a null answer",
        ),
        (with_row(1, reward_model=None), "row 1: reward_model.ground_truth.target is null"),
        (with_row(1, data_source=None), "row 1: data_source is null or empty"),
    ],
)
def test_broken_files(tmp_path: Path, rows: list[dict[str, Any]], match: str) -> None:
    path = broken(tmp_path, rows)
    with pytest.raises(InvalidArgumentError, match=re.escape(str(path)) + ": .*" + match):
        load_search_r1(path)


def test_empty_file(tmp_path: Path) -> None:
    schema = pa.Table.from_pylist([search_r1_row("q", ["a"], 0)]).schema
    path = broken(tmp_path, [], schema)
    with pytest.raises(InvalidArgumentError, match=r"broken\.parquet: the file has no rows"):
        load_search_r1(path)


def test_not_parquet_and_missing_paths(tmp_path: Path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(InvalidArgumentError, match=r"junk\.parquet: not a readable Parquet file"):
        load_search_r1(junk)
    with pytest.raises(InvalidArgumentError, match=r"nope\.parquet: no such dataset file"):
        load_search_r1(tmp_path / "nope.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InvalidArgumentError, match="directory holds no"):
        load_search_r1(tmp_path / "empty_dir")
    with pytest.raises(InvalidArgumentError, match="no dataset files"):
        load_search_r1([])


def test_example_is_a_plain_record() -> None:
    ex = Example(0, "nq", "q", [{"role": "user", "content": SEARCH_R1_TEMPLATE}], ["a"])
    assert ex.extra_info == {} and ex.row == -1
