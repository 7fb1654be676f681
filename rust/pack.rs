//! Learner batches from a forest's kept trajectories, in two layouts built in one pass.
//!
//! * flat: one row per kept leaf, shared prefixes repeated (what the reference trains on);
//! * packed: every distinct node's tokens once, depth-first, with a tree attention structure;
//!
//! and the [`Layout`] the learner plans its micro-batches with (each token's predecessor, the
//! trajectories through it, tree and row spans), read off the same segment walk, so that the
//! Python side never walks the tree.
//!
//! The packed loss equals the flat loss exactly. A token u shared by the kept leaves S(u) has the
//! same context, hence the same probability ratio r, in every trajectory through it. The flat loss
//! sums w_i * l(r, A_i) over i in S(u), where w_i is the aggregation weight of trajectory i
//! (`AggMode`) and l is the dual-clip PPO loss, which is linear in A on each sign of A:
//!
//!   A >= 0:  l = -A * min(r, 1 + eps)
//!   A <  0:  l = |A| * min(max(r, 1 - eps), c)
//!
//! so the sum is `-adv_pos[u] * min(r, 1+eps) + adv_neg[u] * min(max(r, 1-eps), c)` with
//! `adv_pos[u] = sum of w_i * A_i over A_i >= 0` and `adv_neg[u] = sum of w_i * |A_i| over A_i < 0`.
//! Terms that do not depend on A (KL, entropy) use `token_weight[u] = sum of w_i over S(u)`.

use crate::advantage::AdvantageStats;
use crate::error::{parse_option, Result, TreeError};
use crate::forest::{Forest, NO_PARENT};
use crate::memory::huge_vec;

/// How per-token losses are reduced over a batch (verl's `loss_agg_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggMode {
    /// Sum over all loss tokens of all trajectories / their count.
    TokenMean,
    /// Mean over trajectories of each trajectory's mean over its loss tokens.
    SeqMeanTokenMean,
    /// Mean over trajectories of each trajectory's sum over its loss tokens.
    SeqMeanTokenSum,
}

impl AggMode {
    pub const VALID: &'static str = "'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'";
    const TABLE: [(&'static str, AggMode); 3] = [
        ("token-mean", AggMode::TokenMean),
        ("seq-mean-token-mean", AggMode::SeqMeanTokenMean),
        ("seq-mean-token-sum", AggMode::SeqMeanTokenSum),
    ];

    pub fn as_str(self) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("token-mean", |(n, _)| *n)
    }

    pub fn parse(name: &str) -> Result<Self> {
        parse_option("loss_agg_mode", name, &Self::TABLE, Self::VALID)
    }

    /// Weight of one loss token of a trajectory with `loss_tokens` of them, in a batch of
    /// `batch` trajectories holding `total_loss_tokens` loss tokens.
    fn weight(self, loss_tokens: usize, batch: usize, total_loss_tokens: usize) -> f64 {
        match self {
            AggMode::TokenMean => 1.0 / total_loss_tokens.max(1) as f64,
            AggMode::SeqMeanTokenMean => 1.0 / (batch as f64 * loss_tokens.max(1) as f64),
            AggMode::SeqMeanTokenSum => 1.0 / batch as f64,
        }
    }
}

/// One row per trajectory, right-padded to the longest (row-major `(rows, cols)` arrays).
/// Token ids are uint32 (as stored), positions and packed indices int32 (a pack checks that
/// they fit): half the bytes of int64, and a pack writes hundreds of MB.
#[derive(Clone, Debug, Default)]
pub struct FlatBatch {
    pub rows: usize,
    pub cols: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<bool>,
    pub loss_mask: Vec<bool>,
    pub advantages: Vec<f32>,
    pub position_ids: Vec<i32>,
    /// Index of each flat position in the packed layout; -1 on padding.
    pub packed_index: Vec<i32>,
}

