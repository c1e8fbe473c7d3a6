//! The per-packet hot path: a query in, an action out; an answer in, an action out.
//!
//! One call per packet from the proxy's event loop (see `DESIGN.md`, "The data path"). The engine
//! owns the pending table (the fresh upstream ids), the endpoint lookup by source address, the
//! DNS verdict, the refusals, the cache update and the counters; Python owns sockets and timers.

mod ids;
mod stats;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashMap;

use crate::cache::{Cache, Change, ChangeKind};
use crate::pattern::LabelBuf;
use crate::policy::{PolicySet, Proto};
use crate::wire::{self, types, Header, QueryView};

pub use stats::{EngineStats, LATENCY_BUCKETS};

/// How denied queries are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Refused,
    NxDomain,
}

/// Which queries produce a log record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogMode {
    None,
    All,
    /// One query in `n` (n >= 1).
    Every(u64),
}

/// What the engine is built with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub reject: Reject,
    /// Denied names ending in one of these get NXDOMAIN whatever `reject` says, so resolvers
    /// that walk a search list (musl) go on to the next suffix instead of giving up.
    pub search_domains: Vec<LabelBuf>,
    pub max_inflight: usize,
    /// Seconds an upstream has to answer before the client gets SERVFAIL.
    pub timeout: f64,
    pub log: LogMode,
}

/// An endpoint as the data path needs it: its id (cache key) and its policy identity (None
/// when no policy selects it: unrestricted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointRef {
    pub id: u32,
    pub identity: Option<u32>,
}

/// The compiled policy and the endpoint table, swapped whole.
#[derive(Debug)]
pub struct PolicyTable {
    pub policy: Arc<PolicySet>,
    pub by_ip: HashMap<IpAddr, EndpointRef>,
    /// Where sources no endpoint owns go; None refuses them.
    pub unknown: Option<EndpointRef>,
}

/// Why a query was answered without forwarding, or how an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    UnknownSource,
    Malformed,
    Overloaded,
    Timeout,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::UnknownSource => "unknown-source",
            Verdict::Malformed => "malformed",
            Verdict::Overloaded => "overloaded",
            Verdict::Timeout => "timeout",
        }
    }
}

/// One query's log line, produced for the queries the log mode picks.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub time: f64,
    pub endpoint: Option<u32>,
    pub qname: String,
    pub qtype: u16,
    pub verdict: Verdict,
    pub rcode: u16,
    pub upstream_ms: Option<f64>,
    pub answers: Vec<IpAddr>,
}

/// What to do with a query.
#[derive(Debug)]
pub enum QueryAction {
    /// Send `bytes` to the upstream on the channel the query came with; `token` names the
    /// client until the answer (or the timeout) comes.
    Forward { bytes: Vec<u8>, token: u64 },
    /// Send `bytes` back to the client.
    Reply { bytes: Vec<u8> },
    /// Send nothing (not a query at all).
    Drop,
}

/// An answer matched to its query.
#[derive(Debug)]
pub struct Answer {
    pub token: u64,
    /// The answer with the client's id restored.
    pub bytes: Vec<u8>,
    /// What the enforcement backend must apply before the client may see `bytes`.
    pub changes: Vec<Change>,
    /// Some change adds an address the firewall does not allow yet: the answer must wait until
    /// the backend has applied `changes`.
    pub hold: bool,
    /// The answer carries addresses for the question (already allowed or not).
    pub has_addresses: bool,
    pub log: Option<LogRecord>,
}

/// A query timed out: `bytes` is the SERVFAIL for its client.
#[derive(Debug)]
pub struct Expired {
    pub token: u64,
    pub bytes: Vec<u8>,
    pub channel: u32,
    pub log: Option<LogRecord>,
}

#[derive(Debug)]
struct Pending {
    token: u64,
    channel: u32,
    upstream_id: u16,
    endpoint: u32,
    /// The client's query as received (its id, question and OPT, for the answer and SERVFAIL).
    query: Vec<u8>,
    started: f64,
    log: bool,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<u64, Pending>,
    by_upstream: HashMap<(u32, u16), u64>,
    deadlines: VecDeque<(f64, u64)>,
    next_token: u64,
    log_counter: u64,
    stats: EngineStats,
    /// The lapse time each (endpoint, ip) firewall element was last programmed with.
    programmed: HashMap<(u32, IpAddr), f64>,
}

/// The engine. All methods take `&self`: state sits behind locks inside.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    table: RwLock<Arc<PolicyTable>>,
    cache: Arc<RwLock<Cache>>,
    state: Mutex<State>,
    ids: Mutex<ids::IdSource>,
}

/// The engine's own errors: only the lock of an earlier panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError(pub &'static str);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for EngineError {}

const POISONED: EngineError = EngineError("engine state poisoned by an earlier panic");

