"""One group's forest at one step as a self-contained HTML page (``treegrpo logs tree``).

The page holds its data, script and styles inline and loads nothing: it opens from a file, offline.
It draws each tree of the group top-down (nodes are agent steps), coloured by reward, V or
advantage (a selector switches), with leaves as squares (solid: kept for training, dashed:
dropped by K-subsampling; the letter is the leaf reason), branch points ringed, invalid actions
outlined in red. Hovering a node shows a summary; clicking it shows its full action and
observation text and highlights its path from the root. A link can preselect both:
``tree.html#metric=adv&node=12``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from treegrpo.exceptions import InvalidArgumentError
from treegrpo.logs.analysis import Run

__all__ = ["tree_frame", "tree_html", "write_tree_html"]

# Node columns carried into the page, under shorter names (those a run lacks are left out).
_FIELDS = {
    "node": "id",
    "parent": "parent",
    "tree": "tree",
    "depth": "depth",
    "is_leaf": "leaf",
    "leaf_reason": "reason",
    "kept": "kept",
    "reward": "reward",
    "value": "value",
    "advantage_sum": "adv",
    "kept_leaves": "kl",
    "num_children": "children",
    "prompt_len": "plen",
    "action_len": "alen",
    "observation_len": "olen",
    "action_text": "action",
    "observation_text": "obs",
    "tool": "tool",
    "query": "query",
    "answer": "answer",
    "valid": "valid",
    "surprisal": "surprisal",
    "finish_reason": "finish",
    "a_inter": "a_inter",
    "a_intra": "a_intra",
    "advantage": "advantage",
}


def tree_frame(run: Run, step: int, group: int) -> pl.DataFrame:
    """The nodes of one group at one step, with the advantages of its kept leaves
    (``a_inter``, ``a_intra``, ``advantage``; null elsewhere). Raises
    :class:`~treegrpo.exceptions.InvalidArgumentError` naming the steps or groups there are."""
    nodes = run.nodes.filter((pl.col("step") == step) & (pl.col("group") == group))
    leaves = run.trajectories.filter((pl.col("step") == step) & (pl.col("group") == group)).select(
        "rank", pl.col("leaf").alias("node"), "a_inter", "a_intra", "advantage"
    )
    # (a group is rolled out by one rank; node ids are per rank)
    frame = nodes.join(leaves, on=["rank", "node"], how="left").sort("node").collect()
    if frame.height:
        return frame
    steps = run.nodes.select(pl.col("step").unique().sort()).collect()["step"].to_list()
    if step not in steps:
        raise InvalidArgumentError(
            f"step {step} is not in the run {run.path}: its steps are {_span(steps)}"
        )
    groups = (
        run.nodes.filter(pl.col("step") == step)
        .select(pl.col("group").unique().sort())
        .collect()["group"]
        .to_list()
    )
    raise InvalidArgumentError(
        f"group {group} is not at step {step} of the run {run.path}: its groups are {_span(groups)}"
    )


def _span(values: list[int]) -> str:
    if len(values) > 12:
        return f"{values[:6]} ... {values[-3:]} ({len(values)} in all)"
    return str(values)


def tree_html(run: Run, step: int, group: int) -> str:
    """The page for one group at one step (see the module docstring).

    Example::

        page = tree_html(load_run("runs/quickstart"), step=3, group=0)
    """
    frame = tree_frame(run, step, group)
    columns = [c for c in _FIELDS if c in frame.columns]
    frame = frame.select(
        pl.col(c).fill_nan(None).alias(_FIELDS[c])
        if frame.schema[c].is_float()
        else pl.col(c).alias(_FIELDS[c])
        for c in columns
    )
    nodes = [_clean(row) for row in frame.iter_rows(named=True)]
    source = run.nodes.filter((pl.col("step") == step) & (pl.col("group") == group))
    data_source = source.select(pl.col("data_source").first()).collect().item()
    meta = {
        "run": str(run.path),
        "step": step,
        "group": group,
        "data_source": data_source,
    }
    # JSON inside <script>: escape "<" so that no text can close the element early.
    payload = json.dumps({"meta": meta, "nodes": nodes}, allow_nan=False).replace("<", "\\u003c")
    title = html.escape(f"treegrpo: {run.path} step {step} group {group}")
    head, tail = _PAGE.split("__DATA__")  # the title sits in head, texts only in the payload
    return head.replace("__TITLE__", title) + payload + tail


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def write_tree_html(run: Run, step: int, group: int, out: str | Path) -> Path:
    """Write :func:`tree_html` to ``out`` (parent directories created)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tree_html(run, step, group), encoding="utf-8")
    return path


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { font: 13px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa;
         display: flex; flex-direction: column; height: 100vh; }
  header { padding: 10px 16px; background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 15px; margin: 0 0 4px; }
  #stats { color: #555; }
  #controls { margin-top: 6px; display: flex; gap: 18px; align-items: center; flex-wrap: wrap; }
  main { display: flex; flex: 1; min-height: 0; }
  #canvas { flex: 1; overflow: auto; }
  #detail { width: 380px; overflow: auto; border-left: 1px solid #ddd; background: #fff;
            padding: 10px 14px; }
  #detail pre { white-space: pre-wrap; word-break: break-word; background: #f4f4f4;
                padding: 6px; border-radius: 4px; font-size: 12px; }
  #detail table td { padding: 1px 8px 1px 0; vertical-align: top; }
  #detail .muted { color: #777; }
  .edge { fill: none; stroke: #999; stroke-width: 1.4; }
  .edge.dropped { stroke-dasharray: 3 3; stroke: #ccc; }
  .edge.onpath { stroke: #222; stroke-width: 3; }
  .node { cursor: pointer; }
  .node .shape { stroke: #333; stroke-width: 1.2; }
  .node.dropped .shape { stroke-dasharray: 3 2; fill-opacity: 0.35; }
  .node.invalid .shape { stroke: #d62728; stroke-width: 2.4; }
  .node.selected .shape { stroke: #000; stroke-width: 3; }
  .node .ring { fill: none; stroke: #e6a100; stroke-width: 3; }
  .node text { font-size: 9px; text-anchor: middle; dominant-baseline: central;
               pointer-events: none; }
  .treelabel { font-size: 11px; fill: #555; text-anchor: middle; }
  #tip { position: fixed; pointer-events: none; background: rgba(30,30,30,.92); color: #fff;
         padding: 6px 8px; border-radius: 4px; max-width: 360px; font-size: 12px;
         display: none; white-space: pre-wrap; }
  .legend-item { display: inline-flex; align-items: center; gap: 4px; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div id="stats"></div>
  <div id="controls">
    <label>colour by
      <select id="metric">
        <option value="reward">reward (leaves)</option>
        <option value="value">V (mean kept-leaf reward below)</option>
        <option value="adv">advantage (summed over kept leaves below)</option>
      </select>
    </label>
    <svg id="scale" width="260" height="28"></svg>
    <span id="shapes"></span>
  </div>
</header>
<main>
  <div id="canvas"><svg id="forest"></svg></div>
  <aside id="detail"><p class="muted">Click a node to see its text.</p></aside>
</main>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const DATA = JSON.parse(document.getElementById("data").textContent);
  const nodes = DATA.nodes, meta = DATA.meta;
  const byId = new Map();
  for (const n of nodes) { n.kids = []; byId.set(n.id, n); }
  for (const n of nodes) {
    if (n.parent !== null && byId.has(n.parent)) byId.get(n.parent).kids.push(n);
  }
  const roots = nodes.filter(n => n.parent === null || !byId.has(n.parent));
  roots.sort((a, b) => a.tree - b.tree || a.id - b.id);

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "-";
    if (typeof x === "number") return Number.isInteger(x) ? String(x) : x.toFixed(digits || 3);
    return String(x);
  }

  // ---- layout: leaves take consecutive slots, a parent sits above its children's middle
  let slot = 0;
  function place(n) {
    n.kids.sort((a, b) => a.id - b.id);
    if (n.kids.length === 0) { n.x = slot; slot += 1; return; }
    for (const k of n.kids) place(k);
    n.x = (n.kids[0].x + n.kids[n.kids.length - 1].x) / 2;
  }
  for (const r of roots) { place(r); slot += 0.8; }
  const DX = 36, DY = 74, M = 36;
  const maxDepth = Math.max(0, ...nodes.map(n => n.depth));
  const X = n => M + n.x * DX, Y = n => M + 14 + n.depth * DY;

  // ---- colours: a sequential scale for reward and V, a diverging one for advantage
  const SEQ = [[255, 247, 188], [254, 196, 79], [217, 95, 14], [140, 45, 4]];
  const DIV = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, t));
    const s = t * (stops.length - 1), i = Math.min(Math.floor(s), stops.length - 2), f = s - i;
    const c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return "rgb(" + c.join(",") + ")";
  }
  const finite = xs => xs.filter(x => typeof x === "number" && isFinite(x));
  const rv = finite(nodes.flatMap(n => [n.reward, n.value]));
  const lo = rv.length ? Math.min(...rv) : 0, hi = rv.length ? Math.max(...rv) : 1;
  const amax = Math.max(1e-12, ...finite(nodes.map(n => Math.abs(n.adv))));
  const scales = {
    reward: { get: n => n.leaf ? n.reward : null, lo: lo, hi: hi, stops: SEQ },
    value: { get: n => (n.kl > 0 ? n.value : null), lo: lo, hi: hi, stops: SEQ },
    adv: { get: n => (n.kl > 0 ? n.adv : null), lo: -amax, hi: amax, stops: DIV },
  };
  function colour(metric, n) {
    const s = scales[metric], v = s.get(n);
    if (v === null || v === undefined) return "#d9d9d9";
    return ramp(s.stops, s.hi > s.lo ? (v - s.lo) / (s.hi - s.lo) : 0.5);
  }

  // ---- drawing
  const svg = document.getElementById("forest");
  svg.setAttribute("width", M * 2 + Math.max(slot - 0.8, 1) * DX);
  svg.setAttribute("height", M * 2 + 28 + maxDepth * DY);
  const edges = el("g", {}, svg), layer = el("g", {}, svg);
  const edgeOf = new Map(), groupOf = new Map();
  for (const n of nodes) {
    if (n.parent === null || !byId.has(n.parent)) continue;
    const p = byId.get(n.parent), my = (Y(p) + Y(n)) / 2;
    const d = `M${X(p)},${Y(p)} C${X(p)},${my} ${X(n)},${my} ${X(n)},${Y(n)}`;
    edgeOf.set(n.id, el("path", { d: d, class: "edge" + (n.kl > 0 ? "" : " dropped") }, edges));
  }
  for (const r of roots) {
    const t = el("text", { x: X(r), y: Y(r) - 22, class: "treelabel" }, layer);
    t.textContent = "tree " + r.tree;
  }
  const LETTER = { answer: "A", forced_final: "F", truncated: "T", context_limit: "C" };
  for (const n of nodes) {
    const classes = ["node"];
    if (n.leaf) classes.push(n.kept ? "kept" : "dropped");
    if (n.children >= 2) classes.push("branch");
    if (n.parent !== null && !n.leaf && n.valid === false) classes.push("invalid");
    const g = el("g", {
      class: classes.join(" "), "data-id": n.id, transform: `translate(${X(n)},${Y(n)})`,
    }, layer);
    if (n.children >= 2) el("circle", { r: 14, class: "ring" }, g);
    if (n.leaf) {
      el("rect", { x: -9, y: -9, width: 18, height: 18, rx: 2, class: "shape" }, g);
      el("text", {}, g).textContent = LETTER[n.reason] || "?";
    } else {
      el("circle", { r: n.parent === null ? 11 : 9, class: "shape" }, g);
      if (n.parent === null) el("text", {}, g).textContent = "P";
    }
    g.addEventListener("mousemove", ev => showTip(ev, n));
    g.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    g.addEventListener("click", () => select(n));
    groupOf.set(n.id, g);
  }

  function paint() {
    const metric = document.getElementById("metric").value;
    for (const n of nodes) {
      groupOf.get(n.id).querySelector(".shape").setAttribute("fill", colour(metric, n));
    }
    drawScale(metric);
  }

  function drawScale(metric) {
    const s = scales[metric], box = document.getElementById("scale");
    while (box.firstChild) box.removeChild(box.firstChild);
    const defs = el("defs", {}, box);
    const grad = el("linearGradient", { id: "grad-" + metric }, defs);
    s.stops.forEach((c, i) => el("stop", {
      offset: i / (s.stops.length - 1), "stop-color": "rgb(" + c.join(",") + ")",
    }, grad));
    el("rect", { x: 40, y: 4, width: 180, height: 10, fill: `url(#grad-${metric})` }, box);
    const lab = (x, text, anchor) => {
      const t = el("text", { x: x, y: 25, "font-size": 10, "text-anchor": anchor }, box);
      t.textContent = text;
    };
    lab(40, fmt(s.lo), "middle"); lab(220, fmt(s.hi), "middle");
    const t = el("text", { x: 0, y: 13, "font-size": 10 }, box); t.textContent = metric;
  }

  // ---- hover and click
  const tip = document.getElementById("tip");
  function kind(n) {
    if (n.parent === null) return "root (prompt, " + fmt(n.plen) + " tokens)";
    if (n.leaf) return "leaf: " + n.reason + (n.kept ? ", kept" : ", dropped");
    if (n.valid === false) return "step: invalid action";
    return "step" + (n.tool ? " (" + n.tool + ")" : "");
  }
  function showTip(ev, n) {
    const lines = [
      "node " + n.id + " · depth " + n.depth + " · " + kind(n),
      "reward " + fmt(n.reward) + " · V " + fmt(n.value) + " · advantage sum " + fmt(n.adv),
      "kept leaves below " + fmt(n.kl) + " · children " + fmt(n.children),
    ];
    if (n.action) lines.push("", n.action.length > 200 ? n.action.slice(0, 200) + "…" : n.action);
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 380) + "px";
    tip.style.top = ev.clientY + 14 + "px";
  }
  function select(n) {
    for (const g of groupOf.values()) g.classList.remove("selected");
    for (const e of edgeOf.values()) e.classList.remove("onpath");
    groupOf.get(n.id).classList.add("selected");
    for (let m = n; m && edgeOf.has(m.id); m = byId.get(m.parent)) {
      edgeOf.get(m.id).classList.add("onpath");
    }
    const box = document.getElementById("detail");
    while (box.firstChild) box.removeChild(box.firstChild);
    const h = document.createElement("h3");
    h.textContent = "node " + n.id + " (tree " + n.tree + ", depth " + n.depth + ")";
    box.appendChild(h);
    const table = document.createElement("table");
    const rows = [
      ["kind", kind(n)], ["reward", fmt(n.reward)], ["V", fmt(n.value)],
      ["advantage sum", fmt(n.adv)], ["kept leaves below", fmt(n.kl)],
      ["A = A_inter + A_intra", n.advantage === null || n.advantage === undefined ? "-" :
        fmt(n.advantage) + " = " + fmt(n.a_inter) + " + " + fmt(n.a_intra)],
      ["tokens (action / observation)", fmt(n.alen) + " / " + fmt(n.olen)],
      ["surprisal (mean -log p)", fmt(n.surprisal)], ["finish", fmt(n.finish)],
      ["tool / query", n.tool ? n.tool + ": " + n.query : "-"], ["answer", fmt(n.answer)],
    ];
    for (const [k, v] of rows) {
      const tr = document.createElement("tr");
      const a = document.createElement("td"); a.className = "muted"; a.textContent = k;
      const b = document.createElement("td"); b.textContent = v;
      tr.appendChild(a); tr.appendChild(b); table.appendChild(tr);
    }
    box.appendChild(table);
    for (const [label, text] of [["action", n.action], ["observation", n.obs]]) {
      if (!text) continue;
      const p = document.createElement("p"); p.className = "muted"; p.textContent = label;
      const pre = document.createElement("pre"); pre.textContent = text;
      box.appendChild(p); box.appendChild(pre);
    }
  }

  // ---- header
  const leaves = nodes.filter(n => n.leaf), kept = leaves.filter(n => n.kept);
  const branches = nodes.filter(n => n.children >= 2);
  document.getElementById("title").textContent =
    `${meta.run} · step ${meta.step} · group ${meta.group} (${meta.data_source})`;
  document.getElementById("stats").textContent =
    `${roots.length} trees, ${nodes.length} nodes, ${leaves.length} leaves ` +
    `(${kept.length} kept, ${leaves.length - kept.length} dropped), ` +
    `${branches.length} branch points`;
  document.getElementById("shapes").textContent =
    "● step   ■ leaf (A answer, F forced final, T truncated, C context limit; " +
    "dashed: dropped)   " +
    "gold ring: branch point   red outline: invalid action";
  // A link can choose the colouring and select a node: tree.html#metric=adv&node=12
  const want = new URLSearchParams(location.hash.slice(1));
  const picker = document.getElementById("metric");
  if (scales[want.get("metric")]) picker.value = want.get("metric");
  picker.addEventListener("change", paint);
  paint();
  if (byId.has(Number(want.get("node")))) select(byId.get(Number(want.get("node"))));
  svg.setAttribute("data-nodes", String(nodes.length));  // set last: the script ran through
})();
</script>
</body>
</html>
"""
