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
    /// Client queries in flight at once, over all clients.
    pub max_inflight: usize,
    /// Client queries in flight at once for one client (an endpoint; a source no endpoint
    /// claims counts on its own), so that one pod cannot take every slot.
    pub max_inflight_per_client: usize,
    /// DNS 0x20 (draft-vixie-dnsext-dns0x20): the letters of a UDP query's name go upstream
    /// in random case, and the answer must echo them exactly.
    pub case_randomization: bool,
    /// Seconds an upstream has to answer before the client gets SERVFAIL.
    pub timeout: f64,
    /// Seconds after which a UDP query still unanswered is sent upstream again, the same bytes
    /// on the same socket ([`Engine::retransmits`]); 0 turns it off. Below `timeout`.
    pub retransmit: f64,
    /// At most this many copies more per UDP query, `retransmit` apart, all before `timeout`
    /// (which still counts from the first send).
    pub retries: u32,
    pub log: LogMode,
    /// The longest TTL an answer keeps: the cache's expiry and the TTLs the client receives
    /// are capped at it (see [`wire::cap_ttls`]).
    pub max_ttl: u32,
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
    /// The query log's spelling, which is also the value of the `verdict` label of the
    /// `fqdnguard_queries_total` metric: one spelling for both (underscores, as every label).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::UnknownSource => "unknown_source",
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
    /// Send `bytes` to the upstream on the channel the query came with, from source-port slot
    /// `slot` (drawn at random, see [`Engine::query`]); `token` names the client until the
    /// answer (or the timeout) comes.
    Forward {
        bytes: Vec<u8>,
        token: u64,
        slot: u16,
    },
    /// The same question is already on its way upstream (same channel, transport and
    /// everything that can change the answer): `token` gets its own copy of that answer.
    Merged { token: u64 },
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

/// An upstream query to send again ([`Engine::retransmits`]): the bytes first sent, from
/// source-port slot `slot` on `channel`, first sent at `started` (the socket of the slot then).
#[derive(Debug, Clone, PartialEq)]
pub struct Retransmit {
    /// The token of the client that sent it (the pending query's key).
    pub token: u64,
    pub channel: u32,
    pub slot: u16,
    pub bytes: Vec<u8>,
    pub started: f64,
}

/// A query ended without an answer: `bytes` is the SERVFAIL for its client.
#[derive(Debug)]
pub struct Expired {
    pub token: u64,
    pub bytes: Vec<u8>,
    /// The upstream channel that failed to answer in time, once per upstream query (None for
    /// the other clients of a merged query, and for a query evicted to make room).
    pub channel: Option<u32>,
    pub log: Option<LogRecord>,
}

/// Who a limit counts against: the endpoint that owns the source address, or the address
/// itself when no endpoint claims it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Endpoint(u32),
    Source(IpAddr),
}

/// One client's query waiting for an upstream answer.
#[derive(Debug)]
struct Waiter {
    token: u64,
    endpoint: u32,
    client: ClientKey,
    /// The client's query as received (its id, question and OPT, for the answer and SERVFAIL).
    query: Vec<u8>,
    log: bool,
}

/// One query sent upstream, and every client waiting for its answer (the first is the one
/// that sent it).
#[derive(Debug)]
struct Pending {
    channel: u32,
    slot: u16,
    upstream_id: u16,
    started: f64,
    /// The question name exactly as sent (0x20: letters in random case), which the answer's
    /// question must repeat byte for byte; None when the name was sent as the client wrote it.
    sent_name: Option<Vec<u8>>,
    /// What merges identical questions into this one (see [`merge_key`]).
    key: Vec<u8>,
    waiters: Vec<Waiter>,
    /// The bytes sent upstream, kept while a retransmission may still be due (UDP only).
    sent: Option<Vec<u8>>,
}

