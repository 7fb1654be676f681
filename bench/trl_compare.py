"""Peer comparison (issue 9): treegrpo against TRL's GRPOTrainer, same model, task and batch.

What both sides train on, per step (the same for every side):

- Model: SmolLM2-135M-Instruct, float32, CPU: the checkpoint treegrpo converts once into its
  cache (``treegrpo.engine.models.default_policy()``); TRL loads that directory by path.
- Task: single-turn QA on the synthetic world's training questions (``treegrpo.data.prepare``
  with the default ``DataConfig``, in its seeded order), Search-R1's prompt in the policy's chat
  template. Reward: treegrpo's ``compute_score`` (exact match of the ``<answer>``, no format
  shaping) on both sides. treegrpo runs with ``tree.max_turns=0``: the first turn is the final
  one, so no tool is ever called and each trajectory is prompt + one completion, as in TRL.
- Batch: ``--prompts`` questions x ``--generations`` trajectories each (2 x 4), sampled at
  temperature 1 with no top-p / top-k filtering, at most ``--max-new-tokens`` tokens each.
- Update: one optimizer step per training step (TRL: ``num_iterations=1``,
  ``per_device_train_batch_size`` = the step's trajectories, ``gradient_accumulation_steps=1``;
  treegrpo: ``ppo_epochs=1``, ``ppo_mini_batch_size=None``), AdamW at the same constant
  learning rate (no warmup), weight decay 0.01, gradient clip 1.0, PPO clip 0.2, token-mean
  loss (TRL's ``dapo``), k3 KL to a frozen reference at 0.001 and an entropy bonus of 0.001
  (treegrpo's defaults, set on TRL too), no gradient checkpointing, no bf16.

Sides: ``trl`` (GRPOTrainer, generation with transformers ``generate``), ``chain`` (treegrpo,
``tree.m=4 tree.n=0``, GRPO advantages: the same algorithm as TRL) and, unless ``--no-tree``,
``tree`` (treegrpo, one tree per prompt whose root gets 3 more completions: ``m=1 n=3 l=1``,
Tree-GRPO advantages; the same number of trajectories, whose shared prompt the learner runs
once). treegrpo runs through ``treegrpo.train.Trainer.train_step``, the code path of
``treegrpo train`` (rollout, advantages, update, Parquet rollout log, metrics).

Timing: all sides live in one process and take turns step by step (a callback at the end of
each TRL step runs one step of each treegrpo side), so changing load from other jobs hits them
alike. The first ``--warmup`` steps of each side are not counted; the table gives medians over
the ``--steps`` timed ones. Per step:

- step: wall time of a whole training step (TRL: from the end of the previous step's callback
  to ``on_step_end``, so its data loading and logging count; treegrpo: ``train_step``);
- rollout: generation + reward (TRL: ``GRPOTrainer._generate``, timed by a subclass that calls
  the original, plus the reward function; treegrpo: ``timing_s/rollout``, which also parses
  the actions and runs the tool calls);
- learner = step - rollout: advantages, reference (and, in treegrpo, old) log-probs, the loss'
  forward and backward, the optimizer step, logging;
- learner tokens/s: trajectory tokens (prompt + completion of every trajectory, a shared prompt
  counted once per trajectory) per second of the learner phase; step tokens/s: the same tokens
  per second of the whole step.

    .venv/bin/python bench/trl_compare.py                  # 1 warm-up + 3 timed steps a side
    .venv/bin/python bench/trl_compare.py --quick          # 1 step a side, no JSON
    .venv/bin/python bench/trl_compare.py --no-tree --steps 5

Needs TRL (``pip install -c constraints.txt -e '.[bench]'``); the model never comes from a hub
(``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; fail rather than download

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, target, write_results

TITLE = "Peer comparison: treegrpo against TRL's GRPOTrainer"
ISSUE = 9
SEED = 0
INSTALL_HINT = (
    "bench/trl_compare.py needs TRL, which treegrpo does not install by default: run "
    "`.venv/bin/pip install -c constraints.txt -e '.[bench]'` (or `pip install -c "
    "constraints.txt trl`)"
)
# The GRPOConfig fields recorded in the JSON (what decides the work of a step).
TRL_ARGS_RECORDED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "generation_batch_size",
    "steps_per_generation",
    "num_generations",
    "num_iterations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "epsilon",
    "beta",
    "entropy_coef",
    "loss_type",
    "scale_rewards",
    "gradient_checkpointing",
    "bf16",
    "use_cpu",
)
LABELS = {
    "trl": "TRL GRPOTrainer",
    "chain": "treegrpo chain (M=4, N=0)",
    "tree": "treegrpo tree (M=1, N=3, L=1)",
}


def _require_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None


@dataclass
class Settings:
    """What every side shares (recorded in the JSON)."""

    prompts: int = 2
    generations: int = 4
    max_new_tokens: int = 32
    lr: float = 1e-6
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    clip: float = 0.2
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    seed: int = SEED

    @property
    def trajectories(self) -> int:
        return self.prompts * self.generations


@dataclass
class Side:
    """One side's per-step records."""

    name: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step_s: float, cpu_s: float, rollout_s: float, tokens: int, **extra: Any) -> None:
        learner_s = step_s - rollout_s
        self.steps.append(
            {
                "step_s": step_s,
                "step_cpu_s": cpu_s,
                "rollout_s": rollout_s,
                "learner_s": learner_s,
                "trajectory_tokens": tokens,
                "learner_tokens_per_s": tokens / learner_s if learner_s > 0 else None,
                "step_tokens_per_s": tokens / step_s,
                "loadavg_1min": round(os.getloadavg()[0], 2),
                **extra,
            }
        )

    def summary(self, warmup: int) -> dict[str, Any]:
        timed = self.steps[warmup:] or self.steps
        out: dict[str, Any] = {"timed_steps": len(timed)}
        for key in (
            "step_s",
            "step_cpu_s",
            "rollout_s",
            "learner_s",
            "trajectory_tokens",
            "generated_tokens",
            "learner_tokens_per_s",
            "step_tokens_per_s",
            "mean_reward",
        ):
            values = [s[key] for s in timed if s.get(key) is not None]
            out[key] = statistics.median(values) if values else None
        return out


