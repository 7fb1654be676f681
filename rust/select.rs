//! Node selection for expansion and K-leaf subsampling (algorithm.md section 2).

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_pcg::Pcg64;

use crate::error::{Result, TreeError};
use crate::forest::Forest;

/// Options of `Forest::select`.
#[derive(Clone, Copy, Debug)]
pub struct SelectOptions {
    /// Draw with replacement (the reference rule): a node drawn twice gets two sibling branches.
    pub replace: bool,
    /// The root is a candidate (drawing it starts a fresh chain in the same tree).
    pub include_root: bool,
}

impl Default for SelectOptions {
    fn default() -> Self {
        Self {
            replace: true,
            include_root: true,
        }
    }
}

/// A seeded generator per (seed, stream), so one tree's draws do not depend on the others'.
pub(crate) fn rng_for(seed: u64, stream: u64) -> Pcg64 {
    // splitmix64 finaliser decorrelates nearby (seed, stream) pairs.
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    Pcg64::seed_from_u64(z ^ (z >> 31))
}

impl Forest {
    /// The candidates for expansion in one tree: the root (if included) and every open node, in id order.
    pub fn candidates(&self, tree: u32, include_root: bool) -> Vec<u32> {
        let mut out = Vec::new();
        self.candidates_into(tree, include_root, &mut out);
        out
    }

    fn candidates_into(&self, tree: u32, include_root: bool, out: &mut Vec<u32>) {
        let t = &self.trees[tree as usize];
        out.clear();
        if include_root {
            out.push(t.root);
        }
        out.extend_from_slice(&t.open);
    }

    /// Draw `n` nodes to expand in every tree, uniformly from its candidates.
    ///
    /// Returns the draws tree by tree (tree 0's first). With replacement each tree gives exactly
    /// `n` (if it has any candidate); without, `min(n, candidates)` distinct nodes. Deterministic
    /// for a seed, and tree t's draws depend only on (seed, t) and its own nodes.
    pub fn select(&self, n: usize, seed: u64, opts: SelectOptions) -> Vec<u32> {
        let mut picks = Vec::with_capacity(n * self.trees.len());
        if n == 0 {
            return picks;
        }
        for (t, tree) in self.trees.iter().enumerate() {
            // Candidate i is the root (i = 0, if included), else open[i - first_open]: no
            // candidate list is built.
            let first_open = usize::from(opts.include_root);
            let len = first_open + tree.open.len();
            if len == 0 {
                continue;
            }
            let candidate = |i: usize| {
                if i < first_open {
                    tree.root
                } else {
                    tree.open[i - first_open]
                }
            };
            let mut rng = rng_for(seed, t as u64);
            if opts.replace {
                use rand::RngExt;
                picks.extend((0..n).map(|_| candidate(rng.random_range(0..len))));
            } else {
                let k = n.min(len);
                let mut idx = sample(&mut rng, len, k).into_vec();
                idx.sort_unstable();
                picks.extend(idx.into_iter().map(candidate));
            }
        }
        picks
    }

