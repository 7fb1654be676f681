//! Seed arguments: one integer, or several (a run's seed, a step, a round) folded in Rust.

use pyo3::prelude::*;
use pyo3::types::{PyInt, PyString};

use super::error::to_pyerr;
use crate::error::TreeError;
use crate::select::seed_from_parts;

/// A seed: an int in [0, 2^64) as given, or a sequence of ints folded by
/// [`seed_from_parts`] (each part in [-2^63, 2^64), a negative one as its 64-bit two's complement).
pub(crate) struct Seed(pub u64);

fn bad(what: String) -> PyErr {
    to_pyerr(TreeError::InvalidArgument(format!(
        "seed must be an int in [0, 2^64) or a sequence of ints in [-2^63, 2^64) (mixed into one seed), got {what}"
    )))
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr().map(|r| r.to_string()).unwrap_or_default()
}

fn part(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(bad(repr(obj)));
    }
    obj.extract::<u64>()
        .or_else(|_| obj.extract::<i64>().map(|v| v as u64))
        .map_err(|_| bad(repr(obj)))
}

impl<'a, 'py> FromPyObject<'a, 'py> for Seed {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<pyo3::types::PyBool>() {
            return obj.extract::<u64>().map(Seed).map_err(|_| bad(repr(&obj)));
        }
        if obj.is_instance_of::<PyString>() {
            return Err(bad(repr(&obj)));
        }
        let iter = obj.try_iter().map_err(|_| bad(repr(&obj)))?;
        let parts = iter.map(|item| part(&item?)).collect::<PyResult<Vec<u64>>>()?;
        Ok(Seed(seed_from_parts(&parts)))
    }
}