fn error_reply(query: &[u8], rcode: u16) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(query.len() + 16);
    wire::error_response(query, rcode, &mut out)
        .ok()
        .map(|()| out)
}

/// A reply for a query too broken for [`wire::error_response`]: the header alone, id and RD
/// copied, QR set, `rcode`, no sections (RFC 1035 4.1.1 allows it for FORMERR).
fn header_only_reply(query: &[u8], rcode: u16) -> Option<Vec<u8>> {
    let h = Header::parse(query).ok()?;
    let flags = 0x8000 | (h.flags & 0x7900) | (rcode & 0xf);
    let mut out = Vec::with_capacity(12);
    for w in [h.id, flags, 0, 0, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    Some(out)
}

/// Turns the cache's changes into what the firewall must be told, tracking what it was told.
///
/// A firewall element is programmed to lapse at `expiry + (expiry - now)`: twice the time the
/// answer granted. The cache removes the entry at its own expiry (a `removed` change), so the
/// slack only matters if fqdnguard is gone; what it buys is that an answer extending the cache
/// expiry needs no firewall update until the new expiry passes the programmed one, i.e. about
/// once per TTL instead of once per answer. Additions and removals always go through.
fn program(st: &mut State, changes: Vec<Change>, now: f64) -> Vec<Change> {
    let mut out = Vec::with_capacity(changes.len());
    for mut c in changes {
        let key = (c.endpoint, c.ip);
        match c.kind {
            ChangeKind::Removed => {
                st.programmed.remove(&key);
                out.push(c);
            }
            ChangeKind::Extended if st.programmed.get(&key).is_some_and(|&p| c.expires_at <= p) => {
                st.stats.refreshes_skipped += 1;
            }
            ChangeKind::Added | ChangeKind::Extended => {
                c.expires_at += (c.expires_at - now).max(0.0);
                st.programmed.insert(key, c.expires_at);
                out.push(c);
            }
        }
    }
    out
}

fn ends_with(name: &LabelBuf, suffix: &LabelBuf) -> bool {
    let (n, s) = (name.len(), suffix.len());
    n >= s && (0..s).all(|i| name.label(n - 1 - i) == suffix.label(s - 1 - i))
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        cache: Arc<RwLock<Cache>>,
        table: PolicyTable,
    ) -> Result<Self, EngineError> {
        Ok(Engine {
            config,
            table: RwLock::new(Arc::new(table)),
            cache,
            state: Mutex::new(State::default()),
            ids: Mutex::new(
                ids::IdSource::new().map_err(|_| EngineError("the OS random source failed"))?,
            ),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Swaps in a new policy and endpoint table; queries already pending keep their endpoint.
    pub fn set_table(&self, table: PolicyTable) -> Result<(), EngineError> {
        *self.table.write().map_err(|_| POISONED)? = Arc::new(table);
        Ok(())
    }

    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        let st = self.state.lock().map_err(|_| POISONED)?;
        let mut s = st.stats.clone();
        s.inflight = st.pending.len() as u64;
        Ok(s)
    }

    fn pick_log(&self, st: &mut State) -> bool {
        match self.config.log {
            LogMode::None => false,
            LogMode::All => true,
            LogMode::Every(n) => {
                st.log_counter += 1;
                st.log_counter % n.max(1) == 0
            }
        }
    }

    /// A query from `src` for the DNS server `server`:`port` over `proto`, to be forwarded on
    /// upstream `channel` if allowed.
    #[allow(clippy::too_many_arguments)]
    pub fn query(
        &self,
        src: IpAddr,
        server: IpAddr,
        port: u16,
        proto: Proto,
        data: &[u8],
        channel: u32,
        now: f64,
    ) -> Result<(QueryAction, Option<LogRecord>), EngineError> {
        let view = match QueryView::parse(data) {
            Ok(v) => v,
            Err(_) => return self.malformed(data, now),
        };
        let table = Arc::clone(&*self.table.read().map_err(|_| POISONED)?);
        let endpoint = table.by_ip.get(&src).copied().or(table.unknown);
        let name = view.labels();
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        st.stats.queries += 1;
        let log = self.pick_log(&mut st);
        let record = |verdict: Verdict, rcode: u16, ep: Option<u32>| LogRecord {
            time: now,
            endpoint: ep,
            qname: view.qname.to_text(),
            qtype: view.qtype,
            verdict,
            rcode,
            upstream_ms: None,
            answers: Vec::new(),
        };
        let Some(endpoint) = endpoint else {
            st.stats.unknown_source += 1;
            let bytes = error_reply(data, types::REFUSED);
            return Ok(reply(
                bytes,
                log.then(|| record(Verdict::UnknownSource, types::REFUSED, None)),
            ));
        };
        let allowed = match endpoint.identity {
            None => true,
            Some(ident) => table.policy.dns_allowed(ident, server, port, proto, &name),
        };
        if !allowed {
            st.stats.denied += 1;
            let rcode = if self.config.reject == Reject::NxDomain
                || self
                    .config
                    .search_domains
                    .iter()
                    .any(|s| ends_with(&name, s))
            {
                types::NXDOMAIN
            } else {
                types::REFUSED
            };
            let bytes = error_reply(data, rcode);
            return Ok(reply(
                bytes,
                log.then(|| record(Verdict::Denied, rcode, Some(endpoint.id))),
            ));
        }
        if st.pending.len() >= self.config.max_inflight {
            st.stats.overloaded += 1;
            let bytes = error_reply(data, types::SERVFAIL);
            return Ok(reply(
                bytes,
                log.then(|| record(Verdict::Overloaded, types::SERVFAIL, Some(endpoint.id))),
            ));
        }
        st.stats.allowed += 1;
        let upstream_id = {
            let mut ids = self.ids.lock().map_err(|_| POISONED)?;
            loop {
                let id = ids
                    .next_id()
                    .map_err(|_| EngineError("the OS random source failed"))?;
                if !st.by_upstream.contains_key(&(channel, id)) {
                    break id;
                }
            }
        };
        let mut bytes = data.to_vec();
        // The packet parsed as a query, so it has a header: this cannot fail.
        let _ = wire::set_id(&mut bytes, upstream_id);
        st.next_token += 1;
        let token = st.next_token;
        st.by_upstream.insert((channel, upstream_id), token);
        st.deadlines.push_back((now + self.config.timeout, token));
        st.pending.insert(
            token,
            Pending {
                token,
                channel,
                upstream_id,
                endpoint: endpoint.id,
                query: data.to_vec(),
                started: now,
                log,
            },
        );
        Ok((QueryAction::Forward { bytes, token }, None))
    }

    fn malformed(
        &self,
        data: &[u8],
        now: f64,
    ) -> Result<(QueryAction, Option<LogRecord>), EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        st.stats.queries += 1;
        st.stats.malformed += 1;
        let Ok(h) = Header::parse(data) else {
            return Ok((QueryAction::Drop, None)); // not even a header: nothing to answer
        };
        if h.qr() {
            return Ok((QueryAction::Drop, None)); // a response: answering it could loop
        }
        let rcode = if h.opcode() != types::OPCODE_QUERY {
            types::NOTIMP
        } else {
            types::FORMERR
        };
        let bytes = error_reply(data, rcode).or_else(|| header_only_reply(data, rcode));
        let log = self.pick_log(&mut st);
        let record = LogRecord {
            time: now,
            endpoint: None,
            qname: String::new(),
            qtype: 0,
            verdict: Verdict::Malformed,
            rcode,
            upstream_ms: None,
            answers: Vec::new(),
        };
        Ok(reply(bytes, log.then_some(record)))
    }

    /// An answer that came in on upstream `channel`. None: dropped (no pending query with that
    /// id on that channel, not the question asked, or malformed), counted by reason.
    pub fn response(
        &self,
        channel: u32,
        data: &[u8],
        now: f64,
    ) -> Result<Option<Answer>, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        let Ok(header) = Header::parse(data) else {
            st.stats.dropped_malformed += 1;
            return Ok(None);
        };
        let Some(&token) = st.by_upstream.get(&(channel, header.id)) else {
            st.stats.dropped_unmatched += 1;
            return Ok(None);
        };
        if !header.qr() {
            st.stats.dropped_malformed += 1;
            return Ok(None);
        }
        let Ok(resolution) = wire::resolve(data) else {
            // A forged or broken packet must not cost the real answer its place: keep waiting.
            st.stats.dropped_malformed += 1;
            return Ok(None);
        };
        let Some(p) = st.pending.get(&token) else {
            st.stats.dropped_unmatched += 1;
            return Ok(None);
        };
        let same_question = QueryView::parse(&p.query).is_ok_and(|q| {
            q.qtype == resolution.qtype
                && q.qclass == resolution.qclass
                && q.qname.eq_ignore_case(&resolution.qname)
        });
        if !same_question {
            st.stats.dropped_mismatch += 1;
            return Ok(None);
        }
        let Some(p) = st.pending.remove(&token) else {
            return Ok(None);
        };
        st.by_upstream.remove(&(p.channel, p.upstream_id));
        let rcode = u16::from(header.header_rcode());
        st.stats.record_rcode(rcode);
        st.stats.observe_latency(now - p.started);
        let has_addresses = !resolution.addresses.is_empty();
        let mut changes = Vec::new();
        if has_addresses && rcode == types::NOERROR {
            let name = resolution.qname.to_label_buf();
            let recorded = self.cache.write().map_err(|_| POISONED)?.record(
                p.endpoint,
                &name,
                &resolution.addresses,
                now,
            );
            match recorded {
                Ok(c) => changes = program(&mut st, c, now),
                Err(_) => st.stats.cache_errors += 1,
            }
        }
        let hold = changes.iter().any(|c| c.kind == ChangeKind::Added);
        let mut bytes = data.to_vec();
        let client_id = u16::from_be_bytes([p.query[0], p.query[1]]);
        let _ = wire::set_id(&mut bytes, client_id);
        let log = p.log.then(|| LogRecord {
            time: now,
            endpoint: Some(p.endpoint),
            qname: QueryView::parse(&p.query)
                .map(|q| q.qname.to_text())
                .unwrap_or_default(),
            qtype: resolution.qtype,
            verdict: Verdict::Allowed,
            rcode,
            upstream_ms: Some((now - p.started) * 1000.0),
            answers: resolution.addresses.iter().map(|(ip, _)| *ip).collect(),
        });
        Ok(Some(Answer {
            token: p.token,
            bytes,
            changes,
            hold,
            has_addresses,
            log,
        }))
    }

    /// Ends the queries whose upstream did not answer in time: SERVFAIL for each client.
    pub fn sweep(&self, now: f64) -> Result<Vec<Expired>, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        let mut out = Vec::new();
        while let Some(&(deadline, token)) = st.deadlines.front() {
            if deadline > now {
                break;
            }
            st.deadlines.pop_front();
            let Some(p) = st.pending.remove(&token) else {
                continue; // answered or cancelled already
            };
            st.by_upstream.remove(&(p.channel, p.upstream_id));
            st.stats.timeouts += 1;
            st.stats.record_rcode(types::SERVFAIL);
            let bytes = error_reply(&p.query, types::SERVFAIL).unwrap_or_default();
            let log = p.log.then(|| LogRecord {
                time: now,
                endpoint: Some(p.endpoint),
                qname: QueryView::parse(&p.query)
                    .map(|q| q.qname.to_text())
                    .unwrap_or_default(),
                qtype: QueryView::parse(&p.query)
                    .map(|q| q.qtype)
                    .unwrap_or_default(),
                verdict: Verdict::Timeout,
                rcode: types::SERVFAIL,
                upstream_ms: None,
                answers: Vec::new(),
            });
            out.push(Expired {
                token,
                bytes,
                channel: p.channel,
                log,
            });
        }
        Ok(out)
    }

    /// Expires the cache: the removals for the firewall (their programmed state is forgotten).
    pub fn expire(&self, now: f64) -> Result<Vec<Change>, EngineError> {
        let removed = self.cache.write().map_err(|_| POISONED)?.expire(now);
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        match removed {
            Ok(changes) => Ok(program(&mut st, changes, now)),
            Err(_) => {
                st.stats.cache_errors += 1;
                Ok(Vec::new())
            }
        }
    }

    /// Runs changes recorded into the shared cache outside the engine (another proxy's
    /// entries, adopted at a hot restart) through the programming answers get: lapse times
    /// doubled, extensions the firewall already covers dropped.
    pub fn program_changes(
        &self,
        changes: Vec<Change>,
        now: f64,
    ) -> Result<Vec<Change>, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        Ok(program(&mut st, changes, now))
    }

    /// Every live cache entry as the firewall must have it, for a backend's start-up
    /// reconciliation (a restored cache): one `added` change per (endpoint, ip) with its latest
    /// expiry, programmed as answers are.
    pub fn programmed_state(&self, now: f64) -> Result<Vec<Change>, EngineError> {
        let mut latest: HashMap<(u32, IpAddr), f64> = HashMap::new();
        for (endpoint, _, ip, expires) in self.cache.read().map_err(|_| POISONED)?.entries() {
            if expires > now {
                let e = latest.entry((endpoint, ip)).or_insert(expires);
                *e = e.max(expires);
            }
        }
        let mut added: Vec<Change> = latest
            .into_iter()
            .map(|((endpoint, ip), expires_at)| Change {
                kind: ChangeKind::Added,
                endpoint,
                ip,
                expires_at,
            })
            .collect();
        added.sort_by_key(|c| (c.endpoint, c.ip));
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        st.programmed.clear();
        Ok(program(&mut st, added, now))
    }

    /// Forgets a pending query whose client went away (a closed TCP connection).
    pub fn cancel(&self, token: u64) -> Result<bool, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        match st.pending.remove(&token) {
            Some(p) => {
                st.by_upstream.remove(&(p.channel, p.upstream_id));
                st.stats.cancelled += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn reply(bytes: Option<Vec<u8>>, log: Option<LogRecord>) -> (QueryAction, Option<LogRecord>) {
    match bytes {
        Some(bytes) => (QueryAction::Reply { bytes }, log),
        None => (QueryAction::Drop, log),
    }
}

#[cfg(test)]
mod tests;
