"""The embedded engine's sampler: temperature, top-k and top-p over a batch of logits.

Per row: temperature 0 is greedy (the argmax of the raw logits); otherwise top-k, then top-p
(the smallest set of top tokens whose mass reaches ``top_p``), drawn from one
``torch.Generator`` seeded with ``seed`` (on the CPU whatever the model's device: the same seed
gives the same draws anywhere), so the same calls in the same order give the same samples.
``log_probs`` are ``log_softmax(logits / temperature)`` at the sampled token, before top-k/top-p
truncation (what SGLang returns by default); greedy rows use temperature 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from treegrpo.engine.base import SamplingParams

__all__ = ["Sampler"]

# First candidate set for top-k / top-p sampling, and its growth factor until it holds every
# row's nucleus (topk over 49k logits costs ~10 ms for 16 rows; a full sort ~80 ms).
_TOPK_CANDIDATES = 256
_TOPK_GROWTH = 8


class Sampler:
    """Draws tokens for rows with their own :class:`SamplingParams` (see the module docstring);
    :attr:`generator` is the state a checkpoint keeps."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def step(
        self, logits: torch.Tensor, params: Sequence[SamplingParams]
    ) -> tuple[list[int], list[float]]:
        """One token per row of ``logits`` (float32, one row per entry of ``params``) and its
        log-prob under the row's temperature."""
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        log_probs = torch.log_softmax(logits / temps.to(logits.device)[:, None], dim=-1)
        tokens = logits.argmax(dim=-1)  # greedy rows: argmax of the raw logits
        sampled = [j for j, p in enumerate(params) if p.temperature > 0]
        if sampled:
            tokens[sampled] = self.draw(log_probs[sampled], [params[i] for i in sampled])
        chosen = log_probs.gather(1, tokens[:, None])[:, 0]
        return [int(t) for t in tokens.tolist()], [float(lp) for lp in chosen.tolist()]

    def draw(self, log_probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """One token per row from ``softmax(log_probs)``, truncated by each row's top-k / top-p.

        Top-k / top-p look at the ``k`` most likely tokens only (``torch.topk``, much cheaper
        than sorting the vocabulary), ``k`` grown until it holds every row's kept set."""
        vocab = log_probs.shape[-1]
        device = log_probs.device
        probs = log_probs.exp()
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
        if bool((top_k >= vocab).all()) and bool((top_p >= 1).all()):
            return self.categorical(probs)
        limited = top_k[top_k < vocab]
        k = min(vocab, max(_TOPK_CANDIDATES, int(limited.max()) if limited.numel() else 0))
        while True:
            values, index = probs.topk(k, dim=-1)  # sorted, most likely first
            mass = values.cumsum(-1)
            covered = (top_k <= k) | (mass[:, -1] >= top_p) | (k == vocab)
            if bool(covered.all()):
                break
            k = min(vocab, k * _TOPK_GROWTH)
        rank = torch.arange(k, device=device)[None, :]
        keep = rank < top_k[:, None]
        # The nucleus: every token whose preceding mass is below top_p (the first always).
        keep &= ((mass - values) < top_p[:, None]) | (top_p >= 1)[:, None]
        return index.gather(1, self.categorical(values * keep)[:, None])[:, 0]

    def categorical(self, weights: torch.Tensor) -> torch.Tensor:
        """One index per row, drawn in proportion to ``weights`` (>= 0, any scale): inverse CDF
        with a float64 cumulative sum (``torch.multinomial`` is slow over a whole vocabulary)."""
        cdf = weights.double().cumsum(-1)
        u = torch.rand(weights.shape[0], 1, generator=self.generator, dtype=torch.float64)
        u = u.to(cdf.device) * cdf[:, -1:]
        # The first index whose cumulative weight passes u: zero-weight entries never win.
        return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)
