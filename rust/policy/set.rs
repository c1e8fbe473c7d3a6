//! The compiled policy set: every egress rule once, plus one merged table per identity (a distinct
//! set of specs selecting an endpoint), and the two verdicts over them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};

use hashbrown::HashMap;

use super::error::PolicyBuildError;
use super::net::{PeerMatch, Peers, PortRange, Proto};
use crate::pattern::{LabelBuf, Labels, Parsed, PatternTrie};

/// A `matchName` or `matchPattern` entry of `toFQDNs` or `rules.dns`, validated.
#[derive(Debug, Clone)]
pub struct NameSel {
    pub parsed: Parsed,
    pub is_pattern: bool,
    /// As written in the policy.
    pub text: String,
}

/// One `toPorts[]` entry.
#[derive(Debug, Clone)]
pub struct PortEntry {
    /// Empty: every port and protocol.
    pub ranges: Vec<PortRange>,
    /// `rules.dns`; None when the entry has no DNS rule (L3/L4 only: every name passes).
    pub dns: Option<Vec<NameSel>>,
}

impl PortEntry {
    fn admits(&self, port: u16, proto: Proto) -> bool {
        self.ranges.is_empty() || self.ranges.iter().any(|r| r.admits(port, proto))
    }
}

/// One `egress[]` rule.
#[derive(Debug, Clone)]
pub struct EgressRule {
    /// Its index in the spec's `egress` list.
    pub index: u32,
    /// `toFQDNs`; when not empty the rule has no other L3 selector (Cilium forbids mixing).
    pub fqdns: Vec<NameSel>,
    /// The L3 part when `fqdns` is empty.
    pub peers: Peers,
    /// Empty: every port.
    pub ports: Vec<PortEntry>,
}

impl EgressRule {
    /// The index of the first port entry admitting the port, `Some(None)` when the rule has no
    /// `toPorts` (all ports), None when nothing admits it.
    fn port_entry(&self, port: u16, proto: Proto) -> Option<Option<u32>> {
        if self.ports.is_empty() {
            return Some(None);
        }
        let at = self.ports.iter().position(|e| e.admits(port, proto))?;
        Some(Some(at as u32))
    }
}

/// One Cilium rule (a policy's `spec`, or one of its `specs`).
#[derive(Debug, Clone)]
pub struct Spec {
    /// The policy as a verdict names it: `namespace/name` (or `name` when clusterwide).
    pub policy: String,
    /// `CiliumNetworkPolicy default/allow-dns` or `... specs[1]`.
    pub label: String,
    /// `enableDefaultDeny.egress`, defaulting to "has egress or egressDeny rules".
    pub default_deny: bool,
    pub egress: Vec<EgressRule>,
}

/// Where a trie id points: spec, rule (position in `egress`), port entry, selector.
#[derive(Debug, Clone, Copy)]
struct SelRef {
    spec: u32,
    rule: u32,
    entry: u32,
    sel: u32,
}

/// The merged tables of one identity.
#[derive(Debug)]
struct Identity {
    specs: Vec<u32>,
    restricted: bool,
    /// The `rules.dns` selectors of the selected specs, as ranges of ids into
    /// `PolicySet::dns_sels` (and `PolicySet::dns`), ascending: selector ids were handed out in
    /// spec order, so a spec's are contiguous.
    dns_ranges: Vec<(u32, u32)>,
    /// Port entries with no `rules.dns` in rules with a non-FQDN L3 part, as (spec, rule, entry;
    /// None for a rule with no `toPorts`), in rule then entry order: they let every name through.
    dns_open: Vec<(u32, u32, Option<u32>)>,
    /// `toFQDNs` selectors; ids index `PolicySet::fqdn_sels`.
    fqdn: PatternTrie,
    /// (spec, rule) of rules with a non-FQDN L3 part (or none).
    l3_rules: Vec<(u32, u32)>,
}