/// A client's share of the in-flight slots: how many it holds, and its tokens oldest first
/// (tokens no longer waiting are dropped lazily).
#[derive(Debug, Default)]
struct ClientUse {
    count: usize,
    tokens: VecDeque<u64>,
}

/// Answers in a row from a channel that matched a query in everything but the case of the
/// name before 0x20 is turned off for that channel (an upstream that does not keep case).
const CASE_FALLBACK: u32 = 8;
/// The per-channel 0x20 bookkeeping is forgotten beyond this many channels (the channels of
/// servers clients asked are recycled); forgetting only turns 0x20 back on.
const CASE_CHANNELS: usize = 4096;

#[derive(Debug, Default)]
struct State {
    /// Upstream queries, by the token of the client that sent them.
    pending: HashMap<u64, Pending>,
    /// (channel, source-port slot, upstream id) -> upstream query.
    by_upstream: HashMap<(u32, u16, u16), u64>,
    /// Merge key -> upstream query.
    by_key: HashMap<Vec<u8>, u64>,
    /// Every waiting client's token -> its upstream query.
    waiting: HashMap<u64, u64>,
    clients: HashMap<ClientKey, ClientUse>,
    /// Upstream queries by deadline (answered ones are skipped when they come up).
    deadlines: VecDeque<(f64, u64)>,
    /// Retransmissions due, one queue per round (the n-th copy of each query in the n-th),
    /// so that each stays in time order: (when, upstream query). Answered ones are skipped.
    retransmits: Vec<VecDeque<(f64, u64)>>,
    /// Client queries ended to make room for others: SERVFAIL at the next sweep.
    evicted: Vec<Expired>,
    /// Channels with 0x20 off, and the case mismatches in a row of the others.
    case_off: HashMap<u32, bool>,
    case_misses: HashMap<u32, u32>,
    next_token: u64,
    log_counter: u64,
    stats: EngineStats,
    /// The lapse time each (endpoint, ip) firewall element was last programmed with.
    programmed: HashMap<(u32, IpAddr), f64>,
}

impl State {
    /// Counts `token` against `client`'s share.
    fn hold_slot(&mut self, client: ClientKey, token: u64) {
        let u = self.clients.entry(client).or_default();
        u.count += 1;
        u.tokens.push_back(token);
    }

    /// Gives `token`'s slot back (it no longer waits).
    fn free_slot(&mut self, client: ClientKey, token: u64) {
        let Some(u) = self.clients.get_mut(&client) else {
            return;
        };
        u.count = u.count.saturating_sub(1);
        if u.count == 0 {
            self.clients.remove(&client);
            return;
        }
        if u.tokens.front() == Some(&token) {
            u.tokens.pop_front();
        } else if u.tokens.len() > 2 * u.count + 16 {
            let waiting = &self.waiting;
            u.tokens.retain(|t| *t != token && waiting.contains_key(t));
        }
    }

    /// Takes `token` out of its upstream query (dropping the query when nobody else waits);
    /// its slot is freed.
    fn remove_waiter(&mut self, token: u64) -> Option<(Waiter, u32)> {
        let leader = self.waiting.remove(&token)?;
        let p = self.pending.get_mut(&leader)?;
        let i = p.waiters.iter().position(|w| w.token == token)?;
        let w = p.waiters.remove(i);
        let channel = p.channel;
        if p.waiters.is_empty() {
            self.drop_pending(leader);
        }
        self.free_slot(w.client, w.token);
        Some((w, channel))
    }

    /// Forgets upstream query `leader` (not its waiters: the caller has them).
    fn drop_pending(&mut self, leader: u64) -> Option<Pending> {
        let p = self.pending.remove(&leader)?;
        self.by_upstream.remove(&(p.channel, p.slot, p.upstream_id));
        if self.by_key.get(&p.key) == Some(&leader) {
            self.by_key.remove(&p.key);
        }
        Some(p)
    }

