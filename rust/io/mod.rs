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
//! Queries leave from a pool of unconnected sockets per address family, each bound by the
//! kernel to a random ephemeral port, one picked at random per query by the engine
//! ([`Engine::query`]'s slot) and re-drawn over time: an off-path sender must guess the port
//! as well as the id (RFC 5452 section 9.2; with 1,024 sockets, 26 bits). An answer is taken
//! only from the address the query went to, on the socket it left from.
//!
//! Transparent interception (TPROXY) is built in: with `transparent`, the listeners read the
//! original destination of every query (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`), the
//! engine's DNS verdict sees that server and port, and the answer leaves from that address and
//! port (an `IP_TRANSPARENT` socket bound there, kept for the next answer).
//!
//! The system calls go through `nix`; the one `unsafe` line takes ownership of a descriptor
//! that `fcntl(F_DUPFD_CLOEXEC)` just made ([`high_fd`]).

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
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
/// At most this many asked servers have a channel at a time. The least recently used one is
/// replaced only when idle (nothing sent to it for an upstream timeout, so no answer is owed on
/// it); while all are busy, a query to yet another server is not sent and times out (SERVFAIL).
const MAX_ORIGINALS: usize = 256;
/// How many engine channels the asked servers cycle through (each new server takes the next: an
/// answer owed to a replaced server can never match a query sent to its successor).
const ORIGINAL_CHANNELS: u32 = u32::MAX - ORIGINAL_CHANNEL_BASE;
/// The source-port pool: one socket of each family is re-drawn (closed, and a new one bound to
/// a new random port) this often; 1,024 sockets are all re-drawn in about a minute. The old
/// socket is read for an upstream timeout more, for the answers still owed on it.
const REDRAW_EVERY: Duration = Duration::from_millis(50);
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
    /// Upstream sockets per address family, each on its own random port (at least 1).
    pub source_ports: u16,
    /// Listening sockets handed over by the process this one takes over from (hot restart):
    /// per listener, in the order of `listen` then `transparent_listen`, a descriptor to use
    /// instead of binding a new socket (`None`, or past the end: bind). Each is duplicated; the
    /// caller keeps its own descriptor and closes it.
    pub inherited: Vec<Option<RawFd>>,
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
    /// Queries to an asked server that could not be given a channel (all busy).
    pub orig_refused: u64,
    /// Datagrams on an upstream socket from an address no query went to (dropped).
    pub unexpected_source: u64,
    /// Upstream sockets re-drawn on a new random port.
    pub redraws: u64,
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
    unexpected_source: AtomicU64,
    redraws: AtomicU64,
}

#[derive(Debug)]
struct Listener {
    fd: OwnedFd,
    local: SocketAddr,
    /// TPROXY listener: reads the original destination, answers from it.
    transparent: bool,
}

/// A configured upstream; its index is its engine channel.
#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    answers: AtomicU64,
}

/// One server clients asked, on its own engine channel.
#[derive(Debug)]
struct Original {
    addr: SocketAddr,
    channel: u32,
    /// When a query last went out: idle (replaceable) an upstream timeout later.
    last_sent: Instant,
}

/// The servers clients asked (`forward_to_original`), each with its engine channel. Only the
/// I/O thread touches them: a server gets its channel when a query the verdict allowed goes
/// to it (never before the verdict: a refused or dropped query takes nothing).
#[derive(Debug, Default)]
struct Originals {
    slots: Vec<Original>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Servers taken so far: the next one's channel is `ORIGINAL_CHANNEL_BASE + next`.
    next: u32,
}

/// Where answers may come from: (address, port) -> engine channel.
fn addr_key(a: SocketAddr) -> (std::net::IpAddr, u16) {
    (a.ip().to_canonical(), a.port())
}

impl Originals {
    /// The channel a query to `server` goes out on: its socket's, or the one the next socket
    /// will take (the verdict comes first; the socket is made by [`Originals::open`]).
    fn channel(&self, server: SocketAddr) -> u32 {
        if let Some(&i) = self.by_addr.get(&server) {
            return self.slots[i].channel;
        }
        // Never a channel a live server holds (after the counter wraps): answers and
        // retransmitted copies are routed by channel, so two servers must not share one.
        let mut k = self.next;
        loop {
            let channel = ORIGINAL_CHANNEL_BASE + k % ORIGINAL_CHANNELS;
            if !self.slots.iter().any(|o| o.channel == channel) {
                return channel;
            }
            k = k.wrapping_add(1) % ORIGINAL_CHANNELS;
        }
    }

