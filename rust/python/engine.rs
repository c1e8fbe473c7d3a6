//! `Engine`: the proxy's per-packet calls. Converts only; the logic is in `crate::engine`.

use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::cache::{changes_out, PyChangeList, PyDnsCache};
use super::policy::PyCompiledPolicy;
use crate::engine::{
    self, EndpointRef, EngineConfig, LogMode, LogRecord, PolicyTable, QueryAction, Reject,
    LATENCY_BUCKETS, MAX_RETRIES, RETRANSMIT_FLOOR,
};
use crate::pattern::LabelBuf;
use crate::policy::{PolicySet, Proto};

pub(super) fn engine_err(e: engine::EngineError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn ip_arg(text: &str, what: &str) -> PyResult<IpAddr> {
    text.split('%')
        .next()
        .unwrap_or(text)
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| PyValueError::new_err(format!("{what}: {text:?} is not an IP address")))
}

pub(super) fn log_out<'py>(py: Python<'py>, rec: Option<LogRecord>) -> PyResult<Bound<'py, PyAny>> {
    let Some(r) = rec else {
        return Ok(py.None().into_bound(py));
    };
    let answers: Vec<String> = r.answers.iter().map(ToString::to_string).collect();
    Ok(PyTuple::new(
        py,
        [
            r.time.into_pyobject(py)?.into_any(),
            r.endpoint.into_pyobject(py)?.into_any(),
            r.qname.into_pyobject(py)?.into_any(),
            r.qtype.into_pyobject(py)?.into_any(),
            r.verdict.as_str().into_pyobject(py)?.into_any(),
            r.rcode.into_pyobject(py)?.into_any(),
            r.upstream_ms.into_pyobject(py)?.into_any(),
            answers.into_pyobject(py)?.into_any(),
        ],
    )?
    .into_any())
}

type EndpointIn = (u32, Option<u32>);

fn table(
    policy: Arc<PolicySet>,
    endpoints: std::collections::HashMap<String, EndpointIn>,
    unknown: Option<EndpointIn>,
) -> PyResult<PolicyTable> {
    let mut by_ip = HashMap::with_capacity(endpoints.len());
    for (ip, (id, identity)) in endpoints {
        by_ip.insert(
            ip_arg(&ip, "endpoint address")?,
            EndpointRef { id, identity },
        );
    }
    let unknown = unknown.map(|(id, identity)| EndpointRef { id, identity });
    Ok(PolicyTable {
        policy,
        by_ip,
        unknown,
    })
}

/// The proxy's data path: one call per query, one per answer.
#[derive(Debug)]
#[pyclass(name = "Engine", module = "fqdnguard._core", frozen)]
pub struct PyEngine {
    inner: Arc<engine::Engine>,
}