# ------------------------------------------------------------------------------ treegrpo


def treegrpo_trainer(mode: str, s: Settings, run_dir: Path, total_steps: int) -> Any:
    """A set-up ``treegrpo.train.Trainer`` for one treegrpo side."""
    from treegrpo.config import (
        AlgorithmConfig,
        DataConfig,
        EnvConfig,
        ModelConfig,
        TrainConfig,
        TrainerConfig,
    )
    from treegrpo.learner import LearnerConfig
    from treegrpo.rollout import RolloutConfig
    from treegrpo.train import Trainer

    sampling = {
        "max_turns": 0,  # the first turn is the final one: single-turn QA, no tool calls
        "max_action_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "seed": s.seed,
    }
    if mode == "chain":
        tree = RolloutConfig(m=s.generations, n=0, l=0, **sampling)
        estimator = "grpo"
    else:  # one tree per prompt: a root chain plus generations - 1 draws (all of the root)
        tree = RolloutConfig(m=1, n=s.generations - 1, l=1, **sampling)
        estimator = "tree"
    cfg = TrainConfig(
        data=DataConfig(train_batch_size=s.prompts),
        model=ModelConfig(path="default", sft_steps=0, device="cpu", dtype="float32"),
        env=EnvConfig(format_reward=False),
        tree=tree,
        algorithm=AlgorithmConfig(adv_estimator=estimator),
        learner=LearnerConfig(
            lr=s.lr,
            warmup_steps=0,
            total_steps=total_steps,
            weight_decay=s.weight_decay,
            grad_clip=s.grad_clip,
            clip_ratio_low=s.clip,
            clip_ratio_high=s.clip,
            kl_coef=s.kl_coef,
            entropy_coeff=s.entropy_coef,
            loss_agg_mode="token-mean",
            ppo_mini_batch_size=None,  # one update a step, as TRL's num_iterations=1
        ),
        trainer=TrainerConfig(
            total_steps=total_steps,
            run_dir=str(run_dir),
            val_before=False,
            val_after=False,
            resume="never",
            logger=[],
            seed=s.seed,
        ),
    )
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return trainer


