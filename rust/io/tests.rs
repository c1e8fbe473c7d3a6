//! The I/O thread over real loopback sockets: a client, the proxy's listener, and a fake
//! upstream made of a plain `UdpSocket` that answers what it is sent.

use std::net::UdpSocket;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::*;
use crate::cache::{Cache, Config};
use crate::engine::{EndpointRef, EngineConfig, LogMode, PolicyTable, Reject};
use crate::policy::PolicySet;

fn engine(unknown: Option<EndpointRef>, timeout: f64) -> Arc<Engine> {
    let cache = Arc::new(RwLock::new(Cache::new(
        Config::new(0, 1000, 100_000).expect("config"),
    )));
    let table = PolicyTable {
        policy: Arc::new(PolicySet::new(Vec::new()).expect("empty policy")),
        by_ip: HashMap::new(),
        unknown,
    };
    let config = EngineConfig {
        reject: Reject::Refused,
        search_domains: vec![],
        max_inflight: 100,
        max_inflight_per_client: 100,
        case_randomization: true,
        timeout,
        retransmit: 0.0,
        retries: 0,
        log: LogMode::All,
        max_ttl: 0x7fff_ffff,
    };
    Arc::new(Engine::new(config, cache, table).expect("engine"))
}

const ANYONE: Option<EndpointRef> = Some(EndpointRef {
    id: 7,
    identity: None,
});

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    for w in [id, 0x0100, 1, 0, 0, 0] {
        q.extend_from_slice(&w.to_be_bytes());
    }
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The answer to `q` (any id) with one A record, 192.0.2.1, TTL 60.
fn answer_to(q: &[u8]) -> Vec<u8> {
    let mut a = q.to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    a[7] = 1; // ANCOUNT
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    a
}

fn udp(timeout_ms: u64) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(timeout_ms)))
        .expect("timeout");
    s
}

fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

struct Setup {
    io: UdpIo,
    client: UdpSocket,
    upstream: UdpSocket,
    proxy: SocketAddr,
}

fn setup(unknown: Option<EndpointRef>, timeout: f64) -> Setup {
    let upstream = udp(2000);
    let config = IoConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        upstreams: vec![upstream.local_addr().expect("addr")],
        transparent: false,
        forward_to_original: false,
        mark: None,
        buffer: 1 << 20,
        transparent_listen: Vec::new(),
        inherited: Vec::new(),
        source_ports: 4,
    };
    let io = UdpIo::new(engine(unknown, timeout), &config).expect("io");
    io.start().expect("start");
    let proxy = io.local_addresses()[0];
    assert_ne!(proxy.port(), 0, "the bound port is reported");
    Setup {
        io,
        client: udp(2000),
        upstream,
        proxy,
    }
}

