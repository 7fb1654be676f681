//! The Python bindings: the private module `treegrpo._core`. Only this folder imports pyo3.

mod error;
mod forest;
mod pack;
mod radix;
mod seed;
mod table;
mod tokens;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "BUILD_PROFILE",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add("OPTIONS", pack::options(m.py())?)?;
    m.add_class::<forest::PyForest>()?;
    m.add_class::<pack::PyPack>()?;
    m.add_class::<radix::PyRadixIndex>()?;
    m.add_class::<table::PyTable>()?;
    Ok(())
}
