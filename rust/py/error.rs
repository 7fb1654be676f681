//! Maps `TreeError` to the named Python exceptions of `treegrpo/exceptions.py`, and the one
//! helper that runs a computation with the GIL released and converts its error.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::error::TreeError;

/// The Python exception class (in `treegrpo.exceptions`) for each error.
fn class_name(err: &TreeError) -> &'static str {
    match err {
        TreeError::UnknownNode { .. } => "UnknownNodeError",
        TreeError::StaleHandle { .. } => "StaleHandleError",
        TreeError::StepUnderLeaf { .. } => "InvalidStepError",
        TreeError::RewardOnNonLeaf { .. }
        | TreeError::NonFiniteReward { .. }
        | TreeError::MissingReward { .. }
        | TreeError::NoAdvantage { .. } => "RewardError",
        TreeError::UnknownOption { .. } => "InvalidOptionError",
        TreeError::LockUnderflow { .. } => "LockError",
        TreeError::KTooLarge { .. } | TreeError::InvalidArgument(_) | TreeError::InvalidToken { .. } => {
            "InvalidArgumentError"
        }
    }
}

pub(crate) fn to_pyerr(err: TreeError) -> PyErr {
    Python::attach(|py| {
        let message = err.to_string();
        match py
            .import("treegrpo.exceptions")
            .and_then(|m| m.getattr(class_name(&err)))
        {
            Ok(cls) => match cls.call1((message,)) {
                Ok(exc) => PyErr::from_value(exc),
                Err(e) => e,
            },
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// Run `f` with the GIL released (other Python threads go on) and map its error.
pub(crate) fn enter<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    py.detach(f).map_err(to_pyerr)
}

pub(crate) trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
