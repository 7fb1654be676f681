//! `treegrpo.Forest`: the Python face of `crate::forest::Forest`.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;

use super::error::{enter, IntoPyResult};
use super::pack::PyPack;
use super::seed::Seed;
use super::table::PyTable;
use super::tokens::Tokens;
use crate::advantage::{AdvantageStats, Estimator};
use crate::error::TreeError;
use crate::forest::{Forest, LeafReason};

/// The most draws one `select` call may make (4 bytes each): beyond it the pick list alone
/// would take gigabytes, and the allocation would abort the process instead of raising.
const MAX_DRAWS: usize = 1 << 28;

fn check_draws(n: usize, trees: usize) -> Result<(), TreeError> {
    match n.checked_mul(trees) {
        Some(total) if total <= MAX_DRAWS => Ok(()),
        _ => Err(TreeError::InvalidArgument(format!(
            "select: {n} draws per tree x {trees} trees is more than {MAX_DRAWS} draws in one call; \
             draw fewer nodes per tree"
        ))),
    }
}
use crate::pack::AggMode;
use crate::select::{Policy, SelectOptions, Selection};

type Arrays<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<bool>>);
type TokenArrays<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<bool>>);
type WithAdvantages<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<f32>>,
);

/// A rollout forest: groups (prompts) of trees whose nodes are whole agent steps.
#[pyclass(name = "Forest", module = "treegrpo", frozen)]
pub struct PyForest {
    inner: Mutex<Held>,
}

/// The forest and the result of its last `advantages()` call, which `pack`, `nodes` and
/// `trajectory` read while it is current (no change to the forest since: the core checks the
/// generation it was computed at).
#[derive(Default)]
struct Held {
    forest: Forest,
    stats: Option<AdvantageStats>,
}

impl Deref for Held {
    type Target = Forest;
    fn deref(&self) -> &Forest {
        &self.forest
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Forest {
        &mut self.forest
    }
}

impl PyForest {
    /// Lock for a short operation. The lock is only ever held by code that does not call
    /// back into Python, so holding the GIL while waiting for it cannot deadlock.
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn arrays(py: Python<'_>, tokens: Vec<u32>, mask: Vec<u8>) -> Arrays<'_> {
    let ids: Vec<i64> = tokens.into_iter().map(i64::from).collect();
    let mask: Vec<bool> = mask.into_iter().map(|m| m != 0).collect();
    (ids.into_pyarray(py), mask.into_pyarray(py))
}

/// Node ids come in as i64 so that a negative id is an unknown node, not an OverflowError.
fn node_id(forest: &Forest, id: i64) -> PyResult<u64> {
    u64::try_from(id)
        .map_err(|_| TreeError::UnknownNode {
            node: id,
            len: forest.nodes.len(),
        })
        .py()
}

fn table(batch: Result<arrow_array::RecordBatch, arrow_schema::ArrowError>) -> PyResult<PyTable> {
    batch
        .map(PyTable::new)
        .map_err(|e| super::error::to_pyerr(TreeError::InvalidArgument(format!("Arrow export failed: {e}"))))
}

#[pymethods]
impl PyForest {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(Held::default()),
        }
    }

    /// Add a tree for `group` (one id per question) whose root holds the prompt tokens.
    fn add_root(&self, group: i64, prompt: Tokens) -> PyResult<u32> {
        self.lock().add_root(group, &prompt.0).py()
    }

    /// Add one agent step (action tokens, then observation tokens) under `parent`.
    /// `leaf=True` ends the episode with reason "answer"; `reason` names another ending.
    /// `mean_log_prob`: the mean log-probability of the action tokens (None or NaN = unknown),
    /// which the surprisal selection policy weighs the step by.
    #[pyo3(signature = (parent, action, observation=None, *, leaf=false, reason=None, mean_log_prob=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_step(
        &self,
        parent: i64,
        action: Tokens,
        observation: Option<Tokens>,
        leaf: bool,
        reason: Option<&str>,
        mean_log_prob: Option<f64>,
    ) -> PyResult<u32> {
        let leaf = match reason {
            Some(name) => Some(LeafReason::parse(name).py()?),
            None => leaf.then_some(LeafReason::Answer),
        };
        let observation = observation.map(|t| t.0).unwrap_or_default();
        let mut f = self.lock();
        let parent = node_id(&f, parent)?;
        let mean_log_prob = mean_log_prob.unwrap_or(f64::NAN);
        f.add_scored_step(parent, &action.0, &observation, leaf, mean_log_prob)
            .py()
    }

