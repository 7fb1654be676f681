//! `treegrpo.Pack`: the learner batches of `crate::pack`, as NumPy arrays handed over without copies.

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::advantage::Estimator;
use crate::forest::LeafReason;
use crate::pack::{AggMode, Pack};
use crate::select::Policy;

/// `treegrpo._core.OPTIONS`: the values each string option of the core accepts, read off the
/// `VALID` lists its parsers quote in their errors, so Python validates against the same ones.
pub(crate) fn options(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let names = |valid: &str| -> Vec<String> {
        valid
            .split(", ")
            .map(|name| name.trim_matches('\'').to_string())
            .collect()
    };
    let out = PyDict::new(py);
    out.set_item("loss_agg_mode", names(AggMode::VALID))?;
    out.set_item("adv_estimator", names(Estimator::VALID))?;
    out.set_item("leaf_reason", names(LeafReason::VALID))?;
    out.set_item("selection", names(Policy::VALID))?;
    Ok(out)
}

/// Both learner layouts of a forest's kept trajectories (`Forest.pack`).
#[pyclass(name = "Pack", module = "treegrpo", frozen)]
pub struct PyPack {
    flat: Py<PyDict>,
    packed: Py<PyDict>,
    layout: Py<PyDict>,
    leaves: Vec<u32>,
    leaf_advantages: Vec<f64>,
    total_tokens: usize,
    unique_tokens: usize,
    rows: usize,
    loss_agg_mode: &'static str,
}

fn vec1<'py, T: numpy::Element>(py: Python<'py>, v: Vec<T>) -> Bound<'py, PyArray1<T>> {
    v.into_pyarray(py)
}

fn vec2<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyAny>> {
    // A C-contiguous reshape of a fresh array is a view: no copy.
    Ok(v.into_pyarray(py).reshape([rows, cols])?.into_any())
}

impl PyPack {
    pub(crate) fn new(py: Python<'_>, pack: Pack, agg_name: &'static str) -> PyResult<Self> {
        let Pack {
            leaves,
            leaf_advantage,
            flat: f,
            packed: p,
            layout: l,
            total_tokens,
            unique_tokens,
            ..
        } = pack;
        let (rows, cols) = (f.rows, f.cols);
        let flat = PyDict::new(py);
        flat.set_item("input_ids", vec2(py, f.input_ids, rows, cols)?)?;
        flat.set_item("attention_mask", vec2(py, f.attention_mask, rows, cols)?)?;
        flat.set_item("loss_mask", vec2(py, f.loss_mask, rows, cols)?)?;
        flat.set_item("advantages", vec2(py, f.advantages, rows, cols)?)?;
        flat.set_item("position_ids", vec2(py, f.position_ids, rows, cols)?)?;
        flat.set_item("packed_index", vec2(py, f.packed_index, rows, cols)?)?;
        let packed = PyDict::new(py);
        packed.set_item("input_ids", vec1(py, p.input_ids))?;
        packed.set_item("position_ids", vec1(py, p.position_ids))?;
        packed.set_item("loss_mask", vec1(py, p.loss_mask))?;
        packed.set_item("segment_ids", vec1(py, p.segment_ids))?;
        packed.set_item("subtree_end", vec1(py, p.subtree_end))?;
        packed.set_item("token_weight", vec1(py, p.token_weight))?;
        packed.set_item("adv_pos", vec1(py, p.adv_pos))?;
        packed.set_item("adv_neg", vec1(py, p.adv_neg))?;
        packed.set_item("segment_node", vec1(py, p.segment_node))?;
        packed.set_item("segment_start", vec1(py, p.segment_start))?;
        packed.set_item("segment_len", vec1(py, p.segment_len))?;
        packed.set_item("segment_parent", vec1(py, p.segment_parent))?;
        let layout = PyDict::new(py);
        layout.set_item("pred", vec1(py, l.pred))?;
        layout.set_item("count", vec1(py, l.count))?;
        layout.set_item("count_pos", vec1(py, l.count_pos))?;
        layout.set_item("count_neg", vec1(py, l.count_neg))?;
        layout.set_item("tree_segments", vec1(py, l.tree_segments))?;
        layout.set_item("tree_tokens", vec1(py, l.tree_tokens))?;
        layout.set_item("tree_group", vec1(py, l.tree_group))?;
        layout.set_item("row_tree", vec1(py, l.row_tree))?;
        layout.set_item("row_tokens", vec1(py, l.row_tokens))?;
        layout.set_item("row_loss_tokens", vec1(py, l.row_loss_tokens))?;
        Ok(Self {
            flat: flat.unbind(),
            packed: packed.unbind(),
            layout: layout.unbind(),
            leaves,
            leaf_advantages: leaf_advantage,
            total_tokens,
            unique_tokens,
            rows,
            loss_agg_mode: agg_name,
        })
    }
}

#[pymethods]
impl PyPack {
    /// One row per trajectory, right-padded: input_ids (uint32), attention_mask, loss_mask,
    /// advantages (float32), position_ids (int32) (each (B, T)) and packed_index (B, T, int32),
    /// the packed position of each flat one (-1 on padding).
    #[getter]
    fn flat<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.flat.bind(py).copy()
    }

    /// Each distinct node once, depth-first: per token input_ids (uint32), position_ids, segment_ids,
    /// subtree_end (int32), loss_mask, token_weight, adv_pos, adv_neg (float32) (each (U,)); per
    /// segment segment_node (uint32), segment_start, segment_len (int64), segment_parent (int32).
    #[getter]
    fn packed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.packed.bind(py).copy()
    }

    /// What the learner plans with (so it knows no tree), all int64 but the float32 counts:
    /// per packed token (U,) pred (the packed position before it in its trajectories, -1 at
    /// a trajectory's start) and count / count_pos / count_neg (the trajectories through it:
    /// all, advantage > 0, < 0); per tree (packed order) tree_segments and tree_tokens (its
    /// first segment and token; (trees + 1,), the last entry the totals) and tree_group (its
    /// prompt's group id); per row (B,) row_tree, row_tokens, row_loss_tokens.
    #[getter]
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.layout.bind(py).copy()
    }

    /// The leaves of the trajectories, in row order.
    #[getter]
    fn leaves(&self) -> Vec<u32> {
        self.leaves.clone()
    }

    /// The advantage of each row's leaf.
    #[getter]
    fn leaf_advantages(&self) -> Vec<f64> {
        self.leaf_advantages.clone()
    }

    /// Tokens over all trajectories, shared prefixes counted once per trajectory.
    #[getter]
    fn total_tokens(&self) -> usize {
        self.total_tokens
    }

    /// Tokens of the packed layout (each shared prefix once).
    #[getter]
    fn unique_tokens(&self) -> usize {
        self.unique_tokens
    }

    /// total_tokens / unique_tokens.
    #[getter]
    fn sharing_ratio(&self) -> f64 {
        self.total_tokens as f64 / self.unique_tokens.max(1) as f64
    }

    #[getter]
    fn loss_agg_mode(&self) -> &'static str {
        self.loss_agg_mode
    }

    fn __len__(&self) -> usize {
        self.rows
    }

    fn __repr__(&self) -> String {
        format!(
            "Pack(trajectories={}, total_tokens={}, unique_tokens={}, sharing_ratio={:.3}, loss_agg_mode='{}')",
            self.rows,
            self.total_tokens,
            self.unique_tokens,
            self.sharing_ratio(),
            self.loss_agg_mode
        )
    }
}
