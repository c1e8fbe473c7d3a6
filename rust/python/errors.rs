//! The exception hierarchy and the single conversion from the core's [`Error`] to a Python
//! exception.
//!
//! `FqdnGuardError(Exception)` is the root. `PatternError`, `WireError` and `CacheError` also
//! derive from `ValueError`, which `create_exception!` cannot express (one base only), so the
//! classes are made with `type(name, bases, ns)` when the module loads and kept for the conversion.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

static FQDNGUARD_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static PATTERN_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static WIRE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CACHE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn make_class<'py>(
    m: &Bound<'py, PyModule>,
    name: &str,
    bases: &Bound<'py, PyTuple>,
    doc: &str,
) -> PyResult<Bound<'py, PyType>> {
    let py = m.py();
    let ns = PyDict::new(py);
    ns.set_item("__module__", "fqdnguard")?;
    ns.set_item("__doc__", doc)?;
    let cls = py
        .get_type::<PyType>()
        .call1((name, bases, ns))?
        .cast_into::<PyType>()?;
    m.add(name, &cls)?;
    Ok(cls)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let root = make_class(
        m,
        "FqdnGuardError",
        &PyTuple::new(py, [py.get_type::<PyException>()])?,
        "Base class of every error fqdnguard raises.",
    )?;
    let value_error = py.get_type::<PyValueError>();
    let pattern = make_class(
        m,
        "PatternError",
        &PyTuple::new(py, [root.clone(), value_error.clone()])?,
        "A matchName, matchPattern or DNS name is malformed; the message says what and where.",
    )?;
    let wire = make_class(
        m,
        "WireError",
        &PyTuple::new(py, [root.clone(), value_error.clone()])?,
        "A DNS message is malformed or cannot be answered as asked; the message says what, where.",
    )?;
    let cache = make_class(
        m,
        "CacheError",
        &PyTuple::new(py, [root.clone(), value_error.clone()])?,
        "A cache operation was refused: a bad argument, or a snapshot that cannot be read or written.",
    )?;
    let _ = CACHE_ERROR.set(py, cache.unbind());
    let _ = FQDNGUARD_ERROR.set(py, root.unbind());
    let _ = PATTERN_ERROR.set(py, pattern.unbind());
    let _ = WIRE_ERROR.set(py, wire.unbind());
    Ok(())
}

/// The one conversion from a core error to a Python exception.
fn to_pyerr(err: Error) -> PyErr {
    Python::attach(|py| {
        let cell = match &err {
            Error::Pattern(_) => &PATTERN_ERROR,
            // Bad arguments to a compiled policy (policy files are validated, with their line
            // numbers, before they are compiled): a plain ValueError.
            Error::PolicyBuild(_) => return PyValueError::new_err(err.to_string()),
            Error::Wire(_) => &WIRE_ERROR,
            Error::Cache(_) => &CACHE_ERROR,
        };
        match cell.get(py) {
            Some(cls) => PyErr::from_type(cls.bind(py).clone(), err.to_string()),
            None => PyValueError::new_err(err.to_string()),
        }
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        to_pyerr(err)
    }
}
