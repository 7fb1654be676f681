//! Tree-GRPO advantages (algorithm.md section 3), with the reference code's exact numerics.
//!
//! For kept leaf i of tree t in group x, with z_g(i) = (R_i - mean_g) / (std_g + 1e-6):
//!   A_inter(i) = z over the group's kept leaves, A_intra(i) = z over the tree's kept leaves,
//!   A(i) = A_inter(i) + A_intra(i).
//! std is the unbiased sample std; a singleton uses mean 0 and std 1; equal rewards give 0.

use crate::error::{parse_option, Result, TreeError};
use crate::forest::{Forest, NO_PARENT};

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
#[derive(Clone, Debug, PartialEq)]
pub struct AdvantageStats {
    pub estimator: Estimator,
    pub scale_std: bool,
    /// Kept leaves, ascending id.
    pub leaves: Vec<u32>,
    pub reward: Vec<f64>,
    pub a_inter: Vec<f64>,
    pub a_intra: Vec<f64>,
    pub advantage: Vec<f64>,
    /// Per node (indexed by node id): kept leaves below (a kept leaf counts itself).
    pub kept_below: Vec<u32>,
    /// Per node: mean reward of the kept leaves below (V(s)); NaN where there are none.
    pub value: Vec<f64>,
    /// Per node: summed advantage of the kept leaves below, the weight the loss puts on its tokens.
    pub advantage_sum: Vec<f64>,
}

impl AdvantageStats {
    /// The advantage of a kept leaf, if it has one.
    pub fn of_leaf(&self, leaf: u32) -> Option<f64> {
        self.leaves.binary_search(&leaf).ok().map(|i| self.advantage[i])
    }
}

/// The (mean, denominator) that turn a set's rewards into z-scores with the reference numerics,
/// or None when every reward is equal (each term is then exactly 0).
/// `rewards` is called twice (two passes: mean, then squared deviations).
fn normaliser<I: Iterator<Item = f64>>(rewards: impl Fn() -> I, scale_std: bool) -> Option<(f64, f64)> {
    let (mut n, mut sum) = (0usize, 0.0);
    let mut first = None;
    let mut all_equal = true;
    for r in rewards() {
        n += 1;
        sum += r;
        match first {
            None => first = Some(r),
            Some(f) => all_equal &= r == f,
        }
    }
    if n == 1 {
        // A one-member set: mean 0 and std 1, so the term is the raw reward.
        return Some((0.0, if scale_std { 1.0 + EPS } else { 1.0 }));
    }
    if n == 0 || all_equal {
        // std 0: exactly 0 (no rounding residue of the mean through the 1e-6 denominator).
        return None;
    }
    let mean = sum / n as f64;
    let denom = if scale_std {
        let var = rewards().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1) as f64;
        var.sqrt() + EPS
    } else {
        1.0
    };
    Some((mean, denom))
}

/// z-scores of `rewards` (a test helper over [`normaliser`]).
#[cfg(test)]
fn z_scores(rewards: &[f64], scale_std: bool, out: &mut Vec<f64>) {
    out.clear();
    let norm = normaliser(|| rewards.iter().copied(), scale_std);
    out.extend(
        rewards
            .iter()
            .map(|r| norm.map_or(0.0, |(mean, denom)| (r - mean) / denom)),
    );
}

impl Forest {
    /// Compute the advantages of every kept leaf and the per-node process statistics.
    /// Every kept leaf needs a reward. Trees without kept leaves contribute nothing.
    pub fn advantages(&mut self, estimator: Estimator, scale_std: bool) -> Result<&AdvantageStats> {
        let stats = self.compute_advantages(estimator, scale_std)?;
        Ok(self.stats.insert(stats))
    }