    /// Like [`Forest::select`], but each candidate is drawn with probability proportional to
    /// `weights[node]` (one finite, non-negative weight per node of the forest) divided by
    /// `1 + penalty * expansions`, where a candidate's expansions are its children but the
    /// first (a root's initial chain, a step's own continuation: branches earlier draws made)
    /// plus the draws it already got in this call. So the penalty acts within a round, as the
    /// draws are made: with replacement a node drawn once weighs less for the tree's next draw. A tree whose candidates all
    /// weigh 0 falls back to uniform draws. Uncertainty-guided rules (e.g. surprisal of a
    /// step's action tokens) set the weights; `penalty = 0` leaves them as given.
    pub fn select_weighted(
        &self,
        n: usize,
        seed: u64,
        weights: &[f64],
        penalty: f64,
        opts: SelectOptions,
    ) -> Result<Vec<u32>> {
        if weights.len() != self.nodes.len() {
            return Err(TreeError::InvalidArgument(format!(
                "select_weighted got {} weights for {} nodes: pass one weight per node",
                weights.len(),
                self.nodes.len()
            )));
        }
        if let Some((node, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
        {
            return Err(TreeError::InvalidArgument(format!(
                "weight {w} of node {node} is not a finite number >= 0"
            )));
        }
        if !(penalty.is_finite() && penalty >= 0.0) {
            return Err(TreeError::InvalidArgument(format!(
                "overexpand penalty {penalty} is not a finite number >= 0"
            )));
        }
        use rand::RngExt;
        let mut picks = Vec::with_capacity(n * self.trees.len());
        let (mut cands, mut cum, mut expansions) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..self.trees.len() as u32 {
            self.candidates_into(t, opts.include_root, &mut cands);
            expansions.clear();
            expansions.extend(
                cands
                    .iter()
                    .map(|&c| self.nodes[c as usize].num_children.saturating_sub(1)),
            );
            let mut rng = rng_for(seed, t as u64);
            let draws = if opts.replace { n } else { n.min(cands.len()) };
            for _ in 0..draws {
                if cands.is_empty() {
                    break;
                }
                cum.clear();
                let mut total = 0.0;
                for (&c, &e) in cands.iter().zip(&expansions) {
                    total += weights[c as usize] / (1.0 + penalty * f64::from(e));
                    cum.push(total);
                }
                let i = if total > 0.0 {
                    let x = rng.random::<f64>() * total;
                    cum.partition_point(|&c| c <= x).min(cands.len() - 1)
                } else {
                    rng.random_range(0..cands.len())
                };
                picks.push(cands[i]);
                if opts.replace {
                    expansions[i] += 1;
                } else {
                    cands.remove(i);
                    expansions.remove(i);
                }
            }
        }
        Ok(picks)
    }

    /// Leaves of one tree, in id order.
    pub fn tree_leaves(&self, tree: u32) -> impl Iterator<Item = u32> + '_ {
        self.trees[tree as usize].leaves.iter().copied()
    }

    /// Keep a random subset of `k` leaves in every tree (seeded); the others are dropped from training.
    /// Every tree must have at least `k` leaves; nothing changes otherwise.
    pub fn keep_leaves(&mut self, k: usize, seed: u64) -> Result<()> {
        for (t, tree) in self.trees.iter().enumerate() {
            let leaves = &tree.leaves;
            if leaves.len() < k {
                return Err(TreeError::KTooLarge {
                    k,
                    tree: t as u32,
                    leaves: leaves.len(),
                });
            }
        }
        for (t, tree) in self.trees.iter().enumerate() {
            let leaves = &tree.leaves;
            let mut rng = rng_for(seed, t as u64);
            for &leaf in leaves {
                self.kept[leaf as usize] = false;
            }
            for i in sample(&mut rng, leaves.len(), k) {
                self.kept[leaves[i] as usize] = true;
            }
        }
        self.stats = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forest::tests::small;
    use crate::forest::LeafReason;

    #[test]
    fn selection_never_draws_leaves_and_is_seeded() {
        let (mut f, root, a, _) = small();
        let c = f
            .add_step(root as u64, &[9], &[], Some(LeafReason::Truncated))
            .unwrap();
        let picks = f.select(1000, 3, SelectOptions::default());
        assert_eq!(picks.len(), 1000);
        assert!(picks.iter().all(|&p| p == root || p == a));
        assert!(!picks.contains(&c));
        assert_eq!(picks, f.select(1000, 3, SelectOptions::default()));
        assert_ne!(picks, f.select(1000, 4, SelectOptions::default()));
        let no_root = f.select(
            5,
            0,
            SelectOptions {
                replace: true,
                include_root: false,
            },
        );
        assert_eq!(no_root, vec![a; 5]);
        let distinct = f.select(
            5,
            0,
            SelectOptions {
                replace: false,
                include_root: true,
            },
        );
        assert_eq!(distinct, vec![root, a]);
    }

    #[test]
    fn weighted_selection_follows_the_weights() {
        let (f, root, a, _) = small();
        let mut w = vec![0.0; f.nodes.len()];
        w[a as usize] = 3.0;
        w[root as usize] = 1.0;
        let picks = f
            .select_weighted(40_000, 5, &w, 0.0, SelectOptions::default())
            .unwrap();
        let share = picks.iter().filter(|&&p| p == a).count() as f64 / picks.len() as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
        let zero = vec![0.0; f.nodes.len()];
        let uniform = f
            .select_weighted(40_000, 5, &zero, 0.0, SelectOptions::default())
            .unwrap();
        let share = uniform.iter().filter(|&&p| p == a).count() as f64 / uniform.len() as f64;
        assert!((share - 0.5).abs() < 0.01, "{share}");
        let distinct = f
            .select_weighted(
                5,
                0,
                &w,
                0.0,
                SelectOptions {
                    replace: false,
                    include_root: true,
                },
            )
            .unwrap();
        assert_eq!(distinct.len(), 2);
        assert!(f
            .select_weighted(1, 0, &w[..1], 0.0, SelectOptions::default())
            .is_err());
        assert!(f
            .select_weighted(1, 0, &w, -1.0, SelectOptions::default())
            .is_err());
        w[0] = f64::NAN;
        assert!(f
            .select_weighted(1, 0, &w, 0.0, SelectOptions::default())
            .is_err());
    }

    #[test]
    fn overexpand_penalty_acts_on_the_draws_of_one_call() {
        // a chain root -> a -> b (leaf): root and a each have their one continuation, no
        // expansion yet; equal weights
        let (f, root, a, _) = small();
        let mut w = vec![0.0; f.nodes.len()];
        w[a as usize] = 1.0;
        w[root as usize] = 1.0;
        let opts = SelectOptions::default();
        let (mut repeats_free, mut repeats_penalised) = (0, 0);
        for seed in 0..200 {
            let free = f.select_weighted(2, seed, &w, 0.0, opts).unwrap();
            repeats_free += usize::from(free[0] == free[1]);
            let penalised = f.select_weighted(2, seed, &w, 1e9, opts).unwrap();
            repeats_penalised += usize::from(penalised[0] == penalised[1]);
            // the first draw of a call sees no earlier draw: the same for any penalty
            assert_eq!(free[0], penalised[0]);
        }
        assert!(repeats_free > 60, "{repeats_free}"); // ~ half of 200
        assert_eq!(repeats_penalised, 0); // once drawn, a node weighs ~0 for the next draw
                                          // penalty 1: a node's weight halves after its first draw, so the second draw repeats
                                          // it with probability (1/2) / (1/2 + 1) = 1/3
        let draws: Vec<Vec<u32>> = (0..30_000)
            .map(|s| f.select_weighted(2, s, &w, 1.0, opts).unwrap())
            .collect();
        let again = draws.iter().filter(|d| d[0] == d[1]).count() as f64 / draws.len() as f64;
        assert!((again - 1.0 / 3.0).abs() < 0.02, "{again}");
    }

    #[test]
    fn overexpand_penalty_counts_the_children_after_the_first() {
        // root has its chain (a -> b) and one more branch (c, a leaf): one expansion; a none
        let (mut f, root, a, _) = small();
        f.add_step(root as u64, &[9], &[], Some(LeafReason::Answer))
            .unwrap();
        let mut w = vec![0.0; f.nodes.len()];
        w[a as usize] = 1.0;
        w[root as usize] = 1.0;
        let firsts: Vec<u32> = (0..30_000)
            .map(|s| {
                f.select_weighted(1, s, &w, 1.0, SelectOptions::default())
                    .unwrap()[0]
            })
            .collect();
        let share = firsts.iter().filter(|&&p| p == root).count() as f64 / firsts.len() as f64;
        assert!((share - 1.0 / 3.0).abs() < 0.02, "{share}"); // 1/2 against 1
    }

    #[test]
    fn keep_leaves_checks_k_before_changing() {
        let (mut f, root, _, b) = small();
        let c = f
            .add_step(root as u64, &[9], &[], Some(LeafReason::Answer))
            .unwrap();
        assert!(matches!(
            f.keep_leaves(3, 0),
            Err(TreeError::KTooLarge {
                k: 3,
                tree: 0,
                leaves: 2
            })
        ));
        assert!(f.kept[b as usize] && f.kept[c as usize]);
        f.keep_leaves(1, 0).unwrap();
        assert_eq!(f.kept[b as usize] as u8 + f.kept[c as usize] as u8, 1);
    }
}