/// Waits until the I/O thread has published something.
fn drain_some(io: &UdpIo) -> Drained {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let d = io.drain().expect("drain");
        if !d.held.is_empty() || !d.changes.is_empty() || !d.logs.is_empty() {
            return d;
        }
        assert!(Instant::now() < deadline, "nothing published");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_new_address_is_held_until_released_then_a_known_one_passes() {
    let s = setup(ANYONE, 2.0);
    let q = query(0x4242, "www.example.com");
    s.client.send_to(&q, s.proxy).expect("send");
    let mut buf = [0u8; 512];
    let (n, from) = s.upstream.recv_from(&mut buf).expect("forwarded upstream");
    assert!(
        buf[2..n].eq_ignore_ascii_case(&q[2..]),
        "only the id and the case of the name (0x20) change"
    );
    s.upstream
        .send_to(&answer_to(&buf[..n]), from)
        .expect("answer");

    let d = drain_some(&s.io);
    assert_eq!(d.held.len(), 1, "the answer waits for the firewall");
    assert!(d.adds_seq > 0 && s.io.adds_pending());
    assert_eq!(d.changes.len(), 1);
    assert_eq!(d.changes[0].endpoint, 7);
    s.client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    assert_eq!(recv(&s.client), None, "held answers do not leave");
    assert_eq!(s.io.release(&d.held).expect("release"), 1);
    assert_eq!(s.io.release(&d.held).expect("release"), 0, "released once");
    let got = recv(&s.client).expect("released answer");
    assert_eq!(&got[..2], &[0x42, 0x42], "the client's id is restored");
    assert_eq!(got[7], 1);

    // While the addition is not applied, an answer with addresses waits too; once applied, not.
    s.client
        .send_to(&query(7, "www.example.com"), s.proxy)
        .expect("send");
    let (n, from) = s.upstream.recv_from(&mut buf).expect("forwarded");
    s.upstream
        .send_to(&answer_to(&buf[..n]), from)
        .expect("answer");
    let d2 = drain_some(&s.io);
    assert_eq!(d2.held.len(), 1);
    s.io.adds_applied(d.adds_seq);
    assert!(!s.io.adds_pending());
    s.io.release(&d2.held).expect("release");
    recv(&s.client).expect("second answer");
    s.client
        .send_to(&query(8, "www.example.com"), s.proxy)
        .expect("send");
    let (n, from) = s.upstream.recv_from(&mut buf).expect("forwarded");
    s.upstream
        .send_to(&answer_to(&buf[..n]), from)
        .expect("answer");
    let got = recv(&s.client).expect("a known address is not held");
    assert_eq!(&got[..2], &[0, 8]);
    assert_eq!(s.io.answers(0), 3);
    assert_eq!(s.io.inflight().expect("inflight"), 0);
    s.io.stop().expect("stop");
}

#[test]
fn unknown_sources_are_refused_without_going_upstream() {
    let s = setup(None, 2.0);
    s.client
        .send_to(&query(9, "www.example.com"), s.proxy)
        .expect("send");
    let got = recv(&s.client).expect("refusal");
    assert_eq!(got[3] & 0x0f, 5, "REFUSED");
    s.upstream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 512];
    assert!(s.upstream.recv_from(&mut buf).is_err(), "nothing forwarded");
    let d = drain_some(&s.io);
    assert_eq!(d.logs.len(), 1, "the log record reaches the caller");
    assert_eq!(d.logs[0].qname, "www.example.com.");
}

#[test]
fn sweep_answers_servfail_to_the_clients_it_owns() {
    let s = setup(ANYONE, 0.05);
    s.client
        .send_to(&query(3, "slow.example.com"), s.proxy)
        .expect("send");
    let mut buf = [0u8; 512];
    s.upstream.recv_from(&mut buf).expect("forwarded");
    let expired =
        s.io.sweep(crate::cache::now_seconds() + 1.0)
            .expect("sweep");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].channel, Some(0));
    let got = recv(&s.client).expect("servfail");
    assert_eq!(
        (got[1], got[3] & 0x0f),
        (3, 2),
        "SERVFAIL with the client's id"
    );
    assert_eq!(s.io.inflight().expect("inflight"), 0);
}

#[test]
fn stop_listening_leaves_answers_flowing_and_bad_channels_are_refused() {
    let s = setup(ANYONE, 2.0);
    assert!(s.io.set_upstream(1).is_err());
    s.client
        .send_to(&query(4, "a.example.com"), s.proxy)
        .expect("send");
    let mut buf = [0u8; 512];
    let (n, from) = s.upstream.recv_from(&mut buf).expect("forwarded");
    s.io.stop_listening();
    std::thread::sleep(Duration::from_millis(20));
    s.upstream
        .send_to(&answer_to(&buf[..n]), from)
        .expect("answer");
    let d = drain_some(&s.io);
    s.io.release(&d.held).expect("release");
    assert!(recv(&s.client).is_some(), "in-flight answer delivered");
    s.client
        .send_to(&query(5, "b.example.com"), s.proxy)
        .expect("send");
    s.upstream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    assert!(
        s.upstream.recv_from(&mut buf).is_err(),
        "no longer reading queries"
    );
}

