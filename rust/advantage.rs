//! Tree-GRPO advantages (algorithm.md section 3), with the reference code's exact numerics.
//!
//! For kept leaf i of tree t in group x, with z_g(i) = (R_i - mean_g) / (std_g + 1e-6):
//!   A_inter(i) = z over the group's kept leaves, A_intra(i) = z over the tree's kept leaves,
//!   A(i) = A_inter(i) + A_intra(i).
//! std is the unbiased sample std; a singleton uses mean 0 and std 1; equal rewards give 0.

use arrow_buffer::ScalarBuffer;

use crate::error::{parse_option, Result, TreeError};
use crate::forest::Forest;

pub const EPS: f64 = 1e-6;

/// Which advantage a kept leaf trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimator {
    /// A_inter + A_intra (the paper's default).
    Tree,
    /// A_intra only: z within each tree.
    TreeIntra,
    /// A_inter only: z over all kept leaves of the prompt.
    TreeInter,
    /// Chain GRPO: z over the prompt's trajectories. Numerically the same as `TreeInter`;
    /// named for forests of chains (N = 0), the baseline of the paper.
    Grpo,
}

impl Estimator {
    pub const VALID: &'static str = "'tree', 'tree_intra', 'tree_inter', 'grpo'";
    const TABLE: [(&'static str, Estimator); 4] = [
        ("tree", Estimator::Tree),
        ("tree_intra", Estimator::TreeIntra),
        ("tree_inter", Estimator::TreeInter),
        ("grpo", Estimator::Grpo),
    ];

    pub fn parse(name: &str) -> Result<Self> {
        parse_option("estimator", name, &Self::TABLE, Self::VALID)
    }

    pub fn as_str(self) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(_, e)| *e == self)
            .map(|(n, _)| *n)
            .unwrap_or("tree")
    }

    fn combine(self, inter: f64, intra: f64) -> f64 {
        match self {
            Estimator::Tree => inter + intra,
            Estimator::TreeIntra => intra,
            Estimator::TreeInter | Estimator::Grpo => inter,
        }
    }
}

/// Per kept leaf (in leaf-id order) and per node results of one `advantages` call.
///
/// The columns are Arrow buffers (each derefs to a slice), so the Arrow export shares them
/// instead of copying.
#[derive(Clone, Debug, PartialEq)]
pub struct AdvantageStats {
    /// The forest's generation they were computed at ([`AdvantageStats::is_current`]).
    pub generation: u64,
    pub estimator: Estimator,
    pub scale_std: bool,
    /// Kept leaves, ascending id.
    pub leaves: ScalarBuffer<u32>,
    /// Per kept leaf: its tree.
    pub tree: ScalarBuffer<u32>,
    /// Per kept leaf: the caller's key of its group.
    pub group: ScalarBuffer<i64>,
    pub reward: ScalarBuffer<f64>,
    pub a_inter: ScalarBuffer<f64>,
    pub a_intra: ScalarBuffer<f64>,
    pub advantage: ScalarBuffer<f64>,
    /// Per node (indexed by node id): kept leaves below (a kept leaf counts itself).
    pub kept_below: ScalarBuffer<u32>,
    /// Per node: mean reward of the kept leaves below (V(s)); NaN where there are none.
    pub value: ScalarBuffer<f64>,
    /// Per node: summed advantage of the kept leaves below, the weight the loss puts on its tokens.
    pub advantage_sum: ScalarBuffer<f64>,
}

impl AdvantageStats {
    /// The advantage of a kept leaf, if it has one.
    pub fn of_leaf(&self, leaf: u32) -> Option<f64> {
        self.leaves.binary_search(&leaf).ok().map(|i| self.advantage[i])
    }

    /// The advantage of a kept leaf, or an error naming it.
    pub fn advantage_of(&self, leaf: u32) -> Result<f64> {
        self.of_leaf(leaf).ok_or(TreeError::NoAdvantage { node: leaf })
    }

    /// Whether these statistics describe `forest` as it is: computed from it, with no change since.
    pub fn is_current(&self, forest: &Forest) -> bool {
        self.generation == forest.generation()
    }
}

/// The rewards of one set (a tree's or a group's kept leaves), accumulated one at a time, and
/// the (mean, denominator) that turn them into z-scores with the reference numerics.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    n: u32,
    all_equal: bool,
    first: f64,
    /// The sum of the rewards, then (`finish_mean`) their mean.
    mean: f64,
    /// Summed squared deviations from the mean (second pass).
    squares: f64,
    denom: f64,
}

impl Moments {
    fn push(&mut self, r: f64) {
        if self.n == 0 {
            self.first = r;
            self.all_equal = true;
        } else {
            self.all_equal &= r == self.first;
        }
        self.n += 1;
        self.mean += r;
    }

    /// After every `push`: the mean, and the denominator unless it needs the squared deviations.
    fn finish_mean(&mut self, scale_std: bool) {
        (self.mean, self.denom) = if self.n == 1 {
            // A one-member set: mean 0 and std 1, so the term is the raw reward.
            (0.0, if scale_std { 1.0 + EPS } else { 1.0 })
        } else if self.n == 0 || self.all_equal {
            // std 0: exactly 0 (r - mean is +0.0 for every member, with no rounding residue of
            // the mean through the 1e-6 denominator).
            (self.first, 1.0)
        } else {
            (self.mean / self.n as f64, 1.0)
        };
    }