def treegrpo_step(trainer: Any, side: Side) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    metrics = trainer.train_step()
    step_s, cpu = time.perf_counter() - start, time.process_time() - cpu
    trainer.step += 1
    side.add(
        step_s,
        cpu,
        metrics["timing_s/rollout"],
        int(metrics["perf/total_tokens"]),
        generated_tokens=int(metrics["tree/generated_tokens"]),
        forward_tokens=int(metrics["perf/forward_tokens"]),
        padded_tokens=int(metrics["perf/padded_tokens"]),
        update_s=metrics["timing_s/update_actor"],
        old_log_prob_s=metrics["timing_s/old_log_prob"],
        mean_reward=metrics["critic/score/mean"],
        trajectories=round(metrics["tree/leaves_per_prompt"] * trainer.cfg.data.train_batch_size),
    )


# ------------------------------------------------------------------------------ TRL


@dataclass
class _TrlStep:
    """What the TRL side measures inside a step (reset at each step's end)."""

    rollout_s: float = 0.0
    tokens: int = 0
    generated: int = 0
    trajectories: int = 0
    rewards: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.rollout_s, self.tokens, self.generated, self.trajectories = 0.0, 0, 0, 0
        self.rewards = []


def trl_trainer(
    s: Settings,
    model_dir: Path,
    examples: list[Any],
    prompt_lengths: list[int],
    out_dir: Path,
    total_steps: int,
    callback: Any,
    acc: _TrlStep,
) -> Any:
    """A GRPOTrainer over ``examples`` (in order), configured as the module docstring says."""
    from datasets import Dataset
    from treegrpo.env.rewards import compute_score
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation is timed (the phase split only; nothing else changes)."""

        def _generate(self, prompts: list) -> Any:
            start = time.perf_counter()
            out = super()._generate(prompts)
            acc.rollout_s += time.perf_counter() - start
            return out

    def exact_match(
        completions: list[Any],
        completion_ids: list[list[int]],
        golds: list[list[str]],
        data_source: list[str],
        prompt_tokens: list[int],
        **_: Any,
    ) -> list[float]:
        start = time.perf_counter()
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [
            compute_score(ds, text, {"target": list(g)})
            for ds, text, g in zip(data_source, texts, golds, strict=True)
        ]
        acc.generated += sum(len(ids) for ids in completion_ids)
        acc.tokens += sum(prompt_tokens) + sum(len(ids) for ids in completion_ids)
        acc.trajectories += len(completions)
        acc.rewards.extend(rewards)
        acc.rollout_s += time.perf_counter() - start
        return rewards

    dataset = Dataset.from_list(
        [
            {
                "prompt": x.prompt,
                "golds": list(x.golds),
                "data_source": x.data_source,
                "prompt_tokens": n,
            }
            for x, n in zip(examples, prompt_lengths, strict=True)
        ]
    )
    args = GRPOConfig(
        output_dir=str(out_dir),
        max_steps=total_steps,
        per_device_train_batch_size=s.trajectories,  # one step's trajectories in one pass
        gradient_accumulation_steps=1,
        num_generations=s.generations,
        num_iterations=1,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=s.weight_decay,
        max_grad_norm=s.grad_clip,
        epsilon=s.clip,
        beta=s.kl_coef,
        entropy_coef=s.entropy_coef,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,  # the prompts in treegrpo's order
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=s.seed,
    )
    return TimedGRPOTrainer(
        model=str(model_dir),
        reward_funcs=exact_match,
        args=args,
        train_dataset=dataset,
        callbacks=[callback],
    )


# ------------------------------------------------------------------------------ the run


def run(s: Settings, warmup: int, steps: int, sides: list[str]) -> dict[str, Any]:
    _require_trl()
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from treegrpo.engine.models import default_policy

    total = warmup + steps
    model_dir = default_policy()
    tmp = Path(tempfile.mkdtemp(prefix="treegrpo-trl-compare-"))
    results = {name: Side(name) for name in sides}

    trainers = {}
    for mode in sides[1:]:
        print(f"setting up {LABELS[mode]}", flush=True)
        trainers[mode] = treegrpo_trainer(mode, s, tmp / mode, total)
    # the questions treegrpo's trainers will take, in their order, for TRL's dataset
    data = trainers["chain"].data
    examples = [data.train[data.order[i % len(data.order)]] for i in range(total * s.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_lengths = []
    for x in examples:  # TRL renders the chat itself: check that it sees the same prompt ids
        ours = list(data.prompt(x, tokenizer).input_ids)
        theirs = tokenizer.apply_chat_template(
            x.prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        if ours != list(theirs):
            raise RuntimeError(f"prompt ids differ between treegrpo and TRL for {x.question!r}")
        prompt_lengths.append(len(ours))

    acc = _TrlStep()

    class Interleave(TrainerCallback):
        """Closes each TRL step's timing, then runs one step of every treegrpo side."""

        mark = cpu_mark = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_s = time.perf_counter() - self.mark
            results["trl"].add(
                step_s,
                time.process_time() - self.cpu_mark,
                acc.rollout_s,
                acc.tokens,
                generated_tokens=acc.generated,
                mean_reward=statistics.fmean(acc.rewards) if acc.rewards else None,
                trajectories=acc.trajectories,
            )
            acc.reset()
            self._report("trl", state.global_step)
            for mode, trainer in trainers.items():
                treegrpo_step(trainer, results[mode])
                self._report(mode, state.global_step)
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

        @staticmethod
        def _report(mode: str, step: int) -> None:
            r = results[mode].steps[-1]
            kind = "warm-up" if step <= warmup else "timed"
            print(
                f"  step {step} ({kind}) {LABELS[mode]}: {r['step_s']:.1f} s "
                f"(CPU {r['step_cpu_s']:.1f} s) "
                f"(rollout {r['rollout_s']:.1f} s, learner {r['learner_s']:.1f} s), "
                f"{r['trajectory_tokens']} trajectory tokens, load {r['loadavg_1min']}",
                flush=True,
            )

    print("setting up TRL GRPOTrainer", flush=True)
    trl = trl_trainer(s, model_dir, examples, prompt_lengths, tmp / "trl", total, Interleave(), acc)
    threads = torch.get_num_threads()
    print(f"training {total} steps a side ({warmup} warm-up), torch threads {threads}", flush=True)
    start = time.perf_counter()
    try:
        trl.train()
    finally:
        for trainer in trainers.values():
            trainer.close()
        shutil.rmtree(tmp, ignore_errors=True)  # run dirs: rollout logs, TRL's output_dir
    elapsed = time.perf_counter() - start
    trl_args = trl.args.to_dict()
    configs: dict[str, Any] = {"trl": {k: trl_args.get(k) for k in TRL_ARGS_RECORDED}}
    for mode, trainer in trainers.items():
        full = trainer.cfg.to_dict()
        configs[mode] = {k: full[k] for k in ("tree", "algorithm", "learner")}
    return {
        "sides": {
            name: {"label": LABELS[name], **side.summary(warmup), "steps": side.steps}
            for name, side in results.items()
        },
        "configs": configs,
        "torch_threads": threads,
        "train_elapsed_s": elapsed,
        "model_dir": str(model_dir),
        "prompt_tokens": prompt_lengths,
    }


