//! Node selection for expansion and K-leaf subsampling (algorithm.md section 2).

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_pcg::Pcg64;

use crate::error::{parse_option, Result, TreeError};
use crate::forest::{Forest, Tree, NO_PARENT};

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

/// How [`Forest::select_with`] weighs a tree's candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every candidate weighs 1 (the reference rule).
    Uniform,
    /// A step weighs the surprisal of its action tokens, `max(-mean log-prob, 0)` (0 where the
    /// forest holds no mean log-prob); a root the mean weight of its tree's steps that have
    /// one (0 if none). TreeRL/ARPO-style uncertainty-guided branching.
    Surprisal,
}

impl Policy {
    pub const VALID: &'static str = "'uniform', 'surprisal'";
    const TABLE: [(&'static str, Policy); 2] =
        [("uniform", Policy::Uniform), ("surprisal", Policy::Surprisal)];

    pub fn parse(name: &str) -> Result<Self> {
        parse_option("selection policy", name, &Self::TABLE, Self::VALID)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Uniform => "uniform",
            Policy::Surprisal => "surprisal",
        }
    }
}

/// The policy part of [`Forest::select_with`]: how candidates weigh, and what a tree without
/// a candidate gets.
#[derive(Clone, Copy, Debug)]
pub struct Selection {
    pub policy: Policy,
    /// Each candidate's weight is divided by `1 + penalty * expansions` (see
    /// [`Forest::select_weighted`]); 0 leaves the policy's weights as they are.
    pub overexpand_penalty: f64,
    /// A tree that got no draw (no candidate: its root excluded and no open step) is expanded
    /// from its root instead: `n` draws of it with replacement, one without. So every tree
    /// gets its draws, and a prompt its `1 + L*N` leaves per tree.
    pub root_fallback: bool,
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            policy: Policy::Uniform,
            overexpand_penalty: 0.0,
            root_fallback: false,
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

/// One 63-bit seed from several integers (e.g. a run's seed, a training step and a round),
/// stable across processes and platforms: a splitmix64-style fold. Callers that vary a seed
/// per step pass the parts, and the draws of a step come from this one derivation.
pub fn seed_from_parts(parts: &[u64]) -> u64 {
    let mut z: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        z = (z ^ p).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 31;
    }
    z >> 1
}

fn check_penalty(penalty: f64) -> Result<()> {
    if penalty.is_finite() && penalty >= 0.0 {
        Ok(())
    } else {
        Err(TreeError::InvalidArgument(format!(
            "overexpand penalty {penalty} is not a finite number >= 0"
        )))
    }
}

fn check_weights(weights: &[f64]) -> Result<()> {
    match weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
    {
        Some((node, w)) => Err(TreeError::InvalidArgument(format!(
            "weight {w} of node {node} is not a finite number >= 0"
        ))),
        None => Ok(()),
    }
}

/// Reused buffers of the weighted draws.
#[derive(Default)]
struct Scratch {
    cands: Vec<u32>,
    cum: Vec<f64>,
    expansions: Vec<u32>,
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
        self.draw(n, seed, None, 0.0, opts, false)
    }

    /// Draw `n` nodes to expand in every tree under a policy ([`Selection`]): the one entry
    /// point of the rollout. The uniform policy without a penalty draws as [`Forest::select`];
    /// any other as [`Forest::select_weighted`] with the policy's weights, each tree from its
    /// own generator (seed, tree). With `root_fallback`, a tree without a draw gets its root.
    /// Errors (nothing drawn) on a penalty that is not a finite number >= 0, and under the
    /// surprisal policy on a step whose surprisal is infinite.
    pub fn select_with(&self, n: usize, seed: u64, opts: SelectOptions, how: Selection) -> Result<Vec<u32>> {
        check_penalty(how.overexpand_penalty)?;
        let weights = match how.policy {
            Policy::Uniform if how.overexpand_penalty == 0.0 => None,
            Policy::Uniform => Some(vec![1.0; self.nodes.len()]),
            Policy::Surprisal => {
                let w = self.surprisal_weights();
                check_weights(&w)?;
                Some(w)
            }
        };
        Ok(self.draw(
            n,
            seed,
            weights.as_deref(),
            how.overexpand_penalty,
            opts,
            how.root_fallback,
        ))
    }

    /// The surprisal policy's weight of every node (see [`Policy::Surprisal`]). A root's mean
    /// sums its tree's step weights in id order, leaves included.
    pub fn surprisal_weights(&self) -> Vec<f64> {
        let mut weights = vec![0.0; self.nodes.len()];
        let mut sum = vec![0.0f64; self.trees.len()];
        let mut count = vec![0u32; self.trees.len()];
        for (id, &m) in self.mean_log_prob.iter().enumerate() {
            if self.parent[id] == NO_PARENT || m.is_nan() {
                continue;
            }
            // max(-m, 0), keeping -m when it is not below 0 (so -0.0 stays -0.0)
            let w = if 0.0 > -m { 0.0 } else { -m };
            weights[id] = w;
            let t = self.tree_of[id] as usize;
            sum[t] += w;
            count[t] += 1;
        }
        for (t, tree) in self.trees.iter().enumerate() {
            weights[tree.root as usize] = if count[t] > 0 {
                sum[t] / f64::from(count[t])
            } else {
                0.0
            };
        }
        weights
    }

