"""The tree rollout: Tree-GRPO's sampling procedure over whole agent steps.

For a batch of prompts (algorithm.md section 2):

1. Init: M roots per prompt, each rolled out as one multi-turn chain to a leaf.
2. Expand, L rounds: in every tree, N nodes are drawn (``Forest.select``: uniform with
   replacement over the root and the open nodes, the reference rule; or weighted by the
   surprisal of a step's action tokens, which the Forest holds as each step's mean log-prob)
   and each is continued to a leaf from "prompt + steps up to and including the node's
   observation" (``Forest.context``). Draws of the same node become siblings sampled from one
   prompt with ``n`` (so do the M roots of one prompt, and any branches whose contexts are
   equal).
3. K leaves kept per tree; outcome rewards on the leaves.

Chain GRPO is the same code with N = 0 (M independent chains per prompt).

Two schedules (``RolloutConfig.schedule``, see its docstring for the trade-off):

- ``"lockstep"``: at every agent step, all active branches of all trees go to the engine as
  ONE batch; the tool calls of the step then run concurrently (the environment batches them
  per tool). Every step waits for the slowest generation and the slowest tool call of the
  batch, and no expansion starts before every tree's first chain has ended.
- ``"async"``: every branch advances on its own (generate -> tool call -> generate ...) as
  soon as its previous step is done, and a tree's expansion round starts as soon as that
  tree's previous round is complete. Siblings (the draws of one node, the M roots of one
  prompt) still go out as one request with ``n``. Steps are recorded in the Forest per tree
  when its round is complete, in a fixed order (step depth, then the branch's place in the
  round's draws, siblings of a node together), and selection is per tree with a per-tree
  seed, so for given completions a tree is the same whatever the timing. Tool calls made in
  the same event-loop turn still go to the environment as one batch.

The rollout
knows no optimizer and no server: it drives an :class:`~treegrpo.engine.Engine` and a
:class:`~treegrpo.env.SearchEnv`, and records into a :class:`treegrpo.Forest`. The tree logic
(selection policies, the root fallback, seeds, contexts and paths) lives in the Forest, in
Rust; this module keeps the procedure, and imports no pyarrow.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from treegrpo import Forest
from treegrpo.config import RolloutConfig
from treegrpo.engine.base import (
    Completion,
    Engine,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from treegrpo.env.steps import SearchEnv, StepInput, StepResult
from treegrpo.exceptions import InvalidArgumentError

__all__ = ["Budget", "NodeInfo", "Prompt", "Rollout", "RolloutConfig", "RolloutResult", "rollout"]

RewardFn = Callable[..., float]
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Prompt:
    """One question: its group id (unique per question), prompt token ids, and what the reward
    needs (``data_source``, ``ground_truth``, ``extra_info``, verl's reward signature)."""

    group: int
    input_ids: Sequence[int]
    data_source: str
    ground_truth: Any
    extra_info: dict[str, Any] | None = None


@dataclass
class NodeInfo:
    """What the Forest does not hold about a step: texts, the engine's and the tool's answers.
    ``mean_log_prob`` is also on the step's node (``Forest.nodes()``), where selection reads it."""

    parent: int | None = None
    action_text: str = ""
    observation_text: str = ""
    mean_log_prob: float = math.nan
    finish_reason: str | None = None
    tool: str | None = None
    query: str | None = None
    answer: str | None = None
    valid: bool = False
    weight_version: str | None = None


@dataclass
class Budget:
    """What the rollout spent, per prompt group (and summed in `total`)."""

    generated_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    leaves: int = 0
    requests: int = 0

    def add(self, other: Budget) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def leaves_per_1k_generated(self) -> float:
        return 1000.0 * self.leaves / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def cache_hit_rate(self) -> float:
        prompt = self.prefill_tokens + self.cached_tokens
        return self.cached_tokens / prompt if prompt else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["leaves_per_1k_generated"] = self.leaves_per_1k_generated
        out["cache_hit_rate"] = self.cache_hit_rate
        return out


@dataclass
class RolloutResult:
    """The forest (rewards set, K leaves kept) and everything needed to log and train on it."""

    forest: Forest
    info: dict[int, NodeInfo]
    prompts: dict[int, Prompt]
    budget: dict[int, Budget]
    total: Budget = field(default_factory=Budget)
    # Wall seconds in the engine (``generate``), the environment's tool calls (``tool``) and
    # the reward function (``reward``); the rest of a rollout is bookkeeping. Seconds with at
    # least one call of the kind in flight: under the async schedule generation and tool
    # calls overlap, so ``generate + tool`` can exceed the rollout's wall time.
    timing: dict[str, float] = field(
        default_factory=lambda: {"generate": 0.0, "tool": 0.0, "reward": 0.0}
    )

    def response_text(self, leaf: int) -> str:
        """The policy's response for a leaf: every step's action and observation after the
        prompt (what verl's reward functions score)."""
        steps = self.forest.path(leaf)[1:]  # the root holds the prompt
        return "".join(self.info[i].action_text + self.info[i].observation_text for i in steps)


@dataclass
class _Branch:
    node: int
    tree: int
    group: int
    context: list[int]
    turn: int


@dataclass
class _Gen:
    """One branch's generation for one step, possibly over several engine calls (continued
    past an answer's closing tag, see :meth:`SearchEnv.continues_past`)."""

    ids: list[int]
    log_probs: list[float]
    finish: FinishReason
    weight_version: str
    budget: int  # max_new_tokens of the step
    generated: int  # tokens generated, dropped ones included
    # the first segment (Search-R1's cut at the first </answer> when no tool tag closes later)
    first: tuple[int, FinishReason] | None = None

    @classmethod
    def of(cls, c: Completion, budget: int) -> _Gen:
        ids = list(c.output_ids)
        return cls(ids, list(c.log_probs), c.finish, c.weight_version, budget, len(ids))


@dataclass
class _Done:
    """One finished step of a branch, before it is recorded in the Forest (async schedule)."""

    action: list[int]
    observation: list[int]
    reason: str | None
    info: NodeInfo  # its parent is set when the step is recorded
    leaf: bool


class _Busy:
    """Wall seconds during which at least one call of a kind is in flight."""

    def __init__(self, timing: dict[str, float], key: str) -> None:
        self.timing, self.key, self.depth, self.start = timing, key, 0, 0.0

    def __enter__(self) -> None:
        if self.depth == 0:
            self.start = time.perf_counter()
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.timing[self.key] += time.perf_counter() - self.start


class _Batched(Generic[_T, _R]):
    """Calls ``fn(items) -> results`` once for the items submitted in one event-loop turn
    (each caller awaits its own result). Used for the tool calls and the per-tree selection
    of the async schedule, so branches that become ready together are still served as one
    batch."""

    def __init__(self, fn: Callable[[list[_T]], Awaitable[list[_R]]]) -> None:
        self.fn = fn
        self.items: list[_T] = []
        self.futures: list[asyncio.Future[_R]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: _T) -> _R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        if not self.items:
            loop.call_soon(self._flush)
        self.items.append(item)
        self.futures.append(future)
        return await future

    def _flush(self) -> None:
        items, futures = self.items, self.futures
        self.items, self.futures = [], []
        task = asyncio.get_running_loop().create_task(self._serve(items, futures))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, items: list[_T], futures: list[asyncio.Future[_R]]) -> None:
        try:
            results = await self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"{len(results)} results for {len(items)} items")
        except BaseException as e:  # handed to every waiting caller
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for f, r in zip(futures, results, strict=True):
            if not f.done():
                f.set_result(r)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


