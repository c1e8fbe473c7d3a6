//! The proxy's UDP socket I/O on a Rust thread: `recvmmsg` in, one engine call per packet,
//! `sendmmsg` out, without the Python interpreter on the path.
//!
//! Python keeps the configuration, the timers and the enforcement backend. What it must see
//! reaches it in batches through [`UdpIo::drain`], announced on an eventfd the event loop
//! watches: answers held until the backend has applied new addresses (they wait here, by id,
//! until [`UdpIo::release`]), the changes for the backend, and the sampled query log records.
//! Timeouts go through [`UdpIo::sweep`], which answers the UDP clients it owns and hands the rest
//! (TCP tokens, failover accounting) back, in the shape of [`Engine::sweep`].
//!
//! Transparent interception (TPROXY) is built in: with `transparent`, the listeners read the
//! original destination of every query (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`), the
//! engine's DNS verdict sees that server and port, and the answer leaves from that address and
//! port (an `IP_TRANSPARENT` socket bound there, kept for the next answer).
//!
//! No `unsafe` here: the system calls go through `nix`.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};

use crate::cache::Change;
use crate::engine::{Engine, EngineError, Expired, LogRecord, QueryAction};
use crate::policy::Proto;

/// Datagrams read or written per system call.
pub const BATCH: usize = 32;
/// Engine channels of the servers clients asked (`forward_to_original`) start here, far above
/// the configured upstreams' and the proxy's TCP channels (`1 << 20` up).
pub const ORIGINAL_CHANNEL_BASE: u32 = 1 << 28;
/// At most this many asked servers get a socket at a time. The least recently used one is
/// replaced only when idle (nothing sent to it for an upstream timeout, so no answer is owed on
/// it); while all are busy, a query to yet another server gets none and times out (SERVFAIL).
const MAX_ORIGINALS: usize = 256;
/// How many engine channels the asked servers' sockets cycle through (each new socket takes the
/// next: an answer owed on a replaced socket can never match a query sent on its successor).
const ORIGINAL_CHANNELS: u32 = u32::MAX - ORIGINAL_CHANNEL_BASE;
/// Batches read from one ready socket before the others get their turn.
const ROUNDS: usize = 4;
/// The largest UDP payload (an EDNS answer may be up to 64 KiB).
const MAX_DATAGRAM: usize = 65_535;

/// The sockets and options the I/O thread is built with.
#[derive(Debug, Clone)]
pub struct IoConfig {
    /// Addresses to listen on for clients (SO_REUSEPORT, like the asyncio listeners).
    pub listen: Vec<SocketAddr>,
    /// Upstream resolvers; their index is the engine's channel.
    pub upstreams: Vec<SocketAddr>,
    /// TPROXY listeners: read the original destination, answer from it.
    pub transparent: bool,
    /// Transparent mode: forward each query to the server the client asked (its original
    /// destination) instead of the configured upstream.
    pub forward_to_original: bool,
    /// SO_MARK on the upstream sockets, so interception never loops them back.
    pub mark: Option<u32>,
    /// SO_RCVBUF / SO_SNDBUF of every socket, in bytes.
    pub buffer: usize,
    /// More listeners, always transparent, after the `listen` ones: one thread serves a
    /// proxy's direct listeners and its TPROXY listeners together (one table, one sweep).
    pub transparent_listen: Vec<SocketAddr>,
}

/// What can go wrong setting the I/O up or driving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// A socket call failed: what was being done, and the errno.
    Socket(String, Errno),
    /// The engine's state is poisoned.
    Engine(EngineError),
    /// The configuration is unusable (no listener, an unknown channel...).
    Config(String),
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::Socket(what, e) => write!(f, "{what}: {}", e.desc()),
            IoError::Engine(e) => write!(f, "{e}"),
            IoError::Config(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for IoError {}

impl From<EngineError> for IoError {
    fn from(e: EngineError) -> Self {
        IoError::Engine(e)
    }
}

/// Where an answer goes: the listener it came in on, the client, and (transparent mode) the
/// address the client asked, which the answer must come from.
#[derive(Debug, Clone, Copy)]
struct Client {
    listener: usize,
    addr: SockaddrStorage,
    local: Option<SocketAddr>,
}

/// What Python must see, accumulated until it drains.
#[derive(Debug, Default)]
pub struct Drained {
    /// Ids of answers held here until [`UdpIo::release`].
    pub held: Vec<u64>,
    /// Changes for the enforcement backend, in order.
    pub changes: Vec<Change>,
    /// The latest addition sequence number among the held answers (0: none added).
    pub adds_seq: u64,
    /// Sampled query log records.
    pub logs: Vec<LogRecord>,
}

#[derive(Debug, Default)]
struct Events {
    out: Drained,
    notified: bool,
}

#[derive(Debug, Default)]
struct Table {
    clients: HashMap<u64, Client>,
    held: HashMap<u64, (Vec<u8>, Client)>,
    next_held: u64,
}

/// Counters of the I/O thread.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoStats {
    pub queries: u64,
    pub answers: u64,
    pub client_gone: u64,
    pub truncated: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Transparent listeners: datagrams sent to the listener itself, not handed over by
    /// TPROXY (dropped: forwarding them to "the server asked" would loop).
    pub not_intercepted: u64,
    /// Transparent answers that could not leave from the address asked (no socket could be
    /// bound there); a bound socket's failed sends count in `send_errors`.
    pub reply_errors: u64,
    /// Queries to an asked server no socket could be opened for (all busy, or refused).
    pub orig_refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    answers: AtomicU64,
    client_gone: AtomicU64,
    truncated: AtomicU64,
    send_errors: AtomicU64,
    recv_errors: AtomicU64,
    not_intercepted: AtomicU64,
    reply_errors: AtomicU64,
    orig_refused: AtomicU64,
}

