//! The crate's one error type. Each module keeps its own structured error; this enum gathers them
//! so the binding layer converts errors to Python exceptions in exactly one place.

use std::fmt;

pub use crate::cache::CacheError;
pub use crate::pattern::PatternError;
pub use crate::policy::PolicyBuildError;
pub use crate::wire::WireError;

/// Any error the core reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A matchName / matchPattern, or a DNS name in presentation form, is malformed.
    Pattern(PatternError),
    /// Input a compiled policy cannot accept (a bad prefix, port range, protocol or index).
    PolicyBuild(PolicyBuildError),
    /// A DNS message is malformed, or cannot be answered as asked.
    Wire(WireError),
    /// A cache operation was refused: bad input, or a snapshot that cannot be read or written.
    Cache(CacheError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Pattern(e) => e.fmt(f),
            Error::PolicyBuild(e) => e.fmt(f),
            Error::Wire(e) => e.fmt(f),
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

impl From<PolicyBuildError> for Error {
    fn from(e: PolicyBuildError) -> Self {
        Error::PolicyBuild(e)
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Error::Wire(e)
    }
}

impl From<CacheError> for Error {
    fn from(e: CacheError) -> Self {
        Error::Cache(e)
    }
}