async def _all(coros: Sequence[Coroutine[Any, Any, _R]]) -> list[_R]:
    """``asyncio.gather`` that cancels the others when one fails (Python 3.10 has no
    TaskGroup), so a failed rollout leaves no branch running."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Rollout:
    """Runs tree (or chain) rollouts with one engine, one environment and one reward function.

    ``reward_fn(data_source, solution_str, ground_truth, extra_info=None) -> float`` (verl's
    signature). ``eos_token_ids`` end a step like a stop string (kept in the action).
    """

    def __init__(
        self,
        engine: Engine,
        env: SearchEnv,
        reward_fn: RewardFn,
        config: RolloutConfig,
        *,
        tokenizer: Any,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if config.max_turns != env.max_turns:
            raise ValueError(
                f"RolloutConfig.max_turns ({config.max_turns}) differs from the environment's "
                f"({env.max_turns}): build SearchEnv(max_turns=config.max_turns)"
            )
        self.engine, self.env, self.reward_fn, self.config = engine, env, reward_fn, config
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self._bar: Any = None  # the progress bar of the run in progress
        self._busy: dict[str, _Busy] = {}  # the run in progress's timers
        # The most tokens a trajectory may reach, one short of the model's context length
        # (SGLang refuses input + max_new_tokens >= context length); None = no bound.
        limit = config.max_model_len or getattr(engine, "context_length", None)
        self.max_len: int | None = int(limit) - 1 if limit else None

    def _room(self, context_len: int) -> int:
        """Tokens a step may generate after a context of ``context_len`` tokens."""
        budget = self.config.max_action_tokens
        return budget if self.max_len is None else min(budget, self.max_len - context_len)

    # ------------------------------------------------------------------ the procedure

    async def run(
        self, prompts: Sequence[Prompt], *, step: int = 0, progress: str | None = None
    ) -> RolloutResult:
        """Roll out every prompt; `step` varies the selection seed between training steps.
        ``progress``: the label of a progress bar over the leaves reached (None = no bar)."""
        from tqdm import tqdm

        total = len(prompts) * self.config.m * self.config.leaves_per_tree
        with tqdm(total=total, desc=progress, unit="leaf", disable=progress is None) as bar:
            self._bar = bar
            try:
                return await self._run(prompts, step)
            finally:
                self._bar = None

    async def _run(self, prompts: Sequence[Prompt], step: int) -> RolloutResult:
        groups = [p.group for p in prompts]
        if len(set(groups)) != len(groups):
            raise ValueError("prompt groups must be unique: one group id per question")
        cfg = self.config
        for p in prompts:
            if self._room(len(p.input_ids)) < 1:
                assert self.max_len is not None
                raise InvalidArgumentError(
                    f"the prompt of group {p.group} has {len(p.input_ids)} tokens, which leaves "
                    f"no room to generate within max_model_len={self.max_len + 1}: shorten the "
                    "prompt or raise tree.max_model_len"
                )
        forest = Forest()
        result = RolloutResult(forest, {}, {p.group: p for p in prompts}, {})
        for p in prompts:
            result.budget[p.group] = Budget()
        self._busy = {k: _Busy(result.timing, k) for k in ("generate", "tool")}
        if cfg.schedule == "async":
            await self._run_async(prompts, step, result)
        else:
            await self._run_lockstep(prompts, step, result)

        # 3. K leaves per tree, rewards on the leaves.
        if cfg.k is not None and cfg.k < cfg.leaves_per_tree:
            forest.keep_leaves(cfg.k, seed=(cfg.seed, step, 1_000_003))
        start = time.perf_counter()
        self._reward(result)
        result.timing["reward"] += time.perf_counter() - start
        for budget in result.budget.values():
            result.total.add(budget)
        return result

    async def _run_lockstep(
        self, prompts: Sequence[Prompt], step: int, result: RolloutResult
    ) -> None:
        cfg, forest = self.config, result.forest
        # 1. Init: M chains per prompt.
        branches = []
        for p in prompts:
            for _ in range(cfg.m):
                root = forest.add_root(p.group, list(p.input_ids))
                tree = forest.num_trees - 1
                branches.append(_Branch(root, tree, p.group, list(p.input_ids), 0))
        await self._to_leaves(branches, result)

        # 2. Expand, L rounds of N draws per tree. With the root excluded, a tree without an
        # open step (its chain answered at once) is expanded from its root instead, so every
        # tree still gets its draws (and the prompt its 1 + L*N leaves per tree).
        if not cfg.chain:
            for round_ in range(cfg.l):
                picks = self._select(forest, step, round_)
                await self._to_leaves([self._branch_at(forest, p) for p in picks], result)

    def _select(self, forest: Forest, step: int, round_: int) -> list[int]:
        """Round ``round_``'s draws of every tree (the core seeds each tree on its own from
        (seed, step, round)), with the root fallback of step 2 above."""
        cfg = self.config
        return forest.select(
            cfg.n,
            seed=(cfg.seed, step, round_),
            replace=cfg.replace,
            include_root=cfg.include_root,
            policy=cfg.selection,
            overexpand_penalty=cfg.overexpand_penalty,
            root_fallback=True,
        )

    # ------------------------------------------------------------------ the async schedule

    async def _run_async(self, prompts: Sequence[Prompt], step: int, result: RolloutResult) -> None:
        """Every tree runs its rounds on its own (init, then L expansion rounds); every branch
        its steps. A tree's steps enter the Forest when its round is complete (`_record`)."""
        cfg, forest = self.config, result.forest
        tree_of: dict[int, int] = {}  # node -> tree, to split a selection's picks by tree
        starts: list[tuple[Prompt, list[_Branch]]] = []
        for p in prompts:
            roots = []
            for _ in range(cfg.m):
                root = forest.add_root(p.group, list(p.input_ids))
                tree = forest.num_trees - 1
                tree_of[root] = tree
                roots.append(_Branch(root, tree, p.group, list(p.input_ids), 0))
            starts.append((p, roots))

        async def step_all(inputs: list[StepInput]) -> list[StepResult]:
            with self._busy["tool"]:
                return await self.env.step(inputs)

        async def select_all(items: list[tuple[int, int]]) -> list[list[int]]:
            # One Forest.select per round serves every tree asking for that round in this
            # turn: each tree's draws depend only on that tree and the seed (the core seeds
            # every tree on its own), and every tree is between rounds when it asks.
            picks_of: dict[tuple[int, int], list[int]] = {}
            for round_ in sorted({r for _, r in items}):
                picks = self._select(forest, step, round_)
                for node in picks:
                    picks_of.setdefault((tree_of[node], round_), []).append(node)
            return [picks_of.get(item, []) for item in items]

        tools = _Batched(step_all)
        select = _Batched(select_all)

        async def tree_rounds(first: list[tuple[_Branch, list[_Done]]]) -> None:
            self._record(first, result, tree_of)
            if cfg.chain:
                return
            tree = first[0][0].tree
            for round_ in range(cfg.l):
                picks = await select((tree, round_))
                # The draws of one node are siblings: one request with n (in lockstep's order:
                # a node's draws together, nodes in the order of their first draw).
                same: dict[int, list[_Branch]] = {}
                for node in picks:
                    same.setdefault(node, []).append(self._branch_at(forest, node))
                groups = list(same.values())
                chains = await _all([self._siblings(g, tools, result) for g in groups])
                self._record(
                    [
                        (b, c)
                        for g, cs in zip(groups, chains, strict=True)
                        for b, c in zip(g, cs, strict=True)
                    ],
                    result,
                    tree_of,
                )

        async def tree_life(b: _Branch, g: _Gen) -> None:
            await tree_rounds([(b, await self._chain(b, g, tools, result))])

        async def prompt_trees(roots: list[_Branch]) -> None:
            # The M roots of a prompt: one request with n = M, then every tree on its own.
            gens = await self._sample(roots, result)
            await _all([tree_life(b, g) for b, g in zip(roots, gens, strict=True)])

        try:
            await _all([prompt_trees(roots) for _, roots in starts])
        finally:
            tools.cancel()
            select.cancel()

    async def _sample(self, same: list[_Branch], result: RolloutResult) -> list[_Gen]:
        """The first generation of branches with one context: one request with n."""
        b = same[0]
        budget = self._room(len(b.context))
        request = GenerateRequest(
            b.context, self._sampling(b, budget, len(same)), key=f"group-{b.group}"
        )
        (outs,) = await self._generate([request], result, [b.group])
        if len(outs) != len(same):
            raise RuntimeError(f"engine returned {len(outs)} samples for n={len(same)}")
        return [_Gen.of(c, budget) for c in outs]

    async def _siblings(
        self, same: list[_Branch], tools: _Batched[StepInput, StepResult], result: RolloutResult
    ) -> list[list[_Done]]:
        gens = await self._sample(same, result)
        return await _all(
            [self._chain(b, g, tools, result) for b, g in zip(same, gens, strict=True)]
        )

    async def _chain(
        self, b: _Branch, g: _Gen, tools: _Batched[StepInput, StepResult], result: RolloutResult
    ) -> list[_Done]:
        """One branch to a leaf from its first generation ``g``, step after step."""
        steps: list[_Done] = []
        while True:
            await self._continue_past_answers([(b, g)], result)
            text = self._decode(g.ids)
            s = await tools(StepInput(text, b.turn, truncated=g.finish.type != "stop"))
            done = self._outcome(b, g, s, result)
            steps.append(done)
            if done.leaf:
                return steps
            b = _Branch(-1, b.tree, b.group, b.context + done.action + done.observation, b.turn + 1)
            (g,) = await self._sample([b], result)

    def _record(
        self,
        chains: list[tuple[_Branch, list[_Done]]],
        result: RolloutResult,
        tree_of: dict[int, int],
    ) -> None:
        """A tree's round into the Forest, in a fixed order: by depth in the round, then by
        the branch's place (the order of ``chains``)."""
        parents = [b.node for b, _ in chains]
        depth = 0
        while any(depth < len(steps) for _, steps in chains):
            for i, (b, steps) in enumerate(chains):
                if depth < len(steps):
                    parents[i] = self._add(result, parents[i], steps[depth])
                    tree_of[parents[i]] = b.tree
            depth += 1

    # ------------------------------------------------------------------ steps

    def _outcome(self, b: _Branch, g: _Gen, s: StepResult, result: RolloutResult) -> _Done:
        """A generated step and the tool's answer as a step to record; counts it in the
        budget."""
        s = self._bounded(b, g, s)
        mean_log_prob = sum(g.log_probs) / len(g.log_probs) if g.log_probs else math.nan
        info = NodeInfo(
            action_text=s.action_text,
            observation_text=s.observation_text,
            mean_log_prob=mean_log_prob,
            finish_reason=g.finish.type,
            tool=s.tool,
            query=s.query,
            answer=s.answer,
            valid=s.valid,
            weight_version=g.weight_version,
        )
        budget = result.budget[b.group]
        budget.generated_tokens += g.generated
        budget.tool_calls += s.tool is not None
        if s.is_leaf:
            budget.leaves += 1
            if self._bar is not None:
                self._bar.update()
        return _Done(g.ids, list(s.observation_ids), s.leaf_reason, info, s.is_leaf)

    def _add(self, result: RolloutResult, parent: int, done: _Done) -> int:
        node = result.forest.add_step(
            parent,
            done.action,
            done.observation,
            reason=done.reason,
            mean_log_prob=done.info.mean_log_prob,
        )
        result.info[node] = replace(done.info, parent=parent)
        return node

    async def _to_leaves(self, branches: list[_Branch], result: RolloutResult) -> None:
        """Advance every branch one agent step at a time until all reached a leaf."""
        while branches:
            branches = await self._step(branches, result)

    async def _step(self, branches: list[_Branch], result: RolloutResult) -> list[_Branch]:
        # Branches with the same context are siblings: one request with n samples. That is the
        # draws of one node, and also the M roots of one prompt, whose prompt is then prefilled
        # (and counted in the budget) once rather than M times.
        by_context: dict[tuple[int, tuple[int, ...]], list[_Branch]] = defaultdict(list)
        for b in branches:
            by_context[(b.turn, tuple(b.context))].append(b)
        requests, owners, budgets = [], [], []
        for same in by_context.values():
            b = same[0]
            budget = self._room(len(b.context))
            # Routed by prompt: the trees of a prompt share it, and one request may serve
            # several of them (their roots), so all of them use one server's prefix cache.
            requests.append(
                GenerateRequest(
                    b.context, self._sampling(b, budget, len(same)), key=f"group-{b.group}"
                )
            )
            owners.append(same)
            budgets.append(budget)
        completions = await self._generate(requests, result, [s[0].group for s in owners])

        flat: list[tuple[_Branch, _Gen]] = []
        for same, outs, budget in zip(owners, completions, budgets, strict=True):
            if len(outs) != len(same):
                raise RuntimeError(f"engine returned {len(outs)} samples for n={len(same)}")
            flat.extend((b, _Gen.of(c, budget)) for b, c in zip(same, outs, strict=True))
        await self._continue_past_answers(flat, result)

        texts = [self._decode(g.ids) for _, g in flat]
        inputs = [
            StepInput(text, b.turn, truncated=g.finish.type != "stop")
            for (b, g), text in zip(flat, texts, strict=True)
        ]
        with self._busy["tool"]:
            steps: list[StepResult] = await self.env.step(inputs)

        nxt = []
        for (b, g), s in zip(flat, steps, strict=True):
            done = self._outcome(b, g, s, result)
            node = self._add(result, b.node, done)
            if not done.leaf:
                nxt.append(
                    _Branch(
                        node,
                        b.tree,
                        b.group,
                        b.context + done.action + done.observation,
                        b.turn + 1,
                    )
                )
        return nxt

    def _sampling(self, b: _Branch, budget: int, n: int) -> SamplingParams:
        cfg = self.config
        return SamplingParams(
            max_new_tokens=budget,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=tuple(self.env.stop_strings(b.turn)),
            stop_token_ids=self.eos_token_ids,
            n=n,
        )

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    async def _generate(
        self, requests: list[GenerateRequest], result: RolloutResult, groups: list[int]
    ) -> list[list[Completion]]:
        """One engine call; its time and its prompts' prefill/cache counts go to the budget."""
        with self._busy["generate"]:
            completions = await self.engine.generate(requests)
        if len(completions) != len(requests):
            raise RuntimeError(
                f"engine returned {len(completions)} results for {len(requests)} requests"
            )
        for req, outs, group in zip(requests, completions, groups, strict=True):
            budget = result.budget[group]
            budget.requests += 1
            if outs:  # the prompt is prefilled once for all n samples
                budget.cached_tokens += outs[0].cached_tokens
                budget.prefill_tokens += len(req.input_ids) - outs[0].cached_tokens
        return completions

    async def _continue_past_answers(
        self, flat: list[tuple[_Branch, _Gen]], result: RolloutResult
    ) -> None:
        """Search-R1's cut of a step: at its first tool closing tag if the turn's generation
        holds one, else at its first ``</answer>``. A step that stopped at ``</answer>`` where
        a later tool tag could change its action (:meth:`SearchEnv.continues_past`) goes on to
        its next closing tag, until a tool's closes it (the step is then all of it), or it
        ends otherwise (the step is its first segment, up to that ``</answer>``)."""
        answer_close = f"</{self.env.answer_tag}>"
        pending = [
            i
            for i, (_, g) in enumerate(flat)
            if _stopped_at(g.finish, answer_close)
            and len(g.ids) < g.budget
            and self.env.continues_past(self._decode(g.ids))
        ]
        for i in pending:
            g = flat[i][1]
            g.first = (len(g.ids), g.finish)
        while pending:
            requests = [
                GenerateRequest(
                    flat[i][0].context + flat[i][1].ids,
                    self._sampling(flat[i][0], flat[i][1].budget - len(flat[i][1].ids), 1),
                    key=f"group-{flat[i][0].group}",
                )
                for i in pending
            ]
            outs = await self._generate(requests, result, [flat[i][0].group for i in pending])
            still = []
            for i, (c,) in zip(pending, outs, strict=True):
                g = flat[i][1]
                g.ids += c.output_ids
                g.log_probs += c.log_probs
                g.finish, g.weight_version = c.finish, c.weight_version
                g.generated += len(c.output_ids)
                if _stopped_at(c.finish, answer_close) and len(g.ids) < g.budget:
                    still.append(i)  # only a tool's closing tag (or the end) decides
                elif not any(_stopped_at(c.finish, f"</{t}>") for t in self.env.tools):
                    assert g.first is not None  # no tool tag closed: the cut at </answer>
                    keep, g.finish = g.first
                    del g.ids[keep:], g.log_probs[keep:]
            pending = still

    def _bounded(self, b: _Branch, g: _Gen, s: StepResult) -> StepResult:
        """``s``, or a leaf ``"context_limit"`` when the trajectory reached max_model_len: the
        step was cut by the room left (not by the per-turn limit), or its trajectory leaves
        no room for another token. The observation is dropped (a leaf has none)."""
        if self.max_len is None or s.leaf_reason == "answer":
            return s
        cut = g.finish.type == "length" and g.budget < self.config.max_action_tokens
        full = len(b.context) + len(g.ids) + len(s.observation_ids) >= self.max_len
        if not (cut or (full and not s.is_leaf)):
            return s
        return replace(s, observation_text="", observation_ids=(), leaf_reason="context_limit")

    # ------------------------------------------------------------------ branches, rewards

    @staticmethod
    def _branch_at(forest: Forest, node: int) -> _Branch:
        """A branch continuing from a drawn node: its context is prompt + every step through
        the node's observation, and its next turn is the node's depth."""
        tree, group, depth = forest.place(node)
        return _Branch(node, tree, group, forest.context(node), depth)

    def _reward(self, result: RolloutResult) -> None:
        forest = result.forest
        ids = forest.leaf_ids()
        rewards = []
        for leaf in ids:
            p = result.prompts[forest.place(leaf)[1]]
            r = float(
                self.reward_fn(
                    p.data_source, result.response_text(leaf), p.ground_truth, p.extra_info
                )
            )
            if not math.isfinite(r):
                raise ValueError(
                    f"reward function returned {r} for leaf {leaf}: rewards must be finite"
                )
            rewards.append(r)
        result.forest.set_rewards(ids, rewards)


async def rollout(
    engine: Engine,
    env: SearchEnv,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    config: RolloutConfig,
    *,
    tokenizer: Any,
    eos_token_ids: Sequence[int] = (),
    step: int = 0,
) -> RolloutResult:
    """One-call form of :class:`Rollout`."""
    runner = Rollout(
        engine, env, reward_fn, config, tokenizer=tokenizer, eos_token_ids=eos_token_ids
    )
    return await runner.run(prompts, step=step)


def _stopped_at(finish: FinishReason, stop: str) -> bool:
    return finish.type == "stop" and finish.matched == stop