    /// Second pass (scale_std only): one member's squared deviation from the mean.
    fn push_square(&mut self, r: f64) {
        self.squares += (r - self.mean) * (r - self.mean);
    }

    /// After every `push_square`: the unbiased std + EPS, for sets of distinct rewards.
    fn finish_std(&mut self) {
        if self.n > 1 && !self.all_equal {
            self.denom = (self.squares / (self.n - 1) as f64).sqrt() + EPS;
        }
    }

    fn z(&self, r: f64) -> f64 {
        (r - self.mean) / self.denom
    }
}

/// z-scores of `rewards` (a test helper over [`Moments`]).
#[cfg(test)]
fn z_scores(rewards: &[f64], scale_std: bool, out: &mut Vec<f64>) {
    let mut m = Moments::default();
    rewards.iter().for_each(|&r| m.push(r));
    m.finish_mean(scale_std);
    if scale_std {
        rewards.iter().for_each(|&r| m.push_square(r));
        m.finish_std();
    }
    out.clear();
    out.extend(rewards.iter().map(|&r| m.z(r)));
}

impl Forest {
    /// Compute the advantages of every kept leaf and the per-node process statistics.
    /// Every kept leaf needs a reward. Trees without kept leaves contribute nothing. The caller
    /// keeps the result (the Python binding holds the last one); readers of it (`pack`,
    /// `nodes_batch`) take it as an argument and treat statistics of an earlier state of the
    /// forest as absent.
    ///
    /// Three passes over the kept leaves (sums, squared deviations, z-scores) into per-tree and
    /// per-group accumulators, then one bottom-up sweep over the nodes.
    pub fn advantages(&self, estimator: Estimator, scale_std: bool) -> Result<AdvantageStats> {
        let n_nodes = self.nodes.len();
        // Kept leaves, ascending: written unconditionally, the end advanced only when kept
        // (no unpredictable branch when K of the leaves are kept).
        let mut leaves = vec![0u32; self.leaf_ids.len()];
        let mut n = 0;
        for &id in &self.leaf_ids {
            leaves[n] = id;
            n += usize::from(self.kept[id as usize]);
        }
        leaves.truncate(n);
        let reward: Vec<f64> = leaves.iter().map(|&id| self.reward[id as usize]).collect();
        if reward.iter().any(|r| r.is_nan()) {
            let missing: Vec<u32> = leaves
                .iter()
                .zip(&reward)
                .filter(|(_, r)| r.is_nan())
                .map(|(&id, _)| id)
                .collect();
            return Err(TreeError::MissingReward {
                count: missing.len(),
                first: missing.into_iter().take(5).collect(),
            });
        }
        let tree: Vec<u32> = leaves.iter().map(|&id| self.tree_of[id as usize]).collect();
        let tree_group: Vec<u32> = self.trees.iter().map(|t| t.group).collect();
        let group: Vec<i64> = tree
            .iter()
            .map(|&t| self.groups[tree_group[t as usize] as usize].key)
            .collect();

        // z-scores within each tree (intra) and each group (inter). Accumulating in leaf-id
        // order sums a tree's rewards in the same order as the reference; a group's in the same
        // order when its trees' nodes are contiguous (and within rounding otherwise).
        let mut per_tree = vec![Moments::default(); self.trees.len()];
        let mut per_group = vec![Moments::default(); self.groups.len()];
        for (&t, &r) in tree.iter().zip(&reward) {
            per_tree[t as usize].push(r);
            per_group[tree_group[t as usize] as usize].push(r);
        }
        for m in per_tree.iter_mut().chain(per_group.iter_mut()) {
            m.finish_mean(scale_std);
        }
        if scale_std {
            for (&t, &r) in tree.iter().zip(&reward) {
                per_tree[t as usize].push_square(r);
                per_group[tree_group[t as usize] as usize].push_square(r);
            }
            for m in per_tree.iter_mut().chain(per_group.iter_mut()) {
                m.finish_std();
            }
        }

        // Per kept leaf: the terms and their combination, seeded into the node sweep's arrays.
        // The sweep's arrays have one extra slot, n_nodes, that roots add into (no branch).
        let mut kept_below = vec![0u32; n_nodes + 1];
        let mut reward_sum = vec![0.0f64; n_nodes + 1];
        let mut advantage_sum = vec![0.0f64; n_nodes + 1];
        let mut a_inter = Vec::with_capacity(n);
        let mut a_intra = Vec::with_capacity(n);
        let mut advantage = Vec::with_capacity(n);
        for ((&id, &t), &r) in leaves.iter().zip(&tree).zip(&reward) {
            let inter = per_group[tree_group[t as usize] as usize].z(r);
            let intra = per_tree[t as usize].z(r);
            let a = estimator.combine(inter, intra);
            a_inter.push(inter);
            a_intra.push(intra);
            advantage.push(a);
            kept_below[id as usize] = 1;
            reward_sum[id as usize] = r;
            advantage_sum[id as usize] = a;
        }

        // Bottom-up sweep: children have larger ids than their parents.
        for id in (0..n_nodes).rev() {
            let p = (self.parent[id] as usize).min(n_nodes);
            kept_below[p] += kept_below[id];
            reward_sum[p] += reward_sum[id];
            advantage_sum[p] += advantage_sum[id];
        }
        kept_below.truncate(n_nodes);
        advantage_sum.truncate(n_nodes);
        // V(s) in place of the reward sums.
        let mut value = reward_sum;
        value.truncate(n_nodes);
        // A node without kept leaves below has the sum 0.0, and 0.0 / 0 is NaN.
        for (v, &k) in value.iter_mut().zip(&kept_below) {
            *v /= f64::from(k);
        }
        Ok(AdvantageStats {
            generation: self.generation(),
            estimator,
            scale_std,
            leaves: leaves.into(),
            tree: tree.into(),
            group: group.into(),
            reward: reward.into(),
            a_inter: a_inter.into(),
            a_intra: a_intra.into(),
            advantage: advantage.into(),
            kept_below: kept_below.into(),
            value: value.into(),
            advantage_sum: advantage_sum.into(),
        })
    }

