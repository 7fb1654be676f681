//! `treegrpo.RadixIndex`: the Python face of `crate::radix::RadixIndex`.

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyBool;

use super::error::{enter, to_pyerr, IntoPyResult};
use super::tokens::TokenSlice;
use crate::error::TreeError;
use crate::radix::RadixIndex;

/// A radix tree of cached token sequences (SGLang's radix-cache model): `insert`,
/// `match_prefix`, `inc_lock_ref`/`dec_lock_ref` and LRU `evict` over unlocked leaves.
///
/// Every token stores the int `value` of the `insert` that added it (e.g. a KV block id);
/// `evict` reports the values whose last token left the index.
#[pyclass(name = "RadixIndex", module = "treegrpo", frozen)]
pub struct PyRadixIndex {
    inner: Mutex<RadixIndex>,
}

impl PyRadixIndex {
    /// Lock for a short operation. The lock is only ever held by code that does not call
    /// back into Python, so holding the GIL while waiting for it cannot deadlock.
    fn lock(&self) -> MutexGuard<'_, RadixIndex> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The items of a list/tuple/iterable of token sequences. Each is extracted (and, for NumPy
/// arrays, borrowed) one at a time: holding thousands of NumPy borrows at once is slow.
fn token_list<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    obj.try_iter()
        .map_err(|_| {
            to_pyerr(TreeError::InvalidArgument(
                "sequences must be a list of token sequences".into(),
            ))
        })?
        .collect()
}

/// A non-negative int below 2**64 (not a bool), or `InvalidArgumentError` naming `what`.
fn u64_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let value = if obj.is_instance_of::<PyBool>() {
        None
    } else {
        obj.extract::<u64>().ok()
    };
    value.ok_or_else(|| {
        let shown = obj.repr().map(|r| r.to_string()).unwrap_or_default();
        to_pyerr(TreeError::InvalidArgument(format!(
            "{what} must be an int in [0, 2**64), got {shown}"
        )))
    })
}

#[pymethods]
impl PyRadixIndex {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(RadixIndex::new()),
        }
    }

    /// Store `tokens`; tokens not stored yet get `value` (an int in [0, 2**64)), stored ones keep
    /// theirs. Returns how many leading tokens were already stored.
    fn insert(&self, tokens: TokenSlice<'_>, value: &Bound<'_, PyAny>) -> PyResult<usize> {
        let value = u64_arg(value, "value")?;
        Ok(self.lock().insert(tokens.as_slice(), value))
    }

    /// The longest stored prefix of `tokens`: `(length, handle, value)`, where `handle` names the
    /// node ending exactly after `length` tokens (the root when 0) and `value` is the last matched
    /// token's value (None when `length == 0`). Marks the path as just used.
    fn match_prefix(&self, tokens: TokenSlice<'_>) -> PyResult<(usize, u64, Option<u64>)> {
        let m = self.lock().match_prefix(tokens.as_slice());
        Ok((m.len, m.handle, m.value))
    }

    /// `insert` each sequence in order with its value; returns, per sequence, how many leading
    /// tokens were already stored (its `cached_tokens` if sent to a prefix cache in this order).
    /// Every sequence and value is checked before anything is inserted.
    fn insert_many(
        &self,
        sequences: &Bound<'_, PyAny>,
        values: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<usize>> {
        let values = values
            .iter()
            .map(|v| u64_arg(v, "value"))
            .collect::<PyResult<Vec<u64>>>()?;
        let sequences = token_list(sequences)?;
        if sequences.len() != values.len() {
            return Err(to_pyerr(TreeError::InvalidArgument(format!(
                "insert_many got {} sequences and {} values: pass one value per sequence",
                sequences.len(),
                values.len()
            ))));
        }
        for s in &sequences {
            s.extract::<TokenSlice<'_>>()?;
        }
        let mut index = self.lock();
        sequences
            .iter()
            .zip(values)
            .map(|(s, v)| Ok(index.insert(s.extract::<TokenSlice<'_>>()?.as_slice(), v)))
            .collect()
    }

    /// `match_prefix` lengths of many sequences, in order (each match marks its path as used).
    fn match_prefix_many(&self, sequences: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
        let sequences = token_list(sequences)?;
        for s in &sequences {
            s.extract::<TokenSlice<'_>>()?;
        }
        let mut index = self.lock();
        sequences
            .iter()
            .map(|s| Ok(index.match_prefix(s.extract::<TokenSlice<'_>>()?.as_slice()).len))
            .collect()
    }

    /// Protect the node of `handle` and its ancestors from eviction. Returns how many tokens
    /// became protected. Raises StaleHandleError for an evicted or unknown handle.
    fn inc_lock_ref(&self, handle: &Bound<'_, PyAny>) -> PyResult<usize> {
        let handle = u64_arg(handle, "handle")?;
        self.lock().inc_lock_ref(handle).py()
    }

    /// Undo one `inc_lock_ref(handle)`. Returns how many tokens became evictable. Raises
    /// LockError, changing nothing, if a node on the path is not locked.
    fn dec_lock_ref(&self, handle: &Bound<'_, PyAny>) -> PyResult<usize> {
        let handle = u64_arg(handle, "handle")?;
        self.lock().dec_lock_ref(handle).py()
    }

    /// Remove least-recently-used unlocked leaves until at least `n_tokens` tokens were freed or
    /// none is left. Returns `(freed, dropped)`: the tokens removed and the values whose last
    /// token left the index, in the order they left.
    fn evict(&self, py: Python<'_>, n_tokens: &Bound<'_, PyAny>) -> PyResult<(usize, Vec<u64>)> {
        let n = usize::try_from(u64_arg(n_tokens, "n_tokens")?).unwrap_or(usize::MAX);
        let e = enter(py, || Ok(self.lock().evict(n)))?;
        Ok((e.freed, e.dropped))
    }

    /// Drop every stored token; every handle but the root's becomes stale.
    fn reset(&self) {
        self.lock().reset();
    }

    /// Every stored sequence that ends at a leaf, sorted (every stored token lies on one).
    /// Read-only: does not mark anything as used.
    fn sequences(&self) -> Vec<Vec<u32>> {
        self.lock().sequences()
    }

    /// The tree, one node per line: tokens (long keys shortened), lock count, last access, handle.
    fn pretty_print(&self) -> String {
        self.lock().pretty_print()
    }

    /// Tokens stored.
    #[getter]
    fn total_size(&self) -> usize {
        self.lock().total_size()
    }

    /// Tokens in unlocked nodes.
    #[getter]
    fn evictable_size(&self) -> usize {
        self.lock().evictable_size()
    }

    /// Tokens in locked nodes.
    #[getter]
    fn protected_size(&self) -> usize {
        self.lock().protected_size()
    }

    /// Nodes holding tokens (the root is not counted).
    #[getter]
    fn num_nodes(&self) -> usize {
        self.lock().num_nodes()
    }

    fn __len__(&self) -> usize {
        self.total_size()
    }

    fn __repr__(&self) -> String {
        let ix = self.lock();
        format!(
            "RadixIndex(tokens={}, nodes={}, protected={})",
            ix.total_size(),
            ix.num_nodes(),
            ix.protected_size()
        )
    }
}