    /// Ends the oldest query of the client holding the most slots, if it holds more than
    /// `mine + 1` (so that the client asking now would still hold fewer): its SERVFAIL goes
    /// out at the next sweep. False when no client holds more.
    fn evict_heaviest(&mut self, mine: usize, now: f64) -> bool {
        let Some((&heavy, count)) = self
            .clients
            .iter()
            .map(|(k, u)| (k, u.count))
            .max_by_key(|(_, c)| *c)
        else {
            return false;
        };
        if count <= mine + 1 {
            return false;
        }
        while let Some(token) = self
            .clients
            .get_mut(&heavy)
            .and_then(|u| u.tokens.pop_front())
        {
            if !self.waiting.contains_key(&token) {
                continue;
            }
            // The token was popped already: put it back so free_slot finds the share intact.
            if let Some(u) = self.clients.get_mut(&heavy) {
                u.tokens.push_front(token);
            }
            if let Some((w, _)) = self.remove_waiter(token) {
                self.stats.evicted += 1;
                self.stats.record_rcode(types::SERVFAIL);
                let bytes = error_reply(&w.query, types::SERVFAIL).unwrap_or_default();
                let log = w.log.then(|| waiter_record(&w, now, Verdict::Overloaded));
                self.evicted.push(Expired {
                    token,
                    bytes,
                    channel: None,
                    log,
                });
                return true;
            }
        }
        false
    }

    fn case_on(&self, channel: u32) -> bool {
        !self.case_off.get(&channel).copied().unwrap_or(false)
    }
}

/// A log record for a waiter that got no answer.
fn waiter_record(w: &Waiter, now: f64, verdict: Verdict) -> LogRecord {
    let q = QueryView::parse(&w.query).ok();
    LogRecord {
        time: now,
        endpoint: Some(w.endpoint),
        qname: q.map(|q| q.qname.to_text()).unwrap_or_default(),
        qtype: q.map(|q| q.qtype).unwrap_or_default(),
        verdict,
        rcode: types::SERVFAIL,
        upstream_ms: None,
        answers: Vec::new(),
    }
}

/// Header flags a query may set that change the answer: RD, AD (RFC 6840 5.7), CD.
const ANSWER_FLAGS: u16 = 0x0100 | 0x0020 | 0x0010;

/// Everything about a query that can change its answer, as bytes: the channel (upstream) and
/// transport, the RD/AD/CD flags, type, class, the name lower-cased, and the whole EDNS (buffer
/// size, version, flags with DO, options). Queries with equal keys can share one upstream
/// query.
fn merge_key(view: &QueryView<'_>, channel: u32, proto: Proto) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&channel.to_be_bytes());
    k.push(proto as u8);
    k.extend_from_slice(&(view.header.flags & ANSWER_FLAGS).to_be_bytes());
    k.extend_from_slice(&view.qtype.to_be_bytes());
    k.extend_from_slice(&view.qclass.to_be_bytes());
    for label in view.qname.labels() {
        k.push(label.len() as u8); // <= 63
        k.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    k.push(0);
    if let Some(edns) = view.edns {
        k.push(1);
        k.extend_from_slice(&edns.udp_size.to_be_bytes());
        k.push(edns.version);
        k.extend_from_slice(&edns.flags.to_be_bytes());
        for (code, data) in edns.options {
            k.extend_from_slice(&code.to_be_bytes());
            k.extend_from_slice(&(data.len() as u16).to_be_bytes());
            k.extend_from_slice(data);
        }
    }
    k
}

/// Where a message's question name sits when it is written out at offset 12 without
/// compression (what real clients and servers send): `12..end`. None otherwise.
fn plain_question_name(msg: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut pos = 12;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            return Some(12..pos + 1);
        }
        if len > 63 {
            return None; // a compression pointer (or reserved label type)
        }
        pos += 1 + len;
    }
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

