"""The tree attention mask: the one implementation of the packed layout's attention rule
(``rust/pack.rs`` defines ``segment_ids`` and ``subtree_end`` so that this rule holds)."""

from __future__ import annotations

from typing import Any

import torch

from treegrpo.exceptions import InvalidOptionError

__all__ = ["DENSE_MASK_IMPLS", "PACKED_IMPLS", "tree_attention_mask"]

# Attention implementations that can run the packed layout, and how each gets its mask.
DENSE_MASK_IMPLS = ("sdpa", "eager")
PACKED_IMPLS = (*DENSE_MASK_IMPLS, "flex_attention")


def _may_attend(
    segment_ids: torch.Tensor, subtree_end: torch.Tensor, b: Any, q: Any, kv: Any
) -> torch.Tensor:
    """Query q of row b may attend key kv iff ``kv <= q and subtree_end[kv] > segment_ids[q]``:
    kv is in an ancestor-or-self segment of q's, and not after it (causal)."""
    return (kv <= q) & (subtree_end[b, kv] > segment_ids[b, q])


def tree_attention_mask(
    segment_ids: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The tree attention mask of packed rows (R, T) (or one row (T,)), by :func:`_may_attend`.

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
            return _may_attend(segment_ids, subtree_end, b, q, kv)

        return create_block_mask(mask_mod, rows, None, length, length, device=segment_ids.device)
    if attn_implementation not in DENSE_MASK_IMPLS:
        raise InvalidOptionError(
            f"attn_implementation {attn_implementation!r} cannot run a tree mask: load the model "
            f"with attn_implementation in {', '.join(map(repr, PACKED_IMPLS))} or use packed=False"
        )
    pos = torch.arange(length, device=segment_ids.device)
    b = torch.arange(rows, device=segment_ids.device)[:, None, None]
    allowed = _may_attend(segment_ids, subtree_end, b, pos[None, :, None], pos[None, None, :])
    allowed = allowed[:, None]  # (R, 1, T query, T key)
    if attn_implementation == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
