//! The PyO3 binding layer: classes, conversions and the one error mapping. No logic lives here;
//! every method converts its arguments, calls the core and converts the result.

use pyo3::prelude::*;

mod cache;
mod engine;
mod errors;
mod io;
mod pattern;
mod policy;
mod wire;
mod yaml;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    pattern::register(m)?;
    policy::register(m)?;
    wire::register(m)?;
    cache::register(m)?;
    engine::register(m)?;
    yaml::register(m)?;
    io::register(m)?;
    Ok(())
}
