//! Cilium-compatible `matchName` / `matchPattern` handling.
//!
//! * [`parse`]: validation and normalisation of what a policy author wrote.
//! * [`LabelBuf`]: a DNS name to match, lower-cased once, labels kept apart (a `.` inside a wire
//!   label is never a label boundary).
//! * [`TextName`]: the common case of a name given as text that is already lower case without
//!   escapes, read in place (nothing copied); [`Labels`] is what the trie reads of either.
//! * [`PatternTrie`]: every pattern of a set compiled into one suffix trie walked root-first, so a
//!   lookup costs one pass over the name's labels whatever the number of patterns.

mod edges;
mod error;
mod labels;
mod parse;
mod trie;

pub use error::{PatternError, PatternErrorKind, Source};
pub use labels::{short_key, LabelBuf, Labels, ShortKey, TextName, SHORT_LABEL};
pub use parse::{parse_match_name, parse_match_pattern, LabelPat, Parsed};
pub use trie::PatternTrie;

/// Validates a `matchPattern` and returns its normal form (lower case, absolute), or the error.
pub fn validate_pattern(pattern: &str) -> Result<String, PatternError> {
    parse_match_pattern(pattern).map(|p| p.normalized)
}

/// Validates a `matchName` and returns its normal form (lower case, absolute), or the error.
pub fn validate_name(name: &str) -> Result<String, PatternError> {
    parse_match_name(name).map(|p| p.normalized)
}
