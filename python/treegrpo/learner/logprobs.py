"""Log-probs of given tokens: the model body to hidden states, then lm_head + log-softmax chunk
by chunk, each chunk checkpointed, so neither pass holds a (tokens x vocab) tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TokenLogProbs", "token_log_probs"]


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


class TokenLogProbs(torch.nn.Module):
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
