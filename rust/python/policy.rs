//! `CompiledPolicy` and `Verdict`: conversions around `crate::policy`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use hashbrown::HashMap;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use super::pattern::{name_arg, with_labels};
use crate::error::Error;
use crate::pattern::{self, LabelBuf};
use crate::policy::{
    parse_ip, Cidr, CidrRule, EgressRule, NameSel, Outcome, Peers, PolicyBuildError, PolicySet,
    PortEntry, PortRange, Proto, Query, Spec, Verdict,
};

/// `(is_pattern, text)`.
type SelIn = (bool, String);
/// `(address, prefix length, except [(address, prefix length)], label)`.
type CidrIn = (String, u8, Vec<(String, u8)>, String);
/// `(addresses, cidrs, how a verdict names an address match)`; None for a rule with no L3
/// selector.
type PeersIn = Option<(Vec<String>, Vec<CidrIn>, String)>;
/// `(ranges [(port, end port, protocol)], rules.dns or None)`.
type PortIn = (Vec<(u16, u16, String)>, Option<Vec<SelIn>>);
/// `(egress index, toFQDNs, peers, toPorts)`.
type RuleIn = (u32, Vec<SelIn>, PeersIn, Vec<PortIn>);
/// `(policy, label, default deny, egress rules)`.
type SpecIn = (String, String, bool, Vec<RuleIn>);

fn addr(text: &str) -> Result<IpAddr, Error> {
    parse_ip(text).ok_or_else(|| {
        PolicyBuildError::BadAddress {
            text: text.to_owned(),
        }
        .into()
    })
}

fn proto(text: &str) -> Result<Proto, Error> {
    Proto::parse(text).ok_or_else(|| {
        PolicyBuildError::BadProtocol {
            text: text.to_owned(),
        }
        .into()
    })
}

/// A query names one concrete protocol.
fn query_proto(text: &str) -> Result<Proto, Error> {
    match Proto::parse(text) {
        Some(Proto::Any) | None => Err(PolicyBuildError::BadQueryProtocol {
            text: text.to_owned(),
        }
        .into()),
        Some(p) => Ok(p),
    }
}

fn sel((is_pattern, text): SelIn) -> Result<NameSel, Error> {
    let parsed = if is_pattern {
        pattern::parse_match_pattern(&text)?
    } else {
        pattern::parse_match_name(&text)?
    };
    Ok(NameSel {
        parsed,
        is_pattern,
        text,
    })
}

fn cidr(text: &str, bits: u8) -> Result<Cidr, Error> {
    Ok(Cidr::new(addr(text)?, bits)?)
}

