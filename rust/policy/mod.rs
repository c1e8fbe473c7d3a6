//! Compiled CiliumNetworkPolicy egress rules and the two verdicts.
//!
//! Python reads and validates the YAML (keeping file and line for errors) and evaluates label
//! selectors; what it hands over is already resolved: each rule's `toEndpoints` as the addresses
//! of the endpoints it selects, its `toCIDR`/`toCIDRSet` as prefixes, its `toFQDNs` and
//! `rules.dns` as parsed patterns. [`PolicySet`] keeps every rule once; an *identity* is the set
//! of specs selecting an endpoint, compiled on first use into two merged suffix tries (`rules.dns`
//! and `toFQDNs`), so a verdict is one trie walk plus a port/peer check per candidate.
//!
//! Cilium's semantics kept here: an endpoint selected by a spec with egress default-deny (any
//! `egress` or `egressDeny` rule, unless `enableDefaultDeny.egress: false`) is denied whatever no
//! rule allows; rules are OR-ed; a port entry with no `rules.dns` lets every name through to the
//! servers it admits (the L7 wildcard Cilium adds when L3/L4-only and DNS rules overlap).

mod error;
mod net;
mod set;

pub use error::PolicyBuildError;
pub use net::{parse_ip, Cidr, CidrRule, PeerMatch, Peers, PortRange, Proto};
pub use set::{EgressRule, NameSel, Outcome, PolicySet, PortEntry, Query, Spec, Verdict};

#[cfg(test)]
mod tests;