/// Every distinct node once, depth-first (trees in id order, children in id order).
#[derive(Clone, Debug, Default)]
pub struct PackedBatch {
    pub input_ids: Vec<u32>,
    /// Position of each token in its own trajectory.
    pub position_ids: Vec<i32>,
    pub loss_mask: Vec<bool>,
    /// Per token: its segment (index into the `segment_*` arrays, depth-first order).
    pub segment_ids: Vec<i32>,
    /// Per token: one past the last segment of its segment's subtree. Token q may attend token
    /// kv iff `kv <= q && subtree_end[kv] > segment_ids[q]` (ancestors-or-self, causal).
    pub subtree_end: Vec<i32>,
    pub token_weight: Vec<f32>,
    pub adv_pos: Vec<f32>,
    pub adv_neg: Vec<f32>,
    /// Per segment: the forest node, its first token, its token count, its parent segment (-1 at roots).
    pub segment_node: Vec<u32>,
    pub segment_start: Vec<i64>,
    pub segment_len: Vec<i64>,
    pub segment_parent: Vec<i32>,
}

/// Both layouts and what they share.
#[derive(Clone, Debug)]
pub struct Pack {
    /// The packed trajectories' leaves, in row order.
    pub leaves: Vec<u32>,
    pub leaf_advantage: Vec<f64>,
    pub flat: FlatBatch,
    pub packed: PackedBatch,
    pub layout: Layout,
    /// Tokens over all trajectories (shared prefixes counted once per trajectory).
    pub total_tokens: usize,
    /// Tokens of the packed layout.
    pub unique_tokens: usize,
    pub agg: AggMode,
}

impl Pack {
    pub fn sharing_ratio(&self) -> f64 {
        self.total_tokens as f64 / self.unique_tokens.max(1) as f64
    }
}

/// What the learner plans micro-batches with, read off the segments so that the learner knows
/// no tree: per packed token, per tree (packed order) and per row (trajectory).
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Per token: the packed position of the token before it in its trajectories (the same in
    /// every trajectory through it), whose hidden state predicts it; -1 at a trajectory's start.
    pub pred: Vec<i64>,
    /// Per token: the packed trajectories through it: all, those with advantage > 0, < 0.
    pub count: Vec<f32>,
    pub count_pos: Vec<f32>,
    pub count_neg: Vec<f32>,
    /// Per tree, and one past the last: its first segment and its first token (trees are
    /// contiguous in the packed layout).
    pub tree_segments: Vec<i64>,
    pub tree_tokens: Vec<i64>,
    /// Per tree: its group's key (the caller's prompt id).
    pub tree_group: Vec<i64>,
    /// Per row: its tree, its tokens, its loss (policy) tokens.
    pub row_tree: Vec<i64>,
    pub row_tokens: Vec<i64>,
    pub row_loss_tokens: Vec<i64>,
}

/// The depth-first segment layout of a pack: per segment (one distinct node).
#[derive(Default)]
struct Segments {
    node: Vec<u32>,
    start: Vec<i64>,
    len: Vec<i64>,
    parent: Vec<i32>,
    /// First position of the node within its trajectory.
    offset: Vec<i32>,
    /// One past the last segment of the node's subtree.
    end: Vec<i32>,
}

/// Per packed trajectory (row order): its leaf, its tokens, its loss tokens.
struct Rows<'a> {
    leaves: &'a [u32],
    tokens: &'a [usize],
    loss_tokens: &'a [usize],
}

impl Forest {
    /// The packed layout's per-token arrays, segment after segment. `per_node` holds the token
    /// weight and the weighted positive / negative advantage sums of each node.
    fn packed_tokens(&self, seg: &Segments, unique: usize, per_node: [&[f64]; 3]) -> PackedBatch {
        let mut p = PackedBatch {
            input_ids: huge_vec(unique),
            position_ids: huge_vec(unique),
            loss_mask: huge_vec(unique),
            segment_ids: huge_vec(unique),
            subtree_end: huge_vec(unique),
            token_weight: huge_vec(unique),
            adv_pos: huge_vec(unique),
            adv_neg: huge_vec(unique),
            ..PackedBatch::default()
        };
        let [weight, pos, neg] = per_node;
        for (s, &id) in seg.node.iter().enumerate() {
            let (action, context) = self.node_tokens(id);
            let (n_action, len) = (action.len(), action.len() + context.len());
            let end = p.input_ids.len() + len;
            // A node's value on its action tokens, 0 on the rest.
            let masked = |column: &mut Vec<f32>, value: f64| {
                column.resize(column.len() + n_action, value as f32);
                column.resize(end, 0.0);
            };
            p.input_ids.extend_from_slice(action);
            p.input_ids.extend_from_slice(context);
            let offset = seg.offset[s];
            p.position_ids.extend((0..len as i32).map(|k| offset + k));
            p.loss_mask.resize(p.loss_mask.len() + n_action, true);
            p.loss_mask.resize(end, false);
            p.segment_ids.resize(end, s as i32);
            p.subtree_end.resize(end, seg.end[s]);
            masked(&mut p.token_weight, weight[id as usize]);
            masked(&mut p.adv_pos, pos[id as usize]);
            masked(&mut p.adv_neg, neg[id as usize]);
        }
        p.segment_node = seg.node.clone();
        p.segment_start = seg.start.clone();
        p.segment_len = seg.len.clone();
        p.segment_parent = seg.parent.clone();
        p
    }