/// What decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No spec with egress default-deny selects the endpoint: unrestricted.
    Unrestricted,
    /// The caller had no endpoint for the source.
    UnknownEndpoint,
    /// A `rules.dns` selector matched and its rule admits the server and port.
    DnsName {
        spec: u32,
        rule: u32,
        entry: u32,
        sel: u32,
    },
    /// A rule admits the server and port at L3/L4 with no DNS rule: every name passes.
    DnsOpen {
        spec: u32,
        rule: u32,
        entry: Option<u32>,
    },
    /// A `toFQDNs` selector matched a name the cache holds for the address.
    Fqdn {
        spec: u32,
        rule: u32,
        sel: u32,
        name: String,
    },
    /// A rule's L3 part (`toEndpoints`, `toCIDR`, `toCIDRSet`, or none) admits the address.
    Peer {
        spec: u32,
        rule: u32,
        how: PeerMatch,
    },
    /// Denied: no rule admits the server (or destination) on that port and protocol.
    NoRule,
    /// Denied: rules admit the server and port but no `rules.dns` selector matches the name.
    NameNotAllowed,
    /// Denied (egress): the cache holds no name for the address and no L3 rule admits it.
    NoNames,
    /// Denied (egress): the names the cache holds match no usable `toFQDNs` selector.
    NamesNotAllowed { names: Vec<String> },
}

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Dns {
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
    },
    Egress {
        ip: IpAddr,
        port: u16,
        proto: Proto,
    },
}

/// A decision and everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub query: Query,
    /// The identity asked about (None for an unknown endpoint).
    pub identity: Option<u32>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Unrestricted
                | Outcome::DnsName { .. }
                | Outcome::DnsOpen { .. }
                | Outcome::Fqdn { .. }
                | Outcome::Peer { .. }
        )
    }

    /// The (spec, rule) that allowed it.
    fn rule(&self) -> Option<(u32, u32)> {
        match self.outcome {
            Outcome::DnsName { spec, rule, .. }
            | Outcome::DnsOpen { spec, rule, .. }
            | Outcome::Fqdn { spec, rule, .. }
            | Outcome::Peer { spec, rule, .. } => Some((spec, rule)),
            _ => None,
        }
    }
}

/// Identities by number, appended one at a time (under `PolicySet::by_specs`' lock) and read
/// with no lock and no reference count: a verdict touches no shared counter. Number `i` lives in
/// bucket `ilog2(i + 1)`, which holds `2^bucket` slots and is allocated when first needed, so
/// nothing ever moves once written.
#[derive(Debug)]
struct IdentityList {
    buckets: [OnceLock<Bucket>; 33],
}

/// `2^k` slots, each written once.
type Bucket = Box<[OnceLock<Box<Identity>>]>;

