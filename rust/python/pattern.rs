//! `PatternSet`, `validate_pattern`, `validate_name`.

use std::sync::RwLock;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::error::Error;
use crate::pattern::{self, LabelBuf, PatternTrie};

/// A name argument: `str` or `bytes` in presentation form, read without copying.
pub(super) fn name_arg(obj: &Bound<'_, PyAny>) -> PyResult<LabelBuf> {
    Ok(LabelBuf::from_presentation(name_text(obj)?).map_err(Error::from)?)
}

/// The text of a name argument (`str` or `bytes`), borrowed.
pub(super) fn name_text<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    Ok(if let Ok(s) = obj.cast::<PyString>() {
        s.to_str()?.as_bytes()
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        b.as_bytes()
    } else {
        return Err(PyTypeError::new_err(format!(
            "a DNS name must be str or bytes, not {}",
            obj.get_type().name()?
        )));
    })
}

/// Runs `$on` on the labels of the name argument `$obj`: read in place when the text is already
/// lower case without escapes (the common case: nothing is copied or moved), else parsed into a
/// [`LabelBuf`] (which also reports what is wrong with an invalid name).
macro_rules! with_labels {
    ($obj:expr, |$n:ident| $on:expr) => {{
        let text = $crate::python::pattern::name_text($obj)?;
        let mut $n = $crate::pattern::TextName::empty();
        if $n.read(text) {
            $on
        } else {
            let $n = $crate::pattern::LabelBuf::from_presentation(text)
                .map_err($crate::error::Error::from)?;
            $on
        }
    }};
}
pub(super) use with_labels;

fn poisoned() -> PyErr {
    PyRuntimeError::new_err("PatternSet lock poisoned by an earlier panic")
}

/// A set of matchName / matchPattern entries compiled into a suffix trie, each with a rule id.
#[derive(Debug)]
#[pyclass(name = "PatternSet", module = "fqdnguard._core", frozen)]
pub struct PyPatternSet {
    trie: RwLock<PatternTrie>,
}

#[pymethods]
impl PyPatternSet {
    #[new]
    #[pyo3(signature = (patterns = None))]
    fn new(patterns: Option<Vec<String>>) -> PyResult<Self> {
        let mut trie = PatternTrie::new();
        for (id, p) in patterns.unwrap_or_default().iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| PyRuntimeError::new_err("too many patterns"))?;
            trie.insert(&pattern::parse_match_pattern(p).map_err(Error::from)?, id);
        }
        Ok(PyPatternSet {
            trie: RwLock::new(trie),
        })
    }

    /// Adds a matchPattern with a rule id.
    fn add(&self, pattern: &str, id: u32) -> PyResult<()> {
        let parsed = pattern::parse_match_pattern(pattern).map_err(Error::from)?;
        self.trie
            .write()
            .map_err(|_| poisoned())?
            .insert(&parsed, id);
        Ok(())
    }

    /// Adds a matchName (no wildcards) with a rule id.
    fn add_name(&self, name: &str, id: u32) -> PyResult<()> {
        let parsed = pattern::parse_match_name(name).map_err(Error::from)?;
        self.trie
            .write()
            .map_err(|_| poisoned())?
            .insert(&parsed, id);
        Ok(())
    }

    /// True when any entry matches the name.
    fn matches(&self, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        // The lock is taken once the name is read (measured a little faster: the lock's atomic
        // waits for earlier stores to drain, and the read, all loads, can go on meanwhile).
        Ok(with_labels!(name, |n| self
            .trie
            .read()
            .map_err(|_| poisoned())?
            .matches(&n)))
    }

    /// Sorted unique rule ids of every entry matching the name.
    fn matching(&self, name: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let trie = self.trie.read().map_err(|_| poisoned())?;
        Ok(with_labels!(name, |n| trie.matching(&n)))
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.trie.read().map_err(|_| poisoned())?.len())
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("PatternSet(<{} entries>)", self.__len__()?))
    }
}

/// Validates a matchPattern; returns its normal form or raises PatternError.
#[pyfunction]
fn validate_pattern(pattern: &str) -> PyResult<String> {
    Ok(pattern::validate_pattern(pattern).map_err(Error::from)?)
}

/// Validates a matchName; returns its normal form or raises PatternError.
#[pyfunction]
fn validate_name(name: &str) -> PyResult<String> {
    Ok(pattern::validate_name(name).map_err(Error::from)?)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPatternSet>()?;
    m.add_function(wrap_pyfunction!(validate_pattern, m)?)?;
    m.add_function(wrap_pyfunction!(validate_name, m)?)?;
    Ok(())
}