    /// The learner's [`Layout`]: predecessors and trajectory counts per token, tree spans, rows.
    fn layout(
        &self,
        seg: &Segments,
        unique: usize,
        node_segment: &[i32],
        counts: &[Vec<f32>; 3],
        rows: &Rows<'_>,
    ) -> Layout {
        let mut lay = Layout {
            pred: huge_vec(unique),
            count: huge_vec(unique),
            count_pos: huge_vec(unique),
            count_neg: huge_vec(unique),
            ..Layout::default()
        };
        // Per segment: the last token of its trajectories so far (itself or, if it is empty,
        // its nearest non-empty ancestor), -1 if none; parents come before children.
        let mut last = vec![-1i64; seg.node.len()];
        let mut seg_tree = vec![0i64; seg.node.len()];
        for (s, &id) in seg.node.iter().enumerate() {
            let (start, len, parent) = (seg.start[s], seg.len[s], seg.parent[s]);
            let before = if parent < 0 { -1 } else { last[parent as usize] };
            last[s] = if len > 0 { start + len - 1 } else { before };
            if parent < 0 {
                let tree = &self.trees[self.tree_of[id as usize] as usize];
                lay.tree_segments.push(s as i64);
                lay.tree_tokens.push(start);
                lay.tree_group.push(self.groups[tree.group as usize].key);
            }
            seg_tree[s] = lay.tree_segments.len() as i64 - 1;
            if len > 0 {
                lay.pred.push(before);
                lay.pred.extend(start..start + len - 1);
            }
            let len = len as usize;
            for (column, per_node) in [&mut lay.count, &mut lay.count_pos, &mut lay.count_neg]
                .into_iter()
                .zip(counts)
            {
                column.resize(column.len() + len, per_node[id as usize]);
            }
        }
        lay.tree_segments.push(seg.node.len() as i64);
        lay.tree_tokens.push(unique as i64);
        lay.row_tree = rows
            .leaves
            .iter()
            .map(|&leaf| seg_tree[node_segment[leaf as usize] as usize])
            .collect();
        lay.row_tokens = rows.tokens.iter().map(|&n| n as i64).collect();
        lay.row_loss_tokens = rows.loss_tokens.iter().map(|&n| n as i64).collect();
        lay
    }

    /// The flat layout: one right-padded row per trajectory, and each position's packed index.
    #[allow(clippy::too_many_arguments)]
    fn flat_rows(
        &self,
        paths: &[Vec<u32>],
        lengths: &[usize],
        cols: usize,
        leaf_advantage: &[f64],
        node_segment: &[i32],
        seg: &Segments,
        pad_id: u32,
    ) -> FlatBatch {
        let size = paths.len() * cols;
        let mut f = FlatBatch {
            rows: paths.len(),
            cols,
            input_ids: huge_vec(size),
            attention_mask: huge_vec(size),
            loss_mask: huge_vec(size),
            advantages: huge_vec(size),
            position_ids: huge_vec(size),
            packed_index: huge_vec(size),
        };
        for (i, path) in paths.iter().enumerate() {
            for &id in path {
                let (action, context) = self.node_tokens(id);
                let start = seg.start[node_segment[id as usize] as usize];
                let len = action.len() + context.len();
                f.input_ids.extend_from_slice(action);
                f.input_ids.extend_from_slice(context);
                f.loss_mask.resize(f.loss_mask.len() + action.len(), true);
                f.loss_mask.resize(f.loss_mask.len() + context.len(), false);
                let start = start as i32;
                f.packed_index.extend(start..start + len as i32);
            }
            let (n, end) = (lengths[i], (i + 1) * cols);
            f.position_ids.extend(0..n as i32);
            f.position_ids.resize(end, 0);
            f.input_ids.resize(end, pad_id);
            f.loss_mask.resize(end, false);
            f.packed_index.resize(end, -1);
            f.attention_mask.resize(end - cols + n, true);
            f.attention_mask.resize(end, false);
            f.advantages.resize(end - cols + n, leaf_advantage[i] as f32);
            f.advantages.resize(end, 0.0);
        }
        f
    }

