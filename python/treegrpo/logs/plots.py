"""PNG plots of rollout logs (``treegrpo logs plot`` and ``treegrpo logs compare``).

matplotlib is an optional dependency (``pip install 'treegrpo[viz]'``). Figures are drawn with
the object API on the Agg canvas, never through ``pyplot``: nothing global changes, so plotting
is safe next to a user's own figures and off the main thread.

- :func:`plot_run`: ``rewards.png`` (training reward and validation EM per step and data
  source), ``depth.png`` (V, |V(s) - V(parent)| and |advantage| by depth), ``branching.png``
  (branch depth distribution, sibling reward gaps, share of branch points with a preference
  signal), ``budget.png`` (generated tokens and tool calls per leaf, token reuse), and
  ``failures.png`` (invalid actions, truncations, forced finals).
- :func:`plot_compare`: the same curves of several runs on shared axes (e.g. tree vs chain),
  rewards also against cumulative generated tokens (equal budget, not equal steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from treegrpo.exceptions import MissingDependencyError
from treegrpo.logs.analysis import (
    Run,
    advantage_by_depth,
    branch_points,
    branching,
    budget,
    em_curve,
    failures,
    reward_curve,
)

__all__ = ["plot_compare", "plot_learning_curve", "plot_run"]

_FAILURES = (
    ("invalid_share", "invalid actions (of steps)"),
    ("truncated_share", "truncated (of leaves)"),
    ("forced_final_share", "forced final (of leaves)"),
)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            "plots need matplotlib: pip install 'treegrpo[viz]' (or pip install matplotlib)"
        ) from e


def _figure(panels: int, title: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    width = 5.2 * panels
    fig = Figure(figsize=(width, 4.0))
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    # Fixed margins (in inches, whatever the panel count): matplotlib's constrained layout
    # would fit them to the labels, at 40% of the drawing time.
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.13, top=0.84,
                        wspace=0.32)  # fmt: skip
    fig.suptitle(title)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legends(*axes: Any) -> None:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _line(ax: Any, frame: pl.DataFrame, x: str, y: str, **kw: Any) -> None:
    frame = frame.drop_nulls(y)
    ax.plot(frame[x].to_list(), frame[y].to_list(), marker="o", markersize=3, **kw)
    if x in ("step", "depth"):
        _integer_ticks(ax)


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(run: Run, out_dir: str | Path) -> list[Path]:
    """Write the PNG plots of one run into ``out_dir`` (created); returns their paths.

    Example::

        plot_run(load_run("runs/quickstart"), "plots/")
    """
    _require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = run.nodes
    rewards, overall, em, depth, by_depth, points, per_step, spent, failed = pl.collect_all(
        [
            reward_curve(run.trajectories),
            reward_curve(run.trajectories, by=["step"]),
            em_curve(run.metrics),
            advantage_by_depth(nodes),
            branching(nodes),
            branch_points(nodes).select("gap"),
            branching(nodes, by=["step"]),
            budget(nodes),
            failures(nodes),
        ]
    )
    name = run.path.name or str(run.path)
    paths = []

    fig, (ax, bx) = _figure(2, f"{name}: rewards")
    # one colour per data source in both panels; "all" in black
    sources = sorted(set(rewards["data_source"]) | set(em["data_source"]) - {"all"})
    colour = {source: f"C{i % 10}" for i, source in enumerate(sources)} | {"all": "black"}
    for (source,), part in sorted(rewards.partition_by("data_source", as_dict=True).items()):
        _line(ax, part, "step", "reward_mean", label=source, color=colour[source])
    _line(ax, overall, "step", "reward_mean", label="all", color="black", linewidth=2)
    ax.set(xlabel="step", ylabel="mean reward (kept leaves)", title="training reward")
    for (source,), part in sorted(em.partition_by("data_source", as_dict=True).items()):
        _line(bx, part, "step", "em", label=source, color=colour[source])
    _legends(ax, bx)
    if not em.height:
        _empty(bx, "no validation metrics (val-core/*) in metrics.jsonl")
    bx.set(xlabel="step", ylabel="exact match", title="validation EM (greedy chains)")
    paths.append(_save(fig, out / "rewards.png"))

    fig, (ax, bx, cx) = _figure(3, f"{name}: where the signal is, by depth")
    if depth.height:
        spread = depth["value_std"].fill_null(0).to_list()
        ax.errorbar(depth["depth"].to_list(), depth["value_mean"].to_list(), yerr=spread,
                    marker="o", capsize=3)  # fmt: skip
        _line(bx, depth, "depth", "value_gain_abs_mean")
        _line(cx, depth, "depth", "advantage_sum_abs_mean", label="|summed advantage|")
        _line(cx, depth, "depth", "advantage_sum_mean", label="summed advantage")
        cx.legend(fontsize=8)
    ax.set(xlabel="depth", ylabel="V(s)", title="V: mean kept-leaf reward below (± std)")
    bx.set(xlabel="depth", ylabel="mean |V(s) - V(parent)|", title="value change per step")
    cx.set(xlabel="depth", ylabel="per node", title="advantage on a node's tokens")
    paths.append(_save(fig, out / "depth.png"))

    fig, (ax, bx, cx, dx) = _figure(4, f"{name}: branching")
    gaps = points["gap"].drop_nulls().to_list()
    if by_depth.height:
        ax.bar(by_depth["depth"].to_list(), by_depth["share"].to_list(), color="tab:orange")
        cx.bar(by_depth["depth"].to_list(), by_depth["signal_share"].to_list(), color="tab:green")
        _integer_ticks(ax)
        _integer_ticks(cx)
        _line(dx, per_step, "step", "signal_share", color="black")
    else:
        for axis in (ax, cx, dx):
            _empty(axis, "no branch points (chain rollouts?)")
    if gaps:
        bx.hist(gaps, bins=20, color="tab:blue")
    else:
        _empty(bx, "no branch point with two comparable children")
    ax.set(xlabel="depth", ylabel="share of branch points", title="branch depth distribution")
    bx.set(xlabel="max - min V of sibling subtrees", ylabel="branch points",
           title="reward gap between siblings")  # fmt: skip
    cx.set(xlabel="depth", ylabel="share", title="preference signal, by depth")
    dx.set(xlabel="step", ylabel="share", title="preference signal, per step")
    paths.append(_save(fig, out / "branching.png"))

    fig, (ax, bx, cx) = _figure(3, f"{name}: budget")
    _line(ax, spent, "step", "generated_tokens_per_leaf", label="spent per leaf")
    _line(ax, spent, "step", "path_tokens_mean", label="on a kept leaf's path")
    _line(bx, spent, "step", "tool_calls_per_leaf", label="spent per leaf")
    _line(bx, spent, "step", "path_tool_calls_mean", label="on a kept leaf's path")
    _line(cx, spent, "step", "token_reuse")
    _legends(ax, bx)
    ax.set(xlabel="step", ylabel="tokens", title="generated tokens per leaf")
    bx.set(xlabel="step", ylabel="tool calls", title="tool calls per leaf")
    cx.set(xlabel="step", ylabel="trained / generated tokens", title="token reuse")
    paths.append(_save(fig, out / "budget.png"))

    fig, (ax,) = _figure(1, f"{name}: failure modes")
    for column, label in _FAILURES:
        _line(ax, failed, "step", column, label=label)
    ax.set(xlabel="step", ylabel="share", title="failures per step")
    _legends(ax)
    paths.append(_save(fig, out / "failures.png"))
    return paths


def plot_compare(runs: Mapping[str, Run], out_dir: str | Path) -> list[Path]:
    """Write plots of several runs on shared axes (labels are the mapping's keys) into
    ``out_dir``: ``rewards.png`` (reward against step and against cumulative generated
    tokens, validation EM of ``all``), ``budget.png``, ``depth.png`` and ``failures.png``.

    Example::

        plot_compare({"tree": load_run("runs/tree"), "chain": load_run("runs/chain")}, "cmp/")
    """
    _require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for label, run in runs.items():
        curve, em, spent, depth, per_depth, failed = pl.collect_all(
            [
                reward_curve(run.trajectories, by=["step"]),
                em_curve(run.metrics).filter(pl.col("data_source") == "all"),
                budget(run.nodes),
                advantage_by_depth(run.nodes),
                branching(run.nodes),
                failures(run.nodes),
            ]
        )
        curve = curve.join(
            spent.select("step", pl.col("generated_tokens").cum_sum().alias("cum_tokens")),
            on="step",
        )
        data[label] = (curve, em, spent, depth, per_depth, failed)
    title = " vs ".join(runs)
    paths = []

    fig, (ax, bx, cx) = _figure(3, f"{title}: rewards")
    for label, (curve, em, *_) in data.items():
        _line(ax, curve, "step", "reward_mean", label=label)
        _line(bx, curve, "cum_tokens", "reward_mean", label=label)
        if em.height:
            _line(cx, em, "step", "em", label=label)
    ax.set(xlabel="step", ylabel="mean reward (kept leaves)", title="training reward")
    bx.set(xlabel="generated tokens (cumulative)", ylabel="mean reward",
           title="training reward at equal budget")  # fmt: skip
    cx.set(xlabel="step", ylabel="exact match", title="validation EM (all sources)")
    _legends(ax, bx, cx)
    paths.append(_save(fig, out / "rewards.png"))

    fig, (ax, bx, cx) = _figure(3, f"{title}: budget")
    for label, (_, _, spent, *_) in data.items():
        _line(ax, spent, "step", "generated_tokens_per_leaf", label=label)
        _line(bx, spent, "step", "tool_calls_per_leaf", label=label)
        _line(cx, spent, "step", "token_reuse", label=label)
    ax.set(xlabel="step", ylabel="tokens", title="generated tokens per leaf")
    bx.set(xlabel="step", ylabel="tool calls", title="tool calls per leaf")
    cx.set(xlabel="step", ylabel="trained / generated tokens", title="token reuse")
    _legends(ax, bx, cx)
    paths.append(_save(fig, out / "budget.png"))

    fig, (ax, bx, cx) = _figure(3, f"{title}: by depth")
    for label, (_, _, _, depth, per_depth, _) in data.items():
        _line(ax, depth, "depth", "value_mean", label=label)
        _line(bx, depth, "depth", "advantage_sum_abs_mean", label=label)
        _line(cx, per_depth, "depth", "signal_share", label=label)
    ax.set(xlabel="depth", ylabel="V(s)", title="V by depth")
    bx.set(xlabel="depth", ylabel="mean |summed advantage|", title="advantage by depth")
    cx.set(xlabel="depth", ylabel="share", title="branch points with a preference signal")
    _legends(ax, bx, cx)
    paths.append(_save(fig, out / "depth.png"))

    fig, axes = _figure(3, f"{title}: failure modes")
    for (column, name), axis in zip(_FAILURES, axes, strict=True):
        for label, (*_, failed) in data.items():
            _line(axis, failed, "step", column, label=label)
        axis.set(xlabel="step", ylabel="share", title=name)
    _legends(*axes)
    paths.append(_save(fig, out / "failures.png"))
    return paths


def plot_learning_curve(run_dir: str | Path, out: str | Path) -> Path | None:
    """``out``: held-out EM (``val-core/all/acc/mean@1``) and the mean training reward
    (``critic/score/mean``) of a run against the generated tokens spent so far (the sum of
    ``tree/generated_tokens`` over its steps), from its ``metrics.jsonl``. None when the run
    has no step and no validation to show."""
    import json

    _require_matplotlib()
    steps: dict[int, dict[str, float]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        steps.setdefault(int(record.get("step", 0)), {}).update(record)
    spent, tokens = 0.0, {}
    for step in sorted(steps):
        spent += float(steps[step].get("tree/generated_tokens", 0.0))
        tokens[step] = spent
    em = [
        (tokens[s], r["val-core/all/acc/mean@1"])
        for s, r in sorted(steps.items())
        if "val-core/all/acc/mean@1" in r
    ]
    reward = [
        (tokens[s], r["critic/score/mean"])
        for s, r in sorted(steps.items())
        if "critic/score/mean" in r
    ]
    if not em and not reward:
        return None
    fig, (left, right) = _figure(2, f"learning curve: {Path(run_dir).name}")
    for ax, points, label in (
        (left, em, "held-out EM (greedy)"),
        (right, reward, "mean training reward"),
    ):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3)
        else:
            _empty(ax, "no data")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _save(fig, Path(out))