    /// `stats` if they describe the forest as it is now; statistics of an earlier state read as none.
    pub fn current<'a>(&self, stats: Option<&'a AdvantageStats>) -> Option<&'a AdvantageStats> {
        stats.filter(|s| s.is_current(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forest::LeafReason;

    /// algorithm.md's worked example: M=2, K=3, tree A = [1, 1, 0.2], tree B = [0.2, 0, 0.2].
    fn worked_example() -> Forest {
        let mut f = Forest::new();
        for rewards in [[1.0, 1.0, 0.2], [0.2, 0.0, 0.2]] {
            let root = f.add_root(0, &[1, 2]).unwrap();
            let mid = f.add_step(root as u64, &[3], &[4], None).unwrap();
            for (i, r) in rewards.into_iter().enumerate() {
                let parent = if i == 0 { root } else { mid };
                let leaf = f
                    .add_step(parent as u64, &[5], &[], Some(LeafReason::Answer))
                    .unwrap();
                f.set_rewards(&[leaf as u64], &[r]).unwrap();
            }
        }
        f
    }

    #[test]
    fn worked_example_matches_the_doc() {
        let f = worked_example();
        let s = f.advantages(Estimator::Tree, true).unwrap();
        let expect = [1.849, 1.849, -1.678, 0.054, -2.127, 0.054];
        for (a, e) in s.advantage.iter().zip(expect) {
            assert!((a - e).abs() < 5e-4, "{a} vs {e}");
        }
    }

    #[test]
    fn node_statistics_sum_over_kept_leaves() {
        let f = worked_example();
        let s = f.advantages(Estimator::Tree, true).unwrap();
        // tree A: root 0, mid 1, leaves 2 (under root), 3 and 4 (under mid)
        assert_eq!(s.kept_below[0], 3);
        assert_eq!(s.kept_below[1], 2);
        assert!((s.value[1] - 0.6).abs() < 1e-12);
        assert!((s.advantage_sum[1] - (s.advantage[1] + s.advantage[2])).abs() < 1e-12);
        // intra-tree terms of a tree sum to 0, so the root's sum is its leaves' inter terms
        let root_sum: f64 = s.a_inter[..3].iter().sum();
        assert!((s.advantage_sum[0] - root_sum).abs() < 1e-9);
    }

    #[test]
    fn singletons_and_equal_rewards() {
        let mut z = Vec::new();
        z_scores(&[0.7], true, &mut z);
        assert_eq!(z, vec![0.7 / (1.0 + EPS)]);
        z_scores(&[0.7], false, &mut z);
        assert_eq!(z, vec![0.7]);
        z_scores(&[0.2, 0.2, 0.2], true, &mut z);
        assert_eq!(z, vec![0.0; 3]);
        z_scores(&[1.0, 0.0], false, &mut z);
        assert_eq!(z, vec![0.5, -0.5]);
    }

    #[test]
    fn missing_rewards_are_reported() {
        let mut f = worked_example();
        f.add_step(0, &[9], &[], Some(LeafReason::Truncated)).unwrap();
        let err = f.advantages(Estimator::Tree, true).unwrap_err();
        assert_eq!(
            err,
            TreeError::MissingReward {
                count: 1,
                first: vec![10]
            }
        );
    }

    #[test]
    fn estimators_parse_with_a_helpful_error() {
        assert_eq!(Estimator::parse("tree_intra").unwrap(), Estimator::TreeIntra);
        let msg = Estimator::parse("gae").unwrap_err().to_string();
        assert!(
            msg.contains("'tree', 'tree_intra', 'tree_inter', 'grpo'"),
            "{msg}"
        );
        for (name, e) in Estimator::TABLE {
            assert_eq!(e.as_str(), name);
        }
    }
}
