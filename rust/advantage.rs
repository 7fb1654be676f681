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

/// z-scores of `rewards` with the reference numerics.
fn z_scores(rewards: &[f64], scale_std: bool, out: &mut Vec<f64>) {
    out.clear();
    let n = rewards.len();
    if n == 1 {
        // A one-member group: mean 0, std 1, so the term is the raw reward.
        let denom = if scale_std { 1.0 + EPS } else { 1.0 };
        out.push(rewards[0] / denom);
        return;
    }
    if n == 0 {
        return;
    }
    if rewards.iter().all(|&r| r == rewards[0]) {
        // std 0: every member's term is exactly 0 (no rounding residue from the mean).
        out.resize(n, 0.0);
        return;
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    let denom = if scale_std {
        let var = rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1) as f64;
        var.sqrt() + EPS
    } else {
        1.0
    };
    out.extend(rewards.iter().map(|r| (r - mean) / denom));
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
        // position of each kept leaf in the output, by node id
        let mut leaves = Vec::new();
        let mut missing = Vec::new();
        for (id, node) in self.nodes.iter().enumerate() {
            if node.leaf.is_some() && node.kept {
                if node.reward.is_none() {
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
        let reward: Vec<f64> = leaves
            .iter()
            .map(|&id| self.nodes[id as usize].reward.unwrap_or(0.0))
            .collect();
        let mut slot = vec![u32::MAX; n_nodes];
        for (i, &id) in leaves.iter().enumerate() {
            slot[id as usize] = i as u32;
        }

        let mut a_inter = vec![0.0; leaves.len()];
        let mut a_intra = vec![0.0; leaves.len()];
        let (mut rs, mut zs, mut members) = (Vec::new(), Vec::new(), Vec::new());
        let scatter = |members: &[usize], rs: &mut Vec<f64>, zs: &mut Vec<f64>, out: &mut [f64]| {
            rs.clear();
            rs.extend(members.iter().map(|&i| reward[i]));
            z_scores(rs, scale_std, zs);
            for (&i, &z) in members.iter().zip(zs.iter()) {
                out[i] = z;
            }
        };
        for group in &self.groups {
            let mut group_members = Vec::new();
            for &t in &group.trees {
                members.clear();
                for &id in &self.trees[t as usize].nodes {
                    let s = slot[id as usize];
                    if s != u32::MAX {
                        members.push(s as usize);
                    }
                }
                scatter(&members, &mut rs, &mut zs, &mut a_intra);
                group_members.extend_from_slice(&members);
            }
            scatter(&group_members, &mut rs, &mut zs, &mut a_inter);
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
            let parent = self.nodes[id].parent;
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
