//! Token-id arguments: any 1-D integer NumPy array (fast path) or any iterable of ints.

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;

use super::error::to_pyerr;
use crate::error::TreeError;

fn bad(position: usize, value: impl ToString) -> PyErr {
    to_pyerr(TreeError::InvalidToken {
        position,
        value: value.to_string(),
    })
}

macro_rules! try_array {
    ($obj:expr, $($t:ty),*) => {
        $(
            if let Ok(a) = $obj.extract::<PyReadonlyArray1<'_, $t>>() {
                return a
                    .as_array()
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| u32::try_from(v).map_err(|_| bad(i, v)))
                    .collect();
            }
        )*
    };
}

/// Extract token ids, raising `InvalidArgumentError` naming the first value that is not a u32.
pub(crate) fn extract_tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, u32>>() {
        return Ok(a.as_array().to_vec());
    }
    try_array!(obj, i64, i32, u64, i16, u16, i8, u8);
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(to_pyerr(TreeError::InvalidArgument(
            "token ids must be a list or array of ints, not a string: tokenize first".into(),
        )));
    }
    let iter = obj.try_iter().map_err(|_| {
        to_pyerr(TreeError::InvalidArgument(format!(
            "token ids must be a list or 1-D integer array, got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )))
    })?;
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    for (i, item) in iter.enumerate() {
        let item = item?;
        match item.extract::<i64>() {
            Ok(v) if !item.is_instance_of::<pyo3::types::PyBool>() => {
                out.push(u32::try_from(v).map_err(|_| bad(i, v))?);
            }
            _ => return Err(bad(i, item.repr().map(|r| r.to_string()).unwrap_or_default())),
        }
    }
    Ok(out)
}

pub(crate) struct Tokens(pub Vec<u32>);

impl<'a, 'py> FromPyObject<'a, 'py> for Tokens {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        extract_tokens(&obj).map(Tokens)
    }
}

/// Token ids borrowed from a uint32 NumPy array (no copy), or extracted like [`Tokens`].
/// For short operations done with the GIL held.
pub(crate) enum TokenSlice<'py> {
    Borrowed(PyReadonlyArray1<'py, u32>),
    Owned(Vec<u32>),
}

impl TokenSlice<'_> {
    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            // A non-contiguous view falls back to a copy at extraction, so this cannot fail.
            TokenSlice::Borrowed(a) => a.as_slice().expect("contiguous"),
            TokenSlice::Owned(v) => v,
        }
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for TokenSlice<'py> {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u32>>() {
            if a.as_slice().is_ok() {
                return Ok(TokenSlice::Borrowed(a));
            }
        }
        extract_tokens(&obj).map(TokenSlice::Owned)
    }
}