/// At most this many copies of one upstream query ([`EngineConfig::retries`]).
pub const MAX_RETRIES: u32 = 10;
/// The shortest interval between copies ([`EngineConfig::retransmit`]), 0 aside: sooner, a
/// copy mostly duplicates work still in progress upstream.
pub const RETRANSMIT_FLOOR: f64 = 0.05;

const POISONED: EngineError = EngineError("engine state poisoned by an earlier panic");
const RANDOM_FAILED: EngineError = EngineError("the OS random source failed");

/// Flips the case of each ASCII letter of a wire name at random (length bytes are never
/// letters: they are at most 63, below `A`).
fn randomize_case(name: &mut [u8], ids: &mut ids::IdSource) -> Result<(), getrandom::Error> {
    let mut bits = 0u32;
    let mut left = 0;
    for b in name.iter_mut().filter(|b| b.is_ascii_alphabetic()) {
        if left == 0 {
            bits = ids.next_u32()?;
            left = 32;
        }
        if bits & 1 == 1 {
            *b ^= 0x20;
        }
        bits >>= 1;
        left -= 1;
    }
    Ok(())
}

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
        if config.retries > MAX_RETRIES {
            return Err(EngineError("retries: at most 10 copies of a query"));
        }
        if config.retransmit != 0.0
            && (config.retransmit.is_nan() || config.retransmit < RETRANSMIT_FLOOR)
        {
            return Err(EngineError("retransmit: 0 (off) or at least 0.05 s"));
        }
        Ok(Engine {
            config,
            table: RwLock::new(Arc::new(table)),
            cache,
            state: Mutex::new(State::default()),
            ids: Mutex::new(ids::IdSource::new().map_err(|_| RANDOM_FAILED)?),
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
        s.inflight = st.waiting.len() as u64;
        s.upstream_inflight = st.pending.len() as u64;
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
    /// upstream `channel` if allowed, from one of `slots` source ports (the slot is drawn from
    /// the OS CSPRNG, so an off-path sender must guess the port as well as the id: RFC 5452
    /// section 9.2). An identical question already in flight on the channel is not sent
    /// again: the client waits for that answer ([`QueryAction::Merged`]).
    #[allow(clippy::too_many_arguments)]
    pub fn query(
        &self,
        src: IpAddr,
        server: IpAddr,
        port: u16,
        proto: Proto,
        data: &[u8],
        channel: u32,
        slots: u16,
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
        let client = if table.by_ip.contains_key(&src) {
            ClientKey::Endpoint(endpoint.id)
        } else {
            ClientKey::Source(src)
        };
        let mine = st.clients.get(&client).map_or(0, |u| u.count);
        let full = mine >= self.config.max_inflight_per_client
            || (st.waiting.len() >= self.config.max_inflight && !st.evict_heaviest(mine, now));
        if full {
            if mine >= self.config.max_inflight_per_client {
                st.stats.overloaded_client += 1;
            }
            st.stats.overloaded += 1;
            let bytes = error_reply(data, types::SERVFAIL);
            return Ok(reply(
                bytes,
                log.then(|| record(Verdict::Overloaded, types::SERVFAIL, Some(endpoint.id))),
            ));
        }
        st.stats.allowed += 1;
        st.next_token += 1;
        let token = st.next_token;
        let waiter = Waiter {
            token,
            endpoint: endpoint.id,
            client,
            query: data.to_vec(),
            log,
        };
        let key = merge_key(&view, channel, proto);
        if let Some(&leader) = st.by_key.get(&key) {
            if let Some(p) = st.pending.get_mut(&leader) {
                p.waiters.push(waiter);
                st.waiting.insert(token, leader);
                st.hold_slot(client, token);
                st.stats.merged += 1;
                return Ok((QueryAction::Merged { token }, None));
            }
        }
        let mut bytes = data.to_vec();
        let mut sent_name = None;
        let (slot, upstream_id) = {
            // One lock of the random source for the slot, the id and the name's case.
            let mut ids = self.ids.lock().map_err(|_| POISONED)?;
            let slot = if slots > 1 {
                let r = ids.next_u32().map_err(|_| RANDOM_FAILED)?;
                ((u64::from(r) * u64::from(slots)) >> 32) as u16
            } else {
                0
            };
            let id = loop {
                let id = ids.next_id().map_err(|_| RANDOM_FAILED)?;
                if !st.by_upstream.contains_key(&(channel, slot, id)) {
                    break id;
                }
            };
            if self.config.case_randomization && proto == Proto::Udp && st.case_on(channel) {
                if let Some(name) = plain_question_name(&bytes).and_then(|r| bytes.get_mut(r)) {
                    randomize_case(name, &mut ids).map_err(|_| RANDOM_FAILED)?;
                    sent_name = Some(name.to_vec());
                }
            }
            (slot, id)
        };
        // The packet parsed as a query, so it has a header: this cannot fail.
        let _ = wire::set_id(&mut bytes, upstream_id);
        st.by_upstream.insert((channel, slot, upstream_id), token);
        st.by_key.insert(key.clone(), token);
        st.waiting.insert(token, token);
        st.hold_slot(client, token);
        st.deadlines.push_back((now + self.config.timeout, token));
        let sent = if proto == Proto::Udp && self.retransmits_on() {
            if st.retransmits.is_empty() {
                st.retransmits = vec![VecDeque::new(); self.config.retries as usize];
            }
            st.retransmits[0].push_back((now + self.config.retransmit, token));
            Some(bytes.clone())
        } else {
            None
        };
        st.pending.insert(
            token,
            Pending {
                channel,
                slot,
                upstream_id,
                started: now,
                sent_name,
                key,
                waiters: vec![waiter],
                sent,
            },
        );
        Ok((QueryAction::Forward { bytes, token, slot }, None))
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

    /// An answer that came in on upstream `channel`, source-port slot `slot`: one [`Answer`]
    /// per client waiting for it (each with its own id and its own spelling of the name), or
    /// none when it was dropped (no pending query with that id on that channel and slot, not
    /// the question asked, the name not in the case it was sent in, or malformed), counted by
    /// reason.
    pub fn response(
        &self,
        channel: u32,
        slot: u16,
        data: &[u8],
        now: f64,
    ) -> Result<Vec<Answer>, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        let Ok(header) = Header::parse(data) else {
            st.stats.dropped_malformed += 1;
            return Ok(Vec::new());
        };
        let Some(&leader) = st.by_upstream.get(&(channel, slot, header.id)) else {
            st.stats.dropped_unmatched += 1;
            return Ok(Vec::new());
        };
        if !header.qr() {
            st.stats.dropped_malformed += 1;
            return Ok(Vec::new());
        }
        let Ok(mut resolution) = wire::resolve(data) else {
            // A forged or broken packet must not cost the real answer its place: keep waiting.
            st.stats.dropped_malformed += 1;
            return Ok(Vec::new());
        };
        let Some(p) = st.pending.get(&leader) else {
            st.stats.dropped_unmatched += 1;
            return Ok(Vec::new());
        };
        let same_question = p.waiters.first().is_some_and(|w| {
            QueryView::parse(&w.query).is_ok_and(|q| {
                q.qtype == resolution.qtype
                    && q.qclass == resolution.qclass
                    && q.qname.eq_ignore_case(&resolution.qname)
            })
        });
        if !same_question {
            st.stats.dropped_mismatch += 1;
            return Ok(Vec::new());
        }
        if let Some(sent) = &p.sent_name {
            if data.get(12..12 + sent.len()) == Some(&sent[..]) {
                st.case_misses.remove(&channel);
            } else {
                // All else matched: an upstream that does not keep case, or a forger who
                // guessed the port and id but not the case. A few in a row: the former.
                let misses = st.case_misses.entry(channel).or_insert(0);
                *misses += 1;
                if *misses < CASE_FALLBACK {
                    st.stats.dropped_case += 1;
                    return Ok(Vec::new());
                }
                st.case_misses.remove(&channel);
                if st.case_off.len() >= CASE_CHANNELS {
                    st.case_off.clear();
                }
                st.case_off.insert(channel, true);
                st.stats.case_fallbacks += 1;
            }
        }
        if st.case_misses.len() > CASE_CHANNELS {
            st.case_misses.clear();
        }
        let Some(p) = st.drop_pending(leader) else {
            return Ok(Vec::new());
        };
        for w in &p.waiters {
            st.waiting.remove(&w.token);
            st.free_slot(w.client, w.token);
        }
        let rcode = u16::from(header.header_rcode());
        st.stats.observe_latency(now - p.started);
        let has_addresses = !resolution.addresses.is_empty();
        for a in &mut resolution.addresses {
            a.1 = a.1.min(self.config.max_ttl);
        }
        // Each endpoint among the waiters learns the answer once.
        // (endpoint, an address is new to its firewall, its changes until handed out)
        let mut learned: Vec<(u32, bool, Vec<Change>)> = Vec::new();
        if has_addresses && rcode == types::NOERROR {
            let name = resolution.qname.to_label_buf();
            let mut cache = self.cache.write().map_err(|_| POISONED)?;
            for w in &p.waiters {
                if learned.iter().any(|(e, _, _)| *e == w.endpoint) {
                    continue;
                }
                match cache.record(w.endpoint, &name, &resolution.addresses, now) {
                    Ok(c) => {
                        let c = program(&mut st, c, now);
                        let adds = c.iter().any(|c| c.kind == ChangeKind::Added);
                        learned.push((w.endpoint, adds, c));
                    }
                    Err(_) => {
                        st.stats.cache_errors += 1;
                        learned.push((w.endpoint, false, Vec::new()));
                    }
                }
            }
        }
        let name_range = plain_question_name(data);
        // The log records' address lists, made only when a waiter's query is logged.
        let answers =
            || -> Vec<IpAddr> { resolution.addresses.iter().map(|(ip, _)| *ip).collect() };
        let mut out = Vec::with_capacity(p.waiters.len());
        for w in p.waiters {
            st.stats.record_rcode(rcode);
            // Every waiter of an endpoint whose firewall gets a new address waits for it; the
            // changes travel with the first.
            let (hold, changes) = match learned.iter_mut().find(|(e, _, _)| *e == w.endpoint) {
                Some((_, adds, c)) => (*adds, std::mem::take(c)),
                None => (false, Vec::new()),
            };
            let mut bytes = data.to_vec();
            // `resolve` accepted the packet, so its framing is sound and the cap cannot fail.
            let _ = wire::cap_ttls(&mut bytes, self.config.max_ttl);
            let client_id = u16::from_be_bytes([w.query[0], w.query[1]]);
            let _ = wire::set_id(&mut bytes, client_id);
            // The client gets its question back as it wrote it (0x20, or another client's
            // spelling of a merged question).
            if let (Some(r), Some(mine)) = (name_range.clone(), plain_question_name(&w.query)) {
                if r == mine && bytes[r.clone()].eq_ignore_ascii_case(&w.query[mine.clone()]) {
                    bytes[r].copy_from_slice(&w.query[mine]);
                }
            }
            let log = w.log.then(|| LogRecord {
                time: now,
                endpoint: Some(w.endpoint),
                qname: QueryView::parse(&w.query)
                    .map(|q| q.qname.to_text())
                    .unwrap_or_default(),
                qtype: resolution.qtype,
                verdict: Verdict::Allowed,
                rcode,
                upstream_ms: Some((now - p.started) * 1000.0),
                answers: answers(),
            });
            out.push(Answer {
                token: w.token,
                bytes,
                changes,
                hold,
                has_addresses,
                log,
            });
        }
        Ok(out)
    }

    /// Ends the queries whose upstream did not answer in time (SERVFAIL for each waiting
    /// client), and hands out the SERVFAILs of queries evicted to make room since the last
    /// sweep.
    pub fn sweep(&self, now: f64) -> Result<Vec<Expired>, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        let mut out = std::mem::take(&mut st.evicted);
        while let Some(&(deadline, leader)) = st.deadlines.front() {
            if deadline > now {
                break;
            }
            st.deadlines.pop_front();
            let Some(p) = st.drop_pending(leader) else {
                continue; // answered or cancelled already
            };
            st.stats.timeouts += 1;
            let mut channel = Some(p.channel);
            for w in p.waiters {
                st.waiting.remove(&w.token);
                st.free_slot(w.client, w.token);
                st.stats.record_rcode(types::SERVFAIL);
                let bytes = error_reply(&w.query, types::SERVFAIL).unwrap_or_default();
                let log = w.log.then(|| waiter_record(&w, now, Verdict::Timeout));
                out.push(Expired {
                    token: w.token,
                    bytes,
                    channel: channel.take(),
                    log,
                });
            }
        }
        // Retransmissions of queries that are over, should the caller never ask for them.
        let State {
            retransmits,
            pending,
            ..
        } = &mut *st;
        for q in retransmits.iter_mut() {
            while q.front().is_some_and(|(_, l)| !pending.contains_key(l)) {
                q.pop_front();
            }
        }
        Ok(out)
    }

    /// True when UDP queries are sent again at all (retries, and an interval below the
    /// timeout).
    pub fn retransmits_on(&self) -> bool {
        let c = &self.config;
        c.retries > 0 && c.retransmit > 0.0 && c.retransmit < c.timeout
    }

    /// The UDP queries due to be sent again by `now` (no answer yet, and their timeout still
    /// ahead: the copy is sent only while an answer to it can be taken), each at most
    /// `retries` times, `retransmit` apart; and when the next one is due (None: none
    /// scheduled). An answer to any copy matches the one pending query, and its waiters get
    /// one answer each: nothing about matching changes.
    pub fn retransmits(&self, now: f64) -> Result<(Vec<Retransmit>, Option<f64>), EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        let mut out = Vec::new();
        let (interval, timeout) = (self.config.retransmit, self.config.timeout);
        for round in 0..st.retransmits.len() {
            while let Some(&(due, leader)) = st.retransmits[round].front() {
                if due > now {
                    break;
                }
                st.retransmits[round].pop_front();
                let Some(p) = st.pending.get_mut(&leader) else {
                    continue; // answered, timed out or cancelled already
                };
                // Due before the timeout, and still before it now: a caller that comes late
                // (the asyncio sweeper's tick) sends no copy that could not be answered.
                if due >= p.started + timeout || now >= p.started + timeout {
                    p.sent = None;
                    continue;
                }
                let next = due + interval;
                let last = round + 1 >= self.config.retries as usize || next >= p.started + timeout;
                let bytes = if last { p.sent.take() } else { p.sent.clone() };
                let Some(bytes) = bytes else { continue };
                out.push(Retransmit {
                    token: leader,
                    channel: p.channel,
                    slot: p.slot,
                    bytes,
                    started: p.started,
                });
                if !last {
                    st.retransmits[round + 1].push_back((next, leader));
                }
            }
        }
        st.stats.retransmits += out.len() as u64;
        let next = st
            .retransmits
            .iter()
            .filter_map(|q| q.front().map(|&(due, _)| due))
            .min_by(f64::total_cmp);
        Ok((out, next))
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

    /// Forgets a pending query whose client went away (a closed TCP connection); the upstream
    /// query stays while other clients wait for it.
    pub fn cancel(&self, token: u64) -> Result<bool, EngineError> {
        let mut st = self.state.lock().map_err(|_| POISONED)?;
        match st.remove_waiter(token) {
            Some(_) => {
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
