"""Search-R1 Parquet datasets: load them into :class:`Example` rows, and write them.

The format (one row per question; ../shared/docs/search-agent.md):

=============  ================================================================================
column         type
=============  ================================================================================
data_source    string: ``nq``, ``hotpotqa``, ... (selects the reward)
prompt         list<struct<role: string, content: string>>: the rendered user message
ability        string: ``"fact-reasoning"`` (optional when loading)
reward_model   struct<style: string, ground_truth: struct<target: list<string>>>
extra_info     struct<split: string, index: int64, ...> (optional when loading)
=============  ================================================================================

Other columns (``question``, ``golden_answers``, ``id``, ...) are tolerated; ``question``, when
present, gives :attr:`Example.question`. Group ids are a running index over all loaded rows, so
they are unique per question across files (the per-file ``extra_info.index`` is not: the
reference reuses it and silently merges unrelated questions of concatenated datasets).
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from treegrpo.env.prompt import SEARCH_R1_TEMPLATE, PromptBuilder
from treegrpo.exceptions import InvalidArgumentError

__all__ = ["Example", "load_search_r1", "write_search_r1"]

PathLike = str | Path


@dataclass
class Example:
    """One question of a Search-R1 dataset.

    - ``group_id``: unique per question across every file of one :func:`load_search_r1` call.
    - ``prompt``: the chat messages of the ``prompt`` column (render them with
      :meth:`PromptBuilder.render_messages`).
    - ``question``: the ``question`` column, or else the prompt's text after "Question: ".
    - ``golds``: ``reward_model.ground_truth.target``.
    - ``source`` / ``row``: the file and 0-based row the example came from."""

    group_id: int
    data_source: str
    question: str
    prompt: list[dict[str, str]]
    golds: list[str]
    extra_info: dict[str, Any] = field(default_factory=dict)
    ability: str = "fact-reasoning"
    source: str = ""
    row: int = -1


# ---- loading


def load_search_r1(
    paths: PathLike | Sequence[PathLike], *, split: str | None = None
) -> list[Example]:
    """Read Search-R1 Parquet files (a directory stands for its ``*.parquet`` files, sorted).

    ``split`` keeps only the rows whose ``extra_info.split`` equals it. Schema problems raise
    :class:`~treegrpo.exceptions.InvalidArgumentError` naming the file, the column or nested
    field, and the row."""
    files = _expand(paths)
    examples: list[Example] = []
    splits_seen: set[Any] = set()
    for file in files:
        for ex in _read_file(file):
            split_of_row = ex.extra_info.get("split")
            splits_seen.add(split_of_row)
            if split is None or split_of_row == split:
                ex.group_id = len(examples)
                examples.append(ex)
    if split is not None and not examples:
        seen = ", ".join(sorted(repr(s) for s in splits_seen))
        raise InvalidArgumentError(
            f"no row has extra_info.split == {split!r} in {', '.join(map(str, files))}; "
            f"the splits found: {seen}"
        )
    return examples


def _expand(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise InvalidArgumentError("no dataset files given")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise InvalidArgumentError(f"{p}: directory holds no *.parquet file")
            files.extend(found)
        elif p.exists():
            files.append(p)
        elif any(c in str(item) for c in "*?["):  # a glob: its matches, in sorted order
            found = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not found:
                raise InvalidArgumentError(f"{item}: the pattern matches no dataset file")
            files.extend(found)
        else:
            raise InvalidArgumentError(f"{p}: no such dataset file")
    return files


def _read_file(file: Path) -> list[Example]:
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise InvalidArgumentError(f"{file}: not a readable Parquet file ({e})") from None
    if table.num_rows == 0:
        raise InvalidArgumentError(f"{file}: the file has no rows")
    schema = table.schema
    _check_schema(file, schema)
    optional = [c for c in ("ability", "extra_info", "question") if c in schema.names]
    rows = table.select(["data_source", "prompt", "reward_model", *optional]).to_pylist()
    return [_example(file, i, row) for i, row in enumerate(rows)]


def _check_schema(file: Path, schema: pa.Schema) -> None:
    def fail(column: str, what: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{file}: column {column!r} {what}; expected the Search-R1 schema (see "
            "treegrpo.env.datasets, or write files with write_search_r1)"
        )

    for name in ("data_source", "prompt", "reward_model"):
        if name not in schema.names:
            raise fail(name, f"is missing (columns: {', '.join(schema.names)})")
    if not _is_string(schema.field("data_source").type):
        raise fail("data_source", f"must be a string, got {schema.field('data_source').type}")
    for name in ("ability", "question"):
        if name in schema.names and not _is_string(schema.field(name).type):
            raise fail(name, f"must be a string, got {schema.field(name).type}")

    prompt = schema.field("prompt").type
    if not _is_list(prompt) or not pa.types.is_struct(prompt.value_type):
        raise fail("prompt", f"must be a list of {{role, content}} structs, got {prompt}")
    for sub in ("role", "content"):
        idx = prompt.value_type.get_field_index(sub)
        if idx < 0 or not _is_string(prompt.value_type.field(idx).type):
            raise fail("prompt", f"messages need a string field {sub!r}, got {prompt}")

    target = _nested(schema.field("reward_model").type, ("ground_truth", "target"))
    if target is None:
        raise fail(
            "reward_model",
            f"has no field ground_truth.target (type: {schema.field('reward_model').type})",
        )
    if not _is_list(target) or not _is_string(target.value_type):
        raise fail(
            "reward_model", f"field ground_truth.target must be a list of strings, got {target}"
        )
    if "extra_info" in schema.names and not pa.types.is_struct(schema.field("extra_info").type):
        raise fail("extra_info", f"must be a struct, got {schema.field('extra_info').type}")


def _example(file: Path, i: int, row: dict[str, Any]) -> Example:
    def fail(what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{file}: row {i}: {what}")

    data_source = row["data_source"]
    if not data_source:
        raise fail("data_source is null or empty; it selects the reward (e.g. 'nq')")
    prompt = row["prompt"]
    if not prompt:
        raise fail("prompt is null or empty; it must hold the chat messages")
    messages: list[dict[str, str]] = []
    for j, m in enumerate(prompt):
        if m is None or m["role"] is None or m["content"] is None:
            raise fail(f"prompt[{j}] has a null role or content")
        messages.append({"role": m["role"], "content": m["content"]})
    gt = (row["reward_model"] or {}).get("ground_truth") or {}
    golds = gt.get("target")
    if not golds:
        raise fail("reward_model.ground_truth.target is null or empty; it lists the gold answers")
    if any(g is None for g in golds):
        raise fail("reward_model.ground_truth.target holds a null answer")
    question = (row.get("question") or "").strip() or _question_from_prompt(messages)
    return Example(
        group_id=-1,
        data_source=data_source,
        question=question,
        prompt=messages,
        golds=list(golds),
        extra_info=dict(row.get("extra_info") or {}),
        ability=row.get("ability") or "fact-reasoning",
        source=str(file),
        row=i,
    )


def _question_from_prompt(messages: list[dict[str, str]]) -> str:
    """The text after the first "Question: " of the last user message (the template's
    placeholder), or that whole message when it has no such marker."""
    user = [m["content"] for m in messages if m["role"] == "user"] or [messages[-1]["content"]]
    text = user[-1]
    _, marker, rest = text.partition("Question: ")
    return (rest if marker else text).strip()


def _is_string(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or bool(is_view and is_view(t))


def _is_list(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_list_view", None)  # pyarrow >= 16
    return pa.types.is_list(t) or pa.types.is_large_list(t) or bool(is_view and is_view(t))


def _nested(t: pa.DataType, names: tuple[str, ...]) -> pa.DataType | None:
    for name in names:
        if not pa.types.is_struct(t) or t.get_field_index(name) < 0:
            return None
        t = t.field(t.get_field_index(name)).type
    return t


# ---- writing

_RECORD_KEYS = {"question", "golds", "data_source"}
_OPTIONAL_KEYS = {"split", "index", "extra_info", "prompt", "ability"}

_PROMPT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_REWARD_TYPE = pa.struct(
    [("style", pa.string()), ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))]
)


def write_search_r1(
    records: Iterable[Example | Mapping[str, Any]],
    path: PathLike,
    *,
    template: str | PromptBuilder = SEARCH_R1_TEMPLATE,
) -> Path:
    """Write records as a Search-R1 Parquet file that Search-R1, verl and
    :func:`load_search_r1` read. Returns the path.

    Each record is an :class:`Example` (written as loaded: round trip) or a mapping:

    - ``question`` (str), ``golds`` (list of str), ``data_source`` (str, e.g. ``"synth_2hop"``;
      sources starting with ``synth`` are scored by exact match): required;
    - ``split`` (default ``"train"``) and ``index`` (default: the record's position in this
      file) go to ``extra_info``, with the keys of an optional ``extra_info`` dict (a key that
      some records lack is written as null for them: one struct type per column);
    - ``prompt``: chat messages; by default one user message built from ``question`` with
      ``template`` (Search-R1's base template);
    - ``ability``: default ``"fact-reasoning"``.

    Columns written: ``data_source``, ``prompt``, ``ability``, ``reward_model``
    (``{"style": "rule", "ground_truth": {"target": golds}}``), ``extra_info``, and
    ``question`` (extra columns are tolerated by Search-R1 and verl)."""
    builder = template if isinstance(template, PromptBuilder) else PromptBuilder(template)
    columns: dict[str, list[Any]] = {
        k: [] for k in ("data_source", "prompt", "ability", "reward_model", "extra_info")
    }
    questions: list[str] = []
    for position, rec in enumerate(records):
        ex = rec if isinstance(rec, Example) else _example_from_record(position, rec, builder)
        extra = dict(ex.extra_info)
        extra.setdefault("split", "train")
        extra.setdefault("index", position)
        columns["data_source"].append(ex.data_source)
        columns["prompt"].append(ex.prompt)
        columns["ability"].append(ex.ability)
        columns["reward_model"].append(
            {"style": "rule", "ground_truth": {"target": [str(g) for g in ex.golds]}}
        )
        columns["extra_info"].append(
            {"split": extra.pop("split"), "index": extra.pop("index"), **extra}
        )
        questions.append(ex.question)
    if not questions:
        raise InvalidArgumentError(f"no records to write to {path}; a dataset needs a row")
    try:
        extra_info = pa.array(columns["extra_info"])
    except (pa.ArrowException, TypeError) as e:
        raise InvalidArgumentError(
            f"extra_info values of different types across records cannot form one column: {e}"
        ) from None
    table = pa.table(
        {
            "data_source": pa.array(columns["data_source"], pa.string()),
            "prompt": pa.array(columns["prompt"], _PROMPT_TYPE),
            "ability": pa.array(columns["ability"], pa.string()),
            "reward_model": pa.array(columns["reward_model"], _REWARD_TYPE),
            "extra_info": extra_info,
            "question": pa.array(questions, pa.string()),
        }
    )
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def _example_from_record(position: int, rec: Mapping[str, Any], builder: PromptBuilder) -> Example:
    def fail(what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"record {position}: {what}")

    if not isinstance(rec, Mapping):
        raise fail(f"must be an Example or a mapping, got {type(rec).__name__}")
    missing = _RECORD_KEYS - rec.keys()
    if missing:
        raise fail(f"missing {', '.join(sorted(missing))} (required: question, golds, data_source)")
    unknown = rec.keys() - _RECORD_KEYS - _OPTIONAL_KEYS
    if unknown:
        raise fail(
            f"unknown keys {', '.join(sorted(map(str, unknown)))}; allowed: "
            f"{', '.join(sorted(_RECORD_KEYS | _OPTIONAL_KEYS))} (put others in extra_info)"
        )
    golds = rec["golds"]
    if isinstance(golds, str) or not all(isinstance(g, str) for g in golds) or not len(golds):
        raise fail(f"golds must be a non-empty list of str, got {golds!r:.80}")
    if not isinstance(rec["data_source"], str) or not rec["data_source"]:
        raise fail("data_source must be a non-empty str (e.g. 'synth_2hop')")
    extra = dict(rec.get("extra_info") or {})
    for key in ("split", "index"):
        if key in rec:
            extra[key] = rec[key]
    question = rec["question"]
    if not isinstance(question, str) or not question.strip():
        raise fail(f"question must be a non-empty str, got {question!r:.80}")
    prompt = rec.get("prompt") or builder.messages(question)
    return Example(
        group_id=position,
        data_source=rec["data_source"],
        question=question.strip(),
        prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
        golds=list(golds),
        extra_info=extra,
        ability=rec.get("ability", "fact-reasoning"),
    )