impl IdentityList {
    fn new() -> Self {
        IdentityList {
            buckets: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn locate(i: u32) -> (usize, usize) {
        let n = u64::from(i) + 1;
        let bucket = n.ilog2();
        (bucket as usize, (n - (1u64 << bucket)) as usize)
    }

    fn get(&self, i: u32) -> Option<&Identity> {
        let (bucket, at) = Self::locate(i);
        self.buckets[bucket].get()?.get(at)?.get().map(Box::as_ref)
    }

    fn set(&self, i: u32, identity: Identity) {
        let (bucket, at) = Self::locate(i);
        let slots = self.buckets[bucket].get_or_init(|| {
            std::iter::repeat_with(OnceLock::new)
                .take(1 << bucket)
                .collect()
        });
        // Numbers are handed out once, under the lock, so the slot is empty.
        let _ = slots[at].set(Box::new(identity));
    }
}

/// Every spec compiled once; identities are added as endpoints show up.
#[derive(Debug)]
pub struct PolicySet {
    specs: Vec<Spec>,
    dns_sels: Vec<SelRef>,
    /// Every `rules.dns` selector of every spec, ids indexing `dns_sels`: one trie shared by all
    /// identities, so verdicts for many endpoints walk the same (cached) tables.
    dns: PatternTrie,
    fqdn_sels: Vec<SelRef>,
    /// The identity number of each set of specs; its lock also orders appends to `identities`.
    by_specs: Mutex<HashMap<Vec<u32>, u32>>,
    identities: IdentityList,
}

fn count(n: usize, what: &'static str) -> Result<u32, PolicyBuildError> {
    u32::try_from(n).map_err(|_| PolicyBuildError::TooMany { what })
}

impl PolicySet {
    pub fn new(specs: Vec<Spec>) -> Result<Self, PolicyBuildError> {
        let mut dns_sels = Vec::new();
        let mut fqdn_sels = Vec::new();
        count(specs.len(), "specs")?;
        for (s, spec) in specs.iter().enumerate() {
            for (r, rule) in spec.egress.iter().enumerate() {
                for (e, entry) in rule.ports.iter().enumerate() {
                    for sel in 0..entry.dns.as_ref().map_or(0, Vec::len) {
                        dns_sels.push(SelRef {
                            spec: s as u32,
                            rule: count(r, "rules")?,
                            entry: count(e, "port entries")?,
                            sel: count(sel, "selectors")?,
                        });
                    }
                }
                for sel in 0..rule.fqdns.len() {
                    fqdn_sels.push(SelRef {
                        spec: s as u32,
                        rule: count(r, "rules")?,
                        entry: 0,
                        sel: count(sel, "selectors")?,
                    });
                }
            }
        }
        count(dns_sels.len(), "rules.dns selectors")?;
        count(fqdn_sels.len(), "toFQDNs selectors")?;
        let mut dns = PatternTrie::new();
        for (g, x) in dns_sels.iter().enumerate() {
            let entry = &specs[x.spec as usize].egress[x.rule as usize].ports[x.entry as usize];
            if let Some(sel) = entry.dns.as_ref().and_then(|d| d.get(x.sel as usize)) {
                dns.insert(&sel.parsed, g as u32);
            }
        }
        Ok(PolicySet {
            specs,
            dns_sels,
            dns,
            fqdn_sels,
            by_specs: Mutex::new(HashMap::new()),
            identities: IdentityList::new(),
        })
    }

    pub fn specs(&self) -> &[Spec] {
        &self.specs
    }

    /// The identity for the set of specs selecting an endpoint (in any order), built on first
    /// use and shared by every endpoint with the same set.
    pub fn identity(&self, specs: &[u32]) -> Result<u32, PolicyBuildError> {
        let mut key = specs.to_vec();
        key.sort_unstable();
        key.dedup();
        if let Some(&id) = self.by_specs().get(&key) {
            return Ok(id);
        }
        for &s in &key {
            if s as usize >= self.specs.len() {
                return Err(PolicyBuildError::UnknownIndex {
                    what: "spec",
                    index: s,
                });
            }
        }
        let built = self.build_identity(key.clone());
        let mut by_specs = self.by_specs();
        if let Some(&id) = by_specs.get(&key) {
            return Ok(id);
        }
        let id = count(by_specs.len(), "identities")?;
        // Written before the number is published (here, under the lock), so whoever holds a
        // number finds its identity.
        self.identities.set(id, built);
        by_specs.insert(key, id);
        Ok(id)
    }

    pub fn identity_count(&self) -> usize {
        self.by_specs().len()
    }

    // A poisoned lock only means a panic elsewhere; the table is never left half-written (an
    // identity is added whole), so the data is still good.
    fn by_specs(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u32>, u32>> {
        self.by_specs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn build_identity(&self, specs: Vec<u32>) -> Identity {
        let mut id = Identity {
            restricted: specs.iter().any(|&s| self.specs[s as usize].default_deny),
            specs,
            dns_ranges: Vec::new(),
            dns_open: Vec::new(),
            fqdn: PatternTrie::new(),
            l3_rules: Vec::new(),
        };
        // Selector ids were handed out in spec order, so a range scan finds a spec's selectors.
        for &s in &id.specs {
            let spec = &self.specs[s as usize];
            for (r, rule) in spec.egress.iter().enumerate() {
                let r = r as u32;
                if rule.fqdns.is_empty() {
                    id.l3_rules.push((s, r));
                    if rule.ports.is_empty() {
                        id.dns_open.push((s, r, None));
                    }
                    for (e, entry) in rule.ports.iter().enumerate() {
                        if entry.dns.is_none() {
                            id.dns_open.push((s, r, Some(e as u32)));
                        }
                    }
                }
            }
            let first = self.dns_sels.partition_point(|x| x.spec < s);
            let end = self.dns_sels.partition_point(|x| x.spec <= s);
            if first < end {
                id.dns_ranges.push((first as u32, end as u32));
            }
            let first = self.fqdn_sels.partition_point(|x| x.spec < s);
            for (g, x) in self.fqdn_sels[first..].iter().enumerate() {
                if x.spec != s {
                    break;
                }
                let rule = &spec.egress[x.rule as usize];
                id.fqdn
                    .insert(&rule.fqdns[x.sel as usize].parsed, (first + g) as u32);
            }
        }
        id
    }

    fn get(&self, identity: u32) -> Result<&Identity, PolicyBuildError> {
        self.identities
            .get(identity)
            .ok_or(PolicyBuildError::UnknownIndex {
                what: "identity",
                index: identity,
            })
    }

    fn with_identity<R>(
        &self,
        identity: u32,
        f: impl FnOnce(&Identity) -> R,
    ) -> Result<R, PolicyBuildError> {
        self.get(identity).map(f)
    }

    /// True when some spec with egress default-deny selects the identity (its egress is then
    /// limited to what rules allow); false for an unrestricted identity.
    pub fn is_restricted(&self, identity: u32) -> Result<bool, PolicyBuildError> {
        self.with_identity(identity, |id| id.restricted)
    }

    fn rule(&self, spec: u32, rule: u32) -> &EgressRule {
        &self.specs[spec as usize].egress[rule as usize]
    }

    /// The first thing that allows the DNS query, if any: the `rules.dns` selector with the
    /// lowest id whose port entry admits the port and whose rule admits the server, else the
    /// first open port entry (no `rules.dns`) admitting both. With `first_found`, any allowing
    /// selector will do (the answer is only used as yes/no), so the walk stops at the first.
    fn dns_allowing<N: Labels + ?Sized>(
        &self,
        id: &Identity,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &N,
        first_found: bool,
    ) -> Option<Outcome> {
        let admits = |g: u32| {
            self.dns_sels.get(g as usize).is_some_and(|x| {
                let rule = self.rule(x.spec, x.rule);
                rule.ports[x.entry as usize].admits(port, proto)
                    && rule.peers.admits(server).is_some()
            })
        };
        // Each slice holds the (ascending) ids of the selectors of one trie node that matches,
        // from every spec; only the identity's ranges count. A range search per selected spec
        // keeps a selector shared by many specs cheap.
        let mut best: Option<u32> = None;
        self.dns.visit_matching(name, |ids| {
            for &(lo, hi) in &id.dns_ranges {
                if best.is_some_and(|b| b <= lo) {
                    break;
                }
                // Ids stop short of u32::MAX (their count fits a u32).
                let below = hi.min(best.unwrap_or(u32::MAX));
                let from = ids.partition_point(|&g| g < lo);
                let found = ids[from..]
                    .iter()
                    .take_while(|&&g| g < below)
                    .find(|&&g| admits(g));
                if let Some(&g) = found {
                    best = Some(g);
                    // Later ranges hold only higher ids.
                    break;
                }
            }
            first_found && best.is_some()
        });
        if let Some(x) = best.and_then(|g| self.dns_sels.get(g as usize)) {
            return Some(Outcome::DnsName {
                spec: x.spec,
                rule: x.rule,
                entry: x.entry,
                sel: x.sel,
            });
        }
        id.dns_open.iter().find_map(|&(spec, rule, entry)| {
            let r = self.rule(spec, rule);
            let admits = entry.map_or(true, |e| r.ports[e as usize].admits(port, proto));
            (admits && r.peers.admits(server).is_some()).then_some(Outcome::DnsOpen {
                spec,
                rule,
                entry,
            })
        })
    }

    /// Yes or no for a DNS query, as [`PolicySet::dns_verdict`] decides it, without the
    /// explanation: the per-query hot path. An identity never handed out is denied.
    pub fn dns_allowed<N: Labels + ?Sized>(
        &self,
        identity: u32,
        server: IpAddr,
        port: u16,
        proto: Proto,
        name: &N,
    ) -> bool {
        self.with_identity(identity, |id| {
            !id.restricted
                || self
                    .dns_allowing(id, Some(server), port, proto, name, true)
                    .is_some()
        })
        .unwrap_or(false)
    }

    /// The DNS verdict's outcome, except that a query the rules deny gives None: why they deny
    /// it ([`Outcome::NoRule`] or [`Outcome::NameNotAllowed`]) takes a walk over every rule of
    /// the identity, which [`PolicySet::dns_denial`] does when someone asks.
    pub fn dns_outcome<N: Labels + ?Sized>(
        &self,
        identity: Option<u32>,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &N,
    ) -> Result<Option<Outcome>, PolicyBuildError> {
        let Some(identity) = identity else {
            return Ok(Some(Outcome::UnknownEndpoint));
        };
        self.with_identity(identity, |id| {
            if !id.restricted {
                return Some(Outcome::Unrestricted);
            }
            self.dns_allowing(id, server, port, proto, name, false)
        })
    }

    /// Why the rules deny a DNS query that [`PolicySet::dns_outcome`] found nothing allowing:
    /// [`Outcome::NameNotAllowed`] when some rule admits the server and port with `rules.dns`
    /// (so only the name failed), else [`Outcome::NoRule`].
    pub fn dns_denial(
        &self,
        identity: u32,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
    ) -> Result<Outcome, PolicyBuildError> {
        self.with_identity(identity, |id| {
            let dns_path = id.l3_rules.iter().any(|&(s, r)| {
                let rule = self.rule(s, r);
                rule.peers.admits(server).is_some()
                    && rule
                        .ports
                        .iter()
                        .any(|e| e.dns.is_some() && e.admits(port, proto))
            });
            if dns_path {
                Outcome::NameNotAllowed
            } else {
                Outcome::NoRule
            }
        })
    }

    /// The DNS verdict: may this identity ask `server` (None: any server a rule admits) on
    /// `port`/`proto` for `name`?
    pub fn dns_verdict(
        &self,
        identity: Option<u32>,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &LabelBuf,
    ) -> Result<Verdict, PolicyBuildError> {
        let outcome = match self.dns_outcome(identity, server, port, proto, name)? {
            Some(outcome) => outcome,
            // dns_outcome settles an unknown endpoint, so the identity is there.
            None => match identity {
                Some(i) => self.dns_denial(i, server, port, proto)?,
                None => Outcome::UnknownEndpoint,
            },
        };
        Ok(Verdict {
            outcome,
            query: Query::Dns {
                server,
                port,
                proto,
            },
            identity,
        })
    }

    /// The egress verdict: may this identity reach `ip` on `port`/`proto`, given the names the
    /// DNS cache holds `ip` under for it?
    pub fn egress_verdict(
        &self,
        identity: Option<u32>,
        ip: IpAddr,
        port: u16,
        proto: Proto,
        names: &[(LabelBuf, String)],
    ) -> Result<Verdict, PolicyBuildError> {
        let query = Query::Egress { ip, port, proto };
        let verdict = |outcome| {
            Ok(Verdict {
                outcome,
                query,
                identity,
            })
        };
        let Some(identity) = identity else {
            return verdict(Outcome::UnknownEndpoint);
        };
        let id = self.get(identity)?;
        if !id.restricted {
            return verdict(Outcome::Unrestricted);
        }
        for (name, text) in names {
            // Cilium's toFQDNs selectors match only names whose labels are all made of
            // [-a-zA-Z0-9_], the match-all ones (`*`, `**.`) included: their regex is
            // `(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)` (matchpattern.ToAnchoredRegexp), while a DNS
            // rule's match-all admits every name. Other selectors need it label by label.
            if !name.usual_below(name.count()) {
                continue;
            }
            for g in id.fqdn.matching(name) {
                let x = self.fqdn_sels[g as usize];
                if self.rule(x.spec, x.rule).port_entry(port, proto).is_some() {
                    return verdict(Outcome::Fqdn {
                        spec: x.spec,
                        rule: x.rule,
                        sel: x.sel,
                        name: text.clone(),
                    });
                }
            }
        }
        for &(s, r) in &id.l3_rules {
            let rule = self.rule(s, r);
            if let Some(how) = rule.peers.admits(Some(ip)) {
                if rule.port_entry(port, proto).is_some() {
                    return verdict(Outcome::Peer {
                        spec: s,
                        rule: r,
                        how,
                    });
                }
            }
        }
        verdict(if names.is_empty() {
            Outcome::NoNames
        } else {
            Outcome::NamesNotAllowed {
                names: names.iter().map(|(_, t)| t.clone()).collect(),
            }
        })
    }

    /// `namespace/name` of the policy that allowed the verdict.
    pub fn policy_of(&self, v: &Verdict) -> Option<&str> {
        v.rule()
            .map(|(s, _)| self.specs[s as usize].policy.as_str())
    }

    /// The `egress[]` index of the rule that allowed the verdict.
    pub fn rule_index_of(&self, v: &Verdict) -> Option<u32> {
        v.rule().map(|(s, r)| self.rule(s, r).index)
    }

    /// The selector that allowed the verdict, as a field path and value.
    pub fn selector_of(&self, v: &Verdict) -> Option<String> {
        let sel_text = |s: &NameSel| {
            format!(
                "{}: {:?}",
                if s.is_pattern {
                    "matchPattern"
                } else {
                    "matchName"
                },
                s.text
            )
        };
        match &v.outcome {
            Outcome::DnsName {
                spec,
                rule,
                entry,
                sel,
            } => {
                let e = &self.rule(*spec, *rule).ports[*entry as usize];
                let s = e.dns.as_ref()?.get(*sel as usize)?;
                Some(format!("toPorts[{entry}].rules.dns[{sel}].{}", sel_text(s)))
            }
            Outcome::DnsOpen { entry, .. } => Some(match entry {
                Some(e) => format!("toPorts[{e}] (no rules.dns)"),
                None => "(no toPorts: all ports)".to_owned(),
            }),
            Outcome::Fqdn {
                spec, rule, sel, ..
            } => {
                let s = self.rule(*spec, *rule).fqdns.get(*sel as usize)?;
                Some(format!("toFQDNs[{sel}].{}", sel_text(s)))
            }
            Outcome::Peer { spec, rule, how } => Some(match how {
                PeerMatch::Any => "(no L3 selector: any destination)".to_owned(),
                PeerMatch::Endpoint => match &self.rule(*spec, *rule).peers {
                    Peers::Listed { ips_label, .. } => ips_label.clone(),
                    Peers::Any => return None,
                },
                PeerMatch::Cidr(i) => match &self.rule(*spec, *rule).peers {
                    Peers::Listed { cidrs, .. } => cidrs.get(*i as usize)?.label.clone(),
                    Peers::Any => return None,
                },
            }),
            _ => None,
        }
    }

    fn identity_policies(&self, identity: Option<u32>) -> String {
        let Some(id) = identity.and_then(|i| self.get(i).ok()) else {
            return String::new();
        };
        let mut names: Vec<&str> = id
            .specs
            .iter()
            .filter(|&&s| self.specs[s as usize].default_deny)
            .map(|&s| self.specs[s as usize].label.as_str())
            .collect();
        names.dedup();
        let shown = names.len().min(3);
        let mut out = names[..shown].join(", ");
        if names.len() > shown {
            let _ = write!(out, " and {} more", names.len() - shown);
        }
        out
    }

    /// A sentence explaining the verdict.
    pub fn reason(&self, v: &Verdict) -> String {
        let by = |spec: &u32, rule: &u32| {
            format!(
                "{} egress rule {}",
                self.specs[*spec as usize].label,
                self.rule(*spec, *rule).index
            )
        };
        let sel = || self.selector_of(v).unwrap_or_default();
        let what = match v.query {
            Query::Dns {
                server,
                port,
                proto,
            } => match server {
                Some(s) => format!("DNS to {s} port {port}/{}", proto.as_str()),
                None => format!("DNS on port {port}/{}", proto.as_str()),
            },
            Query::Egress { ip, port, proto } => {
                format!("traffic to {ip} port {port}/{}", proto.as_str())
            }
        };
        let selected = || {
            format!(
                "the endpoint is selected by egress policy ({}), so egress is default-deny",
                self.identity_policies(v.identity)
            )
        };
        match &v.outcome {
            Outcome::Unrestricted => format!(
                "allowed: no egress policy selects the endpoint, so {what} is unrestricted"
            ),
            Outcome::UnknownEndpoint => {
                format!("denied: the source is not a known endpoint, so {what} is not allowed")
            }
            Outcome::DnsName { spec, rule, .. } => format!(
                "allowed by {}: {} matches the name, and the rule allows {what}",
                by(spec, rule),
                sel()
            ),
            Outcome::DnsOpen { spec, rule, .. } => format!(
                "allowed by {}: {} allows {what} with no DNS rule, so every name is allowed",
                by(spec, rule),
                sel()
            ),
            Outcome::Fqdn {
                spec, rule, name, ..
            } => format!(
                "allowed by {}: {} matches {name}, a name the DNS cache holds for this address, \
                 and the rule allows {what}",
                by(spec, rule),
                sel()
            ),
            Outcome::Peer { spec, rule, .. } => {
                format!("allowed by {}: {} admits {what}", by(spec, rule), sel())
            }
            Outcome::NoRule => format!("denied: {}, and no egress rule allows {what}", selected()),
            Outcome::NameNotAllowed => format!(
                "denied: {}; rules allow {what} but no rules.dns selector of theirs matches the name",
                selected()
            ),
            Outcome::NoNames => format!(
                "denied: {}; the DNS cache holds no name for the address for this endpoint, and \
                 no toCIDR/toCIDRSet/toEndpoints rule allows {what}",
                selected()
            ),
            Outcome::NamesNotAllowed { names } => format!(
                "denied: {}; the names the DNS cache holds for the address ({}) match no toFQDNs \
                 selector of a rule allowing {what}, and no toCIDR/toCIDRSet/toEndpoints rule \
                 allows it",
                selected(),
                names.join(", ")
            ),
        }
    }

    /// The outcome as a short word for logs and metrics.
    pub fn kind(v: &Verdict) -> &'static str {
        match v.outcome {
            Outcome::Unrestricted => "unrestricted",
            Outcome::UnknownEndpoint => "unknown-endpoint",
            Outcome::DnsName { .. } => "dns-name",
            Outcome::DnsOpen { .. } => "dns-open",
            Outcome::Fqdn { .. } => "fqdn",
            Outcome::Peer { .. } => "peer",
            Outcome::NoRule => "no-rule",
            Outcome::NameNotAllowed => "name-not-allowed",
            Outcome::NoNames => "no-names",
            Outcome::NamesNotAllowed { .. } => "names-not-allowed",
        }
    }
}