    /// Set the outcome reward of one leaf.
    fn set_reward(&self, leaf: i64, reward: f64) -> PyResult<()> {
        let mut f = self.lock();
        let leaf = node_id(&f, leaf)?;
        f.set_rewards(&[leaf], &[reward]).py()
    }

    /// Set the rewards of many leaves; nothing is written if any is invalid.
    fn set_rewards(&self, leaves: Vec<i64>, rewards: Vec<f64>) -> PyResult<()> {
        let mut f = self.lock();
        let leaves = leaves
            .into_iter()
            .map(|id| node_id(&f, id))
            .collect::<PyResult<Vec<u64>>>()?;
        f.set_rewards(&leaves, &rewards).py()
    }

    /// Draw `n` nodes to expand per tree, tree by tree, under a selection policy
    /// (`"uniform"` or `"surprisal"`), each candidate's weight divided by
    /// 1 + `overexpand_penalty` x its expansions; `root_fallback`: a tree without a candidate
    /// is expanded from its root. `seed`: an int, or a sequence of ints mixed into one.
    #[pyo3(
        signature = (n, *, seed=Seed(0), replace=true, include_root=true, policy="uniform", overexpand_penalty=0.0, root_fallback=false),
        text_signature = "($self, n, *, seed=0, replace=True, include_root=True, policy='uniform', overexpand_penalty=0.0, root_fallback=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        py: Python<'_>,
        n: usize,
        seed: Seed,
        replace: bool,
        include_root: bool,
        policy: &str,
        overexpand_penalty: f64,
        root_fallback: bool,
    ) -> PyResult<Vec<u32>> {
        let opts = SelectOptions {
            replace,
            include_root,
        };
        let how = Selection {
            policy: Policy::parse(policy).py()?,
            overexpand_penalty,
            root_fallback,
        };
        enter(py, || {
            let f = self.lock();
            check_draws(n, f.trees.len())?;
            f.select_with(n, seed.0, opts, how)
        })
    }

    /// Draw `n` nodes per tree with probability proportional to `weights` (one per node),
    /// each divided by 1 + `overexpand_penalty` x the node's expansions so far (its children
    /// but the first, plus its draws earlier in this call).
    #[pyo3(
        signature = (n, weights, *, seed=Seed(0), replace=true, include_root=true, overexpand_penalty=0.0),
        text_signature = "($self, n, weights, *, seed=0, replace=True, include_root=True, overexpand_penalty=0.0)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn select_weighted(
        &self,
        py: Python<'_>,
        n: usize,
        weights: Vec<f64>,
        seed: Seed,
        replace: bool,
        include_root: bool,
        overexpand_penalty: f64,
    ) -> PyResult<Vec<u32>> {
        let opts = SelectOptions {
            replace,
            include_root,
        };
        enter(py, || {
            let f = self.lock();
            check_draws(n, f.trees.len())?;
            f.select_weighted(n, seed.0, &weights, overexpand_penalty, opts)
        })
    }

    /// Keep a seeded random subset of `k` leaves in every tree.
    #[pyo3(signature = (k, *, seed=Seed(0)), text_signature = "($self, k, *, seed=0)")]
    fn keep_leaves(&self, py: Python<'_>, k: usize, seed: Seed) -> PyResult<()> {
        enter(py, || self.lock().keep_leaves(k, seed.0))
    }

    /// Compute Tree-GRPO advantages of every kept leaf; returns one row per kept leaf.
    #[pyo3(signature = (estimator="tree", *, scale_std=true))]
    fn advantages(&self, py: Python<'_>, estimator: &str, scale_std: bool) -> PyResult<PyTable> {
        let estimator = Estimator::parse(estimator).py()?;
        let batch = enter(py, || {
            let mut f = self.lock();
            let stats = f.advantages(estimator, scale_std)?;
            let f = &mut *f;
            let batch = f.forest.advantages_batch(Some(&stats));
            f.stats = Some(stats);
            Ok(batch)
        })?;
        table(batch)
    }

    /// Both learner layouts (flat and tree-packed) of the kept trajectories, or of `leaves`.
    /// Needs `advantages()` first; `loss_agg_mode` sets the packed loss weights.
    #[pyo3(signature = (*, leaves=None, loss_agg_mode="token-mean", pad_id=0))]
    fn pack(
        &self,
        py: Python<'_>,
        leaves: Option<Vec<i64>>,
        loss_agg_mode: &str,
        pad_id: u32,
    ) -> PyResult<PyPack> {
        let agg = AggMode::parse(loss_agg_mode).py()?;
        let name = agg.as_str();
        let pack = {
            let leaves = match leaves {
                Some(ids) => {
                    let f = self.lock();
                    Some(
                        ids.into_iter()
                            .map(|id| node_id(&f, id))
                            .collect::<PyResult<Vec<u64>>>()?,
                    )
                }
                None => None,
            };
            enter(py, || {
                let f = self.lock();
                f.pack(f.stats.as_ref(), leaves.as_deref(), agg, pad_id)
            })?
        };
        PyPack::new(py, pack, name)
    }

    /// One row per node, with the statistics of the last `advantages` call.
    fn nodes(&self, py: Python<'_>) -> PyResult<PyTable> {
        table(enter(py, || {
            let f = self.lock();
            Ok(f.nodes_batch(f.stats.as_ref()))
        })?)
    }

    /// One row per leaf, kept or not.
    fn leaves(&self, py: Python<'_>) -> PyResult<PyTable> {
        table(enter(py, || Ok(self.lock().leaves_batch()))?)
    }

    /// Token ids (uint32, like `Pack`'s) of prompt + every step through `node`, and the loss
    /// mask (True on action tokens).
    fn tokens<'py>(&self, py: Python<'py>, node: i64) -> PyResult<TokenArrays<'py>> {
        let (tokens, mask) = {
            let f = self.lock();
            f.trajectory(node_id(&f, node)?).py()?
        };
        let mask: Vec<bool> = mask.into_iter().map(|m| m != 0).collect();
        Ok((tokens.into_pyarray(py), mask.into_pyarray(py)))
    }

    /// The context to continue `node` from, as a list of token ids: the prompt and every
    /// step through the node's observation.
    fn context(&self, py: Python<'_>, node: i64) -> PyResult<Vec<u32>> {
        enter(py, || {
            let f = self.lock();
            let node = u64::try_from(node).map_err(|_| TreeError::UnknownNode {
                node,
                len: f.nodes.len(),
            })?;
            f.context(node)
        })
    }

    /// Every leaf's id, ascending (the rows of `leaves()`).
    fn leaf_ids(&self) -> Vec<u32> {
        self.lock().leaf_ids.clone()
    }

    /// The node ids from the root to `node`, root first.
    fn path(&self, node: i64) -> PyResult<Vec<u32>> {
        let f = self.lock();
        f.path_of(node_id(&f, node)?).py()
    }

    /// Where `node` sits: (its tree, its group id, its depth; 0 = a root).
    fn place(&self, node: i64) -> PyResult<(u32, i64, u32)> {
        let f = self.lock();
        let id = node_id(&f, node)?;
        let depth = f.node(id).py()?.depth;
        let tree = f.tree_of[id as usize];
        let group = f.groups[f.trees[tree as usize].group as usize].key;
        Ok((tree, group, depth))
    }

    /// A kept leaf's training sequence: token ids, loss mask, and the leaf's advantage on every token.
    fn trajectory<'py>(&self, py: Python<'py>, leaf: i64) -> PyResult<WithAdvantages<'py>> {
        let (tokens, mask, advantage) = {
            let f = self.lock();
            let leaf = node_id(&f, leaf)?;
            let (tokens, mask) = f.trajectory(leaf).py()?;
            let advantage = f
                .current(f.stats.as_ref())
                .ok_or(TreeError::NoAdvantage { node: leaf as u32 })
                .and_then(|s| s.advantage_of(leaf as u32))
                .py()?;
            (tokens, mask, advantage)
        };
        let n = tokens.len();
        let (ids, mask) = arrays(py, tokens, mask);
        Ok((ids, mask, vec![advantage as f32; n].into_pyarray(py)))
    }

    #[getter]
    fn num_nodes(&self) -> usize {
        self.lock().nodes.len()
    }

    #[getter]
    fn num_trees(&self) -> usize {
        self.lock().trees.len()
    }

    #[getter]
    fn num_groups(&self) -> usize {
        self.lock().groups.len()
    }

    #[getter]
    fn num_leaves(&self) -> usize {
        self.lock().num_leaves()
    }

    fn __len__(&self) -> usize {
        self.num_nodes()
    }

    fn __repr__(&self) -> String {
        let f = self.lock();
        format!(
            "Forest(groups={}, trees={}, nodes={}, leaves={})",
            f.groups.len(),
            f.trees.len(),
            f.nodes.len(),
            f.num_leaves()
        )
    }
}
