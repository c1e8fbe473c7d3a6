//! The FQDN -> IP TTL cache: which IPs each endpoint learned for each name, until the DNS TTL
//! (at least `min_ttl`) runs out.
//!
//! * [`Cache`]: record, expire, caps, lookups and the change stream for the firewall.
//! * [`snapshot`]: save and restore, versioned and checksummed, written atomically.
//! * [`listing`]: the entries as NDJSON, a piece at a time.
//! * Names are stored in wire form, lower-cased; see [`names`] for why and how they come out.
//!
//! No PyO3 here: the binding layer (`crate::python::cache`) wraps a [`Cache`] in a lock.

mod error;
pub mod listing;
pub mod names;
pub mod snapshot;
mod store;

pub use error::CacheError;
pub use store::{
    check_ttl, now_seconds, parse_ip, parse_packed_ip, Batch, Cache, Change, ChangeKind, Config,
    Endpoint, EntryView, Stats,
};

#[cfg(test)]
mod tests;
