//! `CompiledPolicy` and `Verdict`: conversions around `crate::policy`.

use std::net::IpAddr;
use std::sync::Arc;

use pyo3::prelude::*;

use super::pattern::name_arg;
use crate::error::Error;
use crate::pattern::{self, LabelBuf};
use crate::policy::{
    Cidr, CidrRule, EgressRule, NameSel, Peers, PolicyBuildError, PolicySet, PortEntry, PortRange,
    Proto, Spec, Verdict,
};

/// `(is_pattern, text)`.
type SelIn = (bool, String);
/// `(address, prefix length, except [(address, prefix length)], label)`.
type CidrIn = (String, u8, Vec<(String, u8)>, String);
/// `(endpoint addresses, cidrs)`; None for a rule with no L3 selector.
type PeersIn = Option<(Vec<String>, Vec<CidrIn>)>;
/// `(ranges [(port, end port, protocol)], rules.dns or None)`.
type PortIn = (Vec<(u16, u16, String)>, Option<Vec<SelIn>>);
/// `(egress index, toFQDNs, peers, toPorts)`.
type RuleIn = (u32, Vec<SelIn>, PeersIn, Vec<PortIn>);
/// `(policy, label, default deny, egress rules)`.
type SpecIn = (String, String, bool, Vec<RuleIn>);

fn addr(text: &str) -> Result<IpAddr, Error> {
    text.parse().map_err(|_| {
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
    match proto(text)? {
        Proto::Any => Err(PolicyBuildError::BadProtocol {
            text: text.to_owned(),
        }
        .into()),
        p => Ok(p),
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
        Some((ips, cidrs)) => Peers::Listed {
            ips: ips.iter().map(|s| addr(s)).collect::<Result<_, _>>()?,
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

/// Egress rules compiled for verdicts; see `fqdnguard.Policy` for the public face.
#[derive(Debug)]
#[pyclass(name = "CompiledPolicy", module = "fqdnguard._core", frozen)]
pub struct PyCompiledPolicy {
    set: Arc<PolicySet>,
}

impl PyCompiledPolicy {
    /// The compiled set itself, shared with the proxy engine.
    pub(crate) fn shared(&self) -> Arc<PolicySet> {
        Arc::clone(&self.set)
    }
}

#[pymethods]
impl PyCompiledPolicy {
    #[new]
    fn new(py: Python<'_>, specs: Vec<SpecIn>) -> PyResult<Self> {
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
        Ok(PyCompiledPolicy { set: Arc::new(set) })
    }

    /// The identity number for the specs (by position) selecting an endpoint.
    fn identity(&self, specs: Vec<u32>) -> PyResult<u32> {
        Ok(self.set.identity(&specs).map_err(Error::from)?)
    }

    #[getter]
    fn identity_count(&self) -> usize {
        self.set.identity_count()
    }

    #[pyo3(signature = (identity, server, port, protocol, qname))]
    fn dns_verdict(
        &self,
        identity: Option<u32>,
        server: Option<&str>,
        port: u16,
        protocol: &str,
        qname: &Bound<'_, PyAny>,
    ) -> PyResult<PyVerdict> {
        let server = server.map(addr).transpose()?;
        let proto = query_proto(protocol)?;
        let name = name_arg(qname)?;
        let verdict = self
            .set
            .dns_verdict(identity, server, port, proto, &name)
            .map_err(Error::from)?;
        Ok(PyVerdict {
            verdict,
            set: Arc::clone(&self.set),
        })
    }

    #[pyo3(signature = (identity, ip, port, protocol, names))]
    fn egress_verdict(
        &self,
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
        let verdict = self
            .set
            .egress_verdict(identity, ip, port, proto, &names)
            .map_err(Error::from)?;
        Ok(PyVerdict {
            verdict,
            set: Arc::clone(&self.set),
        })
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
    verdict: Verdict,
    set: Arc<PolicySet>,
}

#[pymethods]
impl PyVerdict {
    #[getter]
    fn allowed(&self) -> bool {
        self.verdict.allowed()
    }

    /// A sentence naming the policy, rule and selector that decided, or why nothing allowed.
    #[getter]
    fn reason(&self) -> String {
        self.set.reason(&self.verdict)
    }

    /// `namespace/name` (or `name` when clusterwide) of the policy that allowed it.
    #[getter]
    fn policy(&self) -> Option<String> {
        self.set.policy_of(&self.verdict).map(str::to_owned)
    }

    /// The index in the policy's `egress` list of the rule that allowed it.
    #[getter]
    fn rule_index(&self) -> Option<u32> {
        self.set.rule_index_of(&self.verdict)
    }

    /// The selector that allowed it, with its field path.
    #[getter]
    fn selector(&self) -> Option<String> {
        self.set.selector_of(&self.verdict)
    }

    /// A short word for logs and metrics (e.g. "dns-name", "no-rule").
    #[getter]
    fn kind(&self) -> &'static str {
        PolicySet::kind(&self.verdict)
    }

    fn __bool__(&self) -> bool {
        self.verdict.allowed()
    }

    fn __repr__(&self) -> String {
        format!(
            "Verdict(allowed={}, kind={:?}, policy={:?}, rule_index={:?})",
            if self.verdict.allowed() {
                "True"
            } else {
                "False"
            },
            PolicySet::kind(&self.verdict),
            self.set.policy_of(&self.verdict),
            self.set.rule_index_of(&self.verdict),
        )
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCompiledPolicy>()?;
    m.add_class::<PyVerdict>()?;
    Ok(())
}
