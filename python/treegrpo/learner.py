"""The policy update: the reference's PPO loss over a batch of trajectories, flat or tree-packed.

One file, one job: the loss knows no tree and no server. It reads a :class:`treegrpo.Pack`
(or packs a :class:`treegrpo.Forest`); the tree only survives as an attention mask and as
per-token weights that Rust computed (``rust/pack.rs``).

What one :meth:`Learner.step` does (docs/algorithm.md, section 4):

1. Split the trajectories into mini-batches of ``ppo_mini_batch_size`` whole prompts (verl's
   name and meaning: all of a prompt's trees in one mini-batch), and each mini-batch into
   micro-batches of at most ``micro_batch_tokens`` padded tokens (gradient accumulation).
2. Recompute ``old_log_probs`` with the current weights (eval mode, no grad), before any
   update of the step, for every mini-batch, and the frozen reference model's log-probs when
   ``kl_coef > 0``. A step that makes a single update skips the old pass: its own log-probs,
   detached, are the old ones (``reuse_on_policy_log_probs``).
3. For ``ppo_epochs`` x each mini-batch: per micro-batch, run the model body to hidden states,
   then lm_head + log-softmax chunk by chunk (``logprob_chunk_tokens``; recomputed in backward,
   so neither pass holds a (tokens x vocab) tensor for the batch); the loss is verl's dual-clip
   PPO loss with ratio ``exp(log_probs - old_log_probs)``, plus ``kl_coef`` x KL to the
   reference (low_var_kl = k3) minus ``entropy_coeff`` x entropy, aggregated by
   ``loss_agg_mode`` over the MINI-batch. Then clip the gradient norm and take one AdamW step
   (skipped when the loss or the gradient is not finite) and call ``on_step``.
4. Flat mode: one padded row per trajectory, the loss written as verl writes it. Packed mode:
   each distinct token once (shared prefixes run once), a tree attention mask, and the closed
   form per token ``-adv_pos*min(r, 1+eps_high) + adv_neg*min(max(r, 1-eps_low), c)`` plus
   ``token_weight`` x (k3 KL, -entropy): the same loss and gradient (docs/architecture.md,
   "Learner").
5. Learning rate: linear warmup then constant, advanced once per learner step (verl's
   ``get_constant_schedule_with_warmup``, stepped once per training step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import torch.utils.checkpoint

from treegrpo._core import Forest, Pack
from treegrpo.distributed import all_reduce_grads, all_reduce_max, all_reduce_sum, world
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError, TreeGRPOError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "Learner",
    "LearnerConfig",
    "MicroBatch",
    "NonFiniteLossError",
    "StepBatch",
    "agg_loss",
    "kl_penalty",
    "token_log_probs",
    "tree_attention_mask",
]

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLType = Literal["low_var_kl", "kl", "abs", "mse"]
Autocast = Literal["bfloat16", "none"]
Strategy = Literal["ddp", "fsdp2"]

# Attention implementations that can run the packed layout, and how each gets its mask.
_DENSE_MASK_IMPLS = ("sdpa", "eager")
_PACKED_IMPLS = (*_DENSE_MASK_IMPLS, "flex_attention")

# The metric sums of a micro-batch's loss (MicroBatch.loss), reduced over ranks when data parallel.
_STAT_KEYS = ("pg_loss", "entropy", "kl_loss", "clipped", "clipped_lower", "approx_kl", "tokens")


class NonFiniteLossError(TreeGRPOError, FloatingPointError):
    """``max_nonfinite_updates`` optimizer updates in a row had a non-finite loss or gradient."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, value: object, valid: str) -> None:
    raise InvalidArgumentError(f"LearnerConfig.{name} must be {valid}, got {value!r}")


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
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                _fail(name, value, "a finite number > 0")
        for name in ("weight_decay", "kl_coef", "entropy_coeff"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                _fail(name, value, "a finite number >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", self.betas, "two numbers in [0, 1), e.g. (0.9, 0.999)")
        if not 0 <= self.warmup_ratio < 1:
            _fail("warmup_ratio", self.warmup_ratio, "in [0, 1)")
        for name in ("warmup_steps", "total_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                _fail(name, value, "None or an int >= 0")
        if self.warmup_steps is None and self.warmup_ratio > 0 and self.total_steps is None:
            raise InvalidArgumentError(
                f"LearnerConfig.total_steps is needed to turn warmup_ratio={self.warmup_ratio} "
                "into steps: set total_steps (learner steps in the run), or warmup_steps, or "
                "warmup_ratio=0"
            )
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            _fail("grad_clip", self.grad_clip, "None (no clipping) or a finite number > 0")
        if not 0 <= self.clip_ratio_low < 1:
            _fail("clip_ratio_low", self.clip_ratio_low, "in [0, 1)")
        if not (math.isfinite(self.clip_ratio_high) and self.clip_ratio_high >= 0):
            _fail("clip_ratio_high", self.clip_ratio_high, "a finite number >= 0")
        if not (math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1):
            _fail("clip_ratio_c", self.clip_ratio_c, "> 1 (the dual clip; the reference uses 3.0)")
        for name, kind in (
            ("loss_agg_mode", LossAggMode),
            ("kl_type", KLType),
            ("autocast", Autocast),
            ("strategy", Strategy),
        ):
            valid = get_args(kind)
            if getattr(self, name) not in valid:
                raise InvalidOptionError(
                    f"LearnerConfig.{name} must be one of {', '.join(map(repr, valid))}, "
                    f"got {getattr(self, name)!r}"
                )
        mini = self.ppo_mini_batch_size
        if not (mini is None or mini == "auto" or (_is_int(mini) and mini >= 1)):
            _fail("ppo_mini_batch_size", mini, 'None (one update), "auto" or an int >= 1')
        for name in ("ppo_epochs", "logprob_chunk_tokens", "max_nonfinite_updates"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                _fail(name, value, "an int >= 1")
        mbt = self.micro_batch_tokens
        if mbt is not None and not (isinstance(mbt, int) and mbt >= 1):
            _fail("micro_batch_tokens", mbt, "None (a mini-batch per pass) or an int >= 1")

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
            raise InvalidArgumentError(
                f"LearnerConfig.ppo_mini_batch_size={mini} does not divide the step's {prompts} "
                "prompts: use a divisor of the prompts per step (data.train_batch_size)"
            )
        updates = prompts // mini
        if per_rank % updates:
            raise InvalidArgumentError(
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


# ---------------------------------------------------------------------------------------------
# Loss pieces (verl's numerics)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl's ``agg_loss`` of a (B, T) per-token loss over its ``loss_mask`` (float (B, T)).

    Empty denominators count as 1 (as ``Forest.pack``'s weights)."""
    masked = loss_mat * loss_mask
    if mode == "token-mean":
        return masked.sum() / loss_mask.sum().clamp(min=1)
    seq = masked.sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        seq = seq / loss_mask.sum(-1).clamp(min=1)
    return seq.mean()


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate to the reference policy (verl's ``kl_penalty``)."""
    if kl_type == "kl":
        return log_probs - ref_log_probs
    if kl_type == "abs":
        return (log_probs - ref_log_probs).abs()
    if kl_type == "mse":
        return 0.5 * (log_probs - ref_log_probs).square()
    kl = ref_log_probs - log_probs  # low_var_kl: k3 = exp(kl) - kl - 1, clamped
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def _ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    # verl clamps the log-ratio to [-20, 20] before exp, for stability.
    return torch.exp(torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0))


def _verl_policy_loss(
    old_log_prob: torch.Tensor,  # (B, T)
    log_prob: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B, T)
    cfg: LearnerConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's ``compute_policy_loss`` (dual clip) per token, before aggregation: the loss
    (B, T) and its two clip indicators (B, T) (clipped; dual-clipped)."""
    ratio = _ratio(log_prob, old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = torch.gt(pg_losses2, pg_losses1)
    pg_losses3 = -advantages * cfg.clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    clipped_lower = torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses, clipped, clipped_lower


# ---------------------------------------------------------------------------------------------
# Log-probs


def _chunk_log_probs(
    lm_head: nn.Module,
    temperature: float,
    with_entropy: bool,
    hidden: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = lm_head(hidden).float()  # (n, V): one chunk only
    if temperature != 1.0:
        logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    token = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if with_entropy else None
    return token, entropy


def token_log_probs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    *,
    chunk_tokens: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N,) of ``targets`` (N,) under ``log_softmax(lm_head(hidden) / temperature)``,
    and (``with_entropy``) the entropy (N,) of each distribution, from hidden states (N, d).

    Works ``chunk_tokens`` rows at a time. With autograd on, each chunk is checkpointed: its
    logits are dropped after the forward and recomputed in backward, so memory stays at one
    chunk's (chunk x vocab) in both passes (the price: lm_head runs twice)."""
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    log_probs: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        args = (lm_head, temperature, with_entropy, h, t)
        if grad:
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_log_probs, *args, use_reentrant=False
            )
        else:
            lp, ent = _chunk_log_probs(*args)
        log_probs.append(lp)
        if ent is not None:
            entropies.append(ent)
    if not log_probs:  # no loss token: still part of the graph, so backward runs through it
        empty = hidden[:0].sum(-1).float()
        return empty, (empty if with_entropy else None)
    return torch.cat(log_probs), (torch.cat(entropies) if with_entropy else None)


def tree_attention_mask(
    segment_ids: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The tree attention mask of packed rows (R, T): query q may attend key kv iff
    ``kv <= q and subtree_end[kv] > segment_ids[q]`` (ancestors-or-self, causal; pack.rs).

    - "sdpa": a boolean (R, 1, T, T) tensor, True = attend;
    - "eager": an additive float (R, 1, T, T) tensor, 0 / dtype's min (eager misreads booleans);
    - "flex_attention": a ``BlockMask`` from that rule (block-sparse: masked blocks are skipped).
    """
    if segment_ids.dim() == 1:
        segment_ids, subtree_end = segment_ids[None], subtree_end[None]
    rows, length = segment_ids.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (kv <= q) & (subtree_end[b, kv] > segment_ids[b, q])

        return create_block_mask(mask_mod, rows, None, length, length, device=segment_ids.device)
    pos = torch.arange(length, device=segment_ids.device)
    allowed = (pos[None, None, :] <= pos[None, :, None]) & (
        subtree_end[:, None, :] > segment_ids[:, :, None]
    )  # (R, T query, T key)
    allowed = allowed[:, None]  # (R, 1, T, T)
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise InvalidOptionError(
        f"attn_implementation {attn_implementation!r} cannot run a tree mask: load the model "
        f"with attn_implementation in {', '.join(map(repr, _PACKED_IMPLS))} or use packed=False"
    )


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class MicroBatch:
    """One forward pass: model inputs (R rows of T tokens) and, per loss token (N), what the
    loss needs. Built by :meth:`Learner.prepare`.

    Flat (``segment_ids is None``): rows are trajectories; ``loss_index`` places each loss token
    in the (R*T) grid, ``advantages``/``loss_mask`` are (R, T), and the verl loss aggregates the
    micro-batch, then ``scale`` = micro / mini-batch normaliser.
    Packed: rows are (groups of) trees; ``adv_pos``/``adv_neg``/``token_weight`` are the pack's
    weights at each loss token, normalised over the whole pack, and ``scale`` = pack /
    mini-batch normaliser; ``count*`` are the trajectories through each token (all / A > 0 /
    A < 0), for the token-mean metrics."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    pred_index: torch.Tensor  # (N,) position in the (R*T) hidden states predicting each token
    targets: torch.Tensor  # (N,) the loss tokens' ids
    pack_index: np.ndarray  # (N,) each loss token's position in the pack's packed layout
    scale: float
    num_tokens: int  # real (non-padding) tokens
    attention_mask: torch.Tensor | None = None  # (R, T) flat padding mask
    segment_ids: torch.Tensor | None = None  # (R, T) packed
    subtree_end: torch.Tensor | None = None  # (R, T) packed
    loss_index: torch.Tensor | None = None  # (N,) flat
    loss_mask: torch.Tensor | None = None  # (R, T) float, flat
    advantages: torch.Tensor | None = None  # (R, T) flat
    adv_pos: torch.Tensor | None = None  # (N,) packed
    adv_neg: torch.Tensor | None = None  # (N,) packed
    token_weight: torch.Tensor | None = None  # (N,) packed
    count: torch.Tensor | None = None  # (N,) packed
    count_pos: torch.Tensor | None = None  # (N,) packed
    count_neg: torch.Tensor | None = None  # (N,) packed
    old_log_probs: torch.Tensor | None = None  # (N,)
    ref_log_probs: torch.Tensor | None = None  # (N,)

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def loss(
        self, log_probs: torch.Tensor, entropy: torch.Tensor, cfg: LearnerConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the mini-batch loss, and its metric sums."""
        old = self.old_log_probs
        if old is None:  # on-policy: Learner.prepare without old_log_probs
            old = log_probs.detach()
        if self.packed:
            return self._packed_loss(log_probs, old, entropy, cfg)
        return self._flat_loss(log_probs, old, entropy, cfg)

    def _flat_loss(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        entropy: torch.Tensor,
        cfg: LearnerConfig,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.loss_mask is not None and self.advantages is not None
        assert self.loss_index is not None
        mask, mode, index = self.loss_mask, cfg.loss_agg_mode, self.loss_index

        def grid(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (R, T), zero off the loss
            return values.new_zeros(mask.numel()).index_copy(0, index, values).view(mask.shape)

        log_prob, old = grid(log_probs), grid(old_log_probs)
        pg_losses, clipped, clipped_lower = _verl_policy_loss(old, log_prob, self.advantages, cfg)
        pg_loss = agg_loss(pg_losses, mask, mode)
        ent = agg_loss(grid(entropy), mask, mode)
        loss = pg_loss - cfg.entropy_coeff * ent
        kl = torch.zeros((), device=mask.device)
        if cfg.kl_coef > 0:
            assert self.ref_log_probs is not None
            kl = agg_loss(kl_penalty(log_prob, grid(self.ref_log_probs), cfg.kl_type), mask, mode)
            loss = loss + cfg.kl_coef * kl
        stats = {
            "pg_loss": float(pg_loss.detach()) * self.scale,
            "entropy": float(ent.detach()) * self.scale,
            "kl_loss": float(kl.detach()) * self.scale,
            "clipped": float((clipped * mask).sum()),
            "clipped_lower": float((clipped_lower * mask).sum()),
            "approx_kl": float(((old - log_prob.detach()) * mask).sum()),
            "tokens": float(mask.sum()),
        }
        return loss * self.scale, stats

    def _packed_loss(
        self,
        log_probs: torch.Tensor,
        old: torch.Tensor,
        entropy: torch.Tensor,
        cfg: LearnerConfig,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.adv_pos is not None and self.adv_neg is not None
        assert self.token_weight is not None
        assert self.count is not None and self.count_pos is not None
        assert self.count_neg is not None
        weight = self.token_weight
        ratio = _ratio(log_probs, old)
        # sum over the trajectories i through the token of w_i * dual-clip loss(r, A_i):
        # linear in A on each side of 0 (rust/pack.rs)
        upper, lower = 1 + cfg.clip_ratio_high, 1 - cfg.clip_ratio_low
        pg = -self.adv_pos * torch.clamp(ratio, max=upper) + self.adv_neg * torch.clamp(
            torch.clamp(ratio, min=lower), max=cfg.clip_ratio_c
        )
        pg_loss = pg.sum()
        ent = (weight * entropy).sum()
        loss = pg_loss - cfg.entropy_coeff * ent
        kl = torch.zeros((), device=old.device)
        if cfg.kl_coef > 0:
            assert self.ref_log_probs is not None
            kl = (weight * kl_penalty(log_probs, self.ref_log_probs, cfg.kl_type)).sum()
            loss = loss + cfg.kl_coef * kl
        with torch.no_grad():
            clipped = self.count_pos * (ratio > upper) + self.count_neg * (ratio < lower)
            clipped_lower = self.count_neg * (ratio > cfg.clip_ratio_c)
            approx_kl = self.count * (old - log_probs)
        stats = {
            "pg_loss": float(pg_loss.detach()) * self.scale,
            "entropy": float(ent.detach()) * self.scale,
            "kl_loss": float(kl.detach()) * self.scale,
            "clipped": float(clipped.sum()),
            "clipped_lower": float(clipped_lower.sum()),
            "approx_kl": float(approx_kl.sum()),
            "tokens": float(self.count.sum()),
        }
        return loss * self.scale, stats


def _tree_groups(forest: Forest, pack: Pack) -> np.ndarray:
    """The prompt (group) of each packed tree, in the packed order (_Layout's trees)."""
    import pyarrow as pa

    packed = pack.packed
    roots = np.flatnonzero(packed["segment_parent"] < 0)
    nodes = packed["segment_node"][roots]
    group_of = np.asarray(pa.table(forest.nodes()).column("group").to_numpy(), dtype=np.int64)
    return group_of[nodes.astype(np.int64)]


@dataclass
class StepBatch:
    """One step's data, planned: ``mini_batches[i]`` is the list of micro-batches of update i,
    with ``old_log_probs`` (and ``ref_log_probs``) filled in by :meth:`Learner.prepare`."""

    pack: Pack
    mini_batches: list[list[MicroBatch]]
    total_tokens: int  # trajectory tokens (shared prefixes counted per trajectory)
    unique_tokens: int  # distinct tokens of the pack
    prepare_s: float = 0.0  # seconds spent planning and computing old/ref log-probs

    @property
    def micro_batches(self) -> Iterator[MicroBatch]:
        for mini in self.mini_batches:
            yield from mini


class _Layout:
    """What planning reads from a Pack, computed once per step (NumPy)."""

    def __init__(self, pack: Pack) -> None:
        self.flat, self.packed = pack.flat, pack.packed
        flat, packed = self.flat, self.packed
        self.rows = len(pack)
        self.lengths = flat["attention_mask"].sum(1)  # (B,)
        self.loss_tokens = flat["loss_mask"].sum(1)  # (B,)
        if flat["loss_mask"].shape[1] and flat["loss_mask"][:, 0].any():
            leaf = pack.leaves[int(np.flatnonzero(flat["loss_mask"][:, 0])[0])]
            raise InvalidArgumentError(
                f"the trajectory of leaf {leaf} starts with a policy token: no position predicts "
                "it (give the root a prompt)"
            )
        # trees: root segments, in packed (depth-first) order; each tree is a contiguous range
        parent = packed["segment_parent"]
        roots = np.flatnonzero(parent < 0)
        unique = len(packed["input_ids"])
        self.tree_segments = np.append(roots, len(parent))  # (trees + 1,)
        self.tree_tokens = np.append(packed["segment_start"][roots], unique)  # (trees + 1,)
        seg_tree = np.cumsum(parent < 0) - 1
        nodes = packed["segment_node"]
        seg_of_node = np.full(int(nodes.max(initial=0)) + 1, -1, dtype=np.int64)
        seg_of_node[nodes] = np.arange(len(nodes))
        self.row_tree = seg_tree[seg_of_node[np.asarray(pack.leaves, dtype=np.int64)]]  # (B,)
        # per packed token: the packed position predicting it (same in every trajectory), and
        # how many trajectories (all / A > 0 / A < 0) run through it
        idx = flat["packed_index"]  # (B, T)
        self.pred = np.full(unique, -1, dtype=np.int64)
        valid = idx[:, 1:] >= 0
        self.pred[idx[:, 1:][valid]] = idx[:, :-1][valid]
        adv = flat["advantages"][:, 0] if idx.shape[1] else np.zeros(self.rows, np.float32)

        def through(rows: np.ndarray) -> np.ndarray:
            sel = idx[rows]
            return np.bincount(sel[sel >= 0], minlength=unique).astype(np.float32)

        self.count = through(np.arange(self.rows))
        self.count_pos = through(np.flatnonzero(adv > 0))
        self.count_neg = through(np.flatnonzero(adv < 0))

    @property
    def num_trees(self) -> int:
        return len(self.tree_segments) - 1

    def size(self, rows: np.ndarray, mode: str) -> float:
        """What a set of trajectories adds to the aggregation normaliser: its loss tokens
        (token-mean) or its trajectories (seq-mean-*)."""
        return float(self.loss_tokens[rows].sum()) if mode == "token-mean" else float(len(rows))

    def norm(self, rows: np.ndarray, mode: str) -> float:
        """The aggregation normaliser of a set of trajectories (an empty one counts as 1)."""
        return max(self.size(rows, mode), 1.0)


def _greedy(sizes: list[int], budget: int | None, *, padded: bool = True) -> list[list[int]]:
    """Consecutive groups of items whose cost stays within budget: rows x longest (``padded``,
    items are rows of a padded batch) or the sum (items share one row). An item larger than
    the budget is a group of its own."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i, size in enumerate(sizes):
        cost = (len(current) + 1) * max(longest, size) if padded else total + size
        if current and budget is not None and cost > budget:
            groups.append(current)
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, size), total + size
    if current:
        groups.append(current)
    return groups


# ---------------------------------------------------------------------------------------------
# The learner


class _TokenLogProbs(torch.nn.Module):
    """A causal LM's log-probs (and entropies) of given target tokens: the transformers body
    to hidden states, then lm_head + log-softmax chunk by chunk (:func:`token_log_probs`)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Any,
        position_ids: torch.Tensor,
        pred_index: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_tokens: int,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state  # (R, T, d)
        hidden = hidden.reshape(-1, hidden.shape[-1])[pred_index]  # (N, d)
        return token_log_probs(
            hidden,
            self.model.get_output_embeddings(),
            targets,
            chunk_tokens=chunk_tokens,
            temperature=temperature,
            with_entropy=with_entropy,
        )


def _fully_shard(policy: _TokenLogProbs) -> None:
    """FSDP2 over the default process group: one unit per decoder layer, the rest (embeddings,
    tied lm_head, final norm) in the root unit. Gradients are summed over ranks, not averaged:
    each rank's loss is already normalised by the union batch's normaliser."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(policy.model.base_model, "layers", None)
    if layers is None:
        raise InvalidOptionError(
            f"strategy='fsdp2' shards each decoder layer of model.base_model.layers, which "
            f"{type(policy.model).__name__} does not have: use strategy='ddp'"
        )
    units = [fully_shard(layer) for layer in layers]
    units.append(fully_shard(policy))
    for unit in units:  # a plain SUM (gloo has no pre-multiplied sum)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


class Learner:
    """Updates ``model`` (a transformers causal LM) from packed rollouts.

    ``ref_model``: the frozen reference for the KL loss; used (and, if None, copied from
    ``model`` at construction) only when ``config.kl_coef > 0``. ``on_step``: called after each
    optimizer update (e.g. the embedded engine's ``bump_weight_version``). ``hold``: a
    context-manager factory entered around each optimizer update and ``on_step`` (e.g.
    ``engine.exclusive``), so generation never sees half-updated weights.
    ``data_parallel``: this process is one rank of a torch.distributed group and ``step`` gets
    this rank's share of the batch; losses are normalised over the union of the shares and
    gradients summed over ranks, so the update equals one over the union batch
    (docs/architecture.md, "Data parallel"). Every rank must call ``step`` with the same
    number of trees. With ``config.strategy == "fsdp2"`` the model is sharded in place
    (``fully_shard``): its parameters become DTensors, so nothing else may run it (an engine
    needs its own copy, kept current with :meth:`model_state_dict`), and :meth:`step`,
    :meth:`model_state_dict`, :meth:`optimizer_state_dict` are collectives every rank calls.
    """

    def __init__(
        self,
        model: Any,
        config: LearnerConfig,
        *,
        ref_model: Any | None = None,
        on_step: Callable[[], Any] | None = None,
        hold: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        data_parallel: bool = False,
    ) -> None:
        self.model, self.config = model, config
        self.on_step, self.hold = on_step, hold
        if data_parallel and not torch.distributed.is_initialized():
            raise InvalidArgumentError(
                "data_parallel=True needs an initialised torch.distributed process group: start "
                "the run with torchrun (treegrpo.distributed.init_from_env)"
            )
        self.data_parallel = data_parallel and world().parallel
        self.device = next(model.parameters()).device
        self.attn_implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if config.packed and self.attn_implementation not in _PACKED_IMPLS:
            raise InvalidOptionError(
                f"packed=True needs a tree attention mask, which attn_implementation="
                f"{self.attn_implementation!r} cannot take: load the model with "
                f"attn_implementation in {', '.join(map(repr, _PACKED_IMPLS))}, or use packed=False"
            )
        if getattr(model.config, "final_logit_softcapping", None):
            raise InvalidArgumentError("models with final_logit_softcapping are not supported")
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.ref_model: Any | None = None
        if config.kl_coef > 0:  # copied before any sharding: the reference stays whole
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False).eval()
        # Every forward pass of the policy goes through this module, so that under FSDP2 its
        # hooks gather the embedding/lm_head/norm parameters (the root unit) for the whole
        # pass: lm_head runs outside the transformers body, chunk by chunk.
        self.policy = _TokenLogProbs(model)
        self.fsdp = self.data_parallel and config.strategy == "fsdp2"
        if self.fsdp:
            _fully_shard(self.policy)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self._bar: Any = None  # step()'s progress bar while it runs
        self.steps = 0  # learner steps taken: the LR schedule's position
        self.updates = 0  # optimizer updates applied
        self.skipped_updates = 0
        self._nonfinite_in_a_row = 0

    def __repr__(self) -> str:
        mode = "packed" if self.config.packed else "flat"
        return (
            f"Learner({mode}, steps={self.steps}, updates={self.updates}, "
            f"lr={self.config.lr_at(self.steps):.3g}, kl={'on' if self.ref_model else 'off'})"
        )

    # -- one step ------------------------------------------------------------------------------

    def step(self, data: Forest | Pack, *, progress: str | None = None) -> dict[str, float]:
        """One learner step on a rollout batch (a Forest after ``advantages()``, or its Pack):
        recompute old log-probs, then ``ppo_epochs`` x (prompts / ``ppo_mini_batch_size``)
        optimizer updates. Returns the step's metrics (verl names; means over the updates).
        ``progress``: the label of a progress bar over the step's forward passes (None: no
        bar)."""
        from tqdm import tqdm

        with tqdm(desc=progress, unit="pass", disable=progress is None) as bar:
            self._bar = bar
            try:
                return self.update(self.prepare(data, old_log_probs=None))
            finally:
                self._bar = None

    def prepare(self, data: Forest | Pack, *, old_log_probs: bool | None = True) -> StepBatch:
        """Plan the step's mini- and micro-batches and compute their old (and reference)
        log-probs with the current weights, in eval mode, for every mini-batch before any
        update. Without ``old_log_probs`` the loss uses each pass's own log-probs, detached:
        right only for the first update after this call. None (what :meth:`step` passes):
        computed unless the step makes one update and ``reuse_on_policy_log_probs`` is on.

        A mini-batch holds whole prompts, which a Forest records (its groups); a Pack does not,
        so with a ``ppo_mini_batch_size`` set, pass the Forest."""
        start = time.perf_counter()
        cfg = self.config
        tree_groups = None
        if isinstance(data, Forest):
            pack = data.pack(loss_agg_mode=cfg.loss_agg_mode)
            tree_groups = _tree_groups(data, pack)
        elif isinstance(data, Pack):
            pack = data
            if pack.loss_agg_mode != cfg.loss_agg_mode:
                raise InvalidArgumentError(
                    f"the pack's weights are for loss_agg_mode={pack.loss_agg_mode!r}, the learner "
                    f"uses {cfg.loss_agg_mode!r}: pack with "
                    f"forest.pack(loss_agg_mode={cfg.loss_agg_mode!r})"
                )
        else:
            raise TypeError(f"step() takes a treegrpo.Forest or Pack, got {type(data).__name__}")
        batch = self._plan(pack, tree_groups)
        if old_log_probs is None:
            one_update = cfg.ppo_epochs == 1 and len(batch.mini_batches) == 1
            old_log_probs = not (one_update and cfg.reuse_on_policy_log_probs)
        here = old_log_probs or self.ref_model is not None  # a pass per micro-batch here?
        if self._bar is not None:  # and one per micro-batch and epoch in update()
            passes = sum(len(mini) for mini in batch.mini_batches)
            self._bar.total = passes * (int(here) + cfg.ppo_epochs)
            self._bar.refresh()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for mb in batch.micro_batches if here else ():
                    if old_log_probs:
                        mb.old_log_probs = self._log_probs(self.model, mb)[0]
                    if self.ref_model is not None:
                        mb.ref_log_probs = self._log_probs(self.ref_model, mb)[0]
                    if self._bar is not None:
                        self._bar.update()
        finally:
            self.model.train(was_training)
        batch.prepare_s = time.perf_counter() - start
        return batch

    def update(self, batch: StepBatch) -> dict[str, float]:
        """The optimizer updates of one step on a prepared batch; advances the LR schedule."""
        cfg = self.config
        start = time.perf_counter()
        lr = cfg.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, list[float]] = {}
        skipped = 0
        was_training = self.model.training
        self.model.train()
        try:
            for _ in range(cfg.ppo_epochs):
                for mini in batch.mini_batches:
                    metrics = self._update(mini)
                    if metrics is None:
                        skipped += 1
                        continue
                    for key, value in metrics.items():
                        sums.setdefault(key, []).append(value)
        finally:
            self.model.train(was_training)
        self.steps += 1
        out = {key: float(np.mean(values)) for key, values in sums.items()}
        out["actor/lr"] = lr
        out["actor/updates"] = float(cfg.ppo_epochs * len(batch.mini_batches) - skipped)
        out["actor/skipped_updates"] = float(skipped)
        out["perf/total_tokens"] = float(batch.total_tokens)
        out["perf/unique_tokens"] = float(batch.unique_tokens)
        out["perf/forward_tokens"] = float(sum(mb.num_tokens for mb in batch.micro_batches))
        out["perf/padded_tokens"] = float(sum(mb.padded_tokens for mb in batch.micro_batches))
        out["timing_s/old_log_prob"] = batch.prepare_s
        out["timing_s/update_actor"] = time.perf_counter() - start
        return out

    def mini_batch_loss(
        self, mini: list[MicroBatch], *, backward: bool = True
    ) -> tuple[float, dict[str, float]]:
        """The loss of one mini-batch (sum of its micro-batches' scaled losses) and its metrics;
        with ``backward`` the gradients accumulate into the model's ``.grad``. Returns a
        non-finite loss as soon as a micro-batch has one (its backward is not run)."""
        total = 0.0
        sums: dict[str, float] = {}
        for mb in mini:
            with torch.set_grad_enabled(backward):
                log_probs, entropy = self._log_probs(self.model, mb, with_entropy=True)
                assert entropy is not None
                loss, stats = mb.loss(log_probs, entropy, self.config)
            value = float(loss.detach())
            total += value
            if not math.isfinite(value) and not self.fsdp:
                break  # its backward is not run (FSDP2: every rank runs every pass, see _plan)
            if backward and loss.requires_grad:  # not when the micro-batch has no loss token
                loss.backward()
            if self._bar is not None:
                self._bar.update()
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v
        if self.data_parallel:
            # The union's loss and metric sums (every share is already normalised by the
            # union's normaliser); a non-finite loss on any rank is seen by every rank.
            reduced = all_reduce_sum([total, *(sums.get(k, 0.0) for k in _STAT_KEYS)])
            total, sums = reduced[0], dict(zip(_STAT_KEYS, reduced[1:], strict=True))
        if not math.isfinite(total):
            return total, sums
        tokens = max(sums.get("tokens", 0.0), 1.0)
        metrics = {
            "actor/pg_loss": sums.get("pg_loss", 0.0),
            "actor/pg_clipfrac": sums.get("clipped", 0.0) / tokens,
            "actor/pg_clipfrac_lower": sums.get("clipped_lower", 0.0) / tokens,
            "actor/ppo_kl": sums.get("approx_kl", 0.0) / tokens,
            "actor/entropy": sums.get("entropy", 0.0),
        }
        if self.ref_model is not None:
            metrics["actor/kl_loss"] = sums.get("kl_loss", 0.0)
            metrics["actor/kl_coef"] = self.config.kl_coef
        return total, metrics

    def _update(self, mini: list[MicroBatch]) -> dict[str, float] | None:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.mini_batch_loss(mini, backward=True)
        grad_norm = float("nan")
        if math.isfinite(loss):
            if self.data_parallel and not self.fsdp:  # (FSDP2 reduce-scatters in backward)
                all_reduce_grads(self.params)  # the union batch's gradient, on every rank
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: already the global norm
                norm = norm.full_tensor()
            grad_norm = float(norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            if self._nonfinite_in_a_row >= cfg.max_nonfinite_updates:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_a_row} updates in a row had a non-finite loss or "
                    f"gradient (last: {what}); check the rewards, the lr and the model's dtype"
                )
            warnings.warn(
                f"non-finite {what}: update skipped ({self._nonfinite_in_a_row} in a row, "
                f"{self.skipped_updates} in all)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self._nonfinite_in_a_row = 0
        with self.hold() if self.hold is not None else contextlib.nullcontext():
            self.optimizer.step()
            self.updates += 1
            if self.on_step is not None:
                self.on_step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["actor/grad_norm"] = grad_norm
        return metrics

    # -- forward passes ------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.config.autocast == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log_probs(
        self, model: Any, mb: MicroBatch, *, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) (N,) of a micro-batch's loss tokens under ``model`` (the
        policy or the reference)."""
        if mb.segment_ids is not None:
            assert mb.subtree_end is not None
            mask = tree_attention_mask(
                mb.segment_ids,
                mb.subtree_end,
                attn_implementation=self.attn_implementation,
                dtype=next(model.parameters()).dtype,
            )
        else:
            mask = mb.attention_mask
        run = self.policy if model is self.model else _TokenLogProbs(model)
        with self._autocast():
            return run(
                mb.input_ids,
                mask,
                mb.position_ids,
                mb.pred_index,
                mb.targets,
                chunk_tokens=self.config.logprob_chunk_tokens,
                temperature=self.config.temperature,
                with_entropy=with_entropy,
            )

    # -- state for checkpoints and weight sync -------------------------------------------------

    def model_state_dict(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """The policy's full (unsharded) weights, keyed as ``model.state_dict()``. Under FSDP2
        this gathers the shards (every rank must call it): on CPU, on rank 0 only (the other
        ranks get ``{}``) unless ``every_rank``, which gives every rank the full tensors on the
        model's device. Without sharding it is ``model.state_dict()`` (no copy)."""
        if not self.fsdp:
            return dict(self.model.state_dict())
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return dict(get_model_state_dict(self.model, options=options))

    def optimizer_state_dict(self) -> dict[str, Any]:
        """AdamW's full state keyed by parameter name (the same layout for every strategy, so
        a checkpoint resumes under another one). Under FSDP2 a collective: rank 0 gets it
        (on CPU), the other ranks ``{}``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        return dict(get_optimizer_state_dict(self.model, self.optimizer, options=options))

    def load_state_dicts(
        self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None
    ) -> None:
        """Load full weights (and optimizer state, as :meth:`optimizer_state_dict` gives it)
        into this learner's (possibly sharded) model and optimizer. Under FSDP2 every rank
        calls it with the full state dicts."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(
                self.model, self.optimizer, optim_state_dict=optimizer_state, options=options
            )

    # -- planning ------------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=self.device)

    def _plan(self, pack: Pack, tree_groups: np.ndarray | None = None) -> StepBatch:
        cfg = self.config
        lay = _Layout(pack)
        full_rows = np.arange(lay.rows)
        full_norm = lay.norm(full_rows, cfg.loss_agg_mode)
        splits = self._mini_batch_trees(lay.num_trees, tree_groups)
        rows_of = [np.flatnonzero(np.isin(lay.row_tree, trees)) for trees in splits]
        sizes = [lay.size(rows, cfg.loss_agg_mode) for rows in rows_of]
        if self.data_parallel:
            # Each rank's share of mini-batch i is normalised by the normaliser of the union of
            # every rank's i-th mini-batch; the gradients are then summed over ranks.
            sizes = all_reduce_sum(sizes)
        minis = []
        for trees, rows, size in zip(splits, rows_of, sizes, strict=True):
            mini_norm = max(size, 1.0)
            if cfg.packed:
                minis.append(self._packed_micro_batches(lay, trees, full_norm / mini_norm))
            else:
                minis.append(self._flat_micro_batches(lay, rows, mini_norm))
        if self.fsdp:
            # Every forward and backward of a sharded model is a collective: each rank must run
            # as many micro-batches as the busiest one, so the others add empty ones.
            most = all_reduce_max([len(m) for m in minis])
            for mini, n in zip(minis, most, strict=True):
                mini.extend(self._empty_micro_batch() for _ in range(int(n) - len(mini)))
        return StepBatch(
            pack=pack,
            mini_batches=minis,
            total_tokens=pack.total_tokens,
            unique_tokens=pack.unique_tokens,
        )

    def _mini_batch_trees(self, num_trees: int, tree_groups: np.ndarray | None) -> list[np.ndarray]:
        """The packed trees of each mini-batch: the step's prompts (this rank's share, in order
        of first appearance) split into consecutive runs of equal size, each with all its
        prompts' trees. The number of runs is the same on every rank."""
        cfg = self.config
        trees = np.arange(num_trees)
        if cfg.ppo_mini_batch_size is None:
            return [trees]
        if tree_groups is None:
            raise InvalidArgumentError(
                f"ppo_mini_batch_size={cfg.ppo_mini_batch_size!r} splits a step by prompt, "
                "which a Pack does not record: pass the Forest to Learner.step / prepare"
            )
        groups = list(dict.fromkeys(tree_groups.tolist()))  # this rank's prompts, in order
        local = len(groups)
        total = local
        if self.data_parallel:
            most, fewest = all_reduce_max([float(local), float(-local)])
            if int(most) != -int(fewest):
                raise InvalidArgumentError(
                    f"ranks hold {-int(fewest)} to {int(most)} prompts: with "
                    "ppo_mini_batch_size every rank needs the same number of prompts"
                )
            total = int(all_reduce_sum([float(local)])[0])
        updates = cfg.updates_per_epoch(total, local)
        position = {g: i for i, g in enumerate(groups)}
        run = np.array([position[g] for g in tree_groups.tolist()]) * updates // max(local, 1)
        return [trees[run == i] for i in range(updates)]

    def _empty_micro_batch(self) -> MicroBatch:
        """A one-token pass whose one predicted token has loss weight 0: its loss is 0 and its
        gradient zero, but it runs every parameter (and, under FSDP2, every collective) like
        any other micro-batch."""
        zeros = np.zeros((1, 1), np.int64)
        one = np.zeros(1, np.int64)
        return MicroBatch(
            input_ids=self._tensor(zeros, torch.long),
            position_ids=self._tensor(zeros, torch.long),
            attention_mask=self._tensor(zeros + 1, torch.long),
            pred_index=self._tensor(one, torch.long),
            targets=self._tensor(one, torch.long),
            pack_index=one,
            loss_index=self._tensor(one, torch.long),
            loss_mask=self._tensor(zeros, torch.float32),
            advantages=self._tensor(zeros, torch.float32),
            scale=0.0,
            num_tokens=0,
        )

    def _flat_micro_batches(
        self, lay: _Layout, rows: np.ndarray, mini_norm: float
    ) -> list[MicroBatch]:
        cfg = self.config
        flat = lay.flat
        out = []
        rows = rows[np.argsort(-lay.lengths[rows], kind="stable")]  # longest first: less padding
        for group in _greedy([int(lay.lengths[r]) for r in rows], cfg.micro_batch_tokens):
            r = rows[group]
            width = max(int(lay.lengths[r].max()), 1)
            loss_mask = flat["loss_mask"][r, :width]
            b, t = np.nonzero(loss_mask)
            input_ids = flat["input_ids"][r, :width]
            out.append(
                MicroBatch(
                    input_ids=self._tensor(input_ids, torch.long),
                    position_ids=self._tensor(flat["position_ids"][r, :width], torch.long),
                    attention_mask=self._tensor(flat["attention_mask"][r, :width], torch.long),
                    pred_index=self._tensor(b * width + t - 1, torch.long),
                    targets=self._tensor(input_ids[b, t], torch.long),
                    pack_index=flat["packed_index"][r[b], t],
                    loss_index=self._tensor(b * width + t, torch.long),
                    loss_mask=self._tensor(loss_mask, torch.float32),
                    advantages=self._tensor(flat["advantages"][r, :width], torch.float32),
                    scale=lay.norm(r, cfg.loss_agg_mode) / mini_norm,
                    num_tokens=int(lay.lengths[r].sum()),
                )
            )
        return out

    def _packed_micro_batches(
        self, lay: _Layout, trees: np.ndarray, scale: float
    ) -> list[MicroBatch]:
        """Micro-batches of whole trees. With a dense mask (sdpa, eager) each tree is one row:
        attention cost grows with the square of a row's length, and these kernels do not skip
        masked blocks, so trees side by side in one row would cost (sum of sizes)^2. With
        flex_attention, which skips them, all trees of a micro-batch share one row."""
        one_row = self.attn_implementation == "flex_attention"
        sizes = lay.tree_tokens[trees + 1] - lay.tree_tokens[trees]
        if not one_row:  # rows padded to the largest tree of a micro-batch: largest first
            trees = trees[np.argsort(-sizes, kind="stable")]
            sizes = lay.tree_tokens[trees + 1] - lay.tree_tokens[trees]
        groups = _greedy(sizes.tolist(), self.config.micro_batch_tokens, padded=not one_row)
        return [self._packed_micro_batch(lay, trees[g], scale, one_row) for g in groups]

    def _packed_micro_batch(
        self, lay: _Layout, trees: np.ndarray, scale: float, one_row: bool
    ) -> MicroBatch:
        packed = lay.packed
        # row spans: (first token, end token, first segment) of each row
        if one_row:
            first, last = int(trees[0]), int(trees[-1]) + 1
            spans = [(lay.tree_tokens[first], lay.tree_tokens[last], lay.tree_segments[first])]
        else:
            spans = [
                (lay.tree_tokens[t], lay.tree_tokens[t + 1], lay.tree_segments[t]) for t in trees
            ]
        width = max(max(int(b - a) for a, b, _ in spans), 1)
        rows = len(spans)
        pad_segment = np.iinfo(np.int32).max - 1
        input_ids = np.zeros((rows, width), np.int64)
        position_ids = np.zeros((rows, width), np.int64)
        segment_ids = np.full((rows, width), pad_segment, np.int32)  # padding sees only padding
        subtree_end = np.full((rows, width), pad_segment + 1, np.int32)
        pred, loss_tokens = [], []
        for row, (a, b, s) in enumerate(spans):
            n = int(b - a)
            input_ids[row, :n] = packed["input_ids"][a:b]
            position_ids[row, :n] = packed["position_ids"][a:b]
            segment_ids[row, :n] = packed["segment_ids"][a:b] - s
            subtree_end[row, :n] = packed["subtree_end"][a:b] - s
            u = a + np.flatnonzero(packed["loss_mask"][a:b])  # packed positions of loss tokens
            loss_tokens.append(u)
            pred.append(row * width + lay.pred[u] - a)
        u = np.concatenate(loss_tokens)
        return MicroBatch(
            input_ids=self._tensor(input_ids),
            position_ids=self._tensor(position_ids),
            segment_ids=self._tensor(segment_ids),
            subtree_end=self._tensor(subtree_end),
            pred_index=self._tensor(np.concatenate(pred), torch.long),
            targets=self._tensor(packed["input_ids"][u], torch.long),
            pack_index=u,
            adv_pos=self._tensor(packed["adv_pos"][u], torch.float32),
            adv_neg=self._tensor(packed["adv_neg"][u], torch.float32),
            token_weight=self._tensor(packed["token_weight"][u], torch.float32),
            count=self._tensor(lay.count[u]),
            count_pos=self._tensor(lay.count_pos[u]),
            count_neg=self._tensor(lay.count_neg[u]),
            scale=scale,
            num_tokens=int(sum(b - a for a, b, _ in spans)),
        )
