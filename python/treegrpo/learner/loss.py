"""The loss pieces, with verl's numerics: aggregation, KL estimators, the dual-clip PPO loss per
token (flat) and its closed form over the trajectories through a packed token (packed).

Both take per-token tensors and know no tree: the packed form reads the weights ``rust/pack.rs``
computed (``adv_pos``, ``adv_neg``, ``token_weight``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from treegrpo.config import LearnerConfig

__all__ = ["agg_loss", "kl_penalty", "packed_policy_loss", "ratio", "verl_policy_loss"]


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


def ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """The probability ratio; verl clamps the log-ratio to [-20, 20] before exp, for stability."""
    return torch.exp(torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0))


def verl_policy_loss(
    old_log_prob: torch.Tensor,  # (B, T)
    log_prob: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B, T)
    cfg: LearnerConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's ``compute_policy_loss`` (dual clip) per token, before aggregation: the loss
    (B, T) and its two clip indicators (B, T) (clipped; dual-clipped)."""
    r = ratio(log_prob, old_log_prob)
    pg_losses1 = -advantages * r
    pg_losses2 = -advantages * torch.clamp(r, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = torch.gt(pg_losses2, pg_losses1)
    pg_losses3 = -advantages * cfg.clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    clipped_lower = torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses, clipped, clipped_lower


def packed_policy_loss(
    r: torch.Tensor,  # (N,) ratio per packed loss token
    adv_pos: torch.Tensor,  # (N,)
    adv_neg: torch.Tensor,  # (N,)
    cfg: LearnerConfig,
) -> torch.Tensor:
    """The sum over the trajectories i through each token of w_i x dual-clip loss(r, A_i), in
    closed form (N,): the loss is linear in A on each side of 0 (rust/pack.rs), so it is
    ``-adv_pos * min(r, 1 + eps_high) + adv_neg * min(max(r, 1 - eps_low), c)``."""
    upper, lower = 1 + cfg.clip_ratio_high, 1 - cfg.clip_ratio_low
    return -adv_pos * torch.clamp(r, max=upper) + adv_neg * torch.clamp(
        torch.clamp(r, min=lower), max=cfg.clip_ratio_c
    )