    /// Pack the kept leaves (or `leaves`, if given, each a kept leaf with an advantage) into both
    /// layouts, with the advantages of `stats` (the forest's current ones, from `advantages()`).
    pub fn pack(
        &self,
        stats: Option<&AdvantageStats>,
        leaves: Option<&[u64]>,
        agg: AggMode,
        pad_id: u32,
    ) -> Result<Pack> {
        let stats = self.current(stats).ok_or_else(|| {
            TreeError::InvalidArgument("pack() needs advantages: call advantages() first".into())
        })?;
        let (leaves, leaf_advantage): (Vec<u32>, Vec<f64>) = match leaves {
            None => (stats.leaves.to_vec(), stats.advantage.to_vec()),
            Some(ids) => {
                let mut out = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
                let mut seen = std::collections::HashSet::with_capacity(ids.len());
                for &id in ids {
                    self.node(id)?;
                    if !seen.insert(id) {
                        return Err(TreeError::InvalidArgument(format!(
                            "leaf {id} is listed twice: pack each trajectory once"
                        )));
                    }
                    out.0.push(id as u32);
                    out.1.push(stats.advantage_of(id as u32)?);
                }
                out
            }
        };
        let n_nodes = self.nodes.len();

        // Which nodes are on some packed path, and per node the packed leaves below it.
        let mut on_path = vec![false; n_nodes];
        let mut paths: Vec<Vec<u32>> = Vec::with_capacity(leaves.len());
        let mut loss_tokens = Vec::with_capacity(leaves.len());
        for &leaf in &leaves {
            let path = self.path(leaf);
            loss_tokens.push(
                path.iter()
                    .map(|&id| self.nodes[id as usize].action_len as usize)
                    .sum::<usize>(),
            );
            for &id in &path {
                on_path[id as usize] = true;
            }
            paths.push(path);
        }
        let batch = leaves.len();
        let total_loss: usize = loss_tokens.iter().sum();

        // Per node: weighted advantage sums and token weight of the trajectories through it.
        let mut pos = vec![0.0f64; n_nodes];
        let mut neg = vec![0.0f64; n_nodes];
        let mut weight = vec![0.0f64; n_nodes];
        // Per node: the trajectories through it (all, A > 0, A < 0; signs as the learner's
        // float32 advantages), for the learner's token-mean metrics.
        let mut counts = [
            vec![0.0f32; n_nodes],
            vec![0.0f32; n_nodes],
            vec![0.0f32; n_nodes],
        ];
        for (i, path) in paths.iter().enumerate() {
            let w = agg.weight(loss_tokens[i], batch, total_loss);
            let a = leaf_advantage[i];
            let sign = a as f32;
            for &id in path {
                let id = id as usize;
                weight[id] += w;
                counts[0][id] += 1.0;
                counts[1][id] += f32::from(u8::from(sign > 0.0));
                counts[2][id] += f32::from(u8::from(sign < 0.0));
                if a >= 0.0 {
                    pos[id] += w * a;
                } else {
                    neg[id] -= w * a;
                }
            }
        }

        // Children lists of on-path nodes, for the depth-first order.
        let mut child_count = vec![0u32; n_nodes + 1];
        let on_path_children = || (0..n_nodes).filter(|&id| on_path[id] && self.parent[id] != NO_PARENT);
        for id in on_path_children() {
            child_count[self.parent[id] as usize + 1] += 1;
        }
        for i in 0..n_nodes {
            child_count[i + 1] += child_count[i];
        }
        let mut fill = child_count.clone();
        let mut children = vec![0u32; child_count[n_nodes] as usize];
        for id in on_path_children() {
            let parent = self.parent[id] as usize;
            children[fill[parent] as usize] = id as u32;
            fill[parent] += 1;
        }

        // Depth-first segment layout (per node, cheap); the per-token arrays are filled after.
        let mut seg = Segments::default();
        let mut node_segment = vec![-1i32; n_nodes];
        let mut node_offset = vec![0i64; n_nodes]; // node's first position within its trajectory
        let mut stack: Vec<(u32, bool)> = Vec::new();
        let mut unique = 0usize;
        for tree in &self.trees {
            if !on_path[tree.root as usize] {
                continue;
            }
            stack.push((tree.root, false));
            while let Some((id, done)) = stack.pop() {
                let idx = id as usize;
                if done {
                    seg.end[node_segment[idx] as usize] = seg.node.len() as i32;
                    continue;
                }
                let len = self.nodes[idx].len();
                let parent = self.parent[idx];
                let (parent_seg, offset) = if parent == NO_PARENT {
                    (-1, 0)
                } else {
                    let p = parent as usize;
                    (node_segment[p], node_offset[p] + self.nodes[p].len() as i64)
                };
                node_segment[idx] = seg.node.len() as i32;
                node_offset[idx] = offset;
                seg.node.push(id);
                seg.start.push(unique as i64);
                seg.len.push(len as i64);
                seg.parent.push(parent_seg);
                seg.offset.push(offset as i32); // < unique tokens, checked to fit below
                seg.end.push(0);
                unique += len;
                stack.push((id, true));
                let kids = &children[child_count[idx] as usize..child_count[idx + 1] as usize];
                stack.extend(kids.iter().rev().map(|&c| (c, false)));
            }
        }

        let lengths: Vec<usize> = paths
            .iter()
            .map(|p| p.iter().map(|&id| self.nodes[id as usize].len()).sum())
            .collect();
        let cols = lengths.iter().copied().max().unwrap_or(0);
        // Every position, packed index and trajectory length is below `unique`.
        if unique > i32::MAX as usize {
            return Err(TreeError::InvalidArgument(format!(
                "a pack of {unique} distinct tokens: positions and packed indices are int32, so \
                 at most 2^31 - 1 (pack fewer leaves at a time)"
            )));
        }
        // The two layouts are independent given the segments: build them on two threads.
        let (packed, flat, layout) = std::thread::scope(|scope| {
            let packed = scope.spawn(|| self.packed_tokens(&seg, unique, [&weight, &pos, &neg]));
            let layout = scope.spawn(|| {
                let rows = Rows {
                    leaves: &leaves,
                    tokens: &lengths,
                    loss_tokens: &loss_tokens,
                };
                self.layout(&seg, unique, &node_segment, &counts, &rows)
            });
            let flat = self.flat_rows(
                &paths,
                &lengths,
                cols,
                &leaf_advantage,
                &node_segment,
                &seg,
                pad_id,
            );
            let packed = packed.join().expect("packing thread panicked");
            (packed, flat, layout.join().expect("layout thread panicked"))
        });

        Ok(Pack {
            total_tokens: lengths.iter().sum(),
            unique_tokens: packed.input_ids.len(),
            leaves,
            leaf_advantage,
            flat,
            packed,
            layout,
            agg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advantage::Estimator;
    use crate::forest::LeafReason;

    /// Two groups; tree 0 branches at the root and at a middle step; and its advantages.
    fn forest() -> (Forest, AdvantageStats) {
        let mut f = Forest::new();
        let leaf = Some(LeafReason::Answer);
        let r = f.add_root(0, &[1, 2, 3]).unwrap() as u64;
        let a = f.add_step(r, &[4, 5], &[6, 7], None).unwrap() as u64;
        let l1 = f.add_step(a, &[8], &[], leaf).unwrap() as u64;
        let l2 = f.add_step(a, &[9, 10, 11], &[], leaf).unwrap() as u64;
        let l3 = f.add_step(r, &[12], &[], leaf).unwrap() as u64;
        let r2 = f.add_root(1, &[20]).unwrap() as u64;
        let l4 = f.add_step(r2, &[21, 22], &[], leaf).unwrap() as u64;
        f.set_rewards(&[l1, l2, l3, l4], &[1.0, 0.0, 0.5, 0.3]).unwrap();
        let s = f.advantages(Estimator::Tree, true).unwrap();
        (f, s)
    }

    #[test]
    fn unpacking_gives_back_every_trajectory() {
        let (f, s) = forest();
        let p = f.pack(Some(&s), None, AggMode::TokenMean, 0).unwrap();
        assert_eq!(p.total_tokens, 8 + 10 + 4 + 3);
        assert_eq!(p.unique_tokens, 3 + 4 + 1 + 3 + 1 + 1 + 2);
        for (i, &leaf) in p.leaves.iter().enumerate() {
            let (tokens, mask) = f.trajectory(leaf as u64).unwrap();
            let row = i * p.flat.cols;
            for (k, (&t, &m)) in tokens.iter().zip(&mask).enumerate() {
                let at = p.flat.packed_index[row + k] as usize;
                assert_eq!(p.packed.input_ids[at], t);
                assert_eq!(p.packed.loss_mask[at], m == 1);
                assert_eq!(p.packed.position_ids[at], k as i32);
                assert_eq!(p.flat.input_ids[row + k], t);
            }
            assert!(p.flat.packed_index[row + tokens.len()..row + p.flat.cols]
                .iter()
                .all(|&x| x == -1));
        }
    }

    #[test]
    fn the_mask_rule_is_the_union_of_causal_masks() {
        let (f, s) = forest();
        let p = f.pack(Some(&s), None, AggMode::TokenMean, 0).unwrap();
        let (u, seg, end) = (p.unique_tokens, &p.packed.segment_ids, &p.packed.subtree_end);
        let mut expect = vec![false; u * u];
        for i in 0..p.leaves.len() {
            let row = &p.flat.packed_index[i * p.flat.cols..(i + 1) * p.flat.cols];
            let idx: Vec<usize> = row.iter().filter(|&&x| x >= 0).map(|&x| x as usize).collect();
            for (a, &q) in idx.iter().enumerate() {
                for &kv in &idx[..=a] {
                    expect[q * u + kv] = true;
                }
            }
        }
        for q in 0..u {
            for kv in 0..u {
                let rule = kv <= q && end[kv] > seg[q];
                assert_eq!(rule, expect[q * u + kv], "q {q} kv {kv}");
            }
        }
    }

    #[test]
    fn layout_is_read_off_the_trajectories() {
        let (f, s) = forest();
        let p = f.pack(Some(&s), None, AggMode::TokenMean, 0).unwrap();
        let (u, lay, cols) = (p.unique_tokens, &p.layout, p.flat.cols);
        let mut pred = vec![-1i64; u];
        let mut count = [vec![0.0f32; u], vec![0.0f32; u], vec![0.0f32; u]];
        for i in 0..p.leaves.len() {
            let row = &p.flat.packed_index[i * cols..(i + 1) * cols];
            let idx: Vec<i64> = row.iter().filter(|&&x| x >= 0).map(|&x| x as i64).collect();
            for t in 1..idx.len() {
                pred[idx[t] as usize] = idx[t - 1];
            }
            let a = p.leaf_advantage[i];
            for &x in &idx {
                count[0][x as usize] += 1.0;
                count[1][x as usize] += if a > 0.0 { 1.0 } else { 0.0 };
                count[2][x as usize] += if a < 0.0 { 1.0 } else { 0.0 };
            }
            assert_eq!(lay.row_tokens[i] as usize, idx.len());
            let loss = p.flat.loss_mask[i * cols..(i + 1) * cols]
                .iter()
                .filter(|&&m| m)
                .count();
            assert_eq!(lay.row_loss_tokens[i] as usize, loss);
            let tree = lay.row_tree[i] as usize;
            let (lo, hi) = (lay.tree_tokens[tree], lay.tree_tokens[tree + 1]);
            assert!(idx.iter().all(|&x| lo <= x && x < hi), "row {i} lies in its tree");
        }
        assert_eq!(lay.pred, pred);
        assert_eq!(
            [&lay.count, &lay.count_pos, &lay.count_neg],
            [&count[0], &count[1], &count[2]]
        );
        assert_eq!(lay.tree_segments, vec![0, 5, 7]);
        assert_eq!(lay.tree_tokens, vec![0, 12, u as i64]);
        assert_eq!(lay.tree_group, vec![0, 1]);
    }

    #[test]
    fn packed_weights_reproduce_the_flat_loss() {
        let (f, s) = forest();
        for agg in [
            AggMode::TokenMean,
            AggMode::SeqMeanTokenMean,
            AggMode::SeqMeanTokenSum,
        ] {
            let p = f.pack(Some(&s), None, agg, 0).unwrap();
            let ratio = |i: usize| 0.5 + 0.13 * (i % 11) as f64; // spans both clip edges
            let (eps, c) = (0.2, 3.0);
            let loss = |r: f64, a: f64| {
                let l = f64::max(-a * r, -a * r.clamp(1.0 - eps, 1.0 + eps));
                if a < 0.0 {
                    l.min(-a * c)
                } else {
                    l
                }
            };
            let (rows, cols) = (p.flat.rows, p.flat.cols);
            let mut flat = 0.0;
            let total: usize = p.flat.loss_mask.iter().filter(|&&m| m).count();
            for i in 0..rows {
                let n_i = p.flat.loss_mask[i * cols..(i + 1) * cols]
                    .iter()
                    .filter(|&&m| m)
                    .count();
                let mut row = 0.0;
                for k in 0..cols {
                    let at = i * cols + k;
                    if p.flat.loss_mask[at] {
                        row += loss(
                            ratio(p.flat.packed_index[at] as usize),
                            p.flat.advantages[at] as f64,
                        );
                    }
                }
                flat += match agg {
                    AggMode::TokenMean => row / total as f64,
                    AggMode::SeqMeanTokenMean => row / n_i as f64 / rows as f64,
                    AggMode::SeqMeanTokenSum => row / rows as f64,
                };
            }
            let packed: f64 = (0..p.unique_tokens)
                .filter(|&u| p.packed.loss_mask[u])
                .map(|u| {
                    let r = ratio(u);
                    -(p.packed.adv_pos[u] as f64) * r.min(1.0 + eps)
                        + p.packed.adv_neg[u] as f64 * r.max(1.0 - eps).min(c)
                })
                .sum();
            assert!(
                (flat - packed).abs() < 1e-6 * flat.abs().max(1.0),
                "{agg:?}: {flat} vs {packed}"
            );
        }
    }

    #[test]
    fn pack_rejects_bad_leaves() {
        let (mut f, s) = forest();
        assert!(matches!(
            f.pack(Some(&s), Some(&[2, 2]), AggMode::TokenMean, 0),
            Err(TreeError::InvalidArgument(_))
        ));
        assert!(matches!(
            f.pack(Some(&s), Some(&[1]), AggMode::TokenMean, 0),
            Err(TreeError::NoAdvantage { .. })
        ));
        assert!(matches!(
            f.pack(Some(&s), Some(&[99]), AggMode::TokenMean, 0),
            Err(TreeError::UnknownNode { .. })
        ));
        f.set_rewards(&[2], &[0.0]).unwrap();
        assert!(
            f.pack(Some(&s), None, AggMode::TokenMean, 0).is_err(),
            "stale statistics are gone"
        );
        let s = f.advantages(Estimator::Tree, true).unwrap();
        let sub = f
            .pack(Some(&s), Some(&[4, 2]), AggMode::SeqMeanTokenSum, 7)
            .unwrap();
        assert_eq!(sub.leaves, vec![4, 2]);
        assert_eq!(sub.flat.input_ids[sub.flat.cols - 1], 7, "padding uses pad_id");
        let top = f
            .pack(Some(&s), Some(&[4, 2]), AggMode::TokenMean, u32::MAX)
            .unwrap();
        assert_eq!(top.flat.input_ids[top.flat.cols - 1], u32::MAX, "any u32 pads");
    }
}
