//! `treegrpo.Table`: an Arrow record batch that any Arrow consumer reads without a copy,
//! through the Arrow PyCapsule interface (`pl.DataFrame(t)`, `pa.table(t)`, `pa.record_batch(t)`).

use std::ffi::CStr;

use arrow_array::ffi::FFI_ArrowArray;
use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{Array, RecordBatch, RecordBatchIterator, StructArray};
use arrow_schema::ffi::FFI_ArrowSchema;
use arrow_schema::DataType;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};

/// FFI structs hold raw pointers; a capsule may be dropped on any thread, which the
/// Arrow C data interface allows (release callbacks are thread-safe).
#[repr(transparent)]
struct SendBox<T>(T);
unsafe impl<T> Send for SendBox<T> {}

fn capsule<'py, T: 'static>(
    py: Python<'py>,
    value: T,
    name: &'static CStr,
) -> PyResult<Bound<'py, PyCapsule>> {
    // The consumer moves the struct out and nulls its `release`; if it never does,
    // dropping the box calls `release` through the FFI struct's Drop.
    PyCapsule::new_with_value(py, SendBox(value), name)
}

fn arrow_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("Arrow export failed: {e}"))
}

#[pyclass(name = "Table", module = "treegrpo", frozen)]
pub struct PyTable {
    pub(crate) batch: RecordBatch,
}

impl PyTable {
    pub(crate) fn new(batch: RecordBatch) -> Self {
        Self { batch }
    }
}

#[pymethods]
impl PyTable {
    /// Number of rows.
    #[getter]
    fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// Column names, in schema order.
    #[getter]
    fn column_names(&self) -> Vec<String> {
        self.batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    fn __len__(&self) -> usize {
        self.batch.num_rows()
    }

    fn __repr__(&self) -> String {
        format!(
            "Table(rows={}, columns=[{}])",
            self.batch.num_rows(),
            self.column_names().join(", ")
        )
    }

    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        let schema = FFI_ArrowSchema::try_from(self.batch.schema().as_ref()).map_err(arrow_err)?;
        capsule(py, schema, c"arrow_schema")
    }

    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let _ = requested_schema; // the schema is fixed; consumers cast if they need to
        let array = StructArray::from(self.batch.clone());
        let schema = FFI_ArrowSchema::try_from(&DataType::Struct(self.batch.schema().fields().clone()))
            .map_err(arrow_err)?;
        let data = FFI_ArrowArray::new(&array.to_data());
        PyTuple::new(
            py,
            [
                capsule(py, schema, c"arrow_schema")?,
                capsule(py, data, c"arrow_array")?,
            ],
        )
    }

    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let reader = RecordBatchIterator::new(vec![Ok(self.batch.clone())], self.batch.schema());
        capsule(
            py,
            FFI_ArrowArrayStream::new(Box::new(reader)),
            c"arrow_array_stream",
        )
    }
}