fn rule((index, fqdns, peers, ports): RuleIn) -> Result<EgressRule, Error> {
    let peers = match peers {
        None => Peers::Any,
        Some((ips, cidrs, ips_label)) => Peers::Listed {
            ips: ips.iter().map(|s| addr(s)).collect::<Result<_, _>>()?,
            ips_label,
            cidrs: cidrs
                .into_iter()
                .map(|(a, bits, except, label)| {
                    Ok(CidrRule {
                        cidr: cidr(&a, bits)?,
                        except: except
                            .iter()
                            .map(|(a, b)| cidr(a, *b))
                            .collect::<Result<_, Error>>()?,
                        label,
                    })
                })
                .collect::<Result<_, Error>>()?,
        },
    };
    let ports = ports
        .into_iter()
        .map(|(ranges, dns)| {
            Ok(PortEntry {
                ranges: ranges
                    .iter()
                    .map(|(lo, hi, p)| Ok(PortRange::new(*lo, *hi, proto(p)?)))
                    .collect::<Result<_, Error>>()?,
                dns: dns
                    .map(|d| d.into_iter().map(sel).collect::<Result<_, _>>())
                    .transpose()?,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(EgressRule {
        index,
        fqdns: fqdns.into_iter().map(sel).collect::<Result<_, _>>()?,
        peers,
        ports,
    })
}

/// An endpoint object of the registry the policy was built with, and its identity once known.
#[derive(Debug)]
struct KnownEndpoint {
    /// Held so that its address (the table's key) stays its own.
    obj: Py<PyAny>,
    /// `UNSET` until the first verdict for it.
    identity: AtomicU64,
}

const UNSET: u64 = u64::MAX;

/// Egress rules compiled for verdicts; see `fqdnguard.Policy` for the public face.
#[derive(Debug)]
#[pyclass(name = "CompiledPolicy", module = "fqdnguard._core", frozen)]
pub struct PyCompiledPolicy {
    set: Arc<PolicySet>,
    /// The registry's endpoint objects by address: a verdict finds its identity without
    /// calling back into Python (after the first).
    endpoints: HashMap<usize, KnownEndpoint>,
    /// `selects(endpoint) -> list[int]`: the specs (by position) selecting an endpoint.
    selects: Option<Py<PyAny>>,
}

impl PyCompiledPolicy {
    /// The compiled set, shared with the proxy engine.
    pub(crate) fn shared(&self) -> Arc<PolicySet> {
        Arc::clone(&self.set)
    }

    /// A verdict holding the policy as a Python reference: making and dropping it touches no
    /// atomic counter.
    fn verdict(slf: &Bound<'_, Self>, verdict: Verdict) -> PyVerdict {
        PyVerdict {
            allowed: verdict.allowed(),
            state: VerdictState::Settled(verdict),
            policy: slf.clone().unbind(),
        }
    }
}

#[pymethods]
impl PyCompiledPolicy {
    /// `endpoints`: endpoint objects whose identity is kept here once known; `selects`: how to
    /// find the specs selecting an endpoint (any endpoint, known or not).
    #[new]
    #[pyo3(signature = (specs, endpoints = Vec::new(), selects = None))]
    fn new(
        py: Python<'_>,
        specs: Vec<SpecIn>,
        endpoints: Vec<Bound<'_, PyAny>>,
        selects: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let set = py.detach(|| -> Result<PolicySet, Error> {
            let specs = specs
                .into_iter()
                .map(|(policy, label, default_deny, egress)| {
                    Ok(Spec {
                        policy,
                        label,
                        default_deny,
                        egress: egress.into_iter().map(rule).collect::<Result<_, Error>>()?,
                    })
                })
                .collect::<Result<_, Error>>()?;
            Ok(PolicySet::new(specs)?)
        })?;
        let endpoints = endpoints
            .into_iter()
            .map(|ep| {
                let known = KnownEndpoint {
                    obj: ep.unbind(),
                    identity: AtomicU64::new(UNSET),
                };
                (known.obj.as_ptr() as usize, known)
            })
            .collect();
        Ok(PyCompiledPolicy {
            set: Arc::new(set),
            endpoints,
            selects,
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for known in self.endpoints.values() {
            visit.call(&known.obj)?;
        }
        visit.call(&self.selects)
    }

    /// The identity number for the specs (by position) selecting an endpoint.
    fn identity(&self, specs: Vec<u32>) -> PyResult<u32> {
        Ok(self.set.identity(&specs).map_err(Error::from)?)
    }

    /// The identity of an endpoint: from the table when it is one of `endpoints`, else (and
    /// the first time) from the specs `selects` finds.
    fn identity_of(&self, endpoint: &Bound<'_, PyAny>) -> PyResult<u32> {
        let known = self.endpoints.get(&(endpoint.as_ptr() as usize));
        if let Some(id) = known.map(|k| k.identity.load(Ordering::Relaxed)) {
            if id != UNSET {
                return Ok(id as u32);
            }
        }
        let Some(selects) = &self.selects else {
            return Err(PyValueError::new_err(
                "this CompiledPolicy has no selects function: it knows only identity numbers",
            ));
        };
        let specs: Vec<u32> = selects.bind(endpoint.py()).call1((endpoint,))?.extract()?;
        let id = self.set.identity(&specs).map_err(Error::from)?;
        if let Some(k) = known {
            k.identity.store(u64::from(id), Ordering::Relaxed);
        }
        Ok(id)
    }

    /// True when an egress policy selects the identity (its egress is default-deny).
    fn is_restricted(&self, identity: u32) -> PyResult<bool> {
        Ok(self.set.is_restricted(identity).map_err(Error::from)?)
    }

    #[getter]
    fn identity_count(&self) -> usize {
        self.set.identity_count()
    }

    #[pyo3(signature = (identity, server, port, protocol, qname))]
    fn dns_verdict(
        slf: &Bound<'_, Self>,
        identity: Option<u32>,
        server: Option<&str>,
        port: u16,
        protocol: &str,
        qname: &Bound<'_, PyAny>,
    ) -> PyResult<PyVerdict> {
        let server = server.map(addr).transpose()?;
        let proto = query_proto(protocol)?;
        let set = &slf.get().set;
        let outcome = with_labels!(qname, |name| set
            .dns_outcome(identity, server, port, proto, &name))
        .map_err(Error::from)?;
        Ok(match (outcome, identity) {
            (None, Some(identity)) => PyVerdict {
                allowed: false,
                state: VerdictState::DnsDenied {
                    identity,
                    server,
                    port,
                    proto,
                    settled: OnceLock::new(),
                },
                policy: slf.clone().unbind(),
            },
            (outcome, identity) => Self::verdict(
                slf,
                Verdict {
                    outcome: outcome.unwrap_or(Outcome::UnknownEndpoint),
                    query: Query::Dns {
                        server,
                        port,
                        proto,
                    },
                    identity,
                },
            ),
        })
    }

    /// `dns_verdict` for an endpoint object (None: an unknown source).
    #[pyo3(signature = (endpoint, server, port, protocol, qname))]
    fn endpoint_dns_verdict(
        slf: &Bound<'_, Self>,
        endpoint: Option<&Bound<'_, PyAny>>,
        server: Option<&str>,
        port: u16,
        protocol: &str,
        qname: &Bound<'_, PyAny>,
    ) -> PyResult<PyVerdict> {
        let identity = endpoint.map(|e| slf.get().identity_of(e)).transpose()?;
        Self::dns_verdict(slf, identity, server, port, protocol, qname)
    }

    #[pyo3(signature = (identity, ip, port, protocol, names))]
    fn egress_verdict(
        slf: &Bound<'_, Self>,
        identity: Option<u32>,
        ip: &str,
        port: u16,
        protocol: &str,
        names: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<PyVerdict> {
        let ip = addr(ip)?;
        let proto = query_proto(protocol)?;
        let names = names
            .iter()
            .map(|n| Ok((name_arg(n)?, n.str()?.to_string())))
            .collect::<PyResult<Vec<(LabelBuf, String)>>>()?;
        let verdict = slf
            .get()
            .set
            .egress_verdict(identity, ip, port, proto, &names)
            .map_err(Error::from)?;
        Ok(Self::verdict(slf, verdict))
    }

    fn __len__(&self) -> usize {
        self.set.specs().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "CompiledPolicy(<{} specs, {} identities>)",
            self.set.specs().len(),
            self.set.identity_count()
        )
    }
}

/// A DNS or egress decision that can explain itself.
#[derive(Debug)]
#[pyclass(name = "Verdict", module = "fqdnguard._core", frozen)]
pub struct PyVerdict {
    #[pyo3(get)]
    allowed: bool,
    state: VerdictState,
    policy: Py<PyCompiledPolicy>,
}

#[derive(Debug)]
enum VerdictState {
    Settled(Verdict),
    /// A DNS query the rules deny: why (no rule for the server and port, or no name matched)
    /// is worked out on first read.
    DnsDenied {
        identity: u32,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
        settled: OnceLock<Verdict>,
    },
}

impl PyVerdict {
    fn set(&self) -> &PolicySet {
        &self.policy.get().set
    }

    fn verdict(&self) -> &Verdict {
        match &self.state {
            VerdictState::Settled(v) => v,
            VerdictState::DnsDenied {
                identity,
                server,
                port,
                proto,
                settled,
            } => settled.get_or_init(|| Verdict {
                // Identities are never removed, so the one the query used is still there.
                outcome: self
                    .set()
                    .dns_denial(*identity, *server, *port, *proto)
                    .unwrap_or(Outcome::NoRule),
                query: Query::Dns {
                    server: *server,
                    port: *port,
                    proto: *proto,
                },
                identity: Some(*identity),
            }),
        }
    }
}

#[pymethods]
impl PyVerdict {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.policy)
    }

    /// A sentence naming the policy, rule and selector that decided, or why nothing allowed.
    #[getter]
    fn reason(&self) -> String {
        self.set().reason(self.verdict())
    }

    /// `namespace/name` (or `name` when clusterwide) of the policy that allowed it.
    #[getter]
    fn policy(&self) -> Option<String> {
        self.set().policy_of(self.verdict()).map(str::to_owned)
    }

    /// The index in the policy's `egress` list of the rule that allowed it.
    #[getter]
    fn rule_index(&self) -> Option<u32> {
        self.set().rule_index_of(self.verdict())
    }

    /// The selector that allowed it, with its field path.
    #[getter]
    fn selector(&self) -> Option<String> {
        self.set().selector_of(self.verdict())
    }

    /// A short word for logs and metrics (e.g. "dns-name", "no-rule").
    #[getter]
    fn kind(&self) -> &'static str {
        PolicySet::kind(self.verdict())
    }

    fn __bool__(&self) -> bool {
        self.allowed
    }

    fn __repr__(&self) -> String {
        format!(
            "Verdict(allowed={}, kind={:?}, policy={:?}, rule_index={:?})",
            if self.allowed { "True" } else { "False" },
            PolicySet::kind(self.verdict()),
            self.set().policy_of(self.verdict()),
            self.set().rule_index_of(self.verdict()),
        )
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCompiledPolicy>()?;
    m.add_class::<PyVerdict>()?;
    Ok(())
}