#[derive(Debug)]
struct Listener {
    fd: OwnedFd,
    local: SocketAddr,
    /// TPROXY listener: reads the original destination, answers from it.
    transparent: bool,
}

#[derive(Debug)]
struct Upstream {
    fd: OwnedFd,
    addr: SocketAddr,
    answers: AtomicU64,
}

/// The socket to one server clients asked, on its own engine channel.
#[derive(Debug)]
struct Original {
    up: Upstream,
    channel: u32,
    hdrs: MultiHeaders<SockaddrStorage>,
    out: Vec<(Vec<u8>, Option<SockaddrStorage>)>,
    /// When a query last went out: idle (replaceable) an upstream timeout later.
    last_sent: Instant,
}

/// The servers clients asked, each with its connected, marked socket (`forward_to_original`).
/// Only the I/O thread touches them: it makes one when a query the verdict allowed needs it
/// (never before the verdict: a refused or dropped query opens nothing), polls and reads them.
#[derive(Debug, Default)]
struct Originals {
    slots: Vec<Original>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Sockets made so far: the next one's channel is `ORIGINAL_CHANNEL_BASE + next`.
    next: u32,
}

impl Originals {
    /// The channel a query to `server` goes out on: its socket's, or the one the next socket
    /// will take (the verdict comes first; the socket is made by [`Originals::open`]).
    fn channel(&self, server: SocketAddr) -> u32 {
        match self.by_addr.get(&server) {
            Some(&i) => self.slots[i].channel,
            None => ORIGINAL_CHANNEL_BASE + self.next % ORIGINAL_CHANNELS,
        }
    }

    /// The slot of `server`'s socket, made on `channel` (from [`Originals::channel`]) when
    /// there is none. None when every slot is busy or the kernel refuses the socket: the
    /// query then times out into SERVFAIL; the other servers' answers owed are never lost.
    fn open(
        &mut self,
        server: SocketAddr,
        channel: u32,
        config: &IoConfig,
        idle: Duration,
        now: Instant,
    ) -> Option<usize> {
        if let Some(&i) = self.by_addr.get(&server) {
            return Some(i);
        }
        // The channel is used up either way: a pending query names it.
        self.next = self.next.wrapping_add(1) % ORIGINAL_CHANNELS;
        let replace = if self.slots.len() >= MAX_ORIGINALS {
            let (i, oldest) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, o)| o.last_sent)?;
            if now.saturating_duration_since(oldest.last_sent) < idle {
                return None;
            }
            Some(i)
        } else {
            None
        };
        let up = upstream(server, config).ok()?;
        let slot = Original {
            up,
            channel,
            hdrs: MultiHeaders::preallocate(BATCH, None),
            out: Vec::new(),
            last_sent: now,
        };
        let i = match replace {
            Some(i) => {
                let old = std::mem::replace(&mut self.slots[i], slot);
                self.by_addr.remove(&old.up.addr);
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.by_addr.insert(server, i);
        Some(i)
    }
}

#[derive(Debug)]
struct Shared {
    engine: Arc<Engine>,
    config: IoConfig,
    listeners: Vec<Listener>,
    upstreams: Vec<Upstream>,
    table: Mutex<Table>,
    events: Mutex<Events>,
    /// Transparent mode: sockets bound to the servers clients asked, to answer from them.
    reply_sockets: Mutex<Replies>,
    /// Readable when there is something to drain (Python's event loop watches it).
    notify: EventFd,
    /// Wakes the I/O thread (stop, stop listening).
    wake: EventFd,
    upstream: AtomicU32,
    adds_queued: AtomicU64,
    adds_applied: AtomicU64,
    listening: AtomicBool,
    running: AtomicBool,
    counters: Counters,
}