    /// The slot of `server`, taken on `channel` (from [`Originals::channel`]) when it has
    /// none. None when every slot is busy: the query then times out into SERVFAIL; the other
    /// servers' answers owed are never lost.
    fn open(
        &mut self,
        server: SocketAddr,
        channel: u32,
        idle: Duration,
        now: Instant,
    ) -> Option<usize> {
        if let Some(&i) = self.by_addr.get(&server) {
            return Some(i);
        }
        // The channel is used up either way: a pending query names it.
        self.next =
            (channel.wrapping_sub(ORIGINAL_CHANNEL_BASE)).wrapping_add(1) % ORIGINAL_CHANNELS;
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
        let slot = Original {
            addr: server,
            channel,
            last_sent: now,
        };
        let i = match replace {
            Some(i) => {
                let old = std::mem::replace(&mut self.slots[i], slot);
                self.by_addr.remove(&old.addr);
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

    /// The channel of the asked server `from`, if it is one.
    fn channel_of(&self, from: SocketAddr) -> Option<u32> {
        let key = addr_key(from);
        self.by_addr
            .iter()
            .find(|(a, _)| addr_key(**a) == key)
            .and_then(|(_, &i)| self.slots.get(i))
            .map(|o| o.channel)
    }
}

/// One upstream socket of the pool: its family and the engine slot queries on it carry.
#[derive(Debug)]
struct PoolSocket {
    fd: OwnedFd,
    v6: bool,
    slot: u16,
    /// When it became its slot's socket (the engine's clock): a retransmission leaves from the
    /// socket its query first left from ([`Pool::socket_at`]).
    since: f64,
}

/// The upstream sockets: `source_ports` per family, unconnected, each bound by the kernel to a
/// random ephemeral port (Linux draws it at random in `ip_local_port_range`), plus the
/// re-drawn ones still read until their answers are no longer owed. Only the I/O thread
/// touches it after start. Sockets are keyed by a serial number, the epoll token.
#[derive(Debug)]
struct Pool {
    sockets: HashMap<u64, PoolSocket>,
    /// The serial of each slot's current socket, IPv4 then IPv6 (`u64::MAX`: none).
    v4: Vec<u64>,
    v6: Vec<u64>,
    /// Re-drawn sockets, by when they may be closed.
    retiring: std::collections::VecDeque<(Instant, u64)>,
    next: u64,
    mark: Option<u32>,
    buffer: usize,
}

/// Epoll tokens: the wake eventfd, listeners from `LISTENER_TOKEN`, pool sockets below.
const WAKE_TOKEN: u64 = u64::MAX;
const LISTENER_TOKEN: u64 = 1 << 62;

impl Pool {
    /// `source_ports` sockets per family wanted; fewer when the process runs out of
    /// descriptors (at least one each, else an error): [`Pool::slots`] says how many. A family
    /// `optional` (only for servers clients may ask, not for a configured upstream) is left
    /// out when the node cannot make its sockets (IPv6 turned off): queries to such servers
    /// then fail to send and time out into SERVFAIL.
    fn new(config: &IoConfig, v4: bool, v6: bool, optional: [bool; 2]) -> Result<Pool, IoError> {
        let n = usize::from(config.source_ports.max(1));
        let mut pool = Pool::empty(config);
        let families: Vec<bool> = [(false, v4), (true, v6)]
            .into_iter()
            .filter(|&(v6, wanted)| {
                wanted && (!optional[usize::from(v6)] || Pool::family_works(v6, config))
            })
            .map(|(v6, _)| v6)
            .collect();
        'slots: for slot in 0..n {
            let mut made = Vec::new();
            for &v6 in &families {
                match pool.open(v6, slot as u16) {
                    Ok(serial) => made.push((v6, serial)),
                    Err(IoError::Socket(_, Errno::EMFILE | Errno::ENFILE)) if slot > 0 => {
                        for (_, serial) in made {
                            pool.sockets.remove(&serial);
                        }
                        break 'slots;
                    }
                    Err(e) => return Err(e),
                }
            }
            for (v6, serial) in made {
                pool.slots_mut(v6).push(serial);
            }
        }
        Ok(pool)
    }

    fn empty(config: &IoConfig) -> Pool {
        Pool {
            sockets: HashMap::new(),
            v4: Vec::new(),
            v6: Vec::new(),
            retiring: std::collections::VecDeque::new(),
            next: 0,
            mark: config.mark,
            buffer: config.buffer,
        }
    }

    /// Can this node make an upstream socket of the family (IPv6 may be turned off)?
    fn family_works(v6: bool, config: &IoConfig) -> bool {
        Pool::empty(config).open(v6, 0).is_ok()
    }

    /// Sockets per family (the engine draws a slot among them).
    fn slots(&self) -> u16 {
        self.v4.len().max(self.v6.len()).max(1) as u16
    }

    fn slots_mut(&mut self, v6: bool) -> &mut Vec<u64> {
        if v6 {
            &mut self.v6
        } else {
            &mut self.v4
        }
    }

    /// A new socket for `slot`, bound to a random port; its serial.
    fn open(&mut self, v6: bool, slot: u16) -> Result<u64, IoError> {
        let any: SocketAddr = if v6 {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let fd = high_fd(udp_socket(&any)?);
        let what = "upstream socket";
        if v6 {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(sock_err(what))?;
        }
        if let Some(mark) = self.mark {
            socket::setsockopt(&fd, sockopt::Mark, &mark).map_err(sock_err(what))?;
        }
        grow_buffers(&fd, self.buffer);
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(any)).map_err(sock_err(what))?;
        self.next += 1;
        let serial = self.next;
        let since = crate::cache::now_seconds();
        self.sockets.insert(
            serial,
            PoolSocket {
                fd,
                v6,
                slot,
                since,
            },
        );
        Ok(serial)
    }

    /// The socket a query to `to` leaves from, for engine slot `slot`.
    fn socket_for(&self, to: SocketAddr, slot: u16) -> Option<&PoolSocket> {
        let slots = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        slots
            .get(usize::from(slot))
            .and_then(|serial| self.sockets.get(serial))
    }

    /// The socket a query to `to` left from, for engine slot `slot`, first sent at `started`:
    /// the slot's socket then, re-drawn since or not (a re-drawn one is read, and kept, for an
    /// upstream timeout more). The current one if none is older (a clock stepped back).
    fn socket_at(&self, to: SocketAddr, slot: u16, started: f64) -> Option<&PoolSocket> {
        let current = self.socket_for(to, slot)?;
        if current.since <= started {
            return Some(current);
        }
        let then = self
            .retiring
            .iter()
            .filter_map(|(_, serial)| self.sockets.get(serial))
            .filter(|s| s.slot == slot && s.v6 == to.is_ipv6() && s.since <= started)
            .max_by(|a, b| a.since.total_cmp(&b.since));
        Some(then.unwrap_or(current))
    }

    /// Re-draws one socket of each family at random (the old one is read until `owed_until`),
    /// and closes the re-drawn ones whose answers are no longer owed. Registers and
    /// unregisters them with `epoll`.
    fn redraw(&mut self, epoll: &Epoll, now: Instant, owed_until: Instant, counters: &Counters) {
        while let Some(&(until, serial)) = self.retiring.front() {
            if until > now {
                break;
            }
            self.retiring.pop_front();
            if let Some(old) = self.sockets.remove(&serial) {
                let _ = epoll.delete(&old.fd);
            }
        }
        for v6 in [false, true] {
            let n = self.slots_mut(v6).len();
            if n == 0 {
                continue;
            }
            let mut r = [0u8; 4];
            if getrandom::fill(&mut r).is_err() {
                return;
            }
            let slot = ((u64::from(u32::from_ne_bytes(r)) * n as u64) >> 32) as usize;
            // Out of descriptors or ports: keep the current socket (it still works).
            let Ok(serial) = self.open(v6, slot as u16) else {
                continue;
            };
            let registered = self.sockets.get(&serial).is_some_and(|s| {
                epoll
                    .add(&s.fd, EpollEvent::new(EpollFlags::EPOLLIN, serial))
                    .is_ok()
            });
            if !registered {
                self.sockets.remove(&serial);
                continue;
            }
            let old = std::mem::replace(&mut self.slots_mut(v6)[slot], serial);
            self.retiring.push_back((owed_until, old));
            counters.redraws.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Shared {
    engine: Arc<Engine>,
    config: IoConfig,
    listeners: Vec<Listener>,
    upstreams: Vec<Upstream>,
    /// Configured upstreams by (address, port), for answers.
    upstream_channels: HashMap<(std::net::IpAddr, u16), u32>,
    /// The source-port pool, until the I/O thread takes it.
    pool: Mutex<Option<Pool>>,
    /// Its sockets per family: the engine draws each query's slot among them.
    slots: u16,
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

/// A duplicate of a descriptor handed over by another process, checked to be a UDP socket.
#[allow(unsafe_code)]
fn inherited_socket(raw: RawFd, addr: &SocketAddr) -> Result<OwnedFd, IoError> {
    use std::os::fd::BorrowedFd;
    let what = format!("the socket handed over for {addr} (descriptor {raw})");
    if raw < 0 {
        return Err(IoError::Config(format!("{what}: not a descriptor")));
    }
    // SAFETY: the caller (the Python binding) holds `raw` open for the duration of the call;
    // it is only borrowed here to be duplicated (F_DUPFD_CLOEXEC), never closed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    let fd = borrowed.try_clone_to_owned().map_err(|e| {
        IoError::Socket(what.clone(), Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    })?;
    match socket::getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Datagram) => {}
        Ok(_) => return Err(IoError::Config(format!("{what}: not a UDP socket"))),
        Err(e) => return Err(IoError::Socket(what, e)),
    }
    let flags =
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(sock_err(what.clone()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(sock_err(what))?;
    Ok(fd)
}

fn listener(
    addr: SocketAddr,
    transparent: bool,
    cfg: &IoConfig,
    inherited: Option<RawFd>,
) -> Result<Listener, IoError> {
    let what = format!("cannot listen on {addr}");
    let fd = match inherited {
        Some(raw) => inherited_socket(raw, &addr)?,
        None => udp_socket(&addr)?,
    };
    if inherited.is_none() {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(sock_err(what.clone()))?;
        if addr.is_ipv6() {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(sock_err(what.clone()))?;
        }
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
    if inherited.is_none() {
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(sock_err(what.clone()))?;
    }
    let local = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(sock_err(what.clone()))
        .and_then(|s| socket_addr(&s).ok_or(IoError::Config(what.clone())))?;
    if inherited.is_some()
        && (local.ip() != addr.ip() || (addr.port() != 0 && local.port() != addr.port()))
    {
        return Err(IoError::Config(format!(
            "{what}: the socket handed over is bound to {local}"
        )));
    }
    Ok(Listener {
        fd,
        local,
        transparent,
    })
}

/// Descriptors below this are left to code that still uses `select()` (glibc aborts on an
/// `fd_set` bit past 1024; libnftables is one such user in the same process).
const HIGH_FD: i32 = 1024;

/// `fd` moved to a descriptor number of at least [`HIGH_FD`] when the process may have one
/// (else `fd` as it is): a pool of upstream sockets must not push other code's descriptors
/// past `FD_SETSIZE`.
#[allow(unsafe_code)]
fn high_fd(fd: OwnedFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    match nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD)) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        Ok(raw) if raw >= 0 => unsafe { OwnedFd::from_raw_fd(raw) },
        _ => fd,
    }
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

/// How often the kept reply sockets' addresses are checked again: one that became the node's
/// (node-local DNS adding an address) is released within this time.
const RECHECK_LOCAL_EVERY: Duration = Duration::from_secs(1);

/// A socket that sends from `local` (transparent mode: the server the client asked):
/// `IP_TRANSPARENT` lets it bind an address this host does not own. `IP_PKTINFO` would set the
/// source address only, not the port.
///
/// `share` (SO_REUSEADDR) only for an address that is not the node's ([`Reply::Bound`]): no
/// server can listen there, only another fqdnguard binds it, the predecessor during a hot
/// restart, which still holds its own reply socket there; without SO_REUSEADDR on both, the
/// successor could send no answer from that address until the predecessor exits. Never for an
/// address of the node ([`Reply::Local`]): a UDP socket sharing a server's address (SO_REUSEADDR
/// on both, as Knot and CoreDNS set it) can be handed that server's queries, so there the
/// answer cannot leave while the server holds the address (fail closed). An address that
/// becomes the node's after its socket was bound is released by [`Replies::recheck`].
fn reply_socket(local: SocketAddr, share: bool) -> Result<OwnedFd, IoError> {
    let fd = udp_socket(&local)?;
    let what = format!("reply socket from {local}");
    if local.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(sock_err(what.clone()))?;
    }
    socket::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(sock_err(what.clone()))?;
    if share {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(sock_err(what.clone()))?;
    }
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
    /// When [`Replies::recheck`] looks at the kept sockets next (None: at its first call).
    next_check: Option<Instant>,
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
                reply_socket(local, true).map_or(Reply::Refused, Reply::Bound)
            };
            self.by_addr.insert(local, (reply, tick));
        }
        self.by_addr.get(&local).map_or(&Reply::Refused, |(r, _)| r)
    }

