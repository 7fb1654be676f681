"""Micro-batches from a :class:`treegrpo.Pack`: which trajectories (flat) or whole trees
(packed) share a forward pass, padded how. The tree layout (predecessors, per-token trajectory
counts, tree and row spans) is ``Pack.layout``, computed by ``Forest.pack`` in Rust: planning
knows no tree."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from treegrpo.exceptions import InvalidArgumentError
from treegrpo.learner.batches import FlatMicroBatch, PackedMicroBatch

if TYPE_CHECKING:
    from treegrpo._core import Pack

__all__ = ["Layout", "empty_micro_batch", "flat_micro_batches", "greedy", "packed_micro_batches"]


class Layout:
    """What planning reads from a Pack, once per step."""

    def __init__(self, pack: Pack) -> None:
        self.flat, self.packed, lay = pack.flat, pack.packed, pack.layout
        self.rows = len(pack)
        self.lengths = lay["row_tokens"]  # (B,)
        self.loss_tokens = lay["row_loss_tokens"]  # (B,)
        loss_mask = self.flat["loss_mask"]
        if loss_mask.shape[1] and loss_mask[:, 0].any():
            leaf = pack.leaves[int(np.flatnonzero(loss_mask[:, 0])[0])]
            raise InvalidArgumentError(
                f"the trajectory of leaf {leaf} starts with a policy token: no position predicts "
                "it (give the root a prompt)"
            )
        self.tree_segments = lay["tree_segments"]  # (trees + 1,) first segment of each tree
        self.tree_tokens = lay["tree_tokens"]  # (trees + 1,) first token of each tree
        self.tree_group = lay["tree_group"]  # (trees,) the prompt of each tree
        self.row_tree = lay["row_tree"]  # (B,)
        self.pred = lay["pred"]  # (U,) the packed position predicting each token
        self.count = lay["count"]  # (U,) trajectories through each token: all,
        self.count_pos = lay["count_pos"]  # A > 0,
        self.count_neg = lay["count_neg"]  # A < 0

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


def greedy(sizes: list[int], budget: int | None, *, padded: bool = True) -> list[list[int]]:
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


def _tensor(
    array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)


def empty_micro_batch(device: torch.device) -> FlatMicroBatch:
    """A one-token pass whose one predicted token has loss weight 0: its loss is 0 and its
    gradient zero, but it runs every parameter (and, under FSDP2, every collective) like
    any other micro-batch."""
    zeros = np.zeros((1, 1), np.int64)
    one = np.zeros(1, np.int64)
    return FlatMicroBatch(
        input_ids=_tensor(zeros, device, torch.long),
        position_ids=_tensor(zeros, device, torch.long),
        attention_mask=_tensor(zeros + 1, device, torch.long),
        pred_index=_tensor(one, device, torch.long),
        targets=_tensor(one, device, torch.long),
        pack_index=one,
        loss_index=_tensor(one, device, torch.long),
        loss_mask=_tensor(zeros, device, torch.float32),
        advantages=_tensor(zeros, device, torch.float32),
        scale=0.0,
        num_tokens=0,
    )


def flat_micro_batches(
    lay: Layout,
    rows: np.ndarray,
    mini_norm: float,
    *,
    loss_agg_mode: str,
    budget: int | None,
    device: torch.device,
) -> list[FlatMicroBatch]:
    """Micro-batches of whole trajectories (``rows``), longest first (less padding), each
    scaled by its normaliser over the mini-batch's ``mini_norm``."""
    flat = lay.flat
    out = []
    rows = rows[np.argsort(-lay.lengths[rows], kind="stable")]
    for group in greedy([int(lay.lengths[r]) for r in rows], budget):
        r = rows[group]
        width = max(int(lay.lengths[r].max()), 1)
        loss_mask = flat["loss_mask"][r, :width]
        b, t = np.nonzero(loss_mask)
        input_ids = flat["input_ids"][r, :width]
        out.append(
            FlatMicroBatch(
                input_ids=_tensor(input_ids, device, torch.long),
                position_ids=_tensor(flat["position_ids"][r, :width], device, torch.long),
                attention_mask=_tensor(flat["attention_mask"][r, :width], device, torch.long),
                pred_index=_tensor(b * width + t - 1, device, torch.long),
                targets=_tensor(input_ids[b, t], device, torch.long),
                pack_index=flat["packed_index"][r[b], t],
                loss_index=_tensor(b * width + t, device, torch.long),
                loss_mask=_tensor(loss_mask, device, torch.float32),
                advantages=_tensor(flat["advantages"][r, :width], device, torch.float32),
                scale=lay.norm(r, loss_agg_mode) / mini_norm,
                num_tokens=int(lay.lengths[r].sum()),
            )
        )
    return out


def packed_micro_batches(
    lay: Layout,
    trees: np.ndarray,
    scale: float,
    *,
    one_row: bool,
    budget: int | None,
    device: torch.device,
) -> list[PackedMicroBatch]:
    """Micro-batches of whole trees. With a dense mask (sdpa, eager) each tree is one row:
    attention cost grows with the square of a row's length, and these kernels do not skip
    masked blocks, so trees side by side in one row would cost (sum of sizes)^2. With
    flex_attention (``one_row``), which skips them, all trees of a micro-batch share one row."""
    sizes = lay.tree_tokens[trees + 1] - lay.tree_tokens[trees]
    if not one_row:  # rows padded to the largest tree of a micro-batch: largest first
        trees = trees[np.argsort(-sizes, kind="stable")]
        sizes = lay.tree_tokens[trees + 1] - lay.tree_tokens[trees]
    groups = greedy(sizes.tolist(), budget, padded=not one_row)
    return [_packed_micro_batch(lay, trees[g], scale, one_row, device) for g in groups]


def _packed_micro_batch(
    lay: Layout, trees: np.ndarray, scale: float, one_row: bool, device: torch.device
) -> PackedMicroBatch:
    packed = lay.packed
    # row spans: (first token, end token, first segment) of each row
    if one_row:
        first, last = int(trees[0]), int(trees[-1]) + 1
        spans = [(lay.tree_tokens[first], lay.tree_tokens[last], lay.tree_segments[first])]
    else:
        spans = [(lay.tree_tokens[t], lay.tree_tokens[t + 1], lay.tree_segments[t]) for t in trees]
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
    return PackedMicroBatch(
        input_ids=_tensor(input_ids, device),
        position_ids=_tensor(position_ids, device),
        segment_ids=_tensor(segment_ids, device),
        subtree_end=_tensor(subtree_end, device),
        pred_index=_tensor(np.concatenate(pred), device, torch.long),
        targets=_tensor(packed["input_ids"][u], device, torch.long),
        pack_index=u,
        adv_pos=_tensor(packed["adv_pos"][u], device, torch.float32),
        adv_neg=_tensor(packed["adv_neg"][u], device, torch.float32),
        token_weight=_tensor(packed["token_weight"][u], device, torch.float32),
        count=_tensor(lay.count[u], device),
        count_pos=_tensor(lay.count_pos[u], device),
        count_neg=_tensor(lay.count_neg[u], device),
        scale=scale,
        num_tokens=int(sum(b - a for a, b, _ in spans)),
    )
