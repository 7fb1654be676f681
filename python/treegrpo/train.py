"""``treegrpo train``: Tree-GRPO training of a search agent.

The choices this loop makes, in order (algorithm.md):

1. Rollout: M trees per prompt, each an agent chain to a leaf; L rounds of N drawn nodes each
   continued to a leaf (nodes are whole agent steps); K leaves kept per tree.
2. Reward: outcome reward on each leaf (EM, or the Tree-GRPO QA runs' format-shaped reward).
3. Advantages: A = A_inter (over the prompt's leaves) + A_intra (over the tree's), in Rust.
4. Update: PPO dual-clip loss, KL (k3) to the reference, entropy bonus; shared prefixes trained
   once (tree packing) with weights that make the loss equal the per-trajectory one.
5. Weight sync: the embedded engine shares the learner's weights (version bump + cache flush);
   SGLang servers get them from disk or broadcast over a process group (NCCL; gloo on CPU).
6. Log: verl metric names plus tree/*, to console/JSONL/TensorBoard/W&B, each step's records
   once (treegrpo.logs.metrics); rollouts as Parquet.
7. Checkpoint: policy (safetensors) + optimizer + scheduler + RNG + data cursor + the engine's
   sampling generator, atomically; a resumed run continues exactly. The run directory belongs
   to one run, locked while it runs, written only once set-up has passed (treegrpo.rundir).

Run with no arguments for the embedded quickstart (SmolLM2-135M-Instruct warm-started on the
synthetic world's gold episodes, local BM25, tree (2, 2, 1)); ``--config FILE`` and dotted
overrides (``tree.m=2 learner.lr=1e-6``) for anything else. Data parallel:
``torchrun --nproc-per-node K -m treegrpo.train ...`` (each rank rolls out 1/K of a step's
prompts; the update equals a single-process one on the whole batch; see treegrpo.distributed).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from treegrpo import distributed
from treegrpo.config import TrainConfig, add_config_arguments, load_config
from treegrpo.exceptions import InvalidArgumentError
from treegrpo.rundir import RunDir

__all__ = ["Trainer", "add_subcommand", "main"]


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`, then runs the staged loop."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        # this process's rank in a torchrun run (rank 0 of 1 otherwise): rank 0 writes metrics
        # and checkpoints and prints; every rank rolls out its share of the prompts
        self.world = distributed.world()
        self.progress = progress and self.world.is_main
        self.run_dir = Path(cfg.trainer.run_dir).expanduser()
        self.rundir = RunDir(cfg.trainer.run_dir, resume=cfg.trainer.resume)
        self._engine_states: list[Any] | None = None  # the checkpoint's, restored after set-up
        self.step = 0
        self.cursor = 0  # index into the shuffled training prompts
        # One event loop for the run: HTTP sessions (SGLang, retrievers) live on it.
        self.loop = asyncio.new_event_loop()

    def _await(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the engine (aborting in-flight requests), the event loop and the run
        directory's lock."""
        try:
            if not self.loop.is_closed():
                if hasattr(self, "engine"):
                    self._await(self.engine.close())
                self.loop.close()
        finally:
            self.rundir.close()

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Data, policy (+ warm start), engine, environment, rollout and learner. The cheap
        checks come first (:meth:`preflight`), then data, retriever and servers, and only then
        the model loads: a bad path or a dead URL fails in seconds, not after the warm start."""
        import torch

        from treegrpo import data as data_module
        from treegrpo.engine.base import PolicySource
        from treegrpo.engine.embedded import EmbeddedEngine
        from treegrpo.env import SearchEnv
        from treegrpo.learner import Learner
        from treegrpo.rollout import Rollout

        cfg, world = self.cfg, self.world
        if cfg.data.train_batch_size % world.size:
            raise InvalidArgumentError(
                f"data.train_batch_size={cfg.data.train_batch_size} is not a multiple of the "
                f"{world.size} data-parallel processes: every rank rolls out the same number "
                "of prompts"
            )
        # each rank's prompts must split into the step's mini-batches (raises naming the field)
        cfg.learner.updates_per_epoch(
            cfg.data.train_batch_size, cfg.data.train_batch_size // world.size
        )
        self.preflight()
        self.reward_fn = data_module.reward_function(cfg.env)
        if world.is_main:  # the lock, and whether this run continues the one in run_dir
            self.rundir.open(cfg.to_dict())
        torch.manual_seed(cfg.trainer.seed)
        random.seed(cfg.trainer.seed)

        # rank 0 first: it fills the caches (synthetic world, retriever index, converted model,
        # warm start) that the other ranks then read. The model loads last: what fails fast
        # (data files, the corpus, a retriever or server URL) fails before it.
        with distributed.main_first():
            self.data = data_module.prepare(cfg.data, seed=cfg.trainer.seed)
            if cfg.model.sft_episodes and cfg.model.sft_steps and self.data.sft is not None:
                # RL on the questions the warm start never showed (ModelConfig.sft_episodes)
                from treegrpo.sft import warm_start_questions

                seen = warm_start_questions(
                    self.data.sft, max_hops=cfg.data.max_hops, limit=cfg.model.sft_episodes
                )
                self.data = self.data.without(seen, seed=cfg.trainer.seed)
            self.retriever = data_module.retriever(cfg.env, self.data.corpus)
            if cfg.engine.kind == "sglang":
                from treegrpo.engine import sglang_client

                urls = [
                    *cfg.engine.urls,
                    *([cfg.engine.router_url] if cfg.engine.router_url else []),
                ]
                self._await(sglang_client.probe(urls, retry_window=cfg.engine.retry_window_s))
            self.model, self.tokenizer = self._load_policy()
        self.env = SearchEnv(
            self.tokenizer,
            retriever=self.retriever,
            topk=cfg.env.topk,
            max_turns=cfg.tree.max_turns,
            max_obs_tokens=cfg.env.max_obs_tokens,
            truncated_action=cfg.env.truncated_action,
        )
        # The embedded engine generates from the learner's own weights, or from a replica
        # refreshed after each step (_sync_weights): under FSDP2, which shards the learner's
        # model in place (parameters become DTensors), and when engine.dtype differs from the
        # policy's.
        fsdp = world.parallel and cfg.learner.strategy == "fsdp2"
        if cfg.engine.kind == "embedded":
            dtype = self._engine_dtype()
            replica = fsdp or dtype != next(self.model.parameters()).dtype
            engine_model = copy.deepcopy(self.model).to(dtype) if replica else None
            self.engine: Any = EmbeddedEngine(
                engine_model or self.model,
                self.tokenizer,
                kv_budget_tokens=cfg.engine.kv_budget_tokens,
                seed=cfg.trainer.seed + world.rank,  # ranks sample independently
            )
        else:
            from treegrpo.engine.sglang_client import SGLangClient

            router = cfg.engine.routing == "router"
            self.engine = SGLangClient(
                [cfg.engine.router_url] if router else cfg.engine.urls,
                tokenizer=self.tokenizer,
                retry_window=cfg.engine.retry_window_s,
                routing=cfg.engine.routing,
                control_urls=cfg.engine.urls if router else None,
                weight_sync=cfg.engine.weight_sync,
                sync_address=cfg.engine.sync_address,
                sync_port=cfg.engine.sync_port,
            )
            self._await(self.engine.start())
        # How the engine follows the learner's weights is the engine's business (WeightSync):
        # shared weights bumped after each step, a replica refreshed, or servers pushed to.
        self._weights = self.engine.weight_sync(
            PolicySource(
                model=self.model,
                tokenizer=self.tokenizer,
                state_dict=lambda every_rank: self.learner.model_state_dict(every_rank=every_rank),
                directory=Path(cfg.engine.sync_dir or self.run_dir / "weights"),
                sharded=fsdp,
                is_main=world.is_main,
                barrier=distributed.barrier,
                run=self._await,
            )
        )
        # What the sync needs (a process group with the servers) is formed now, before the
        # run directory is written: a sync that cannot work fails with nothing lost.
        self._weights.start()
        on_step, hold = self._weights.on_step, self._weights.hold
        eos = sorted(getattr(self.engine, "eos_token_ids", ()) or ())
        tree = replace(cfg.tree, seed=cfg.tree.seed + world.rank) if world.parallel else cfg.tree
        if tree.max_model_len is None:  # trajectories end at the policy's context length
            length = getattr(self.model.config, "max_position_embeddings", None)
            tree = replace(tree, max_model_len=int(length) if length else None)
        self.rollout = Rollout(
            self.engine,
            self.env,
            self.reward_fn,
            tree,
            tokenizer=self.tokenizer,
            eos_token_ids=eos,
        )
        # The learner's schedule spans the run, and its log-probs use the rollout's temperature.
        learner_cfg = replace(
            cfg.learner,
            total_steps=cfg.learner.total_steps or max(cfg.trainer.total_steps, 1),
            temperature=cfg.tree.temperature or 1.0,
        )
        self.learner = Learner(
            self.model, learner_cfg, on_step=on_step, hold=hold, data_parallel=world.parallel
        )
        self._resume()
        # Set-up has passed: only now is anything written into the run directory.
        if world.is_main:
            for note in self.rundir.commit(cfg.to_dict(), step=self.step):
                print(note)
        distributed.barrier()
        # SGLang servers start from their own copy of the weights: push the (warm-started or
        # resumed) policy before the first rollout.
        self._sync_weights(self.step)
        self._restore_engine()

    def preflight(self) -> None:
        """What costs nothing to check, before anything is read, written or loaded: a run
        directory that can be one, a device that exists, a model directory with a loadable
        config and weights, a corpus file that exists, logger backends that are installed.
        (Data files are read next, and fail with their path named, before any model loads.)"""
        import torch

        cfg = self.cfg
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise InvalidArgumentError(
                f"trainer.run_dir={cfg.trainer.run_dir} is a file, not a directory: pass a new "
                "directory, or the run directory of a run to resume"
            )
        if cfg.model.device == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(
                "model.device=cuda, but torch sees no CUDA device on this machine "
                "(torch.cuda.is_available() is False): use model.device=cpu or auto"
            )
        check_model_dir(cfg.model.path)
        if cfg.data.corpus and not Path(cfg.data.corpus).expanduser().is_file():
            raise InvalidArgumentError(
                f"data.corpus={cfg.data.corpus}: no such file; pass a JSONL corpus (one "
                '{"id", "contents"} object a line), or leave it unset for the synthetic world\'s'
            )
        from treegrpo.logs.metrics import check_sinks

        check_sinks(cfg.trainer.logger)

    def _load_policy(self) -> tuple[Any, Any]:
        import torch

        from treegrpo.engine.models import load_policy
        from treegrpo.sft import base_policy, warm_start

        cfg = self.cfg.model
        device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        if device == "cuda" and self.world.parallel:
            device = f"cuda:{self.world.local_rank}"  # one GPU per rank
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        world = self.data.sft.parent if self.data.sft is not None else None
        path: Any = base_policy(cfg, world)
        if cfg.sft_steps > 0 and self.data.sft is not None:
            path = warm_start(
                path,
                self.data.sft,
                cfg,
                device=device,
                max_hops=self.cfg.data.max_hops,
                seed=cfg.sft_seed,
                prompt=self.cfg.data.prompt,
                progress=self.progress,
            )
        return load_policy(path, device=device, dtype=dtype)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        """Validate, train ``trainer.total_steps`` steps (resuming if asked), validate."""
        from treegrpo.logs.metrics import MetricsLogger

        cfg = self.cfg.trainer
        final: dict[str, float] = {}
        main = self.world.is_main
        with MetricsLogger(
            self.run_dir if main else None,  # other ranks: a null logger
            cfg.logger,
            resume_step=self.step,
            run_id=self.rundir.run_id or None,
            config=self.cfg.to_dict(),
        ) as log:
            self.log = log
            # a validation already recorded (a kill after it, a re-run) is not run again
            if cfg.val_before and self.step == 0 and not self._recorded(0):
                before = self.validate("before")
                if before:  # {} when there is nothing to validate on
                    log.write(0, before)
            while self.step < cfg.total_steps:
                metrics = self.train_step()
                self.step += 1
                last = self.step == cfg.total_steps
                if cfg.val_every and self.step % cfg.val_every == 0 and not last:
                    metrics.update(self.validate(f"step {self.step}"))
                log.write(self.step, metrics)
                if self.step % cfg.save_every == 0 or last:
                    self.checkpoint()  # every rank (FSDP2 gathers shards); rank 0 writes
            if cfg.val_after and self._recorded(self.step):
                final = log.get(self.step, "val") if self.world.is_main else {}
            elif cfg.val_after:
                final = self.validate("after")
                if final:
                    log.write(self.step, final)
        if self.world.is_main:
            self._report()
        return final

    def _report(self) -> None:
        """The learning-curve plot (``trainer.plot``) and a last line saying where the run's
        files are and how to look at them."""
        plot = None
        if self.cfg.trainer.plot and (self.run_dir / "metrics.jsonl").is_file():
            from treegrpo.exceptions import MissingDependencyError
            from treegrpo.logs.plots import plot_learning_curve

            try:
                plot = plot_learning_curve(self.run_dir, self.run_dir / "learning_curve.png")
            except MissingDependencyError as e:  # the run itself is complete: say so, go on
                print(f"no learning curve: {e} (or set trainer.plot=false)")
        run = str(self.run_dir)
        shown = f"; learning curve {plot}" if plot else ""
        print(
            f"run {run}: metrics.jsonl, nodes/ and trajectories/ (Parquet), checkpoints/{shown}. "
            f"Look at it with: treegrpo logs summary {run} | treegrpo logs plot {run} | "
            f"treegrpo logs tree {run}",
            flush=True,
        )

    def _recorded(self, step: int) -> bool:
        """Whether rank 0's metrics hold a validation of `step` (every rank gets its answer,
        so every rank skips, or runs, the same validation)."""
        found = self.world.is_main and self.log.has(step, "val")
        if found:
            print(f"validation of step {step}: already in metrics.jsonl, not run again")
        return bool(distributed.gather_objects(found)[0])

    def train_step(self) -> dict[str, float]:
        from treegrpo.logs import write_rollout

        cfg = self.cfg
        started = t = time.perf_counter()
        prompts = self._next_prompts()
        # 1-2. rollout: select + expand (Rust), generate, tool calls, rewards
        bar = f"step {self.step + 1} rollout" if self.progress else None
        result = self._await(self.rollout.run(prompts, step=self.step, progress=bar))
        timing = {
            "timing_s/rollout": time.perf_counter() - t,
            "timing_s/gen": result.timing["generate"],
            "timing_s/tool": result.timing["tool"],
            "timing_s/reward": result.timing["reward"],
        }
        # 3. advantages (Rust)
        t = time.perf_counter()
        adv = result.forest.advantages(
            cfg.algorithm.adv_estimator, scale_std=cfg.algorithm.norm_adv_by_std
        )
        timing["timing_s/adv"] = time.perf_counter() - t
        # 4. policy update (the learner reports timing_s/old_log_prob and timing_s/update_actor);
        # 5. weight sync (embedded: version bump inside the learner's step)
        bar = f"step {self.step + 1} update" if self.progress else None
        actor = self.learner.step(result.forest, progress=bar)
        # A non-finite loss skips its update inside the learner (warned, counted in
        # actor/skipped_updates); learner.max_nonfinite_updates in a row stop the run.
        t = time.perf_counter()
        self._sync_weights(self.step + 1)
        timing["timing_s/weight_sync"] = time.perf_counter() - t
        # 6. log: Parquet rollouts for this step (one part per rank), metrics over ranks
        t = time.perf_counter()
        rank = self.world.rank if self.world.parallel else None
        write_rollout(self.run_dir, self.step + 1, result, adv, rank=rank)
        timing["timing_s/log"] = time.perf_counter() - t
        timing["timing_s/step"] = time.perf_counter() - started
        return distributed.reduce_metrics({**rollout_metrics(result, adv), **actor, **timing})

    def _engine_dtype(self) -> Any:
        """The embedded engine's dtype (engine.dtype; see EngineConfig)."""
        import torch

        from treegrpo.engine.models import cpu_has_bf16

        policy = next(self.model.parameters())
        want = self.cfg.engine.dtype
        if want == "auto":
            cpu_bf16 = policy.device.type == "cpu" and cpu_has_bf16()
            want = "bfloat16" if policy.dtype == torch.float32 and cpu_bf16 else "policy"
        named = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        return named.get(want, policy.dtype)

    def _sync_weights(self, version: int) -> None:
        """The engine takes the policy after an update (or at set-up): see
        :class:`treegrpo.engine.base.WeightSync` (SGLang servers get it from disk or over a
        process group, the embedded engine's replica a copy; shared weights need nothing)."""
        self._weights.push(version)

    def _next_prompts(self) -> list[Any]:
        """This rank's share of the step's prompts; every rank advances the cursor over the
        whole step, so the cursor is the same on every rank (and in the checkpoint)."""
        n = self.cfg.data.train_batch_size
        pool = self.data.train
        order = self.data.order
        out = []
        for _ in range(n):
            out.append(pool[order[self.cursor % len(order)]])
            self.cursor += 1
        return [self.data.prompt(x, self.tokenizer) for x in distributed.shard(out, self.world)]

    # ------------------------------------------------------------------ validation

    def validate(self, tag: str) -> dict[str, float]:
        """Greedy chain rollouts on the validation questions: EM per data source; ``{}`` (and a
        note) when the run has no validation questions, never a made-up EM of 0."""
        from treegrpo.env.rewards import compute_score
        from treegrpo.rollout import Rollout

        if not self.data.val:
            if self.world.is_main:
                print(f"validation ({tag}) skipped: no validation questions (set data.val_files)")
            return {}

        # the training rollout's config (max_model_len resolved), as greedy chains
        tree = replace(self.rollout.config, m=1, n=0, k=None, temperature=0.0, top_p=1.0)
        exact = Rollout(
            self.engine,
            self.env,
            lambda ds, s, gt, extra=None: compute_score(ds, s, gt, extra),
            tree,
            tokenizer=self.tokenizer,
            eos_token_ids=sorted(getattr(self.engine, "eos_token_ids", ()) or ()),
        )
        # each rank validates its share of the questions; rewards are summed over ranks
        val = distributed.shard(self.data.val, self.world)
        prompts = [self.data.prompt(x, self.tokenizer) for x in val]
        t = time.perf_counter()
        sums: dict[str, tuple[float, int]] = {}  # data source -> (reward sum, leaves)
        if prompts:
            import polars as pl

            result = self._await(
                exact.run(prompts, progress=f"validate ({tag})" if self.progress else None)
            )
            leaves = pl.DataFrame(result.forest.leaves()).select("group", "reward")
            sources = pl.DataFrame(
                {
                    "group": [p.group for p in prompts],
                    "data_source": [p.data_source for p in prompts],
                }
            )
            per = (
                leaves.join(sources, on="group")
                .group_by("data_source")
                .agg(pl.col("reward").sum().alias("sum"), pl.len().alias("n"))
            )
            sums = {ds: (float(s), int(n)) for ds, s, n in per.iter_rows()}
        total: dict[str, list[float]] = {}
        for part in distributed.gather_objects(sums):
            for ds, (s, n) in part.items():
                acc = total.setdefault(ds, [0.0, 0])
                acc[0], acc[1] = acc[0] + s, acc[1] + n
        metrics = {f"val-core/{ds}/acc/mean@1": s / max(n, 1) for ds, (s, n) in total.items()}
        everything = sum(s for s, _ in total.values()), sum(n for _, n in total.values())
        metrics["val-core/all/acc/mean@1"] = everything[0] / max(everything[1], 1)
        metrics["timing_s/validate"] = time.perf_counter() - t
        if self.world.is_main:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()))
            print(f"validation ({tag}): {shown}")
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Path | None:
        """Every rank calls it (under FSDP2 the shards are gathered); rank 0 writes."""
        from treegrpo.checkpoint import save

        return save(self.run_dir, self.step, self.model, self.tokenizer, self.learner, self.state())

    def state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint (every rank calls it): step, data cursor, and
        every rank's engine state (the embedded engine's sampling generator and weight
        version; SGLang servers keep none: docs/architecture.md, "Exact resume")."""
        engine = self._weights.state_dict()
        return {
            "step": self.step,
            "cursor": self.cursor,
            "engine": distributed.gather_objects(engine),
        }

    def _resume(self) -> None:
        if self.cfg.trainer.resume != "auto":
            return
        from treegrpo.checkpoint import latest, load

        ckpt = latest(self.run_dir)
        if ckpt is None:
            return
        state = load(ckpt, self.model, self.learner)
        self.step, self.cursor = state["step"], state["cursor"]
        self._engine_states = state.get("engine")
        self._weights.weights_loaded()  # weights changed under the engine (its cache)
        if self.world.is_main:
            print(f"resumed from {ckpt} (step {self.step}, run {self.rundir.run_id})")

    def _restore_engine(self) -> None:
        """After the first weight sync: the engine's sampling generator and weight version as
        the checkpoint saved them, so the next rollout draws what an uninterrupted run would."""
        states = self._engine_states
        if not states or not self._weights.keeps_state:
            return
        if len(states) == self.world.size and states[self.world.rank] is not None:
            self._weights.load_state_dict(states[self.world.rank])
        elif self.world.is_main:
            print(
                f"note: the checkpoint was written by {len(states)} processes, this run has "
                f"{self.world.size}: the engines' samplers restart from their seeds"
            )


# Policy names that are not directories: converted or built by treegrpo (treegrpo.engine.models).
_NAMED_POLICIES = frozenset({"default", "scratch"})
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(path: str) -> None:
    """A ``model.path`` that is a Hugging Face checkpoint directory: its ``config.json`` loads
    (no weights are read) and it holds weights; raises :class:`InvalidArgumentError` naming the
    path and the problem. Named policies (``default``...) pass."""
    if path in _NAMED_POLICIES:
        return
    where = Path(path).expanduser()
    need = "a Hugging Face checkpoint directory (config.json, weights, tokenizer files)"
    if not where.is_dir():
        raise InvalidArgumentError(f"model.path={path}: no such directory; pass {need}, or default")
    if not (where / "config.json").is_file():
        raise InvalidArgumentError(f"model.path={path} holds no config.json; pass {need}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgumentError(
            f"model.path={path}: its config.json does not load ({first}); pass {need}"
        ) from e
    if not any((where / name).is_file() for name in _WEIGHT_FILES):
        raise InvalidArgumentError(
            f"model.path={path} holds no weights ({' or '.join(_WEIGHT_FILES[::2])}); pass {need}"
        )


def rollout_metrics(result: Any, adv: Any) -> dict[str, float]:
    """verl's rollout metrics plus tree/* ones, from a rollout and its advantages table."""
    import polars as pl

    a = pl.DataFrame(adv)
    leaves = pl.DataFrame(result.forest.leaves())
    kept = leaves.filter(pl.col("kept"))
    nodes = pl.DataFrame(result.forest.nodes())
    branch = nodes.filter(pl.col("num_children") >= 2)
    total = result.total
    n_prompts = max(len(result.prompts), 1)
    return {
        "critic/score/mean": float(a["reward"].mean() or 0.0),
        "critic/advantages/mean": float(a["advantage"].mean() or 0.0),
        "critic/advantages/max": float(a["advantage"].max() or 0.0),
        "critic/advantages/min": float(a["advantage"].min() or 0.0),
        "response_length/mean": float(kept["action_tokens"].mean() or 0.0),
        "response_length/clip_ratio": float(
            (kept["leaf_reason"].cast(pl.Utf8) == "truncated").mean() or 0.0
        ),
        "num_turns/mean": float(kept["depth"].mean() or 0.0),
        "tool_call_counts/mean": total.tool_calls / max(len(leaves), 1),
        "tree/leaves_per_prompt": len(kept) / n_prompts,
        "tree/branch_depth/mean": float(branch["depth"].mean() or 0.0) if len(branch) else 0.0,
        "tree/prefix_cache_hit_rate": total.cache_hit_rate,
        "tree/gen_tokens_per_leaf": total.generated_tokens / max(len(leaves), 1),
        "tree/leaves_per_1k_generated": total.leaves_per_1k_generated,
        "tree/generated_tokens": float(total.generated_tokens),
        "tree/prefill_tokens": float(total.prefill_tokens),
        "tree/tool_calls": float(total.tool_calls),
    }


# ---------------------------------------------------------------------- command line


def add_subcommand(commands: Any) -> None:
    """Register ``train`` on the ``treegrpo`` command line."""
    p = commands.add_parser(
        "train",
        help="Tree-GRPO training (no arguments: the embedded quickstart)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "tree.m=2 learner.lr=1e-6")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a ConfigError is one line (treegrpo.cli)
    distributed.init_from_env()  # torchrun's process group, if started by torchrun
    trainer = Trainer(cfg, progress=not args.no_progress)
    try:
        trainer.setup()
        trainer.run()
    finally:
        trainer.close()
        distributed.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m treegrpo.train [--debug] [--config FILE] [overrides...]`` (torchrun-friendly;
    user errors are one line and exit code 2, as with ``treegrpo train``)."""
    from treegrpo.cli import run_guarded, split_debug

    parser = argparse.ArgumentParser(prog="python -m treegrpo.train")
    add_subcommand(parser.add_subparsers(dest="command"))
    rest, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(["train", *rest])
    return run_guarded("train", lambda: _run_cli(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
