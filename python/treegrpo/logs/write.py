"""Rollout logs: one Parquet partition per training step and table, written atomically.

A run directory holds::

    nodes/step=000012/part-0.parquet          one row per node (the Forest's Arrow export + texts)
    trajectories/step=000012/part-0.parquet   one row per kept leaf (advantages + lengths)

read with ``polars.scan_parquet(run / "nodes" / "**" / "*.parquet", hive_partitioning=True)``
(the ``step`` column comes from the directory name). A data-parallel run (torchrun, K > 1
processes) writes one part per rank, ``part-{rank}.parquet``, each with a ``rank`` column:
node and tree ids are per rank, so ``(step, rank, node)`` identifies a node; group ids are
global. Each file carries the key-value metadata ``treegrpo.schema_version`` and
``treegrpo.table``. A file appears under its final name only
once complete (written to a temporary name in the same directory, then renamed), so a crash
mid-write leaves nothing a reader picks up; a killed run leaves the temporary
(``.part-0.parquet.*.tmp``), which :func:`remove_temporaries` deletes when the run resumes. The
columns are documented in docs/architecture.md; :mod:`treegrpo.logs.analysis` reads them back
(docs/analysis.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from treegrpo.fsutil import atomic_file

if TYPE_CHECKING:
    from treegrpo import Table
    from treegrpo.rollout import RolloutResult

__all__ = [
    "SCHEMA_VERSION",
    "partition",
    "remove_steps_after",
    "remove_temporaries",
    "write_rollout",
    "write_table_atomic",
    "write_text_atomic",
]

SCHEMA_VERSION = "1"
TABLES = ("nodes", "trajectories")
# The temporaries of write_table_atomic / write_text_atomic: ".{final name}.{random}.tmp".
_PART_TEMPORARY = ".part-*.parquet.*.tmp"


def partition(run_dir: str | Path, table: str, step: int) -> Path:
    """The directory of one step's partition of `table` ("nodes" or "trajectories")."""
    return Path(run_dir) / table / f"step={step:06d}"


def write_table_atomic(table: pa.Table, path: Path, *, name: str) -> Path:
    """Write `table` to `path` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(table.schema.metadata or {})}
    meta.update(
        {b"treegrpo.schema_version": SCHEMA_VERSION.encode(), b"treegrpo.table": name.encode()}
    )
    table = table.replace_schema_metadata(meta)
    with atomic_file(path, suffix=".tmp") as tmp:
        pq.write_table(table, str(tmp))
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    """Write `text` to `path` via a temporary file in the same directory, fsync and a rename:
    a reader (or a process killed mid-write) sees the old file whole or the new one."""
    with atomic_file(path, suffix=".tmp", fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def remove_temporaries(run_dir: str | Path, files: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries that a killed process left in a run directory: Parquet parts
    (``{nodes,trajectories}/step=*/.part-*.parquet.*.tmp``) and those of the `files` (names in
    the run directory) written with :func:`write_text_atomic` (``.metrics.jsonl.*.tmp``). Only
    these patterns; returns what was removed. Call it only while holding the run's lock."""
    root = Path(run_dir)
    found = [p for t in TABLES for p in root.glob(f"{t}/step=*/{_PART_TEMPORARY}")]
    found += [p for name in files for p in root.glob(f".{name}.*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def remove_steps_after(run_dir: str | Path, step: int) -> list[Path]:
    """Delete the rollout-log partitions of steps after `step`: a run resumed from the
    checkpoint of `step` rolls those steps out again, and every step is logged once."""
    root = Path(run_dir)
    found = []
    for table in TABLES:
        for part in root.glob(f"{table}/step=*"):
            number = part.name.removeprefix("step=")
            if part.is_dir() and number.isdigit() and int(number) > step:
                found.append(part)
    for p in found:
        shutil.rmtree(p)
    return found


def write_rollout(
    run_dir: str | Path,
    step: int,
    result: RolloutResult,
    advantages: Table,
    *,
    rank: int | None = None,
) -> dict[str, Path]:
    """Write one step's nodes and trajectories tables. Call after ``forest.advantages(...)`` so
    the nodes table carries V, kept leaves and summed advantage; `advantages` is its result.
    ``rank``: this process's rank in a data-parallel run (part ``part-{rank}.parquet`` and a
    ``rank`` column); None = a single process (``part-0.parquet``, no ``rank`` column)."""
    forest = result.forest
    nodes = pa.table(forest.nodes())
    ids = nodes.column("node").to_pylist()
    info = [result.info.get(i) for i in ids]

    def col(attr: str, kind: pa.DataType) -> pa.Array:
        return pa.array([getattr(x, attr) if x is not None else None for x in info], type=kind)

    # mean_log_prob is the Forest's own column (null at roots and where the engine gave none)
    nodes = (
        nodes.append_column("action_text", col("action_text", pa.string()))
        .append_column("observation_text", col("observation_text", pa.string()))
        .append_column("surprisal", pc.negate(nodes.column("mean_log_prob")))
        .append_column("finish_reason", col("finish_reason", pa.string()))
        .append_column("tool", col("tool", pa.string()))
        .append_column("query", col("query", pa.string()))
        .append_column("answer", col("answer", pa.string()))
        .append_column("valid", col("valid", pa.bool_()))
        .append_column("weight_version", col("weight_version", pa.string()))
        .append_column(
            "data_source",
            pa.array([result.prompts[g].data_source for g in nodes.column("group").to_pylist()]),
        )
    )

    leaves = pa.table(forest.leaves()).select(
        ["leaf", "depth", "leaf_reason", "length", "action_tokens"]
    )
    traj = pa.table(advantages).join(leaves, "leaf", join_type="left outer").sort_by("leaf")
    traj = traj.rename_columns(["turns" if c == "depth" else c for c in traj.column_names])
    groups = traj.column("group").to_pylist()
    traj = traj.append_column(
        "data_source", pa.array([result.prompts[g].data_source for g in groups], pa.string())
    ).append_column(
        "response",
        pa.array([result.response_text(leaf) for leaf in traj.column("leaf").to_pylist()]),
    )
    part = f"part-{rank or 0}.parquet"
    if rank is not None:
        nodes = nodes.append_column("rank", pa.array([rank] * len(nodes), pa.int32()))
        traj = traj.append_column("rank", pa.array([rank] * len(traj), pa.int32()))
    return {
        "nodes": write_table_atomic(nodes, partition(run_dir, "nodes", step) / part, name="nodes"),
        "trajectories": write_table_atomic(
            traj, partition(run_dir, "trajectories", step) / part, name="trajectories"
        ),
    }
