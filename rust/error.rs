//! The crate's one error type. Each module keeps its own structured error; this enum gathers them
//! so the binding layer converts errors to Python exceptions in exactly one place.

use std::fmt;

pub use crate::cache::CacheError;
pub use crate::pattern::PatternError;

/// Any error the core reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A matchName / matchPattern, or a DNS name in presentation form, is malformed.
    Pattern(PatternError),
    /// A cache operation was refused: bad input, or a snapshot that cannot be read or written.
    Cache(CacheError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Pattern(e) => e.fmt(f),
            Error::Cache(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<PatternError> for Error {
    fn from(e: PatternError) -> Self {
        Error::Pattern(e)
    }
}

impl From<CacheError> for Error {
    fn from(e: CacheError) -> Self {
        Error::Cache(e)
    }
}