impl PyEngine {
    /// The engine, shared with the UDP I/O thread (`UdpIo`).
    pub(super) fn shared(&self) -> Arc<engine::Engine> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (cache, *, reject = "refused", search_domains = Vec::new(), max_inflight = 10_000,
                        max_inflight_per_client = 1_000, case_randomization = true,
                        timeout = 2.0, retransmit = 0.0, retries = 1, log_queries = "sampled",
                        log_sample = 0.01, max_ttl = 86_400))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cache: &Bound<'_, PyDnsCache>,
        reject: &str,
        search_domains: Vec<String>,
        max_inflight: usize,
        max_inflight_per_client: usize,
        case_randomization: bool,
        timeout: f64,
        retransmit: f64,
        retries: u32,
        log_queries: &str,
        log_sample: f64,
        max_ttl: u32,
    ) -> PyResult<Self> {
        let reject = match reject {
            "refused" => Reject::Refused,
            "nxdomain" => Reject::NxDomain,
            other => {
                return Err(PyValueError::new_err(format!(
                    "reject: {other:?}: choose refused or nxdomain"
                )))
            }
        };
        let log = match log_queries {
            "none" => LogMode::None,
            "all" => LogMode::All,
            "sampled" if (0.0..=1.0).contains(&log_sample) => {
                if log_sample == 0.0 {
                    LogMode::None
                } else {
                    LogMode::Every((1.0 / log_sample).round().max(1.0) as u64)
                }
            }
            "sampled" => return Err(PyValueError::new_err("log_sample: must be between 0 and 1")),
            other => {
                return Err(PyValueError::new_err(format!(
                    "log_queries: {other:?}: choose all, sampled or none"
                )))
            }
        };
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(PyValueError::new_err(
                "timeout: must be a positive number of seconds",
            ));
        }
        if !(retransmit.is_finite()
            && (retransmit == 0.0 || (RETRANSMIT_FLOOR..timeout).contains(&retransmit)))
        {
            return Err(PyValueError::new_err(format!(
                "retransmit: {retransmit}: must be 0 (off) or from {RETRANSMIT_FLOOR} seconds to \
                 below timeout ({timeout})"
            )));
        }
        if retries > MAX_RETRIES {
            return Err(PyValueError::new_err(format!(
                "retries: {retries}: must be from 0 to {MAX_RETRIES}"
            )));
        }
        if !(1..=0x7fff_ffff).contains(&max_ttl) {
            return Err(PyValueError::new_err(format!(
                "max_ttl: {max_ttl}: must be from 1 to 2147483647 seconds"
            )));
        }
        let search_domains = search_domains
            .iter()
            .map(|s| {
                LabelBuf::from_presentation(s.as_bytes())
                    .map_err(|e| crate::error::Error::from(e).into())
            })
            .collect::<PyResult<Vec<_>>>()?;
        let config = EngineConfig {
            reject,
            search_domains,
            max_inflight,
            max_inflight_per_client,
            case_randomization,
            timeout,
            retransmit,
            retries,
            log,
            max_ttl,
        };
        let empty = Arc::new(PolicySet::new(Vec::new()).map_err(crate::error::Error::from)?);
        let inner = engine::Engine::new(
            config,
            cache.get().shared(),
            table(empty, std::collections::HashMap::new(), None)?,
        )
        .map_err(engine_err)?;
        Ok(PyEngine {
            inner: Arc::new(inner),
        })
    }

    /// Swaps in a compiled policy and the endpoint table: `{ip: (endpoint_id, identity|None)}`,
    /// and where unknown sources go (None: refused).
    #[pyo3(signature = (policy, endpoints, unknown = None))]
    fn set_policy(
        &self,
        policy: &Bound<'_, PyCompiledPolicy>,
        endpoints: std::collections::HashMap<String, EndpointIn>,
        unknown: Option<EndpointIn>,
    ) -> PyResult<()> {
        let t = table(policy.get().shared(), endpoints, unknown)?;
        self.inner.set_table(t).map_err(engine_err)
    }

    /// A query: returns `(action, payload, token, log, slot)`; action 0 forward (from
    /// source-port slot `slot`, one of `slots`), 1 reply, 2 drop, 3 merged (wait for the
    /// answer of the same question already on its way).
    #[pyo3(signature = (src, server, port, tcp, data, channel, now, slots = 1))]
    #[allow(clippy::too_many_arguments)]
    fn query<'py>(
        &self,
        py: Python<'py>,
        src: &str,
        server: &str,
        port: u16,
        tcp: bool,
        data: &[u8],
        channel: u32,
        now: Option<f64>,
        slots: u16,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let now = now.unwrap_or_else(crate::cache::now_seconds);
        let src = ip_arg(src, "source")?;
        let server = ip_arg(server, "server")?;
        let proto = if tcp { Proto::Tcp } else { Proto::Udp };
        let (action, log) = self
            .inner
            .query(src, server, port, proto, data, channel, slots.max(1), now)
            .map_err(engine_err)?;
        let log = log_out(py, log)?;
        let (kind, bytes, token, slot): (u8, &[u8], u64, u16) = match &action {
            QueryAction::Forward { bytes, token, slot } => (0, bytes, *token, *slot),
            QueryAction::Reply { bytes } => (1, bytes, 0, 0),
            QueryAction::Drop => (2, &[], 0, 0),
            QueryAction::Merged { token } => (3, &[], *token, 0),
        };
        PyTuple::new(
            py,
            [
                kind.into_pyobject(py)?.into_any(),
                PyBytes::new(py, bytes).into_any(),
                token.into_pyobject(py)?.into_any(),
                log,
                slot.into_pyobject(py)?.into_any(),
            ],
        )
    }

    /// An answer from upstream `channel` on source-port slot `slot`: one
    /// `(token, payload, changes, hold, has_addresses, log)` per client waiting for it (`hold`:
    /// an address is new to the firewall, so the answer waits for the backend); empty when it
    /// was dropped (counted in `stats()`).
    fn response<'py>(
        &self,
        py: Python<'py>,
        channel: u32,
        slot: u16,
        data: &[u8],
        now: Option<f64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let now = now.unwrap_or_else(crate::cache::now_seconds);
        let answers = self
            .inner
            .response(channel, slot, data, now)
            .map_err(engine_err)?;
        let out = PyList::empty(py);
        for a in answers {
            let log = log_out(py, a.log)?;
            out.append(PyTuple::new(
                py,
                [
                    a.token.into_pyobject(py)?.into_any(),
                    PyBytes::new(py, &a.bytes).into_any(),
                    changes_out(py, a.changes)?.into_any(),
                    pyo3::types::PyBool::new(py, a.hold).to_owned().into_any(),
                    pyo3::types::PyBool::new(py, a.has_addresses)
                        .to_owned()
                        .into_any(),
                    log,
                ],
            )?)?;
        }
        Ok(out)
    }

    /// Queries whose upstream did not answer in time, or evicted to make room:
    /// `[(token, servfail, channel, log)]` (`channel`: the upstream that failed to answer, once
    /// per upstream query; None for the other clients of a merged query and for evictions).
    fn sweep<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let expired = self.inner.sweep(now).map_err(engine_err)?;
        let out = PyList::empty(py);
        for x in expired {
            let log = log_out(py, x.log)?;
            out.append((x.token, PyBytes::new(py, &x.bytes), x.channel, log))?;
        }
        Ok(out)
    }

    /// UDP queries due to be sent upstream again (no answer after `retransmit` seconds):
    /// `[(token, channel, slot, bytes, started)]`, the bytes first sent, to go from the socket
    /// of `slot` that was current at `started` to the same upstream.
    fn retransmits<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let (due, _) = self.inner.retransmits(now).map_err(engine_err)?;
        let out = PyList::empty(py);
        for r in due {
            out.append((
                r.token,
                r.channel,
                r.slot,
                PyBytes::new(py, &r.bytes),
                r.started,
            ))?;
        }
        Ok(out)
    }

    /// Expires the shared cache: the removals for the firewall.
    fn expire<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyChangeList>> {
        let changes = self.inner.expire(now).map_err(engine_err)?;
        changes_out(py, changes)
    }

    /// Changes recorded into the shared cache outside the engine (`DnsCache.record_many` of
    /// another proxy's entries), programmed as answers' are: what the backend must apply.
    fn program_changes<'py>(
        &self,
        py: Python<'py>,
        changes: &Bound<'py, PyChangeList>,
        now: f64,
    ) -> PyResult<Bound<'py, PyChangeList>> {
        let changes = changes.get().changes().to_vec();
        let programmed = self
            .inner
            .program_changes(changes, now)
            .map_err(engine_err)?;
        changes_out(py, programmed)
    }

    /// Every live (endpoint, ip) of the cache as `added` changes, programmed as answers are
    /// (what a backend reconciles to at start).
    fn programmed_state<'py>(
        &self,
        py: Python<'py>,
        now: f64,
    ) -> PyResult<Bound<'py, PyChangeList>> {
        let changes = self.inner.programmed_state(now).map_err(engine_err)?;
        changes_out(py, changes)
    }

    /// Forgets a pending query whose client went away.
    fn cancel(&self, token: u64) -> PyResult<bool> {
        self.inner.cancel(token).map_err(engine_err)
    }

    /// Counters since start, and the upstream latency histogram.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats().map_err(engine_err)?;
        let d = PyDict::new(py);
        d.set_item("queries", s.queries)?;
        d.set_item("allowed", s.allowed)?;
        d.set_item("denied", s.denied)?;
        d.set_item("unknown_source", s.unknown_source)?;
        d.set_item("malformed", s.malformed)?;
        d.set_item("overloaded", s.overloaded)?;
        d.set_item("overloaded_client", s.overloaded_client)?;
        d.set_item("evicted", s.evicted)?;
        d.set_item("merged", s.merged)?;
        d.set_item("dropped_case", s.dropped_case)?;
        d.set_item("case_fallbacks", s.case_fallbacks)?;
        d.set_item("timeouts", s.timeouts)?;
        d.set_item("retransmits", s.retransmits)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("dropped_unmatched", s.dropped_unmatched)?;
        d.set_item("dropped_mismatch", s.dropped_mismatch)?;
        d.set_item("dropped_malformed", s.dropped_malformed)?;
        d.set_item("cache_errors", s.cache_errors)?;
        d.set_item("refreshes_skipped", s.refreshes_skipped)?;
        d.set_item("inflight", s.inflight)?;
        d.set_item("upstream_inflight", s.upstream_inflight)?;
        d.set_item("rcodes", s.rcodes.to_vec())?;
        d.set_item("latency_buckets", LATENCY_BUCKETS.to_vec())?;
        d.set_item("latency_counts", s.latency_counts.to_vec())?;
        d.set_item("latency_sum", s.latency_sum)?;
        Ok(d)
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The bounds `Engine` checks, for the configuration's own checks (one source).
    m.add("MAX_RETRIES", MAX_RETRIES)?;
    m.add("RETRANSMIT_FLOOR", RETRANSMIT_FLOOR)?;
    m.add_class::<PyEngine>()
}