/// The UDP data path on its own thread. All methods take `&self`.
#[derive(Debug)]
pub struct UdpIo {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

const POISONED: IoError = IoError::Engine(EngineError("I/O state poisoned by an earlier panic"));

fn sock_err(what: impl Into<String>) -> impl FnOnce(Errno) -> IoError {
    let what = what.into();
    move |e| IoError::Socket(what, e)
}

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn grow_buffers(fd: &OwnedFd, size: usize) {
    // The *FORCE options pass net.core.[rw]mem_max with CAP_NET_ADMIN; else ask what we may.
    if socket::setsockopt(fd, sockopt::RcvBufForce, &size).is_err() {
        let _ = socket::setsockopt(fd, sockopt::RcvBuf, &size);
    }
    if socket::setsockopt(fd, sockopt::SndBufForce, &size).is_err() {
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &size);
    }
}

fn udp_socket(addr: &SocketAddr) -> Result<OwnedFd, IoError> {
    socket::socket(
        family(addr),
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sock_err(format!("socket for {addr}")))
}

fn listener(addr: SocketAddr, transparent: bool, cfg: &IoConfig) -> Result<Listener, IoError> {
    let fd = udp_socket(&addr)?;
    let what = format!("cannot listen on {addr}");
    socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(sock_err(what.clone()))?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(sock_err(what.clone()))?;
    }
    if transparent {
        socket::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(sock_err(what.clone()))?;
        if addr.is_ipv4() {
            socket::setsockopt(&fd, sockopt::Ipv4OrigDstAddr, &true)
                .map_err(sock_err(what.clone()))?;
        } else {
            socket::setsockopt(&fd, sockopt::Ipv6OrigDstAddr, &true)
                .map_err(sock_err(what.clone()))?;
        }
    }
    grow_buffers(&fd, cfg.buffer);
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(sock_err(what.clone()))?;
    let local = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(sock_err(what.clone()))
        .and_then(|s| socket_addr(&s).ok_or(IoError::Config(what)))?;
    Ok(Listener {
        fd,
        local,
        transparent,
    })
}

fn upstream(addr: SocketAddr, cfg: &IoConfig) -> Result<Upstream, IoError> {
    let fd = udp_socket(&addr)?;
    let what = format!("upstream {addr}");
    if let Some(mark) = cfg.mark {
        socket::setsockopt(&fd, sockopt::Mark, &mark).map_err(sock_err(what.clone()))?;
    }
    grow_buffers(&fd, cfg.buffer);
    // Connected: the kernel drops datagrams from anyone but the upstream (RFC 5452).
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(sock_err(what))?;
    Ok(Upstream {
        fd,
        addr,
        answers: AtomicU64::new(0),
    })
}

/// An address as std sees it (v4-mapped IPv6 sources as IPv4: the endpoint table's keys).
fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

fn orig_dst(cmsg: ControlMessageOwned) -> Option<SocketAddr> {
    match cmsg {
        ControlMessageOwned::Ipv4OrigDstAddr(a) => {
            Some(SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(a))))
        }
        ControlMessageOwned::Ipv6OrigDstAddr(a) => {
            Some(SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(a))))
        }
        _ => None,
    }
}

/// One datagram read: its length in the buffer of the same index, where from, where to.
#[derive(Debug, Clone, Copy)]
struct Received {
    len: usize,
    from: Option<SockaddrStorage>,
    to: Option<SocketAddr>,
    truncated: bool,
}

/// Reads up to [`BATCH`] datagrams without blocking into `bufs`.
fn recv_batch(
    fd: RawFd,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
    bufs: &mut [Vec<u8>],
    out: &mut Vec<Received>,
) -> Result<usize, Errno> {
    out.clear();
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(&mut b[..])])
        .collect();
    let results = socket::recvmmsg(fd, hdrs, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
    for m in results {
        let to = m.cmsgs().ok().and_then(|mut it| it.find_map(orig_dst));
        out.push(Received {
            len: m.bytes,
            from: m.address,
            to,
            truncated: m.flags.contains(MsgFlags::MSG_TRUNC),
        });
    }
    Ok(out.len())
}

/// Sends `msgs` on `fd` (`None` address: a connected socket), [`BATCH`] per system call.
fn send_batch(
    fd: RawFd,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
    msgs: &[(Vec<u8>, Option<SockaddrStorage>)],
    counters: &Counters,
) {
    for chunk in msgs.chunks(BATCH) {
        let mut start = 0;
        while start < chunk.len() {
            let rest = &chunk[start..];
            let iovs: Vec<[IoSlice<'_>; 1]> = rest.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = rest.iter().map(|(_, a)| *a).collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            match socket::sendmmsg(fd, hdrs, &iovs, &addrs, no_cmsgs, MsgFlags::MSG_DONTWAIT)
                .map(Iterator::count)
            {
                Ok(0) | Err(Errno::EAGAIN) => {
                    // Socket buffer full: these datagrams are lost like any other UDP loss.
                    counters
                        .send_errors
                        .fetch_add(rest.len() as u64, Ordering::Relaxed);
                    break;
                }
                Ok(n) => start += n,
                Err(Errno::EINTR) => {}
                Err(_) => {
                    // One bad datagram (e.g. an unreachable address): skip it, send the rest.
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    start += 1;
                }
            }
        }
    }
}

/// Reply sockets kept for transparent mode, at most this many (the least recently used is
/// closed first; an answer still owed from its address simply opens it again).
const MAX_REPLY_SOCKETS: usize = 256;

/// A socket that sends from `local`, an address this host does not own (transparent mode: the
/// server the client asked): `IP_TRANSPARENT` lets it bind there. Without `SO_REUSEADDR`: a UDP
/// socket sharing an address with a server that set it too could be handed its queries.
/// `IP_PKTINFO` would set the source address only, not the port.
fn reply_socket(local: SocketAddr) -> Result<OwnedFd, IoError> {
    let fd = udp_socket(&local)?;
    let what = format!("reply socket from {local}");
    if local.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(sock_err(what.clone()))?;
    }
    socket::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(sock_err(what.clone()))?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(local)).map_err(sock_err(what))?;
    Ok(fd)
}