    /// Like [`Forest::select`], but each candidate is drawn with probability proportional to
    /// `weights[node]` (one finite, non-negative weight per node of the forest) divided by
    /// `1 + penalty * expansions`, where a candidate's expansions are its children but the
    /// first (a root's initial chain, a step's own continuation: branches earlier draws made)
    /// plus the draws it already got in this call. So the penalty acts within a round, as the
    /// draws are made: with replacement a node drawn once weighs less for the tree's next draw.
    /// A tree whose candidates all weigh 0 falls back to uniform draws. Uncertainty-guided
    /// rules (e.g. surprisal of a step's action tokens) set the weights; `penalty = 0` leaves
    /// them as given.
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
        check_weights(weights)?;
        check_penalty(penalty)?;
        Ok(self.draw(n, seed, Some(weights), penalty, opts, false))
    }

    /// Every tree's draws, tree by tree: uniform (`weights = None`) or weighted.
    #[inline]
    fn draw(
        &self,
        n: usize,
        seed: u64,
        weights: Option<&[f64]>,
        penalty: f64,
        opts: SelectOptions,
        root_fallback: bool,
    ) -> Vec<u32> {
        let mut picks = Vec::with_capacity(n * self.trees.len());
        if n == 0 {
            return picks;
        }
        let mut scratch = Scratch::default();
        for (t, tree) in self.trees.iter().enumerate() {
            let before = picks.len();
            let mut rng = rng_for(seed, t as u64);
            match weights {
                None => draw_uniform(tree, n, &mut rng, opts, &mut picks),
                Some(w) => self.draw_weighted(
                    t as u32,
                    n,
                    (w, penalty),
                    &mut rng,
                    opts,
                    &mut scratch,
                    &mut picks,
                ),
            }
            if root_fallback && picks.len() == before {
                let k = if opts.replace { n } else { 1 };
                picks.extend(std::iter::repeat_n(tree.root, k));
            }
        }
        picks
    }

    #[allow(clippy::too_many_arguments)]
    fn draw_weighted(
        &self,
        t: u32,
        n: usize,
        (weights, penalty): (&[f64], f64),
        rng: &mut Pcg64,
        opts: SelectOptions,
        scratch: &mut Scratch,
        picks: &mut Vec<u32>,
    ) {
        use rand::RngExt;
        let Scratch {
            cands,
            cum,
            expansions,
        } = scratch;
        self.candidates_into(t, opts.include_root, cands);
        expansions.clear();
        expansions.extend(
            cands
                .iter()
                .map(|&c| self.nodes[c as usize].num_children.saturating_sub(1)),
        );
        let draws = if opts.replace { n } else { n.min(cands.len()) };
        for _ in 0..draws {
            if cands.is_empty() {
                break;
            }
            cum.clear();
            let mut total = 0.0;
            for (&c, &e) in cands.iter().zip(expansions.iter()) {
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
        self.changed();
        Ok(())
    }
}

/// One tree's uniform draws. Candidate i is the root (i = 0, if included), else
/// `open[i - first_open]`: no candidate list is built.
#[inline]
fn draw_uniform(tree: &Tree, n: usize, rng: &mut Pcg64, opts: SelectOptions, picks: &mut Vec<u32>) {
    let first_open = usize::from(opts.include_root);
    let len = first_open + tree.open.len();
    if len == 0 {
        return;
    }
    let candidate = |i: usize| {
        if i < first_open {
            tree.root
        } else {
            tree.open[i - first_open]
        }
    };
    if opts.replace {
        use rand::RngExt;
        picks.extend((0..n).map(|_| candidate(rng.random_range(0..len))));
    } else {
        let k = n.min(len);
        let mut idx = sample(rng, len, k).into_vec();
        idx.sort_unstable();
        picks.extend(idx.into_iter().map(candidate));
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
    fn seeds_from_parts_are_the_documented_fold() {
        // values of the fold computed independently (tests/reference.py's mix_seed)
        assert_eq!(seed_from_parts(&[]), 5_700_357_409_661_599_242);
        assert_eq!(seed_from_parts(&[0]), 7_726_497_881_224_850_386);
        assert_eq!(seed_from_parts(&[0, 0, 0]), 8_746_761_136_649_461_090);
        assert_eq!(seed_from_parts(&[1, 2, 3]), 8_682_444_779_101_918_068);
        assert_eq!(seed_from_parts(&[7, 0, 1_000_003]), 5_638_476_862_219_625_988);
        assert_eq!(seed_from_parts(&[u64::MAX]), 3_826_321_799_129_986_499);
        assert!(seed_from_parts(&[u64::MAX, 5, 1]) < 1 << 63);
    }

    /// Two trees: tree 0 is `small()` (root 0 -> a 1 -> b 2, leaf) plus a leaf c under the
    /// root; tree 1 (root 4) has one answer at once (leaf 5): no open step.
    fn two_trees() -> (Forest, [u32; 2]) {
        let (mut f, root, _, _) = small();
        f.add_scored_step(root as u64, &[9], &[], Some(LeafReason::Answer), -0.5)
            .unwrap();
        let lone = f.add_root(8, &[1]).unwrap();
        f.add_scored_step(lone as u64, &[2], &[], Some(LeafReason::Answer), -2.0)
            .unwrap();
        (f, [root, lone])
    }

    #[test]
    fn select_with_the_uniform_policy_draws_as_select_and_select_weighted() {
        let (f, _) = two_trees();
        let no_root = SelectOptions {
            replace: true,
            include_root: false,
        };
        for opts in [SelectOptions::default(), no_root] {
            for seed in 0..20 {
                let plain = f.select_with(3, seed, opts, Selection::default()).unwrap();
                assert_eq!(plain, f.select(3, seed, opts));
                let how = Selection {
                    overexpand_penalty: 0.5,
                    ..Selection::default()
                };
                let ones = vec![1.0; f.nodes.len()];
                assert_eq!(
                    f.select_with(3, seed, opts, how).unwrap(),
                    f.select_weighted(3, seed, &ones, 0.5, opts).unwrap()
                );
            }
        }
    }

    #[test]
    fn surprisal_weights_steps_by_their_mean_log_prob_and_roots_by_their_trees_mean() {
        let (mut f, [root, lone]) = two_trees();
        // tree 0: a (1) and b (2) have no mean log-prob (weight 0), c (3) weighs 0.5
        let w = f.surprisal_weights();
        assert_eq!(w, vec![0.5, 0.0, 0.0, 0.5, 2.0, 2.0]);
        f.mean_log_prob[1] = 0.25; // a positive mean (rounding in an engine): weight 0
        f.mean_log_prob[2] = -1.5;
        let w = f.surprisal_weights();
        assert_eq!(w[1], 0.0);
        assert_eq!(w[root as usize], (0.0 + 1.5 + 0.5) / 3.0);
        assert_eq!(w[lone as usize], 2.0);
        let how = Selection {
            policy: Policy::Surprisal,
            overexpand_penalty: 0.3,
            root_fallback: false,
        };
        for seed in 0..20 {
            assert_eq!(
                f.select_with(4, seed, SelectOptions::default(), how).unwrap(),
                f.select_weighted(4, seed, &w, 0.3, SelectOptions::default())
                    .unwrap()
            );
        }
        f.mean_log_prob[3] = f64::NEG_INFINITY;
        let err = f.select_with(1, 0, SelectOptions::default(), how).unwrap_err();
        assert!(err.to_string().contains("weight inf of node 0"), "{err}");
        let bad = Selection {
            overexpand_penalty: -1.0,
            ..Selection::default()
        };
        assert!(f.select_with(1, 0, SelectOptions::default(), bad).is_err());
    }

    #[test]
    fn root_fallback_gives_a_tree_without_a_candidate_its_root() {
        let (f, [_, lone]) = two_trees();
        let a = 1;
        let fallback = Selection {
            root_fallback: true,
            ..Selection::default()
        };
        for (replace, expect) in [(true, vec![a, a, a, lone, lone, lone]), (false, vec![a, lone])] {
            let opts = SelectOptions {
                replace,
                include_root: false,
            };
            assert_eq!(f.select_with(3, 1, opts, fallback).unwrap(), expect);
            let surprisal = Selection {
                policy: Policy::Surprisal,
                ..fallback
            };
            assert_eq!(f.select_with(3, 1, opts, surprisal).unwrap(), expect);
            // without the fallback, the lone tree gets nothing
            assert_eq!(f.select(3, 1, opts), expect[..expect.len() / 2].to_vec());
        }
        // with the root included every tree has a candidate: the fallback changes nothing
        let with_root = f.select_with(3, 1, SelectOptions::default(), fallback).unwrap();
        assert_eq!(with_root, f.select(3, 1, SelectOptions::default()));
        assert!(f
            .select_with(0, 1, SelectOptions::default(), fallback)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn policies_parse_with_their_valid_values_in_the_error() {
        assert_eq!(Policy::parse("surprisal").unwrap(), Policy::Surprisal);
        let msg = Policy::parse("greedy").unwrap_err().to_string();
        assert!(msg.contains("'uniform', 'surprisal'"), "{msg}");
        for (name, p) in Policy::TABLE {
            assert_eq!(p.as_str(), name);
        }
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
