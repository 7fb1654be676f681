"""Rollout-log analysis with polars: a run directory as LazyFrames, and ready-made queries.

``load_run(path)`` scans a run directory (``nodes/``, ``trajectories/``, ``metrics.jsonl``)
into a :class:`Run` of three LazyFrames. Every query takes LazyFrames and returns a LazyFrame,
so a filter composes with any of them and nothing is read until ``collect()``::

    run = load_run("runs/quickstart")
    late = run.nodes.filter(pl.col("step") > 100)
    advantage_by_depth(late).collect()

Queries group by the keys of their ``by=`` argument; ``by=()`` gives one row over everything
passed in. Definitions (docs/analysis.md has the full list of columns):

- a *branch point* is a node with two or more children; its *gap* is the spread (max - min)
  of V over its children whose subtree holds a kept leaf, null when fewer than two do;
  it carries a *preference signal* when the gap is non-zero (sibling subtrees with different
  mean rewards get different intra-tree credit, algorithm.md section 3);
- an *invalid action* is a step that is neither a leaf nor accepted by the environment (it got
  the invalid-action message as its observation);
- the *path* of a leaf is its steps from the root; its budget is the action tokens and tool
  calls on it, and ``token_reuse`` is path tokens summed over the kept leaves (what training
  reads) per generated token: 1.0 for chains, above 1 where kept trajectories share prefixes.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from treegrpo.exceptions import RunFormatError, RunNotFoundError
from treegrpo.logs.write import SCHEMA_VERSION

__all__ = [
    "NODE_COLUMNS",
    "SIGNAL_TOLERANCE",
    "TRAJECTORY_COLUMNS",
    "Run",
    "advantage_by_depth",
    "branch_points",
    "branching",
    "budget",
    "em_curve",
    "failures",
    "leaf_budget",
    "load_run",
    "metric_curve",
    "reward_curve",
    "summary",
]

# The columns the queries read; the tables hold more (texts, log-probs, ...).
NODE_COLUMNS = (
    "node", "parent", "tree", "group", "depth", "prompt_len", "action_len", "observation_len",
    "num_children", "is_leaf", "leaf_reason", "kept", "reward", "kept_leaves", "value",
    "advantage_sum", "tool", "valid", "data_source",
)  # fmt: skip
TRAJECTORY_COLUMNS = (
    "leaf", "tree", "group", "reward", "a_inter", "a_intra", "advantage", "turns", "leaf_reason",
    "length", "action_tokens", "data_source",
)  # fmt: skip

# Sibling values closer than this count as equal (V is a mean of float rewards).
SIGNAL_TOLERANCE = 1e-9

_STEP_DIR = re.compile(r"step=(\d+)")
_EM_METRIC = r"^val-core/(.+)/acc/mean@\d+$"
_METRICS_SCHEMA = {"step": pl.Int64, "metric": pl.String, "value": pl.Float64}


@dataclass(frozen=True)
class Run:
    """A run directory's logs as polars LazyFrames.

    - ``nodes``: one row per node and step: ``Forest.nodes()`` columns plus texts and the
      environment's answers (``action_text``, ``tool``, ``valid``, ``data_source``, ...), with
      ``step`` from the partition directory and ``leaf_reason`` as a string.
    - ``trajectories``: one row per kept leaf and step: reward, ``a_inter``, ``a_intra``,
      ``advantage``, ``turns``, ``length``, ``action_tokens``, ``data_source``, ``response``.
    - Both carry ``rank``: the process that rolled the row out in a data-parallel run (node and
      tree ids are per rank, group ids global), 0 in a single-process run.
    - ``metrics``: ``metrics.jsonl`` in long form, columns ``step``, ``metric``, ``value``
      (numeric metrics only); empty when the run has no metrics file.
    - ``incomplete_steps``: steps left out of ``nodes`` and ``trajectories`` because one table
      lacks a part the other has (a run stopped between the two writes); ``()`` normally.
    """

    path: Path
    nodes: pl.LazyFrame
    trajectories: pl.LazyFrame
    metrics: pl.LazyFrame
    incomplete_steps: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    """Scan a run directory written by training (or by :func:`treegrpo.logs.write_rollout`).

    Checks what it can without reading the data: the directory and both tables exist, every
    Parquet footer is readable, from this schema version, with the columns the queries need.
    Raises :class:`~treegrpo.exceptions.RunNotFoundError` naming a missing path and
    :class:`~treegrpo.exceptions.RunFormatError` naming a malformed file.

    Example::

        run = load_run("runs/quickstart")
        run.nodes.filter(pl.col("is_leaf")).select("step", "reward").collect()
    """
    root = Path(path)
    if not root.exists():
        raise RunNotFoundError(f"run directory {root} does not exist")
    if not root.is_dir():
        raise RunNotFoundError(f"run directory {root} is not a directory")
    nodes = _scan_table(root, "nodes", NODE_COLUMNS)
    trajectories = _scan_table(root, "trajectories", TRAJECTORY_COLUMNS)
    # A step counts only when both tables hold the same parts (one per rank) of it: training
    # writes nodes, then trajectories, so a stop in between leaves a step with nodes alone.
    parts = {table: _parts(root / table) for table in ("nodes", "trajectories")}
    steps = set(parts["nodes"]) | set(parts["trajectories"])
    incomplete = tuple(
        sorted(s for s in steps if parts["nodes"].get(s) != parts["trajectories"].get(s))
    )
    if incomplete:
        shown = ", ".join(map(str, incomplete))
        warnings.warn(
            f"{root}: step(s) {shown} left out: the nodes and trajectories tables do not both "
            "hold every part of them (a run stopped between the two writes; resuming it "
            "rewrites the step)",
            stacklevel=2,
        )
        complete = pl.col("step").is_in(sorted(steps - set(incomplete)))
        nodes, trajectories = nodes.filter(complete), trajectories.filter(complete)
    metrics = _read_metrics(root / "metrics.jsonl")
    return Run(root, nodes, trajectories, metrics, incomplete)


def _parts(where: Path) -> dict[int, frozenset[str]]:
    """Step -> the names of its Parquet parts in one table directory."""
    out: dict[int, set[str]] = {}
    for file in where.glob("*/*.parquet"):
        match = _STEP_DIR.fullmatch(file.parent.name)
        if match:
            out.setdefault(int(match.group(1)), set()).add(file.name)
    return {step: frozenset(names) for step, names in out.items()}


def _scan_table(root: Path, table: str, columns: Sequence[str]) -> pl.LazyFrame:
    where = root / table
    expected = f"{table}/step=NNNNNN/part-0.parquet"
    if not where.is_dir():
        raise RunNotFoundError(
            f"run directory {root} has no {table}/ directory: not a treegrpo run directory "
            f"(expected {expected}, written by training or treegrpo.logs.write_rollout)"
        )
    files = sorted(where.glob("*/*.parquet"))
    if not files:
        raise RunNotFoundError(f"{where} holds no Parquet files (expected {expected})")
    schemas = []
    for file in files:
        if not _STEP_DIR.fullmatch(file.parent.name):
            raise RunFormatError(f"{file}: its directory is not named step=<number>")
        try:
            schema = pq.read_schema(file)
        except (OSError, pa.ArrowException) as e:
            raise RunFormatError(f"{file}: not a readable Parquet file ({e})") from e
        meta = schema.metadata or {}
        version = meta.get(b"treegrpo.schema_version", b"").decode()
        if version != SCHEMA_VERSION:
            raise RunFormatError(
                f"{file}: log schema version {version or '(none)'!r}, this treegrpo reads "
                f"{SCHEMA_VERSION!r}"
            )
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise RunFormatError(f"{file}: the {table} table lacks the columns {missing}")
        schemas.append(schema.remove_metadata())
    # One schema for all parts: a data-parallel step's parts carry a `rank` column that a
    # single-process step's part lacks (a run resumed with another world size has both).
    try:
        unified = pa.unify_schemas(schemas)
    except pa.ArrowException as e:
        raise RunFormatError(f"{where}: the parts' column types disagree ({e})") from e
    lf = pl.scan_parquet(
        str(where / "*" / "*.parquet"),
        hive_partitioning=True,
        schema=pl.from_arrow(unified.empty_table()).schema,
        missing_columns="insert",
    )
    rank = pl.col("rank").fill_null(0) if "rank" in unified.names else pl.lit(0)
    return lf.with_columns(
        pl.col("step").cast(pl.Int64),
        rank.cast(pl.Int32).alias("rank"),
        pl.col("leaf_reason").cast(pl.String),
    )


def _read_metrics(file: Path) -> pl.LazyFrame:
    # Small (one line per step and validation): read now, so a bad line fails here, clearly.
    if not file.exists():
        return pl.LazyFrame(schema=_METRICS_SCHEMA)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise RunFormatError(f"{file}: cannot be read ({e})") from e
    records = []
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            torn = number == len(lines)  # the last line, without its newline
            if torn:
                warnings.warn(
                    f"{file}:{number}: the last line is cut short (a run stopped while writing "
                    "it); left out",
                    stacklevel=3,
                )
                continue
            raise RunFormatError(f"{file}:{number}: not a JSON line ({e})") from e
        if not isinstance(record, dict):
            raise RunFormatError(f"{file}:{number}: not a JSON object")
        records.append(record)
    try:
        wide = pl.from_dicts(records, infer_schema_length=None) if records else pl.DataFrame()
    except pl.exceptions.PolarsError as e:
        raise RunFormatError(f"{file}: its lines do not form a table ({e})") from e
    if wide.height == 0:
        return pl.LazyFrame(schema=_METRICS_SCHEMA)
    if "step" not in wide.columns:
        raise RunFormatError(f"{file}: its lines have no 'step' field")
    numeric = [c for c, t in wide.schema.items() if c != "step" and t.is_numeric()]
    return (
        wide.lazy()
        .select(pl.col("step").cast(pl.Int64), *(pl.col(c).cast(pl.Float64) for c in numeric))
        .unpivot(index="step", variable_name="metric", value_name="value")
        .drop_nulls("value")
        .sort("step", "metric", maintain_order=True)
    )


def _key(column: str) -> pl.Expr:
    """One Int64 join key for a node: (step, rank, node id), as step * 2^44 + rank * 2^32 + id
    (node ids are u32; unique for ranks < 4096 and steps < 2^19). A join on one integer column
    is several times faster than on three."""
    return (
        pl.col("step") * (1 << 44)
        + pl.col("rank").cast(pl.Int64) * (1 << 32)
        + pl.col(column).cast(pl.Int64)
    )


def _grouped(lf: pl.LazyFrame, by: Sequence[str], *aggs: pl.Expr) -> pl.LazyFrame:
    """``lf.group_by(by).agg(aggs)`` sorted by the keys, or one row over all when ``by=()``."""
    by = list(by)
    return lf.group_by(by).agg(*aggs).sort(by) if by else lf.select(*aggs)


# ---------------------------------------------------------------------- curves


def reward_curve(
    trajectories: pl.LazyFrame, by: Sequence[str] = ("step", "data_source")
) -> pl.LazyFrame:
    """Outcome reward of the kept leaves (the trajectories trained on): ``leaves``,
    ``reward_mean``, ``reward_std`` (n-1), ``advantage_abs_mean``, per step and data source.

    Example::

        reward_curve(run.trajectories).collect()
        reward_curve(run.trajectories, by=["step"]).collect()   # all data sources together
    """
    return _grouped(
        trajectories,
        by,
        pl.len().alias("leaves"),
        pl.col("reward").mean().alias("reward_mean"),
        pl.col("reward").std().alias("reward_std"),
        pl.col("advantage").abs().mean().alias("advantage_abs_mean"),
    )


def em_curve(metrics: pl.LazyFrame) -> pl.LazyFrame:
    """Validation exact match per step and data source, from the ``val-core/<data_source>/
    acc/mean@1`` metrics (greedy chain rollouts); ``data_source`` ``all`` is their union.

    Example::

        em_curve(run.metrics).filter(pl.col("data_source") == "all").collect()
    """
    return (
        metrics.filter(pl.col("metric").str.contains(_EM_METRIC))
        .select(
            "step",
            pl.col("metric").str.extract(_EM_METRIC, 1).alias("data_source"),
            pl.col("value").alias("em"),
        )
        .sort("step", "data_source")
    )


def metric_curve(metrics: pl.LazyFrame, name: str) -> pl.LazyFrame:
    """One metric of ``metrics.jsonl`` per step (``step``, ``value``).

    Example::

        metric_curve(run.metrics, "actor/pg_loss").collect()
    """
    return metrics.filter(pl.col("metric") == name).select("step", "value").sort("step")


# ---------------------------------------------------------------------- where the signal is


def advantage_by_depth(nodes: pl.LazyFrame, by: Sequence[str] = ("depth",)) -> pl.LazyFrame:
    """V and advantage by depth, over the nodes with a kept leaf below them.

    ``nodes``; ``value_mean``/``value_std``: V(s), the mean reward of the kept leaves under s;
    ``value_gain_abs_mean``: mean |V(s) - V(parent)| (how much one step moves the expected
    reward, null at the roots); ``advantage_sum_mean`` and ``advantage_sum_abs_mean``: the
    summed advantage of the leaves under s, the weight on s's tokens.

    Example::

        advantage_by_depth(run.nodes).collect()
        advantage_by_depth(run.nodes, by=["step", "depth"]).collect()    # per step
    """
    # Every node with a kept leaf below has a parent with one too (or is a root).
    kept = nodes.filter(pl.col("kept_leaves") > 0)
    parents = kept.filter(~pl.col("is_leaf")).select(
        _key("node").alias("parent_key"), pl.col("value").alias("parent_value")
    )
    with_parent = kept.with_columns(_key("parent").alias("parent_key")).join(
        parents, on="parent_key", how="left"
    )
    return _grouped(
        with_parent,
        by,
        pl.len().alias("nodes"),
        pl.col("value").mean().alias("value_mean"),
        pl.col("value").std().alias("value_std"),
        (pl.col("value") - pl.col("parent_value")).abs().mean().alias("value_gain_abs_mean"),
        pl.col("advantage_sum").mean().alias("advantage_sum_mean"),
        pl.col("advantage_sum").abs().mean().alias("advantage_sum_abs_mean"),
    )


def branch_points(nodes: pl.LazyFrame) -> pl.LazyFrame:
    """One row per branch point (a node with two or more children): ``step``, ``rank``,
    ``data_source``, ``group``, ``tree``, ``node``, ``depth``, ``num_children``, ``compared``
    (children whose subtree holds a kept leaf), ``gap`` (max - min of those children's V, null
    when fewer than two) and ``signal`` (gap above :data:`SIGNAL_TOLERANCE`).

    Example::

        branch_points(run.nodes).sort("gap", descending=True).head(10).collect()
    """
    children = (
        nodes.filter(pl.col("parent").is_not_null() & (pl.col("kept_leaves") > 0))
        .group_by(_key("parent").alias("key"))
        .agg(
            pl.len().alias("compared"),
            pl.col("value").max().alias("child_value_max"),
            pl.col("value").min().alias("child_value_min"),
        )
    )
    compared = pl.col("compared").fill_null(0)
    gap = (
        pl.when(compared >= 2)
        .then(pl.col("child_value_max") - pl.col("child_value_min"))
        .otherwise(None)
    )
    return (
        nodes.filter(pl.col("num_children") >= 2)
        .with_columns(_key("node").alias("key"))
        .join(children, on="key", how="left")
        .select(
            "step",
            "rank",
            "data_source",
            "group",
            "tree",
            "node",
            "depth",
            "num_children",
            compared.cast(pl.UInt32).alias("compared"),
            gap.alias("gap"),
            (gap > SIGNAL_TOLERANCE).fill_null(False).alias("signal"),
        )
        .sort("step", "rank", "node")
    )


def branching(nodes: pl.LazyFrame, by: Sequence[str] = ("depth",)) -> pl.LazyFrame:
    """Branching statistics: ``branch_points`` and their ``share`` among the branch points
    with the same keys other than depth (by depth: the branch depth distribution),
    ``compared`` (those with two or more comparable children), ``with_signal`` and
    ``signal_share`` (a non-zero preference signal, as a share of all branch points),
    ``gap_mean`` (the reward gap between sibling subtrees).

    Example::

        branching(run.nodes).collect()            # by depth
        branching(run.nodes, by=()).collect()     # one row: the run
    """
    by = list(by)
    out = _grouped(
        branch_points(nodes),
        by,
        pl.len().alias("branch_points"),
        (pl.col("compared") >= 2).sum().alias("compared"),
        pl.col("signal").sum().alias("with_signal"),
        pl.col("signal").mean().alias("signal_share"),
        pl.col("gap").mean().alias("gap_mean"),
    )
    # The share of branch points at each depth among those of the same other keys (e.g. step).
    within = [k for k in by if k != "depth"]
    total = pl.col("branch_points").sum()
    return out.with_columns(
        (pl.col("branch_points") / (total.over(within) if within else total)).alias("share")
    )


# ---------------------------------------------------------------------- budget, failures


def leaf_budget(nodes: pl.LazyFrame, *, max_depth: int | None = None) -> pl.LazyFrame:
    """One row per leaf: ``step``, ``rank``, ``data_source``, ``group``, ``tree``, ``leaf``,
    ``kept``,
    ``leaf_reason``, ``turns`` (its depth), ``path_tokens`` (action tokens on the path: what
    the trajectory trains on) and ``path_tool_calls``.

    Walks up the tree one level per join; the number of levels is ``max_depth`` (read from
    the data when not given: one small query over ``depth``).

    Example::

        leaf_budget(run.nodes).group_by("step").agg(pl.col("path_tokens").mean()).collect()
    """
    if max_depth is None:
        max_depth = nodes.select(pl.col("depth").max()).collect().item() or 0
    tools = pl.col("tool").is_not_null().cast(pl.Int64)
    tokens = pl.col("action_len").cast(pl.Int64)
    # The walk carries integers only (the leaf's other columns join back once at the end), and
    # looks up internal nodes only: a leaf is never an ancestor.
    up = nodes.filter(~pl.col("is_leaf")).select(
        _key("node").alias("at"),
        _key("parent").alias("up"),
        tokens.alias("own_tokens"),
        tools.alias("own_tool_calls"),
    )
    leaves = nodes.filter(pl.col("is_leaf"))
    walk = leaves.select(
        _key("node").alias("key"),
        tokens.alias("path_tokens"),
        tools.alias("path_tool_calls"),
        _key("parent").alias("at"),
    )
    # A leaf at depth d has d - 1 steps above it; the root (no action, no tool) ends the walk.
    for _ in range(max(max_depth - 1, 0)):
        walk = (
            walk.join(up, on="at", how="left")
            .with_columns(
                pl.col("path_tokens") + pl.col("own_tokens").fill_null(0),
                pl.col("path_tool_calls") + pl.col("own_tool_calls").fill_null(0),
                pl.col("up").alias("at"),
            )
            .drop("up", "own_tokens", "own_tool_calls")
        )
    return (
        leaves.select(
            "step",
            "rank",
            "data_source",
            "group",
            "tree",
            pl.col("node").alias("leaf"),
            "kept",
            "leaf_reason",
            pl.col("depth").alias("turns"),
            _key("node").alias("key"),
        )
        .join(walk.drop("at"), on="key", how="left")
        .drop("key")
        .sort("step", "rank", "leaf")
    )


def budget(nodes: pl.LazyFrame, by: Sequence[str] = ("step",)) -> pl.LazyFrame:
    """What the rollouts spent and what training got from it: ``trees``, ``leaves`` (all),
    ``kept_leaves``, ``generated_tokens`` (action tokens of every step),
    ``observation_tokens``, ``tool_calls``; spent per leaf: ``generated_tokens_per_leaf``,
    ``tool_calls_per_leaf``; along a kept leaf's path (a trained trajectory):
    ``path_tokens_mean``, ``path_tool_calls_mean``; ``token_reuse`` = path tokens summed over
    kept leaves / generated tokens.

    No walk up the trees: a node's tokens and tool call lie on the path of every kept leaf
    below it, so the path sums are sums over nodes weighted by ``kept_leaves``
    (:func:`leaf_budget` walks the paths, for every leaf).

    Example::

        budget(run.nodes).select("step", "generated_tokens_per_leaf").collect()
    """
    below = pl.col("kept_leaves").cast(pl.Int64).fill_null(0)
    kept = (pl.col("is_leaf") & pl.col("kept")).sum()
    path_tokens = (pl.col("action_len").cast(pl.Int64) * below).sum()
    path_tool_calls = (pl.col("tool").is_not_null().cast(pl.Int64) * below).sum()
    generated = pl.col("action_len").cast(pl.Int64).sum()
    leaves = pl.col("is_leaf").sum()
    tool_calls = pl.col("tool").is_not_null().sum()
    return _grouped(
        nodes,
        by,
        pl.col("parent").is_null().sum().alias("trees"),
        leaves.alias("leaves"),
        kept.alias("kept_leaves"),
        generated.alias("generated_tokens"),
        pl.col("observation_len").cast(pl.Int64).sum().alias("observation_tokens"),
        tool_calls.alias("tool_calls"),
        (generated / leaves).alias("generated_tokens_per_leaf"),
        (tool_calls / leaves).alias("tool_calls_per_leaf"),
        (path_tokens / kept).alias("path_tokens_mean"),
        (path_tool_calls / kept).alias("path_tool_calls_mean"),
        (path_tokens / generated).alias("token_reuse"),
    )


def failures(nodes: pl.LazyFrame, by: Sequence[str] = ("step",)) -> pl.LazyFrame:
    """Failure modes: ``steps`` (non-root nodes), ``invalid_actions`` and
    ``invalid_share`` (of steps); ``leaves`` with ``answered``, ``truncated``,
    ``forced_final``, ``context_limit`` and their shares (of leaves).

    Example::

        failures(run.nodes, by=["step", "data_source"]).collect()
    """
    step = pl.col("parent").is_not_null()
    reason = pl.col("leaf_reason")
    leaves = pl.col("is_leaf").sum()
    return _grouped(
        nodes,
        by,
        step.sum().alias("steps"),
        (step & ~pl.col("is_leaf") & ~pl.col("valid")).sum().alias("invalid_actions"),
        leaves.alias("leaves"),
        (reason == "answer").sum().alias("answered"),
        (reason == "truncated").sum().alias("truncated"),
        (reason == "forced_final").sum().alias("forced_final"),
        (reason == "context_limit").sum().alias("context_limit"),
    ).with_columns(
        (pl.col("invalid_actions") / pl.col("steps")).alias("invalid_share"),
        *(
            (pl.col(c) / pl.col("leaves")).alias(f"{c}_share")
            for c in ("answered", "truncated", "forced_final", "context_limit")
        ),
    )


# ---------------------------------------------------------------------- the whole run


def summary(run: Run) -> dict[str, pl.DataFrame]:
    """The tables of ``treegrpo logs summary``, collected in one pass (shared scans):

    - ``run``: steps, trees, nodes, leaves, kept leaves (steps of ``run.incomplete_steps``
      are not counted);
    - ``rewards``: per data source, mean reward at the first and last step and over the run,
      and validation EM at the first and last validation;
    - ``depth``: :func:`advantage_by_depth`; ``branching``: :func:`branching` by depth;
    - ``branching_all``, ``budget``, ``failures``: one row each over the run.

    Example::

        tables = summary(load_run("runs/quickstart"))
        tables["branching_all"]["signal_share"].item()
    """
    nodes, traj = run.nodes, run.trajectories
    overview = nodes.select(
        pl.col("step").n_unique().alias("steps"),
        pl.col("parent").is_null().sum().alias("trees"),
        pl.len().alias("nodes"),
        pl.col("is_leaf").sum().alias("leaves"),
        (pl.col("is_leaf") & pl.col("kept")).sum().alias("kept_leaves"),
    )
    everything = pl.lit("all").alias("data_source")
    curves = pl.concat(
        [reward_curve(traj), reward_curve(traj, by=["step"]).with_columns(everything)],
        how="diagonal",
    )
    per_step = curves.group_by("data_source").agg(
        pl.col("step").n_unique().alias("steps"),
        pl.col("reward_mean").sort_by("step").first().alias("reward_first"),
        pl.col("reward_mean").sort_by("step").last().alias("reward_last"),
    )
    overall = pl.concat(
        [
            reward_curve(traj, by=["data_source"]),
            reward_curve(traj, by=()).with_columns(everything),
        ],
        how="diagonal",
    ).select("data_source", "leaves", pl.col("reward_mean").alias("reward_run"))
    em = (
        em_curve(run.metrics)
        .group_by("data_source")
        .agg(
            pl.col("em").sort_by("step").first().alias("em_first"),
            pl.col("em").sort_by("step").last().alias("em_last"),
        )
    )
    rewards = (
        per_step.join(overall, on="data_source", how="left")
        .join(em, on="data_source", how="full", coalesce=True)
        .sort("data_source")
    )
    names = ["run", "rewards", "depth", "branching", "branching_all", "budget", "failures"]
    frames = pl.collect_all(
        [
            overview,
            rewards,
            advantage_by_depth(nodes),
            branching(nodes),
            branching(nodes, by=()),
            budget(nodes, by=()),
            failures(nodes, by=()),
        ]
    )
    return dict(zip(names, frames, strict=True))