/// Is `ip` an address of this node (a plain socket may bind it)?
fn is_local(ip: std::net::IpAddr) -> bool {
    let probe = SocketAddr::new(ip, 0);
    udp_socket(&probe)
        .is_ok_and(|fd| socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(probe)).is_ok())
}

/// How answers leave from one address clients asked.
#[derive(Debug)]
enum Reply {
    /// A transparent socket bound there, kept.
    Bound(OwnedFd),
    /// An address of this node (node-local DNS): a server there may hold the port, or want it
    /// later. A socket is bound for each answer and closed at once; while the server holds the
    /// address the answer cannot leave (counted in `reply_errors`; fail closed).
    Local,
    /// The kernel refused the socket: answers are dropped until it falls out of the cache.
    Refused,
}

/// The reply sockets by address, least recently used evicted first.
#[derive(Debug, Default)]
struct Replies {
    by_addr: HashMap<SocketAddr, (Reply, u64)>,
    tick: u64,
}

impl Replies {
    /// How answers leave from `local` (found, or made now).
    fn get(&mut self, local: SocketAddr) -> &Reply {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.by_addr.get_mut(&local) {
            entry.1 = tick;
        } else {
            if self.by_addr.len() >= MAX_REPLY_SOCKETS {
                let oldest = self
                    .by_addr
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(a, _)| *a);
                if let Some(a) = oldest {
                    self.by_addr.remove(&a);
                }
            }
            let reply = if is_local(local.ip()) {
                Reply::Local
            } else {
                reply_socket(local).map_or(Reply::Refused, Reply::Bound)
            };
            self.by_addr.insert(local, (reply, tick));
        }
        self.by_addr.get(&local).map_or(&Reply::Refused, |(r, _)| r)
    }

    /// Sends `payload` to `to` from `local`; false when it could not leave.
    fn send(&mut self, local: SocketAddr, payload: &[u8], to: &SockaddrStorage) -> bool {
        let send = |fd: &OwnedFd| {
            socket::sendto(fd.as_raw_fd(), payload, to, MsgFlags::MSG_DONTWAIT).is_ok()
        };
        match self.get(local) {
            Reply::Bound(fd) => send(fd),
            Reply::Local => reply_socket(local).is_ok_and(|fd| send(&fd)),
            Reply::Refused => false,
        }
    }
}

/// Answers for clients: grouped by listener, or (transparent mode) each with the address it
/// must come from.
#[derive(Debug, Default)]
struct Outbox {
    plain: Vec<Vec<(Vec<u8>, Option<SockaddrStorage>)>>,
    from: Vec<(Vec<u8>, SockaddrStorage, SocketAddr)>,
}

impl Outbox {
    fn new(listeners: usize) -> Self {
        Outbox {
            plain: vec![Vec::new(); listeners],
            from: Vec::new(),
        }
    }

    fn push(&mut self, client: &Client, payload: Vec<u8>) {
        match client.local {
            Some(local) => self.from.push((payload, client.addr, local)),
            None => {
                if let Some(q) = self.plain.get_mut(client.listener) {
                    q.push((payload, Some(client.addr)));
                }
            }
        }
    }