def report(result: dict[str, Any], s: Settings, warmup: int) -> str:
    sides = result["sides"]
    rows = []
    for r in sides.values():
        ratio = r["step_s"] / sides["trl"]["step_s"] if r["step_s"] else None
        rows.append(
            [
                r["label"],
                round(statistics.fmean(x["trajectories"] for x in r["steps"])),
                f"{r['step_s']:.1f}",
                f"{r['step_cpu_s']:.1f}",
                f"{r['rollout_s']:.1f}",
                f"{r['learner_s']:.1f}",
                f"{r['trajectory_tokens']:.0f}",
                f"{r['generated_tokens']:.0f}",
                f"{r['learner_tokens_per_s']:.0f}" if r["learner_tokens_per_s"] else "-",
                f"{r['step_tokens_per_s']:.0f}",
                f"{ratio:.2f}x" if ratio is not None else "-",
            ]
        )
    timed = sides["trl"]["timed_steps"]
    head = (
        f"{s.prompts} prompts x {s.generations} trajectories per step, <= {s.max_new_tokens} "
        f"new tokens; medians of {timed} step{'s' * (timed != 1)} after {warmup} warm-up"
    )
    table = markdown_table(
        [
            "side",
            "traj/step",
            "step s",
            "step CPU s",
            "rollout s",
            "learner s",
            "traj tokens",
            "generated",
            "learner tok/s",
            "step tok/s",
            "step time / TRL",
        ],
        rows,
    )
    return f"{head}\n\n{table}"


