//! `treegrpo.Pack`: the learner batches of `crate::pack`, as NumPy arrays handed over without copies.

use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::{enter, IntoPyResult};
use crate::error::TreeError;
use crate::pack::{block_mask, dense_mask, Pack, TreeMask};

/// Largest packed length `dense_mask()` materialises (U*U bytes: 32768 tokens = 1 GiB).
const DENSE_LIMIT: usize = 32_768;

/// Both learner layouts of a forest's kept trajectories (`Forest.pack`).
#[pyclass(name = "Pack", module = "treegrpo", frozen)]
pub struct PyPack {
    flat: Py<PyDict>,
    packed: Py<PyDict>,
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
        Ok(Self {
            flat: flat.unbind(),
            packed: packed.unbind(),
            leaves,
            leaf_advantages: leaf_advantage,
            total_tokens,
            unique_tokens,
            rows,
            loss_agg_mode: agg_name,
        })
    }

    fn packed_array<'py, T: numpy::Element>(
        &self,
        py: Python<'py>,
        key: &str,
    ) -> PyResult<PyReadonlyArray1<'py, T>> {
        self.packed
            .bind(py)
            .get_item(key)?
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(key.to_string()))?
            .extract::<PyReadonlyArray1<'py, T>>()
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

    /// The (U, U) boolean tree attention mask, True = may attend (ancestors-or-self, causal).
    fn dense_mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let u = self.unique_tokens;
        if u > DENSE_LIMIT {
            return Err(TreeError::InvalidArgument(format!(
                "dense_mask() of {u} tokens needs {} MiB; above {DENSE_LIMIT} tokens use block_mask() or \
                 the (segment_ids, subtree_end) rule",
                (u * u) >> 20
            )))
            .py();
        }
        let seg = self.packed_array::<i32>(py, "segment_ids")?;
        let end = self.packed_array::<i32>(py, "subtree_end")?;
        let (seg, end) = (seg.as_slice()?, end.as_slice()?);
        let mask = py.detach(|| dense_mask(seg, end));
        vec2(py, mask, u, u)
    }

    /// The flex_attention block form: (kv_num_blocks (1,1,Q), kv_indices (1,1,Q,Q),
    /// full_kv_num_blocks, full_kv_indices), for `BlockMask.from_kv_blocks(..., BLOCK_SIZE=block_size)`.
    #[pyo3(signature = (block_size=128))]
    #[allow(clippy::type_complexity)]
    fn block_mask<'py>(
        &self,
        py: Python<'py>,
        block_size: usize,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        Bound<'py, PyAny>,
        Bound<'py, PyAny>,
        Bound<'py, PyAny>,
    )> {
        let seg = self.packed_array::<i32>(py, "segment_ids")?;
        let end = self.packed_array::<i32>(py, "subtree_end")?;
        let start = self.packed_array::<i64>(py, "segment_start")?;
        let len = self.packed_array::<i64>(py, "segment_len")?;
        let parent = self.packed_array::<i32>(py, "segment_parent")?;
        let mask = TreeMask {
            segment_ids: seg.as_slice()?,
            subtree_end: end.as_slice()?,
            segment_start: start.as_slice()?,
            segment_len: len.as_slice()?,
            segment_parent: parent.as_slice()?,
        };
        let bm = enter(py, || block_mask(&mask, block_size))?;
        let q = bm.q_blocks;
        let shape = |v: Vec<i32>, dims: Vec<usize>| -> PyResult<Bound<'py, PyAny>> {
            Ok(v.into_pyarray(py).reshape(dims)?.into_any())
        };
        Ok((
            shape(bm.kv_num_blocks, vec![1, 1, q])?,
            shape(bm.kv_indices, vec![1, 1, q, q])?,
            shape(bm.full_kv_num_blocks, vec![1, 1, q])?,
            shape(bm.full_kv_indices, vec![1, 1, q, q])?,
        ))
    }
}