    fn flush(&mut self, sh: &Shared, hdrs: &mut MultiHeaders<SockaddrStorage>) {
        for (l, q) in self.plain.iter_mut().enumerate() {
            if !q.is_empty() {
                if let Some(lis) = sh.listeners.get(l) {
                    send_batch(lis.fd.as_raw_fd(), hdrs, q, &sh.counters);
                }
                q.clear();
            }
        }
        if self.from.is_empty() {
            return;
        }
        let Ok(mut replies) = sh.reply_sockets.lock() else {
            self.from.clear();
            return;
        };
        // The answers from one asked address leave together, in one sendmmsg per BATCH.
        self.from.sort_unstable_by_key(|(_, _, local)| *local);
        let mut run = Vec::new();
        let mut answers = self.from.drain(..).peekable();
        while let Some((payload, to, local)) = answers.next() {
            run.push((payload, Some(to)));
            if answers.peek().is_some_and(|(_, _, next)| *next == local) {
                continue;
            }
            let bound = match replies.get(local) {
                Reply::Bound(fd) => Some(fd.as_raw_fd()),
                Reply::Local | Reply::Refused => None,
            };
            match bound {
                Some(fd) => send_batch(fd, hdrs, &run, &sh.counters),
                None => {
                    for (payload, to) in &run {
                        let sent = to.is_some_and(|to| replies.send(local, payload, &to));
                        if !sent {
                            sh.counters.reply_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            run.clear();
        }
    }
}

impl Shared {
    /// Is `a` one of the listeners' own addresses?
    fn is_own(&self, a: SocketAddr) -> bool {
        let (ip, port) = (a.ip().to_canonical(), a.port());
        self.listeners
            .iter()
            .any(|l| l.local.port() == port && l.local.ip().to_canonical() == ip)
    }

    fn adds_pending(&self) -> bool {
        self.adds_queued.load(Ordering::Acquire) > self.adds_applied.load(Ordering::Acquire)
    }

    /// Hands `batch` to Python and rings the eventfd once if it was not rung already.
    fn publish(&self, batch: &mut Drained) {
        if batch.held.is_empty() && batch.changes.is_empty() && batch.logs.is_empty() {
            return;
        }
        let Ok(mut ev) = self.events.lock() else {
            return;
        };
        ev.out.held.append(&mut batch.held);
        ev.out.changes.append(&mut batch.changes);
        ev.out.logs.append(&mut batch.logs);
        ev.out.adds_seq = ev.out.adds_seq.max(batch.adds_seq);
        batch.adds_seq = 0;
        if !ev.notified {
            ev.notified = true;
            let _ = self.notify.write(1);
        }
    }

    /// Queries from listener `l`: forwarded upstream, or answered at once.
    fn on_queries(
        &self,
        l: usize,
        io: &mut Scratch<'_>,
        to_upstream: &mut [Vec<(Vec<u8>, Option<SockaddrStorage>)>],
        originals: &mut Originals,
    ) -> Result<(), IoError> {
        let Scratch {
            bufs,
            got,
            outbox,
            batch,
            ..
        } = io;
        let now = crate::cache::now_seconds();
        let configured = self.upstream.load(Ordering::Relaxed) as usize;
        let Some(up) = self.upstreams.get(configured) else {
            return Ok(());
        };
        let transparent = self.listeners.get(l).is_some_and(|lis| lis.transparent);
        let idle = Duration::try_from_secs_f64(self.engine.config().timeout)
            .unwrap_or(Duration::from_secs(5));
        let clock = Instant::now();
        let mut table = self.table.lock().map_err(|_| POISONED)?;
        for (r, buf) in got.iter().zip(bufs.iter()) {
            self.counters.queries.fetch_add(1, Ordering::Relaxed);
            let Some(from) = r.from else { continue };
            let Some(src) = socket_addr(&from) else {
                continue;
            };
            if r.truncated {
                self.counters.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let local = if transparent {
                match r.to {
                    // Sent to a listener itself, not handed over by TPROXY: not ours to answer
                    // (forwarded to "the server asked", it would come back here).
                    Some(a) if !self.is_own(a) => Some(a),
                    _ => {
                        self.counters
                            .not_intercepted
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            } else {
                None
            };
            // The verdict sees the server the client asked (transparent) or the upstream.
            let (server, port) = match local {
                Some(a) => (a.ip().to_canonical(), a.port()),
                None => (up.addr.ip().to_canonical(), 53),
            };
            // Where it goes: the server asked (forward_to_original), else the upstream. The
            // socket to the server asked is made only once the verdict lets the query go.
            let asked = local.filter(|_| self.config.forward_to_original);
            let channel = asked.map_or(configured as u32, |a| originals.channel(a));
            let (action, log) = self.engine.query(
                src.ip().to_canonical(),
                server,
                port,
                Proto::Udp,
                &buf[..r.len],
                channel,
                now,
            )?;
            if let Some(rec) = log {
                batch.logs.push(rec);
            }
            let client = Client {
                listener: l,
                addr: from,
                local,
            };
            match action {
                QueryAction::Forward { bytes, token } => {
                    // Even when it cannot be sent: the sweep answers it SERVFAIL.
                    table.clients.insert(token, client);
                    let queue = match asked {
                        Some(a) => match originals.open(a, channel, &self.config, idle, clock) {
                            Some(i) => originals.slots.get_mut(i).map(|o| {
                                o.last_sent = clock;
                                &mut o.out
                            }),
                            None => {
                                self.counters.orig_refused.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                        },
                        None => to_upstream.get_mut(configured),
                    };
                    if let Some(q) = queue {
                        q.push((bytes, None));
                    }
                }
                QueryAction::Reply { bytes } => outbox.push(&client, bytes),
                QueryAction::Drop => {}
            }
        }
        Ok(())
    }

    /// Answers from upstream `channel`: to their clients, or held for the backend.
    fn on_answers(
        &self,
        channel: u32,
        got: &[Received],
        bufs: &[Vec<u8>],
        outbox: &mut Outbox,
        batch: &mut Drained,
    ) -> Result<(), IoError> {
        let now = crate::cache::now_seconds();
        let mut table = self.table.lock().map_err(|_| POISONED)?;
        for (r, buf) in got.iter().zip(bufs) {
            if r.truncated {
                self.counters.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(a) = self.engine.response(channel, &buf[..r.len], now)? else {
                continue; // unmatched or malformed: dropped and counted by the engine
            };
            self.counters.answers.fetch_add(1, Ordering::Relaxed);
            if let Some(up) = self.upstreams.get(channel as usize) {
                up.answers.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(rec) = a.log {
                batch.logs.push(rec);
            }
            let Some(client) = table.clients.remove(&a.token) else {
                self.counters.client_gone.fetch_add(1, Ordering::Relaxed);
                batch.changes.extend(a.changes);
                continue;
            };
            // New addresses wait for the firewall; so does any answer with addresses while a
            // batch of additions is on its way (it may be adding this answer's addresses).
            if a.hold || (a.has_addresses && self.adds_pending()) {
                if a.hold {
                    batch.adds_seq = self.adds_queued.fetch_add(1, Ordering::AcqRel) + 1;
                }
                table.next_held += 1;
                let id = table.next_held;
                table.held.insert(id, (a.bytes, client));
                batch.held.push(id);
                batch.changes.extend(a.changes);
            } else {
                batch.changes.extend(a.changes);
                outbox.push(&client, a.bytes);
            }
        }
        Ok(())
    }
}

/// The I/O thread's buffers, lent to one socket's reading at a time.
struct Scratch<'a> {
    bufs: &'a mut [Vec<u8>],
    got: &'a mut Vec<Received>,
    outbox: &'a mut Outbox,
    send_hdrs: &'a mut MultiHeaders<SockaddrStorage>,
    batch: &'a mut Drained,
}

/// Reads up to [`ROUNDS`] batches of answers from `up` (engine channel `channel`) and sends
/// what may go; false when the engine is poisoned (the thread ends).
fn read_answers(
    sh: &Shared,
    up: &Upstream,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
    channel: u32,
    io: &mut Scratch<'_>,
) -> bool {
    for _ in 0..ROUNDS {
        match recv_batch(up.fd.as_raw_fd(), hdrs, io.bufs, io.got) {
            Ok(n) => {
                if sh
                    .on_answers(channel, io.got, io.bufs, io.outbox, io.batch)
                    .is_err()
                {
                    return false;
                }
                io.outbox.flush(sh, io.send_hdrs);
                if n < BATCH {
                    break;
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => break,
            // ECONNREFUSED and the like (ICMP): the queries time out and fail over.
            Err(_) => {
                sh.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    true
}

/// The I/O thread: poll, read a batch per ready socket, process, send, publish.
fn run(sh: &Shared) {
    let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; BATCH];
    let cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    // One header set per socket: nix leaves each msg_namelen (and msg_controllen) as the kernel
    // set it, so a set shared between an IPv4 and an IPv6 socket would truncate addresses. A
    // socket's peers all have its family (IPv6 listeners are V6ONLY), so its own set stays right.
    let fresh = || MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut listener_hdrs: Vec<_> = sh.listeners.iter().map(|_| fresh()).collect();
    let mut upstream_hdrs: Vec<_> = sh.upstreams.iter().map(|_| fresh()).collect();
    let mut send_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got = Vec::with_capacity(BATCH);
    let mut to_upstream: Vec<Vec<(Vec<u8>, Option<SockaddrStorage>)>> =
        vec![Vec::new(); sh.upstreams.len()];
    let mut outbox = Outbox::new(sh.listeners.len());
    let mut batch = Drained::default();
    let mut ready = Vec::new();
    let mut originals = Originals::default();
    let mut polled_originals;
    let mut io = Scratch {
        bufs: &mut bufs,
        got: &mut got,
        outbox: &mut outbox,
        send_hdrs: &mut send_hdrs,
        batch: &mut batch,
    };
    while sh.running.load(Ordering::Acquire) {
        let listening = sh.listening.load(Ordering::Acquire);
        {
            let mut fds = vec![PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN)];
            if listening {
                fds.extend(
                    sh.listeners
                        .iter()
                        .map(|l| PollFd::new(l.fd.as_fd(), PollFlags::POLLIN)),
                );
            }
            fds.extend(
                sh.upstreams
                    .iter()
                    .chain(originals.slots.iter().map(|o| &o.up))
                    .map(|u| PollFd::new(u.fd.as_fd(), PollFlags::POLLIN)),
            );
            polled_originals = originals.slots.len();
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => {
                    sh.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            ready.clear();
            ready.extend(
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty())),
            );
        }
        if ready.first() == Some(&true) {
            let _ = sh.wake.read();
        }
        let nl = if listening { sh.listeners.len() } else { 0 };
        // Answers first: they finish work (and free pending slots) before new work comes in.
        for ((c, up), hdrs) in sh.upstreams.iter().enumerate().zip(&mut upstream_hdrs) {
            if ready.get(1 + nl + c) == Some(&true)
                && !read_answers(sh, up, hdrs, c as u32, &mut io)
            {
                return;
            }
        }
        let base = 1 + nl + sh.upstreams.len();
        for (i, o) in originals
            .slots
            .iter_mut()
            .enumerate()
            .take(polled_originals)
        {
            if ready.get(base + i) == Some(&true)
                && !read_answers(sh, &o.up, &mut o.hdrs, o.channel, &mut io)
            {
                return;
            }
        }
        sh.publish(io.batch);
        for ((l, lis), hdrs) in sh
            .listeners
            .iter()
            .enumerate()
            .take(nl)
            .zip(&mut listener_hdrs)
        {
            if ready.get(1 + l) != Some(&true) {
                continue;
            }
            for _ in 0..ROUNDS {
                let res = if lis.transparent {
                    // A fresh header set per call: a datagram without the control message would
                    // leave msg_controllen at 0 for the next call on that slot.
                    let mut fresh = MultiHeaders::preallocate(BATCH, Some(cmsg.clone()));
                    recv_batch(lis.fd.as_raw_fd(), &mut fresh, io.bufs, io.got)
                } else {
                    recv_batch(lis.fd.as_raw_fd(), hdrs, io.bufs, io.got)
                };
                let n = match res {
                    Ok(n) => n,
                    Err(Errno::EAGAIN | Errno::EINTR) => break,
                    Err(_) => {
                        sh.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                };
                if sh
                    .on_queries(l, &mut io, &mut to_upstream, &mut originals)
                    .is_err()
                {
                    return;
                }
                let queues = to_upstream.iter_mut().zip(&sh.upstreams);
                let asked = originals.slots.iter_mut().map(|o| (&mut o.out, &o.up));
                for (q, up) in queues.chain(asked) {
                    if !q.is_empty() {
                        send_batch(up.fd.as_raw_fd(), io.send_hdrs, q, &sh.counters);
                        q.clear();
                    }
                }
                io.outbox.flush(sh, io.send_hdrs);
                if n < BATCH {
                    break;
                }
            }
        }
        sh.publish(io.batch);
    }
}

impl UdpIo {
    /// Opens the sockets (listeners bound, upstreams connected); the thread starts with
    /// [`UdpIo::start`].
    pub fn new(engine: Arc<Engine>, config: &IoConfig) -> Result<Self, IoError> {
        if (config.listen.is_empty() && config.transparent_listen.is_empty())
            || config.upstreams.is_empty()
        {
            return Err(IoError::Config(
                "at least one listen address and one upstream are required".into(),
            ));
        }
        let listeners = config
            .listen
            .iter()
            .map(|a| listener(*a, config.transparent, config))
            .chain(
                config
                    .transparent_listen
                    .iter()
                    .map(|a| listener(*a, true, config)),
            )
            .collect::<Result<Vec<_>, _>>()?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|a| upstream(*a, config))
            .collect::<Result<Vec<_>, _>>()?;
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        let notify = EventFd::from_flags(flags).map_err(sock_err("eventfd"))?;
        let wake = EventFd::from_flags(flags).map_err(sock_err("eventfd"))?;
        Ok(UdpIo {
            shared: Arc::new(Shared {
                engine,
                config: config.clone(),
                listeners,
                upstreams,
                table: Mutex::new(Table::default()),
                events: Mutex::new(Events::default()),
                reply_sockets: Mutex::new(Replies::default()),
                notify,
                wake,
                upstream: AtomicU32::new(0),
                adds_queued: AtomicU64::new(0),
                adds_applied: AtomicU64::new(0),
                listening: AtomicBool::new(true),
                running: AtomicBool::new(false),
                counters: Counters::default(),
            }),
            thread: Mutex::new(None),
        })
    }

    /// Starts the I/O thread (once; later calls do nothing while it runs).
    pub fn start(&self) -> Result<(), IoError> {
        let mut t = self.thread.lock().map_err(|_| POISONED)?;
        if t.is_some() {
            return Ok(());
        }
        self.shared.running.store(true, Ordering::Release);
        let sh = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("fqdnguard-udp".into())
            .spawn(move || run(&sh))
            .map_err(|_| IoError::Config("cannot start the UDP I/O thread".into()))?;
        *t = Some(handle);
        Ok(())
    }

    /// Stops reading the listeners (answers still flow); for a graceful stop.
    pub fn stop_listening(&self) {
        self.shared.listening.store(false, Ordering::Release);
        let _ = self.shared.wake.write(1);
    }

    /// Stops the thread and waits for it. Sockets close when the `UdpIo` is dropped.
    pub fn stop(&self) -> Result<(), IoError> {
        self.shared.running.store(false, Ordering::Release);
        let _ = self.shared.wake.write(1);
        let handle = self.thread.lock().map_err(|_| POISONED)?.take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        Ok(())
    }

    /// The eventfd that is readable when [`UdpIo::drain`] has something.
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    /// The listeners' descriptors (for socket options set from outside, e.g. a reuseport
    /// program), in the order of `IoConfig::listen` then `IoConfig::transparent_listen`.
    pub fn listener_fds(&self) -> Vec<RawFd> {
        self.shared
            .listeners
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .collect()
    }

    /// The bound listen addresses (the real port when 0 was asked), in the same order.
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        self.shared.listeners.iter().map(|l| l.local).collect()
    }

    /// Everything published since the last drain.
    pub fn drain(&self) -> Result<Drained, IoError> {
        let _ = self.shared.notify.read(); // EAGAIN when already reset: fine
        let mut ev = self.shared.events.lock().map_err(|_| POISONED)?;
        ev.notified = false;
        Ok(std::mem::take(&mut ev.out))
    }

    /// Sends the held answers `ids` to their clients; returns how many were still held.
    pub fn release(&self, ids: &[u64]) -> Result<usize, IoError> {
        let mut out = Outbox::new(self.shared.listeners.len());
        let mut n = 0;
        {
            let mut table = self.shared.table.lock().map_err(|_| POISONED)?;
            for id in ids {
                if let Some((payload, client)) = table.held.remove(id) {
                    out.push(&client, payload);
                    n += 1;
                }
            }
        }
        let mut hdrs = MultiHeaders::preallocate(BATCH, None);
        out.flush(&self.shared, &mut hdrs);
        Ok(n)
    }

    /// Sends every held answer (shutdown).
    pub fn release_all(&self) -> Result<usize, IoError> {
        let ids: Vec<u64> = self
            .shared
            .table
            .lock()
            .map_err(|_| POISONED)?
            .held
            .keys()
            .copied()
            .collect();
        self.release(&ids)
    }

    /// [`Engine::sweep`], answering the timed-out UDP clients this owns with their SERVFAIL;
    /// returns every expired query (the others belong to the caller's TCP clients).
    pub fn sweep(&self, now: f64) -> Result<Vec<Expired>, IoError> {
        let expired = self.shared.engine.sweep(now)?;
        let mut out = Outbox::new(self.shared.listeners.len());
        {
            let mut table = self.shared.table.lock().map_err(|_| POISONED)?;
            for x in &expired {
                if let Some(client) = table.clients.remove(&x.token) {
                    out.push(&client, x.bytes.clone());
                }
            }
        }
        let mut hdrs = MultiHeaders::preallocate(BATCH, None);
        out.flush(&self.shared, &mut hdrs);
        Ok(expired)
    }

    /// Sends new queries to upstream `channel` (failover is decided by the caller).
    pub fn set_upstream(&self, channel: usize) -> Result<(), IoError> {
        if channel >= self.shared.upstreams.len() {
            return Err(IoError::Config(format!(
                "upstream channel {channel} does not exist ({} upstreams)",
                self.shared.upstreams.len()
            )));
        }
        self.shared
            .upstream
            .store(channel as u32, Ordering::Relaxed);
        Ok(())
    }

    /// Records that the caller queued additions itself (e.g. a TCP answer): answers with
    /// addresses are held until [`UdpIo::adds_applied`] reaches the returned number.
    pub fn note_adds(&self) -> u64 {
        self.shared.adds_queued.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The backend has applied every addition up to `seq`.
    pub fn adds_applied(&self, seq: u64) {
        self.shared.adds_applied.fetch_max(seq, Ordering::AcqRel);
    }

    /// Some addition has been queued and not yet applied.
    pub fn adds_pending(&self) -> bool {
        self.shared.adds_pending()
    }

    /// Answers matched so far from upstream `channel` (failover resets on progress).
    pub fn answers(&self, channel: usize) -> u64 {
        self.shared
            .upstreams
            .get(channel)
            .map_or(0, |u| u.answers.load(Ordering::Relaxed))
    }

    /// UDP queries forwarded and not yet answered or timed out.
    pub fn inflight(&self) -> Result<usize, IoError> {
        Ok(self
            .shared
            .table
            .lock()
            .map_err(|_| POISONED)?
            .clients
            .len())
    }

    /// Answers held for the backend.
    pub fn held(&self) -> Result<usize, IoError> {
        Ok(self.shared.table.lock().map_err(|_| POISONED)?.held.len())
    }

    pub fn stats(&self) -> IoStats {
        let c = &self.shared.counters;
        IoStats {
            queries: c.queries.load(Ordering::Relaxed),
            answers: c.answers.load(Ordering::Relaxed),
            client_gone: c.client_gone.load(Ordering::Relaxed),
            truncated: c.truncated.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
            recv_errors: c.recv_errors.load(Ordering::Relaxed),
            not_intercepted: c.not_intercepted.load(Ordering::Relaxed),
            reply_errors: c.reply_errors.load(Ordering::Relaxed),
            orig_refused: c.orig_refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpIo {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests;
