//! fqdnguard's compiled core. Module list only; see `DESIGN.md` for what lives where.
//!
//! Everything except `python` is plain Rust: no PyO3, testable with `cargo test`.

pub mod cache;
pub mod engine;
pub mod error;
pub mod io;
pub mod pattern;
pub mod policy;
pub mod wire;
pub mod yaml;

#[cfg(feature = "python")]
#[allow(unsafe_code)]
// PyO3's macros expand to unsafe FFI glue; no hand-written unsafe lives there.
mod python;