def trl_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The informational target: treegrpo's step time <= TRL's at equal trajectories."""
    sides = result["sides"]
    trl, chain = sides["trl"], sides.get("chain")
    if chain is None:
        return []
    note = (
        f"informational (issue 9 sets no number); median step {chain['step_s']:.1f} s vs "
        f"{trl['step_s']:.1f} s, CPU time {chain['step_cpu_s'] / trl['step_cpu_s']:.2f}x; "
        f"learner tokens/s {chain['learner_tokens_per_s'] or 0:.0f} vs "
        f"{trl['learner_tokens_per_s'] or 0:.0f}"
    )
    if "tree" in sides:
        tree = sides["tree"]
        note += f"; tree (1 tree of 4 per prompt) {tree['step_s'] / trl['step_s']:.2f}x"
    return [
        target(
            "training step wall time, treegrpo chain GRPO over TRL GRPOTrainer, "
            "2 prompts x 4 trajectories, SmolLM2-135M, CPU",
            chain["step_s"] / trl["step_s"],
            "<=",
            1.0,
            "x",
            note=note,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (default 2)")
    parser.add_argument("--generations", type=int, default=4, help="trajectories per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per completion (32)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--no-tree", action="store_true", help="skip the treegrpo tree side")
    parser.add_argument("--quick", action="store_true", help="1 step a side, no JSON")
    parser.add_argument("--out", type=Path, default=None, help="result file (quick: none)")
    args = parser.parse_args()
    _require_trl()  # before anything slow
    if args.quick:
        args.steps, args.warmup = 1, 0
    if args.generations < 2:
        parser.error("--generations must be >= 2 (GRPO needs a group)")
    s = Settings(
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
    )
    sides = ["trl", "chain"] + ([] if args.no_tree else ["tree"])
    result = run(s, args.warmup, args.steps, sides)
    print(report(result, s, args.warmup))
    if args.quick and args.out is None:
        return
    info = machine(("trl", "accelerate", "datasets"))
    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "settings": {**vars(s), "warmup": args.warmup, "steps": args.steps},
        "versions": {
            **{k: info["versions"].get(k) for k in ("trl", "transformers", "torch")},
            **{k: info["versions"].get(k) for k in ("accelerate", "datasets")},
            "treegrpo": info["treegrpo"],
            "treegrpo_commit": info["git"].get("commit"),
            "treegrpo_dirty": info["git"].get("dirty"),
        },
        **result,
    }
    payload["targets"] = trl_targets(result)
    path = write_results("trl_compare", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
