"""Rollout logs: writing them (one Parquet partition per step and table) and analysing them
with polars (queries, plots, an HTML tree viewer, the ``treegrpo logs`` command).

- :mod:`treegrpo.logs.write`: ``write_rollout`` and the on-disk layout.
- :mod:`treegrpo.logs.analysis`: ``load_run`` and the queries (LazyFrames in, LazyFrames out).
- :mod:`treegrpo.logs.plots`: PNG plots of one run or two (matplotlib, the ``viz`` extra).
- :mod:`treegrpo.logs.viewer`: one group's forest as a self-contained HTML page.
- :mod:`treegrpo.logs.cli`: ``treegrpo logs summary|plot|tree|compare``.

docs/analysis.md documents the columns and the queries.
"""

from __future__ import annotations

from treegrpo.exceptions import RunFormatError, RunNotFoundError
from treegrpo.logs.analysis import (
    SIGNAL_TOLERANCE,
    Run,
    advantage_by_depth,
    branch_points,
    branching,
    budget,
    em_curve,
    failures,
    leaf_budget,
    load_run,
    metric_curve,
    reward_curve,
    summary,
)
from treegrpo.logs.write import SCHEMA_VERSION, partition, write_rollout, write_table_atomic

__all__ = [
    "SCHEMA_VERSION",
    "SIGNAL_TOLERANCE",
    "Run",
    "RunFormatError",
    "RunNotFoundError",
    "advantage_by_depth",
    "branch_points",
    "branching",
    "budget",
    "em_curve",
    "failures",
    "leaf_budget",
    "load_run",
    "metric_curve",
    "partition",
    "reward_curve",
    "summary",
    "write_rollout",
    "write_table_atomic",
]