#[test]
fn ipv4_and_ipv6_listeners_each_answer_their_own_clients() {
    let upstream = udp(2000);
    let config = IoConfig {
        listen: vec![
            "127.0.0.1:0".parse().expect("addr"),
            "[::1]:0".parse().expect("addr"),
        ],
        upstreams: vec![upstream.local_addr().expect("addr")],
        transparent: false,
        forward_to_original: false,
        mark: None,
        buffer: 1 << 20,
        transparent_listen: Vec::new(),
        inherited: Vec::new(),
        source_ports: 4,
    };
    let io = UdpIo::new(engine(None, 2.0), &config).expect("io");
    io.start().expect("start");
    let (v4, v6) = (io.local_addresses()[0], io.local_addresses()[1]);
    let c4 = udp(2000);
    let c6 = UdpSocket::bind("[::1]:0").expect("bind v6");
    c6.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Alternate families: a v4 peer address must never truncate the next v6 one.
    for i in 0..3u16 {
        c4.send_to(&query(i, "a.example.com"), v4).expect("send");
        assert_eq!(recv(&c4).expect("v4 answer")[..2], i.to_be_bytes());
        c6.send_to(&query(100 + i, "a.example.com"), v6)
            .expect("send");
        assert_eq!(recv(&c6).expect("v6 answer")[..2], (100 + i).to_be_bytes());
    }
}

#[test]
fn asked_servers_get_channels_after_the_verdict_and_busy_ones_are_never_replaced() {
    let idle = Duration::from_secs(5);
    let now = Instant::now();
    let mut o = Originals::default();
    let first: SocketAddr = "127.0.1.1:53".parse().expect("addr");
    // The channel is known before any socket exists (a refused query opens nothing).
    let ch = o.channel(first);
    assert_eq!(ch, ORIGINAL_CHANNEL_BASE);
    assert!(o.slots.is_empty());
    assert_eq!(o.open(first, ch, idle, now), Some(0));
    assert_eq!(o.channel(first), ch, "the same server keeps its channel");
    for i in 1..MAX_ORIGINALS {
        let server = SocketAddr::from(([127, 0, 2, (i % 250) as u8], 1000 + i as u16));
        let c = o.channel(server);
        assert!(o.open(server, c, idle, now).is_some());
    }
    // Full and all busy: a new server gets no socket, and nobody's socket is closed.
    let late: SocketAddr = "127.0.3.1:53".parse().expect("addr");
    let c = o.channel(late);
    assert_eq!(o.open(late, c, idle, now), None);
    assert_eq!(o.slots.len(), MAX_ORIGINALS);
    assert_eq!(o.channel(first), ch);
    // Once idle, the least recently used is replaced, on a channel never used before.
    o.slots[0].last_sent = now - Duration::from_secs(6);
    let c2 = o.channel(late);
    assert_ne!(
        c2, c,
        "the refused query's channel is not given to another server"
    );
    assert_eq!(o.open(late, c2, idle, now), Some(0));
    assert_eq!(o.slots[0].channel, c2);
    assert_ne!(
        o.channel(first),
        ch,
        "the replaced server's channel is gone with it"
    );
    // Answers are told apart by the address they come from, port included.
    assert_eq!(o.channel_of(late), Some(c2));
    assert_eq!(o.channel_of(SocketAddr::from(([127, 0, 3, 1], 54))), None);
}

/// IP_TRANSPARENT needs CAP_NET_ADMIN: the reply socket tests are skipped without it.
fn can_be_transparent() -> bool {
    reply_socket("192.0.2.1:53".parse().expect("addr"), true).is_ok()
}

#[test]
fn answers_from_a_node_address_use_a_socket_each_and_never_take_a_servers_port() {
    if !can_be_transparent() {
        return;
    }
    // The server sets SO_REUSEADDR (Knot and CoreDNS do): a reply socket setting it too
    // could share its address and be handed its queries.
    let server = udp_socket(&"127.0.0.1:0".parse().expect("addr")).expect("socket");
    socket::setsockopt(&server, sockopt::ReuseAddr, &true).expect("reuseaddr");
    socket::bind(
        server.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::from(([127, 0, 0, 1], 0))),
    )
    .expect("bind");
    let asked = socket::getsockname::<SockaddrStorage>(server.as_raw_fd())
        .ok()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|a| SocketAddr::from((a.ip(), a.port())))
        })
        .expect("addr");
    let pod = udp(2000);
    let to = SockaddrStorage::from(pod.local_addr().expect("addr"));
    let mut replies = Replies::default();
    // A server holds the address: the answer cannot leave (fail closed), the server keeps it.
    assert!(!replies.send(asked, b"answer", &to));
    assert!(matches!(
        replies.by_addr.get(&asked),
        Some((Reply::Local, _))
    ));
    drop(server);
    // Nobody holds it: the answer leaves from it, and nothing stays bound there.
    assert!(replies.send(asked, b"answer", &to));
    let mut buf = [0u8; 64];
    let (n, from) = pod.recv_from(&mut buf).expect("answered");
    assert_eq!((&buf[..n], from), (&b"answer"[..], asked));
    UdpSocket::bind(asked).expect("a server can still start there");
}

