"""The micro-batch types: one forward pass each, flat (one row per trajectory) or packed (one
row per tree or group of trees), each with only its own fields and its own loss; and
:class:`StepBatch`, a planned step.

Both hold the model inputs (R rows of T tokens) and, per loss token (N), what the loss needs;
``old_log_probs`` / ``ref_log_probs`` (N,) are filled in by :meth:`Learner.prepare`. Built by
``treegrpo.learner.plan``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from treegrpo.learner.loss import agg_loss, kl_penalty, packed_policy_loss, ratio, verl_policy_loss
from treegrpo.learner.mask import tree_attention_mask

if TYPE_CHECKING:
    from treegrpo._core import Pack
    from treegrpo.config import LearnerConfig

__all__ = ["STAT_KEYS", "FlatMicroBatch", "MicroBatch", "PackedMicroBatch", "StepBatch"]

# The metric sums of a micro-batch's loss, reduced over ranks when data parallel.
STAT_KEYS = ("pg_loss", "entropy", "kl_loss", "clipped", "clipped_lower", "approx_kl", "tokens")


@dataclass(kw_only=True)
class _Pass:
    """What every forward pass holds."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    pred_index: torch.Tensor  # (N,) position in the (R*T) hidden states predicting each token
    targets: torch.Tensor  # (N,) the loss tokens' ids
    pack_index: np.ndarray  # (N,) each loss token's position in the pack's packed layout
    scale: float
    num_tokens: int  # real (non-padding) tokens
    old_log_probs: torch.Tensor | None = None  # (N,); None: on-policy, the pass's own, detached
    ref_log_probs: torch.Tensor | None = None  # (N,); set when kl_coef > 0

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def _old(self, log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs.detach() if self.old_log_probs is None else self.old_log_probs

    def _ref(self) -> torch.Tensor:
        if self.ref_log_probs is None:
            raise RuntimeError("kl_coef > 0 needs ref_log_probs: plan with Learner.prepare")
        return self.ref_log_probs


@dataclass(kw_only=True)
class FlatMicroBatch(_Pass):
    """Rows are trajectories; ``loss_index`` places each loss token in the (R*T) grid, and the
    verl loss aggregates the micro-batch, then ``scale`` = micro / mini-batch normaliser."""

    packed: ClassVar[bool] = False
    attention_mask: torch.Tensor  # (R, T) padding mask
    loss_index: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (R, T) float
    advantages: torch.Tensor  # (R, T)

    def model_mask(self, attn_implementation: str, dtype: torch.dtype) -> Any:
        """The attention mask the model gets: the padding mask."""
        return self.attention_mask

    def loss(
        self, log_probs: torch.Tensor, entropy: torch.Tensor, cfg: LearnerConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the mini-batch loss, and its metric sums."""
        mask, mode, index = self.loss_mask, cfg.loss_agg_mode, self.loss_index

        def grid(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (R, T), zero off the loss
            return values.new_zeros(mask.numel()).index_copy(0, index, values).view(mask.shape)

        log_prob, old = grid(log_probs), grid(self._old(log_probs))
        pg_losses, clipped, clipped_lower = verl_policy_loss(old, log_prob, self.advantages, cfg)
        pg_loss = agg_loss(pg_losses, mask, mode)
        ent = agg_loss(grid(entropy), mask, mode)
        loss = pg_loss - cfg.entropy_coeff * ent
        kl = torch.zeros((), device=mask.device)
        if cfg.kl_coef > 0:
            kl = agg_loss(kl_penalty(log_prob, grid(self._ref()), cfg.kl_type), mask, mode)
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


@dataclass(kw_only=True)
class PackedMicroBatch(_Pass):
    """Rows are (groups of) trees under a tree attention mask; ``adv_pos`` / ``adv_neg`` /
    ``token_weight`` (N,) are the pack's weights at each loss token, normalised over the whole
    pack, and ``scale`` = pack / mini-batch normaliser; ``count*`` (N,) are the trajectories
    through each token (all / A > 0 / A < 0), for the token-mean metrics."""

    packed: ClassVar[bool] = True
    segment_ids: torch.Tensor  # (R, T)
    subtree_end: torch.Tensor  # (R, T)
    adv_pos: torch.Tensor  # (N,)
    adv_neg: torch.Tensor  # (N,)
    token_weight: torch.Tensor  # (N,)
    count: torch.Tensor  # (N,)
    count_pos: torch.Tensor  # (N,)
    count_neg: torch.Tensor  # (N,)

    def model_mask(self, attn_implementation: str, dtype: torch.dtype) -> Any:
        """The attention mask the model gets: the tree mask of the rows."""
        return tree_attention_mask(
            self.segment_ids, self.subtree_end, attn_implementation=attn_implementation, dtype=dtype
        )

    def loss(
        self, log_probs: torch.Tensor, entropy: torch.Tensor, cfg: LearnerConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the mini-batch loss, and its metric sums."""
        old = self._old(log_probs)
        weight = self.token_weight
        r = ratio(log_probs, old)
        pg_loss = packed_policy_loss(r, self.adv_pos, self.adv_neg, cfg).sum()
        ent = (weight * entropy).sum()
        loss = pg_loss - cfg.entropy_coeff * ent
        kl = torch.zeros((), device=old.device)
        if cfg.kl_coef > 0:
            kl = (weight * kl_penalty(log_probs, self._ref(), cfg.kl_type)).sum()
            loss = loss + cfg.kl_coef * kl
        upper, lower = 1 + cfg.clip_ratio_high, 1 - cfg.clip_ratio_low
        with torch.no_grad():
            clipped = self.count_pos * (r > upper) + self.count_neg * (r < lower)
            clipped_lower = self.count_neg * (r > cfg.clip_ratio_c)
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


MicroBatch = FlatMicroBatch | PackedMicroBatch
"""One forward pass of a step: flat or packed."""


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