    fn compute_advantages(&self, estimator: Estimator, scale_std: bool) -> Result<AdvantageStats> {
        let n_nodes = self.nodes.len();
        let mut leaves = Vec::new();
        let mut missing = Vec::new();
        for (id, (leaf, &kept)) in self.leaf.iter().zip(&self.kept).enumerate() {
            if leaf.is_some() && kept {
                if self.reward[id].is_nan() {
                    missing.push(id as u32);
                }
                leaves.push(id as u32);
            }
        }
        if !missing.is_empty() {
            let count = missing.len();
            missing.truncate(5);
            return Err(TreeError::MissingReward {
                count,
                first: missing,
            });
        }
        let reward: Vec<f64> = leaves.iter().map(|&id| self.reward[id as usize]).collect();

        // Counting sort of the kept leaves by tree (stable: id order within a tree), so each
        // tree's leaves are one contiguous run `by_tree[tree_start[t]..tree_start[t + 1]]`.
        let n_trees = self.trees.len();
        let mut tree_start = vec![0usize; n_trees + 1];
        for &id in &leaves {
            tree_start[self.tree_of[id as usize] as usize + 1] += 1;
        }
        for t in 0..n_trees {
            tree_start[t + 1] += tree_start[t];
        }
        let mut fill = tree_start.clone();
        let mut by_tree = vec![0usize; leaves.len()];
        for (i, &id) in leaves.iter().enumerate() {
            let t = self.tree_of[id as usize] as usize;
            by_tree[fill[t]] = i;
            fill[t] += 1;
        }
        let run = |t: u32| &by_tree[tree_start[t as usize]..tree_start[t as usize + 1]];

        let mut a_inter = vec![0.0; leaves.len()];
        let mut a_intra = vec![0.0; leaves.len()];
        for group in &self.groups {
            for &t in &group.trees {
                if let Some((mean, denom)) = normaliser(|| run(t).iter().map(|&i| reward[i]), scale_std) {
                    for &i in run(t) {
                        a_intra[i] = (reward[i] - mean) / denom;
                    }
                }
            }
            let members = || group.trees.iter().flat_map(|&t| run(t).iter().copied());
            if let Some((mean, denom)) = normaliser(|| members().map(|i| reward[i]), scale_std) {
                for i in members() {
                    a_inter[i] = (reward[i] - mean) / denom;
                }
            }
        }
        let advantage: Vec<f64> = a_inter
            .iter()
            .zip(&a_intra)
            .map(|(&e, &a)| estimator.combine(e, a))
            .collect();

        // Bottom-up sweep: children have larger ids than their parents.
        let mut kept_below = vec![0u32; n_nodes];
        let mut reward_sum = vec![0.0f64; n_nodes];
        let mut advantage_sum = vec![0.0f64; n_nodes];
        for (i, &id) in leaves.iter().enumerate() {
            kept_below[id as usize] = 1;
            reward_sum[id as usize] = reward[i];
            advantage_sum[id as usize] = advantage[i];
        }
        for id in (0..n_nodes).rev() {
            let parent = self.parent[id];
            if parent != NO_PARENT {
                let p = parent as usize;
                kept_below[p] += kept_below[id];
                reward_sum[p] += reward_sum[id];
                advantage_sum[p] += advantage_sum[id];
            }
        }
        let value = reward_sum
            .iter()
            .zip(&kept_below)
            .map(|(&s, &k)| if k == 0 { f64::NAN } else { s / k as f64 })
            .collect();
        Ok(AdvantageStats {
            estimator,
            scale_std,
            leaves,
            reward,
            a_inter,
            a_intra,
            advantage,
            kept_below,
            value,
            advantage_sum,
        })
    }

    /// The last computed statistics, or an error naming the leaf that asked for them.
    pub fn stats_for(&self, leaf: u32) -> Result<f64> {
        self.stats
            .as_ref()
            .and_then(|s| s.of_leaf(leaf))
            .ok_or(TreeError::NoAdvantage { node: leaf })
    }

    pub fn last_stats(&self) -> Option<&AdvantageStats> {
        self.stats.as_ref()
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
        let mut f = worked_example();
        let s = f.advantages(Estimator::Tree, true).unwrap();
        let expect = [1.849, 1.849, -1.678, 0.054, -2.127, 0.054];
        for (a, e) in s.advantage.iter().zip(expect) {
            assert!((a - e).abs() < 5e-4, "{a} vs {e}");
        }
    }

    #[test]
    fn node_statistics_sum_over_kept_leaves() {
        let mut f = worked_example();
        let s = f.advantages(Estimator::Tree, true).unwrap().clone();
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
        assert!(f.last_stats().is_none());
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