#[test]
fn a_kept_reply_socket_whose_address_became_the_nodes_is_released() {
    if !can_be_transparent() {
        return;
    }
    // As if 127.0.0.1:port had been foreign when its socket was bound (node-local DNS adds
    // its address later): the next check closes it, and the address is free for a server.
    let asked = SocketAddr::from(([127, 0, 0, 1], udp(2000).local_addr().expect("addr").port()));
    let mut replies = Replies::default();
    let kept = reply_socket(asked, true).expect("bound");
    replies.by_addr.insert(asked, (Reply::Bound(kept), 0));
    let foreign = SocketAddr::from(([192, 0, 2, 1], 53));
    assert!(replies.send(foreign, b"a", &SockaddrStorage::from(asked)));
    let now = Instant::now();
    replies.recheck(now);
    assert!(!replies.by_addr.contains_key(&asked));
    assert!(matches!(
        replies.by_addr.get(&foreign),
        Some((Reply::Bound(_), _))
    ));
    UdpSocket::bind(asked).expect("a server can start there");
}

#[test]
fn reply_sockets_are_bounded_least_recently_used_first() {
    if !can_be_transparent() {
        return;
    }
    let pod = udp(2000);
    let to = SockaddrStorage::from(pod.local_addr().expect("addr"));
    let mut replies = Replies::default();
    let asked = |i: usize| SocketAddr::from(([192, 0, 2, 1], 1000 + i as u16));
    for i in 0..MAX_REPLY_SOCKETS {
        replies.send(asked(i), b"a", &to);
    }
    replies.send(asked(0), b"a", &to); // used again: the second one is now the oldest
    replies.send(asked(MAX_REPLY_SOCKETS), b"a", &to);
    assert_eq!(replies.by_addr.len(), MAX_REPLY_SOCKETS);
    assert!(replies.by_addr.contains_key(&asked(0)));
    assert!(!replies.by_addr.contains_key(&asked(1)));
    assert!(matches!(
        replies.by_addr.get(&asked(MAX_REPLY_SOCKETS)),
        Some((Reply::Bound(_), _))
    ));
}

#[test]
fn a_socket_handed_over_is_read_as_it_is_and_a_wrong_one_is_refused() {
    use std::net::TcpListener;
    let upstream = udp(2000);
    // What the predecessor bound (and has in its receive queue already).
    let held = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let at = held.local_addr().expect("addr");
    let client = udp(2000);
    let q = query(0x5151, "www.example.com");
    client.send_to(&q, at).expect("queued before the hand-over");
    let mut config = IoConfig {
        listen: vec![at],
        upstreams: vec![upstream.local_addr().expect("addr")],
        transparent: false,
        forward_to_original: false,
        mark: None,
        buffer: 1 << 20,
        transparent_listen: Vec::new(),
        inherited: vec![Some(held.as_raw_fd())],
        source_ports: 4,
    };
    let io = UdpIo::new(engine(ANYONE, 2.0), &config).expect("io");
    assert_eq!(io.local_addresses(), vec![at]);
    io.start().expect("start");
    let mut buf = [0u8; 512];
    let (n, _) = upstream
        .recv_from(&mut buf)
        .expect("the queued query is forwarded");
    assert!(buf[2..n].eq_ignore_ascii_case(&q[2..]));
    io.stop().expect("stop");

    // Not a UDP socket, or bound elsewhere: an error naming it, nothing bound.
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
    config.inherited = vec![Some(tcp.as_raw_fd())];
    let err = UdpIo::new(engine(ANYONE, 2.0), &config).expect_err("tcp refused");
    assert!(err.to_string().contains("not a UDP socket"), "{err}");
    let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
    config.inherited = vec![Some(other.as_raw_fd())];
    let err = UdpIo::new(engine(ANYONE, 2.0), &config).expect_err("elsewhere refused");
    assert!(err.to_string().contains("is bound to"), "{err}");
}