    /// Closes the kept sockets (and forgets the refusals) of addresses that became the node's
    /// since they were bound: a server that starts there (node-local DNS) must get its queries,
    /// and a socket sharing its address could be handed some. Their answers then use a socket
    /// each ([`Reply::Local`]). Does the work at most once per [`RECHECK_LOCAL_EVERY`].
    fn recheck(&mut self, now: Instant) {
        if self.next_check.is_some_and(|at| now < at) {
            return;
        }
        self.next_check = Some(now + RECHECK_LOCAL_EVERY);
        self.by_addr
            .retain(|addr, (reply, _)| matches!(reply, Reply::Local) || !is_local(addr.ip()));
    }

    /// Sends `payload` to `to` from `local`; false when it could not leave.
    fn send(&mut self, local: SocketAddr, payload: &[u8], to: &SockaddrStorage) -> bool {
        let send = |fd: &OwnedFd| {
            socket::sendto(fd.as_raw_fd(), payload, to, MsgFlags::MSG_DONTWAIT).is_ok()
        };
        match self.get(local) {
            Reply::Bound(fd) => send(fd),
            Reply::Local => reply_socket(local, false).is_ok_and(|fd| send(&fd)),
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

    /// Queries from listener `l`: forwarded upstream (queued in `to_upstream` as (slot,
    /// server, bytes)), or answered at once.
    fn on_queries(
        &self,
        l: usize,
        io: &mut Scratch<'_>,
        to_upstream: &mut Vec<(u16, SocketAddr, Vec<u8>)>,
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
            // Where it goes: the server asked (forward_to_original), else the upstream. A server
            // asked gets its channel only once the verdict lets the query go; one that is also
            // a configured upstream shares that upstream's channel (one address, one channel).
            let forwarded_to = local.filter(|_| self.config.forward_to_original);
            let channel = match forwarded_to {
                Some(a) => match self.upstream_channels.get(&addr_key(a)) {
                    Some(&c) => c,
                    None => originals.channel(a),
                },
                None => configured as u32,
            };
            let asked = forwarded_to.filter(|_| channel >= ORIGINAL_CHANNEL_BASE);
            let (action, log) = self.engine.query(
                src.ip().to_canonical(),
                server,
                port,
                Proto::Udp,
                &buf[..r.len],
                channel,
                self.slots,
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
                QueryAction::Forward { bytes, token, slot } => {
                    // Even when it cannot be sent: the sweep answers it SERVFAIL.
                    table.clients.insert(token, client);
                    let to = match asked {
                        Some(a) => match originals.open(a, channel, idle, clock) {
                            Some(i) => originals.slots.get_mut(i).map(|o| {
                                o.last_sent = clock;
                                o.addr
                            }),
                            None => {
                                self.counters.orig_refused.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                        },
                        None => self.upstreams.get(channel as usize).map(|u| u.addr),
                    };
                    if let Some(to) = to {
                        to_upstream.push((slot, to, bytes));
                    }
                }
                QueryAction::Merged { token } => {
                    table.clients.insert(token, client);
                }
                QueryAction::Reply { bytes } => outbox.push(&client, bytes),
                QueryAction::Drop => {}
            }
        }
        Ok(())
    }

    /// Answers read from the pool socket of engine slot `slot`: to their clients, or held for
    /// the backend. Each is taken only from an address a query went to (a configured upstream
    /// or a server clients asked), whose channel the engine then matches it on.
    fn on_answers(
        &self,
        slot: u16,
        originals: &Originals,
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
            let from = r.from.as_ref().and_then(socket_addr);
            let channel = from.and_then(|f| {
                self.upstream_channels
                    .get(&addr_key(f))
                    .copied()
                    .or_else(|| originals.channel_of(f))
            });
            let Some(channel) = channel else {
                self.counters
                    .unexpected_source
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let answers = self.engine.response(channel, slot, &buf[..r.len], now)?;
            if answers.is_empty() {
                continue; // unmatched or malformed: dropped and counted by the engine
            }
            self.counters.answers.fetch_add(1, Ordering::Relaxed);
            if let Some(up) = self.upstreams.get(channel as usize) {
                up.answers.fetch_add(1, Ordering::Relaxed);
            }
            for a in answers {
                self.answer_client(a, &mut table, outbox, batch);
            }
        }
        Ok(())
    }

    /// One client's answer: sent, or held until the backend has applied its changes.
    fn answer_client(
        &self,
        a: crate::engine::Answer,
        table: &mut Table,
        outbox: &mut Outbox,
        batch: &mut Drained,
    ) {
        if let Some(rec) = a.log {
            batch.logs.push(rec);
        }
        let Some(client) = table.clients.remove(&a.token) else {
            self.counters.client_gone.fetch_add(1, Ordering::Relaxed);
            batch.changes.extend(a.changes);
            return;
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
}

/// The I/O thread's buffers, lent to one socket's reading at a time.
struct Scratch<'a> {
    bufs: &'a mut [Vec<u8>],
    got: &'a mut Vec<Received>,
    outbox: &'a mut Outbox,
    send_hdrs: &'a mut MultiHeaders<SockaddrStorage>,
    batch: &'a mut Drained,
}

/// Reads up to [`ROUNDS`] batches of answers from pool socket `sock` and sends what may go;
/// false when the engine is poisoned (the thread ends).
fn read_answers(
    sh: &Shared,
    sock: &PoolSocket,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
    originals: &Originals,
    io: &mut Scratch<'_>,
) -> bool {
    for _ in 0..ROUNDS {
        match recv_batch(sock.fd.as_raw_fd(), hdrs, io.bufs, io.got) {
            Ok(n) => {
                if sh
                    .on_answers(sock.slot, originals, io.got, io.bufs, io.outbox, io.batch)
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
            // ICMP errors and the like: the queries time out and fail over.
            Err(_) => {
                sh.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    true
}

/// Sends again the queries the engine says are due ([`Engine::retransmits`]): the same bytes,
/// from the socket each first left from, to the server it went to. Returns when the next is due
/// (the engine's clock), if any.
fn send_retransmits(
    sh: &Shared,
    pool: &Pool,
    originals: &mut Originals,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
) -> Result<Option<f64>, IoError> {
    let now = crate::cache::now_seconds();
    let (due, next) = sh.engine.retransmits(now)?;
    let clock = Instant::now();
    for r in due {
        let to = match sh.upstreams.get(r.channel as usize) {
            Some(u) => Some(u.addr),
            None => originals
                .slots
                .iter_mut()
                .find(|o| o.channel == r.channel)
                .map(|o| {
                    o.last_sent = clock;
                    o.addr
                }),
        };
        // A server no longer known, or no socket of its family: it times out as it would have.
        let Some(to) = to else { continue };
        let Some(sock) = pool.socket_at(to, r.slot, r.started) else {
            sh.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let msg = [(r.bytes, Some(SockaddrStorage::from(to)))];
        send_batch(sock.fd.as_raw_fd(), hdrs, &msg, &sh.counters);
    }
    Ok(next)
}

/// Sends the queued queries, each from its slot's socket to its server; queries for the same
/// socket go out together.
fn send_queries(
    sh: &Shared,
    pool: &Pool,
    queue: &mut Vec<(u16, SocketAddr, Vec<u8>)>,
    hdrs: &mut MultiHeaders<SockaddrStorage>,
) {
    if queue.is_empty() {
        return;
    }
    queue.sort_unstable_by_key(|(slot, to, _)| (to.is_ipv6(), *slot));
    let mut run: Vec<(Vec<u8>, Option<SockaddrStorage>)> = Vec::new();
    let mut items = queue.drain(..).peekable();
    while let Some((slot, to, bytes)) = items.next() {
        run.push((bytes, Some(SockaddrStorage::from(to))));
        if items
            .peek()
            .is_some_and(|(s, t, _)| *s == slot && t.is_ipv6() == to.is_ipv6())
        {
            continue;
        }
        match pool.socket_for(to, slot) {
            Some(sock) => send_batch(sock.fd.as_raw_fd(), hdrs, &run, &sh.counters),
            // No socket of that family (no upstream of it was configured): lost, SERVFAIL.
            None => {
                sh.counters
                    .send_errors
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
            }
        }
        run.clear();
    }
}

/// Adds or removes the listeners from `epoll` (a graceful stop stops reading them).
fn watch_listeners(sh: &Shared, epoll: &Epoll, on: bool) {
    for (l, lis) in sh.listeners.iter().enumerate() {
        if on {
            let _ = epoll.add(
                &lis.fd,
                EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN + l as u64),
            );
        } else {
            let _ = epoll.delete(&lis.fd);
        }
    }
}

/// The I/O thread: wait, read answers then queries (a few batches per ready socket), process,
/// send, publish; re-draw a source port now and then.
fn run(sh: &Shared, mut pool: Pool, epoll: Epoll) {
    let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; BATCH];
    let cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    // One header set per socket family: nix leaves each msg_namelen (and msg_controllen) as
    // the kernel set it, so a set shared between an IPv4 and an IPv6 socket would truncate
    // addresses. A socket's peers all have its family (IPv6 sockets are V6ONLY).
    let fresh = || MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut listener_hdrs: Vec<_> = sh.listeners.iter().map(|_| fresh()).collect();
    let mut answer_hdrs = [fresh(), fresh()];
    let mut send_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got = Vec::with_capacity(BATCH);
    let mut to_upstream: Vec<(u16, SocketAddr, Vec<u8>)> = Vec::new();
    let mut outbox = Outbox::new(sh.listeners.len());
    let mut batch = Drained::default();
    let mut originals = Originals::default();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut io = Scratch {
        bufs: &mut bufs,
        got: &mut got,
        outbox: &mut outbox,
        send_hdrs: &mut send_hdrs,
        batch: &mut batch,
    };
    let owed = Duration::try_from_secs_f64(sh.engine.config().timeout)
        .unwrap_or(Duration::from_secs(5))
        + Duration::from_secs(1);
    let mut listening = false;
    let mut next_redraw = Instant::now() + REDRAW_EVERY;
    // When the engine's next retransmission is due (its clock), if any.
    let mut next_retransmit: Option<f64> = None;
    let retransmitting = sh.engine.retransmits_on();
    while sh.running.load(Ordering::Acquire) {
        let want = sh.listening.load(Ordering::Acquire);
        if want != listening {
            watch_listeners(sh, &epoll, want);
            listening = want;
        }
        let wait = next_retransmit.map_or(REDRAW_EVERY, |due| {
            let left = due - crate::cache::now_seconds();
            Duration::try_from_secs_f64(left.max(0.0))
                .unwrap_or(Duration::ZERO)
                .min(REDRAW_EVERY)
        });
        // Rounded up: waking a moment early would only spin until it is due.
        let wait_ms = wait.as_nanos().div_ceil(1_000_000) as u16;
        let n = match epoll.wait(&mut events, wait_ms) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(_) => {
                sh.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        let ready = &events[..n];
        if ready.iter().any(|e| e.data() == WAKE_TOKEN) {
            let _ = sh.wake.read();
        }
        // Answers first: they finish work (and free pending slots) before new work comes in.
        for e in ready {
            let token = e.data();
            if token >= LISTENER_TOKEN {
                continue;
            }
            if let Some(sock) = pool.sockets.get(&token) {
                let hdrs = &mut answer_hdrs[usize::from(sock.v6)];
                if !read_answers(sh, sock, hdrs, &originals, &mut io) {
                    return;
                }
            }
        }
        sh.publish(io.batch);
        for e in ready {
            let token = e.data();
            if token == WAKE_TOKEN || token < LISTENER_TOKEN || !listening {
                continue;
            }
            let l = (token - LISTENER_TOKEN) as usize;
            let (Some(lis), Some(hdrs)) = (sh.listeners.get(l), listener_hdrs.get_mut(l)) else {
                continue;
            };
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
                send_queries(sh, &pool, &mut to_upstream, io.send_hdrs);
                io.outbox.flush(sh, io.send_hdrs);
                if n < BATCH {
                    break;
                }
            }
        }
        sh.publish(io.batch);
        // After the answers: a query answered in this round is not sent again. Only when one
        // may be due: a copy scheduled this round is due no sooner than the earliest already
        // scheduled (each is one interval after its send), so with one scheduled and not yet
        // due, the engine's lock is not taken on every wake-up.
        let ask = retransmitting
            && match next_retransmit {
                None => true,
                Some(due) => due <= crate::cache::now_seconds(),
            };
        if ask {
            match send_retransmits(sh, &pool, &mut originals, io.send_hdrs) {
                Ok(next) => next_retransmit = next,
                Err(_) => return,
            }
        }
        let now = Instant::now();
        if now >= next_redraw {
            next_redraw = now + REDRAW_EVERY;
            pool.redraw(&epoll, now, now + owed, &sh.counters);
            if let Ok(mut replies) = sh.reply_sockets.lock() {
                replies.recheck(now);
            }
        }
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
        let inherited = |i: usize| config.inherited.get(i).copied().flatten();
        let direct = config.listen.len();
        let listeners = config
            .listen
            .iter()
            .enumerate()
            .map(|(i, a)| listener(*a, config.transparent, config, inherited(i)))
            .chain(
                config
                    .transparent_listen
                    .iter()
                    .enumerate()
                    .map(|(i, a)| listener(*a, true, config, inherited(direct + i))),
            )
            .collect::<Result<Vec<_>, _>>()?;
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|a| Upstream {
                addr: *a,
                answers: AtomicU64::new(0),
            })
            .collect();
        let mut upstream_channels = HashMap::new();
        for (i, u) in upstreams.iter().enumerate() {
            upstream_channels
                .entry(addr_key(u.addr))
                .or_insert(i as u32);
        }
        // Sockets for the families queries may go to: the configured upstreams', and (asked
        // servers) the transparent listeners'.
        let asked = |v6: bool| {
            config.forward_to_original
                && listeners
                    .iter()
                    .any(|l| l.transparent && l.local.is_ipv6() == v6)
        };
        let configured = |v6: bool| upstreams.iter().any(|u| u.addr.is_ipv6() == v6);
        let pool = Pool::new(
            config,
            configured(false) || asked(false),
            configured(true) || asked(true),
            [!configured(false), !configured(true)],
        )?;
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        let notify = EventFd::from_flags(flags).map_err(sock_err("eventfd"))?;
        let wake = EventFd::from_flags(flags).map_err(sock_err("eventfd"))?;
        Ok(UdpIo {
            shared: Arc::new(Shared {
                engine,
                config: config.clone(),
                listeners,
                upstreams,
                upstream_channels,
                slots: pool.slots(),
                pool: Mutex::new(Some(pool)),
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
        let Some(pool) = self.shared.pool.lock().map_err(|_| POISONED)?.take() else {
            return Err(IoError::Config(
                "the UDP I/O thread cannot be started again".into(),
            ));
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sock_err("epoll"))?;
        epoll
            .add(
                &self.shared.wake,
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
            )
            .map_err(sock_err("epoll"))?;
        for (&serial, sock) in &pool.sockets {
            epoll
                .add(&sock.fd, EpollEvent::new(EpollFlags::EPOLLIN, serial))
                .map_err(sock_err("epoll"))?;
        }
        self.shared.running.store(true, Ordering::Release);
        let sh = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("fqdnguard-udp".into())
            .spawn(move || run(&sh, pool, epoll))
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

    /// Upstream sockets per address family (fewer than asked when descriptors ran out).
    pub fn source_ports(&self) -> u16 {
        self.shared.slots
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
            unexpected_source: c.unexpected_source.load(Ordering::Relaxed),
            redraws: c.redraws.load(Ordering::Relaxed),
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
