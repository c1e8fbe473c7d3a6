//! DNS wire format (RFC 1035, 2181, 3596, 6891): a validating, zero-copy parser and the few
//! builders the proxy needs. Every byte is treated as hostile: every read is bounds-checked, a
//! compression pointer must point strictly before the piece of name holding it (at most
//! [`MAX_POINTER_HOPS`] per name), labels are at most 63 bytes and names 255, a count that claims
//! more records than the packet holds and trailing bytes are errors. Nothing here panics on
//! input.
//!
//! Entry points, cheapest first:
//! * [`Header::parse`] — the 12-byte header.
//! * [`QueryView::parse`] — the proxy's hot path for queries: validates the whole packet as a
//!   query (QR clear, opcode QUERY, one question) and gives the question name as a view
//!   ([`Name`]) and as lower-cased labels ([`crate::pattern::LabelBuf`], via
//!   [`QueryView::labels`]) to match a [`crate::pattern::PatternTrie`] without a string, plus
//!   qtype, qclass, the offset where the question ends and the query's EDNS.
//! * [`resolve`] — the hot path for answers: validates the packet and returns the CNAME chain
//!   from the question name and the addresses on it with their TTLs, without building a
//!   [`Message`].
//! * [`Message::parse`] — everything: header, sections with decoded RDATA, EDNS.
//! * [`set_id`], [`error_response`] — builders; [`cap_ttls`] — the TTLs of an answer capped in
//!   place (the proxy's `max_ttl`).
//!
//! We parse ourselves rather than use `domain`, `simple-dns` or `hickory-proto`: see
//! `benches/README.wire.md` for the measurement and the reasons.

mod build;
mod error;
mod message;
mod name;
mod query;
mod resolve;
#[cfg(test)]
mod tests;
mod ttl;
pub mod types;

pub use build::{bad_rcode, error_response, set_id, EDNS_UDP_SIZE};
pub use error::{Section, WireError, WireErrorKind};
pub use message::{Edns, EdnsOptions, Header, Message, Question, RData, Record, TxtStrings};
pub use name::{escape_label, Labels, Name, MAX_POINTER_HOPS};
pub use query::QueryView;
pub use resolve::{resolve, Resolution, MAX_CHAIN};
pub use ttl::{cap_ttls, capped_ttl};