/// A retransmission leaves from the socket its query first left from: after the slot's socket
/// was re-drawn, `socket_at` gives the retiring one for a query sent before the re-draw, and the
/// new one for a query sent after it.
#[test]
fn a_copy_leaves_from_the_socket_of_the_first_send_across_a_redraw() {
    let config = IoConfig {
        listen: Vec::new(),
        upstreams: Vec::new(),
        transparent: false,
        forward_to_original: false,
        mark: None,
        buffer: 1 << 16,
        transparent_listen: Vec::new(),
        inherited: Vec::new(),
        source_ports: 1,
    };
    let mut pool = Pool::new(&config, true, false, [false, false]).expect("pool");
    let to: SocketAddr = "127.0.0.1:53".parse().expect("addr");
    let port = |s: &PoolSocket| {
        let a: SockaddrStorage = socket::getsockname(s.fd.as_raw_fd()).expect("getsockname");
        a.as_sockaddr_in().expect("v4").port()
    };
    let first = pool.socket_for(to, 0).expect("slot 0");
    let (first_port, first_since) = (port(first), first.since);
    let before = first_since + 0.0005;
    // The re-drawn socket's `since` must be later than `before`.
    std::thread::sleep(Duration::from_millis(5));
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    let counters = Counters::default();
    let now = Instant::now();
    pool.redraw(&epoll, now, now + Duration::from_secs(60), &counters);
    assert_eq!(
        counters.redraws.load(Ordering::Relaxed),
        1,
        "one IPv4 slot re-drawn"
    );
    let current = pool.socket_for(to, 0).expect("slot 0");
    assert!(current.since > before);
    assert_ne!(port(current), first_port, "a new socket on another port");
    let then = pool
        .socket_at(to, 0, before)
        .expect("the socket of the first send");
    assert_eq!(
        port(then),
        first_port,
        "a copy of a query sent before the re-draw"
    );
    let later = pool
        .socket_at(to, 0, current.since)
        .expect("the current socket");
    assert_eq!(
        port(later),
        port(current),
        "a query sent after it uses the new one"
    );
    // Once retired for good (its answers no longer owed), the current socket is used.
    pool.redraw(
        &epoll,
        now + Duration::from_secs(61),
        now + Duration::from_secs(120),
        &counters,
    );
    let newest = pool.socket_for(to, 0).expect("slot 0");
    let fallback = pool.socket_at(to, 0, before).expect("some socket");
    assert_eq!(
        (port(fallback), fallback.since),
        (port(newest), newest.since),
        "the first socket is closed by now: the current one"
    );
}

/// A new server asked never takes the channel a live one holds, even once the counter wraps:
/// answers and retransmitted copies are routed by channel.
#[test]
fn a_new_asked_server_skips_the_channels_live_servers_hold() {
    let mut o = Originals::default();
    let now = Instant::now();
    let idle = Duration::from_secs(2);
    let a: SocketAddr = "10.0.0.1:53".parse().expect("addr");
    let b: SocketAddr = "10.0.0.2:53".parse().expect("addr");
    let c: SocketAddr = "10.0.0.3:53".parse().expect("addr");
    let ca = o.channel(a);
    o.open(a, ca, idle, now).expect("a slot");
    // The counter comes round to a's channel again (as after ORIGINAL_CHANNELS others).
    o.next = ca - ORIGINAL_CHANNEL_BASE;
    let cb = o.channel(b);
    assert_ne!(cb, ca, "a live server's channel is skipped");
    o.open(b, cb, idle, now).expect("b slot");
    let cc = o.channel(c);
    assert!(cc != ca && cc != cb, "{cc} {ca} {cb}");
    assert_eq!(o.channel(a), ca, "a known server keeps its channel");
}
