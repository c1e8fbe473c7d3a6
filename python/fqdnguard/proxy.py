"""The DNS proxy: uvloop sockets around the Rust engine.

Per query, one call into Rust (``Engine.query``) decides: forward (bytes with a fresh id for the
upstream), reply (a finished refusal, FORMERR, or SERVFAIL when full), or drop. Per answer, one call
(``Engine.response``) matches it to its pending query, updates the cache and returns the bytes for
the client plus the changes the enforcement backend needs. Answers that carry new IPs are held
until the backend has applied them (batched, at most ``hold_max``), so a pod never receives an IP
its firewall does not yet allow. Python keeps the loop, the sockets, timers and batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import math
import os
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fqdnguard._core import DnsCache, Engine, UdpIo
from fqdnguard.backends import Backend, Log
from fqdnguard.config import ConfigError, ProxyConfig, parse_hostport
from fqdnguard.intercept import (
    LISTEN4,
    LISTEN6,
    Interceptor,
    InterceptSettings,
    policed_sources,
)
from fqdnguard.state import Journal, journal_entries

__all__ = ["Proxy", "ProxyStats"]

log = logging.getLogger("fqdnguard.proxy")
query_log = logging.getLogger("fqdnguard.query")

FORWARD, REPLY, DROP, MERGED = 0, 1, 2, 3
TCP_CHANNEL_BASE = 1 << 20
#: The Rust UDP path's channels to the servers intercepted queries asked start here (its
#: ORIGINAL_CHANNEL_BASE); TCP channels cycle below it.
IO_ORIG_CHANNEL_BASE = 1 << 28
#: UDP channels to the servers intercepted queries were addressed to: ORIG_CHANNEL_BASE + n.
ORIG_CHANNEL_BASE = 1 << 16
MAX_TCP_MESSAGE = 65535
# Consecutive timeouts after which an upstream is skipped for UPSTREAM_RETRY seconds.
UPSTREAM_FAILURES = 3
UPSTREAM_RETRY = 5.0
#: Seconds between route checks of an upstream the kernel cannot reach (see
#: ``Proxy._check_routes``).
UPSTREAM_RECHECK = 1.0


@dataclass
class ProxyStats:
    """Counters kept on the Python side (the engine keeps the per-query ones)."""

    held: int = 0
    hold_timeouts: int = 0
    backend_errors: int = 0
    batches: int = 0
    tcp_connections: int = 0
    tcp_refused: int = 0
    client_gone: int = 0
    upstream_failovers: int = 0
    hold_seconds: list[float] = field(default_factory=list)
    #: Intercepted queries: answers that could not leave from the address asked, and queries
    #: that reached the transparent listener without interception (dropped).
    reply_errors: int = 0
    not_intercepted: int = 0
    #: Intercepted queries to a server no channel could be given (every one busy with queries
    #: in flight): they time out into SERVFAIL.
    orig_upstream_refused: int = 0
    #: Datagrams on an upstream socket from an address no query went to (dropped).
    unexpected_source: int = 0
    #: UDP queries that could not be sent upstream (no route, no socket of that family): they
    #: time out into SERVFAIL.
    upstream_send_errors: int = 0
    #: Route checks that found a configured upstream unreachable (no route from this node):
    #: at start, after upstream timeouts, and every UPSTREAM_RECHECK seconds while one is.
    upstream_unreachable: int = 0
    #: TCP connections closed to make room for a client holding fewer.
    tcp_evicted: int = 0
    #: Batches whose learning could not be written to the state directory's journal.
    journal_errors: int = 0

    def counters(self, io: UdpIo | None = None) -> dict[str, int]:
        """The integer counters, with the Rust UDP path's share of the interception ones
        (``udp_io: rust`` serves the transparent UDP listeners there)."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        if io is not None:
            u = io.stats()
            out["reply_errors"] += u["reply_errors"]
            out["not_intercepted"] += u["not_intercepted"]
            out["orig_upstream_refused"] += u["orig_refused"]
            out["unexpected_source"] += u["unexpected_source"]
            out["udp_send_errors"] = u["send_errors"]
            out["udp_client_gone"] = u["client_gone"]
        return out


def entries_as_answers(
    entries: Iterable[tuple[int, str, str, float]], now: float
) -> dict[int, list[tuple[str, list[tuple[str, int]]]]]:
    """Cache entries ((endpoint, name, ip, expires_at), as ``DnsCache.entries`` lists them) as
    answers to record again at ``now``: per endpoint, ``[(name, [(ip, ttl), ...])]`` with the
    time left rounded up; entries already expired are left out."""
    grouped: dict[int, dict[str, list[tuple[str, int]]]] = {}
    for endpoint, name, ip, expires in entries:
        ttl = math.ceil(expires - now)
        if ttl > 0:
            grouped.setdefault(endpoint, {}).setdefault(name, []).append((ip, ttl))
    return {endpoint: list(names.items()) for endpoint, names in grouped.items()}


# Socket buffers of the UDP sockets: a burst that arrives while the loop is busy waits in the
# kernel instead of being dropped (the default, ~208 KiB, holds a few hundred queries).
SOCKET_BUFFER = 4 << 20


def _grow_buffers(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        _grow_socket_buffers(sock)


def _grow_socket_buffers(sock: Any) -> None:
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        try:  # the *FORCE options pass net.core.[rw]mem_max when we have CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, force or plain, SOCKET_BUFFER)
        except (OSError, TypeError):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


class _Client:
    """Where an answer goes: a UDP peer, or a TCP connection."""

    __slots__ = ("addr", "tcp", "transport")

    def __init__(self, transport: Any, addr: Any, tcp: _TcpClient | None = None) -> None:
        self.transport = transport
        self.addr = addr
        self.tcp = tcp

    def send(self, payload: bytes) -> None:
        if self.tcp is not None:
            self.tcp.send(payload)
        elif not self.transport.is_closing():
            self.transport.sendto(payload, self.addr)


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy, local: tuple[str, int]) -> None:
        self.proxy = proxy
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDP transport class

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Stopping: new queries are ignored, but the socket stays open for the answers owed.
        if not self.proxy._stopping:
            self.proxy._on_query(data, _Client(self.transport, addr), addr[0], False)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp listener %s: %s", self.local, exc)


class _TcpFramer(asyncio.Protocol):
    """RFC 7766 framing: a 2-byte length before each message, pipelining allowed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            size = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + size:
                break
            message = bytes(self.buf[2 : 2 + size])
            del self.buf[: 2 + size]
            self.message_received(message)

    def message_received(self, message: bytes) -> None:
        raise NotImplementedError

    def send(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(payload).to_bytes(2, "big") + payload)


class _TcpClient(_TcpFramer):
    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.peer: Any = None
        self.upstream: _UpstreamTcp | None = None
        self.channel = 0
        self.idle: asyncio.TimerHandle | None = None
        self.tokens: set[int] = set()
        #: Answers received from upstream but held for the backend (sent when released).
        self.held = 0
        #: The client shut its write side: answer what came before, then close.
        self.eof = False
        #: The server its upstream connection goes to, when it is the one the pod asked.
        self.upstream_addr: tuple[str, int] | None = None
        #: Whose share it counts against, and when it was admitted (see Proxy._tcp_open).
        self.client_key: tuple[str, Any] = ("", None)
        self.opened = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.peer = self.transport.get_extra_info("peername")
        if not self.proxy._tcp_open(self):
            self.transport.close()
            return
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.proxy.config.tcp_idle_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if self._owed():  # answers still owed: wait for them
            self._arm_idle()
        elif self.transport is not None:
            self.transport.close()

    def message_received(self, message: bytes) -> None:
        self._arm_idle()
        self.proxy._on_query(message, _Client(self.transport, self.peer, self), self.peer[0], True)

    def eof_received(self) -> bool:
        """The client shut its write side after its queries (``nc -q``, some stub resolvers):
        as BIND and Knot do, the queries received before are answered, and the connection
        closes after the last answer (or at the idle timeout). An unfinished message is
        dropped."""
        self.eof = True
        return self._owed()

    def _owed(self) -> bool:
        return bool(self.tokens or self.held)

    def send(self, payload: bytes) -> None:
        super().send(payload)
        if self.eof and not self._owed() and self.transport is not None:
            self.transport.close()  # after what is written is flushed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.proxy._tcp_closed(self)


class _UpstreamTcp(_TcpFramer):
    """One TCP connection to an upstream for one client connection; queries sent before it is
    up wait in ``queued``."""

    def __init__(self, proxy: Proxy, channel: int) -> None:
        super().__init__()
        self.proxy = proxy
        self.channel = channel
        self.queued: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.closed:
            transport.close()
            return
        for payload in self.queued:
            super().send(payload)
        self.queued.clear()

    def send(self, payload: bytes) -> None:
        if self.transport is None:
            self.queued.append(payload)
        else:
            super().send(payload)

    def message_received(self, message: bytes) -> None:
        self.proxy._on_answer(self.channel, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy._upstream_tcp.discard(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


# -- transparent interception (see fqdnguard.intercept for the node's side) -------------------
#
# Linux socket options the socket module does not name (linux/in.h, linux/in6.h).
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # also the cmsg type (IP_ORIGDSTADDR)
IPV6_RECVORIGDSTADDR = 74  # also the cmsg type (IPV6_ORIGDSTADDR)
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)
#: Room for one sockaddr_in6 of ancillary data.
_ORIG_CMSG = socket.CMSG_SPACE(28)
#: Datagrams read per reader callback before the loop gets a turn.
READ_BATCH = 64
#: Reply sockets (one per address asked) and upstream sockets (one per server) kept open.
MAX_REPLY_SOCKETS = 256
#: In the reply socket cache: the address is the node's own (see ``_TransparentUdp``).
LOCAL = "local"
#: How often the kept reply sockets' addresses are checked again (seconds): one that became
#: the node's (node-local DNS adding an address) is released within this time.
RECHECK_LOCAL_EVERY = 1.0
MAX_ORIG_UPSTREAMS = 1024
#: Names recorded per call when adopting another proxy's cache (the loop runs in between).
ADOPT_CHUNK = 5000
#: Listening sockets handed over by the proxy this one takes over from (hot restart), by
#: (``"udp"`` or ``"tcp"``, host, port) as configured.
Inherited = dict[tuple[str, str, int], socket.socket]


def transparent_socket(
    family: int,
    kind: int,
    local: tuple[str, int],
    *,
    reuse: bool = True,
    listener: bool = False,
) -> socket.socket:
    """A non-blocking socket with IP_TRANSPARENT / IPV6_TRANSPARENT bound to ``local`` (which
    may be an address of another host: the kernel allows it to transparent sockets).
    ``reuse=False`` for reply sockets from an address of the node: with SO_REUSEADDR a UDP
    socket may share an address another server on the node holds with SO_REUSEADDR too, and
    then take its queries (``_TransparentUdp`` says when SO_REUSEADDR is safe).
    ``listener``: a transparent listener, with SO_REUSEPORT like the direct ones, so that a
    proxy starting beside another (hot restart) can bind it when no socket was handed over."""
    sock = socket.socket(family, kind)
    try:
        if listener:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind(local)
    except OSError:
        sock.close()
        raise
    return sock


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The (address, port) a TPROXY-ed datagram was sent to, from its IP_ORIGDSTADDR or
    IPV6_ORIGDSTADDR control message (a sockaddr_in / sockaddr_in6)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), int.from_bytes(data[2:4], "big")
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), int.from_bytes(data[2:4], "big")
    return None


class _TransparentUdp:
    """The UDP side of interception with ``udp_io: asyncio`` (with ``rust`` the Rust UDP
    thread serves these listeners: ``UdpIo(transparent_listen=...)``): a transparent socket
    that TPROXY hands the pods' queries to, read with ``recvmsg`` from the loop's reader
    callback (asyncio's datagram transports cannot see ancillary data), so each query comes
    with its original destination. Each query goes to ``Proxy._on_query`` as the plain
    listeners' do, with that destination.

    It is also the transport of those queries' ``_Client``: answers leave from a transparent
    socket bound to the address and port the pod asked (IP_PKTINFO could set the source
    address, not the port), so the pod's resolver sees the answer come from the server it
    asked. That socket is found (or opened) when an answer is sent, not when the query
    arrives: a query dropped opens nothing, and closing the least recently used socket when
    there are too many never loses an answer still owed (it is opened again to send it).

    A kept socket takes SO_REUSEADDR: its address is not the node's, so no server listens
    there, and only another fqdnguard binds it (the predecessor during a hot restart, which
    holds its own reply socket there until it exits; without SO_REUSEADDR on both the
    successor could answer nothing from that address meanwhile).

    An address local to the node (node-local DNS) is another matter: a server on the node may
    hold that port, or start and want it later. A socket kept bound there would keep that
    server from starting, and one sharing its address (SO_REUSEADDR on both) could receive its
    queries. So such answers go out from a socket bound for that one send and closed at once,
    without SO_REUSEADDR: while a server holds the address, the answer cannot leave and is
    dropped and counted (``reply_errors``), the pod's resolver times out (fail closed). An
    address that becomes the node's after its socket was bound: every ``RECHECK_LOCAL_EVERY``
    the kept sockets' addresses are checked, and those now local are closed.
    """

    def __init__(
        self, proxy: Proxy, local: tuple[str, int], sock: socket.socket | None = None
    ) -> None:
        self.proxy = proxy
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        self.family = family
        #: ``sock``: the listener handed over by the proxy this one takes over from.
        self.sock = (
            sock
            if sock is not None
            else transparent_socket(family, socket.SOCK_DGRAM, local, listener=True)
        )
        level, option = (
            (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR)
            if family == socket.AF_INET6
            else (socket.IPPROTO_IP, IP_RECVORIGDSTADDR)
        )
        self.sock.setsockopt(level, option, 1)
        _grow_socket_buffers(self.sock)
        self.local = self.sock.getsockname()[:2]
        #: Reply sockets by address asked; None: the kernel refused it (not tried again until
        #: it falls out of the cache); LOCAL: an address of this node (a socket per answer).
        self._replies: OrderedDict[tuple[str, int], socket.socket | str | None] = OrderedDict()
        self._origs: dict[bytes, tuple[str, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)
        self._recheck = loop.call_later(RECHECK_LOCAL_EVERY, self._recheck_local)

    def _recheck_local(self) -> None:
        """Closes the kept reply sockets of addresses that became the node's (a server there
        must get its queries); their answers then use a socket each."""
        if self._closed or self._loop is None:
            return
        for orig, reply in list(self._replies.items()):
            if reply is not LOCAL and self._is_local(orig[0]):
                del self._replies[orig]
                if isinstance(reply, socket.socket):
                    reply.close()
                log.info("%s:%d became an address of this node: its reply socket is closed", *orig)
        self._recheck = self._loop.call_later(RECHECK_LOCAL_EVERY, self._recheck_local)

    def _readable(self) -> None:
        sock, on_query, origs = self.sock, self.proxy._on_query, self._origs
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _flags, addr = sock.recvmsg(65535, _ORIG_CMSG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("transparent udp %s: %s", self.local, e)
                return
            # The same few servers are asked over and over: their control messages too.
            raw = ancdata[0][2] if len(ancdata) == 1 else None
            orig = origs.get(raw) if raw is not None else None
            if orig is None:
                orig = original_destination(ancdata)
                if raw is not None and orig is not None and len(origs) < MAX_REPLY_SOCKETS:
                    origs[raw] = orig
            if orig is None or orig == self.local:  # sent here directly: not ours to answer
                self.proxy.stats.not_intercepted += 1
                continue
            on_query(data, _Client(self, (addr, orig)), addr[0], False, orig)

    # -- the transport of the answers (``_Client.send``) ---------------------------------------

    def is_closing(self) -> bool:
        return self._closed

    def sendto(self, payload: bytes, where: tuple[Any, tuple[str, int]]) -> None:
        """Sends an answer to ``where[0]`` from the address it asked, ``where[1]``."""
        addr, orig = where
        replies = self._replies
        if orig in replies:
            reply = replies[orig]
            replies.move_to_end(orig)
        else:
            reply = self._reply_socket(orig)
        if reply is None:
            self.proxy.stats.reply_errors += 1
            return
        if reply is LOCAL:
            self._send_once(payload, addr, orig)
            return
        try:
            reply.sendto(payload, addr)  # type: ignore[union-attr]
        except OSError:
            self.proxy.stats.reply_errors += 1

    def _send_once(self, payload: bytes, addr: Any, orig: tuple[str, int]) -> None:
        try:
            sock = transparent_socket(self.family, socket.SOCK_DGRAM, orig, reuse=False)
        except OSError as e:
            self.proxy.stats.reply_errors += 1
            log.debug("cannot answer from %s:%d, an address of this node: %s", *orig, e)
            return
        with sock:
            try:
                sock.sendto(payload, addr)
            except OSError:
                self.proxy.stats.reply_errors += 1

    def _is_local(self, address: str) -> bool:
        """Is ``address`` one of this node's (a plain socket may bind it)?"""
        with socket.socket(self.family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                return False
            return True

    def _reply_socket(self, orig: tuple[str, int]) -> socket.socket | str | None:
        sock: socket.socket | str | None
        if self._is_local(orig[0]):
            log.info("answers from %s:%d (an address of this node) use a socket each", *orig)
            sock = LOCAL
        else:
            try:
                sock = transparent_socket(self.family, socket.SOCK_DGRAM, orig)
            except OSError as e:
                log.warning("cannot answer from %s:%d (%s): its answers are dropped", *orig, e)
                sock = None
        self._replies[orig] = sock
        if len(self._replies) > MAX_REPLY_SOCKETS:
            old = self._replies.popitem(last=False)[1]
            if isinstance(old, socket.socket):
                old.close()
        return sock

    def stop_reading(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def pause_reading(self) -> None:
        """Stops reading without closing (the socket was handed over: the successor reads it)."""
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.stop_reading()
        self._closed = True
        if self._recheck is not None:
            self._recheck.cancel()
        for reply in self._replies.values():
            if isinstance(reply, socket.socket):
                reply.close()
        self._replies.clear()


class _OriginalUpstream:
    """A server that intercepted queries asked (when no upstream override is configured), on
    its own channel, so RFC 5452 matching still checks the server answering."""

    def __init__(self, channel: int, server: tuple[str, int]) -> None:
        self.channel = channel
        self.server = server
        #: When a query last went out (time.monotonic): an idle channel is one whose queries
        #: have all been answered or timed out.
        self.last_sent = 0.0


#: How often one socket of each family of the upstream pool is re-drawn on a new port.
REDRAW_EVERY = 0.05


#: Descriptors below this are left to code that still uses select() (glibc aborts on an fd_set
#: bit past 1024; libnftables, loaded by the nftables backend, is one).
HIGH_FD = 1024


def _high_fd(sock: socket.socket) -> socket.socket:
    """``sock`` moved to a descriptor number of at least HIGH_FD when the process may have
    one, so that a pool of upstream sockets never pushes other code's descriptors past it."""
    try:
        fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    except OSError:
        return sock
    high = socket.socket(fileno=fd)
    sock.close()
    return high


def _family_works(family: int) -> bool:
    """Can this node make a UDP socket of ``family`` (IPv6 may be turned off)?"""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except OSError:
        return False
    return True


def raise_open_files_limit() -> int:
    """Raises this process's soft limit of open descriptors to its hard limit (the upstream
    socket pool wants a couple of thousand); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class _UpstreamPool:
    """The sockets UDP queries leave from (``udp_io: asyncio``): ``size`` per address family,
    unconnected, each bound by the kernel to a random ephemeral port, re-drawn over time; the
    engine picks one at random per query (RFC 5452: an off-path sender must guess the port as
    well as the id). An answer is taken only from the address a query went to, on the socket it
    left from; the old socket of a re-drawn slot is read for an upstream timeout more."""

    def __init__(
        self, proxy: Proxy, size: int, families: Iterable[int], mark: int, avoid: set[int]
    ) -> None:
        self.proxy = proxy
        self.size = size
        self.mark = mark
        #: Ports the proxy is about to listen on (they may be ephemeral ones, in tests).
        self.avoid = avoid
        self._loop = asyncio.get_running_loop()
        self.slots: dict[int, list[socket.socket]] = {}
        #: When each slot's socket took it (the engine's clock): a retransmitted query leaves
        #: from the socket it first left from (``sendto`` with ``started``).
        self.since: dict[int, list[float]] = {}
        #: (closed at, socket, family, slot, since) of the re-drawn sockets still read.
        self._retiring: list[tuple[float, socket.socket, int, int, float]] = []
        self.redraws = 0
        self._timer: asyncio.TimerHandle | None = None
        families = list(families)
        for family in families:
            self.slots[family] = []
            self.since[family] = []
        start = proxy.clock()
        try:
            for slot in range(size):
                for family in families:
                    self.slots[family].append(self._open(family, slot))
                    self.since[family].append(start)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not slot:
                self.close()
                raise
            # Out of descriptors: fewer sockets (every family keeps the same number).
            for family in families:
                for sock in self.slots[family][slot:]:
                    self._close_one(sock)
                del self.slots[family][slot:]
                del self.since[family][slot:]
            self.size = slot
        self._timer = self._loop.call_later(REDRAW_EVERY, self._redraw)

    def _open(self, family: int, slot: int) -> socket.socket:
        """A socket bound to a port the kernel draws at random (not one the proxy listens on),
        read into ``slot``."""
        for _ in range(8):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self.mark:  # marked so that interception skips it
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
                _grow_socket_buffers(sock)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            except OSError:
                sock.close()
                raise
            if sock.getsockname()[1] not in self.avoid:
                sock = _high_fd(sock)
                self._loop.add_reader(sock.fileno(), self._readable, sock, slot)
                return sock
            sock.close()
        raise OSError("no free upstream port outside the listening ones")

    def sendto(
        self, slot: int, payload: bytes, server: tuple[str, int], started: float | None = None
    ) -> None:
        """Sends ``payload`` from the socket of ``slot``; with ``started`` (a retransmission),
        from the one a query first sent then left from (re-drawn since or not: it is read for
        an upstream timeout more)."""
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        socks = self.slots.get(family)
        try:
            if socks is None:
                raise OSError(f"no upstream socket of family {family}")
            sock = socks[slot]
            if started is not None and self.since[family][slot] > started:
                then = [r for r in self._retiring if r[2:4] == (family, slot) and r[4] <= started]
                if then:
                    sock = max(then, key=lambda r: r[4])[1]
            sock.sendto(payload, server)
        except (OSError, IndexError) as e:  # the query times out and its client gets SERVFAIL
            self.proxy.stats.upstream_send_errors += 1
            log.debug("upstream %s:%d: %s", server[0], server[1], e)

    def _readable(self, sock: socket.socket, slot: int) -> None:
        on_answer = self.proxy._on_pool_answer
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP unreachable and the like
                log.debug("upstream socket: %s", e)
                return
            on_answer(slot, data, addr)

    def _redraw(self) -> None:
        now = time.monotonic()
        while self._retiring and self._retiring[0][0] <= now:
            self._close_one(self._retiring.pop(0)[1])
        owed = now + self.proxy.config.upstream_timeout + 1.0
        taken = self.proxy.clock()
        for family, socks in self.slots.items():
            slot = int.from_bytes(os.urandom(4), "big") * len(socks) >> 32
            try:
                fresh = self._open(family, slot)
            except OSError as e:  # out of descriptors: the current socket still works
                log.debug("upstream socket re-draw: %s", e)
                continue
            self._retiring.append((owed, socks[slot], family, slot, self.since[family][slot]))
            socks[slot] = fresh
            self.since[family][slot] = taken
            self.redraws += 1
        self._timer = self._loop.call_later(REDRAW_EVERY, self._redraw)

    def _close_one(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for socks in self.slots.values():
            for sock in socks:
                self._close_one(sock)
        for retired in self._retiring:
            self._close_one(retired[1])
        self.slots, self._retiring = {}, []


class _TransparentTcpClient(_TcpClient):
    """A TCP connection TPROXY handed over: its local address is the server the pod asked."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(proxy)
        self.orig: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        local = transport.get_extra_info("sockname")
        self.orig = (local[0], local[1]) if local else None
        if self.orig is None or self.orig in self.proxy._transparent_locals:
            # Connected to the listener itself (from this node), not handed over by TPROXY:
            # forwarding it to "the server asked" would connect back here, and so on.
            self.proxy.stats.not_intercepted += 1
            transport.close()
            return
        super().connection_made(transport)

    def message_received(self, message: bytes) -> None:
        self._arm_idle()
        client = _Client(self.transport, self.peer, self)
        self.proxy._on_query(message, client, self.peer[0], True, self.orig)


def engine_table(
    policy: Any, endpoints: Any, unknown: str | None
) -> tuple[Any, dict[str, tuple[int, int | None]], tuple[int, int | None] | None]:
    """What the engine needs (see ``Policy.engine_table``), with the policy resolved against
    ``endpoints`` (recompiled only when it was loaded with another registry)."""
    pol = (
        policy
        if getattr(policy, "_endpoints", None) is endpoints
        else policy.with_endpoints(endpoints)
    )
    try:
        table: tuple[Any, dict[str, tuple[int, int | None]], tuple[int, int | None] | None]
        table = pol.engine_table(unknown)
    except ValueError as e:
        raise ConfigError(f"unknown_endpoint: {e}") from None
    return table


class Proxy:
    """A DNS proxy enforcing a compiled policy; see the module docstring.

    ``policy`` is a :class:`fqdnguard.Policy`, ``endpoints`` an :class:`fqdnguard.Endpoints`;
    ``upstreams`` and ``listen`` are ``"ADDR:PORT"`` strings (``[V6]:PORT`` for IPv6) or tuples.
    """

    def __init__(
        self,
        policy: Any,
        endpoints: Any,
        upstreams: Sequence[str | tuple[str, int]] | None = None,
        listen: Sequence[str | tuple[str, int]] | None = None,
        backend: Backend | None = None,
        *,
        cache: DnsCache | None = None,
        config: ProxyConfig | None = None,
        clock: Callable[[], float] = time.time,
        intercept: Interceptor | None = None,
    ) -> None:
        base = config or ProxyConfig()
        overrides: dict[str, Any] = {}
        if upstreams is not None:
            overrides["upstreams"] = [
                u if isinstance(u, tuple) else parse_hostport(u, "upstreams", 53) for u in upstreams
            ]
        if listen is not None:
            overrides["listen"] = [
                item if isinstance(item, tuple) else parse_hostport(item, "listen")
                for item in listen
            ]
        self.config = base.override(**overrides)
        self.upstreams = self.config.resolved_upstreams()
        self.backend = backend if backend is not None else Log()
        # Not `cache or ...`: an empty DnsCache is falsy (it has a length).
        self.cache = cache if cache is not None else DnsCache(min_ttl=self.config.min_ttl)
        self.clock = clock
        if self.config.udp_io == "rust" and clock is not time.time:
            raise ConfigError(
                "udp_io: the rust UDP path reads the system clock; use udp_io='asyncio' with a "
                "custom clock"
            )
        self.policy = policy
        self.endpoints = endpoints
        #: Transparent interception (``config.intercept``): the node's rules and their sources.
        if intercept is None and self.config.intercept:
            settings = InterceptSettings(
                port=self.config.intercept_port, reverse_path_check=self.config.reverse_path_check
            )
            intercept = Interceptor(settings, exclude=self.config.listen)
        self.intercept = intercept
        #: Intercepted queries go to the server the pod asked unless upstreams are configured.
        self._override = bool(self.config.upstreams)
        self._mark = intercept.settings.proxy_mark if intercept is not None else 0
        self._transparent_udp: list[_TransparentUdp] = []
        #: The transparent listeners' own addresses (a connection to one was not intercepted).
        self._transparent_locals: set[tuple[str, int]] = set()
        self._orig_upstreams: OrderedDict[tuple[str, int], _OriginalUpstream] = OrderedDict()
        #: The same servers by channel: answers and retransmitted copies go by channel, so two
        #: live servers never share one (see ``_orig_channel``).
        self._orig_by_channel: dict[int, _OriginalUpstream] = {}
        self._orig_next = 0
        self._intercept_installed = False
        self.engine = Engine(
            self.cache,
            reject=self.config.reject,
            search_domains=list(self.config.search_domains),
            max_inflight=self.config.max_inflight,
            max_inflight_per_client=self.config.max_inflight_per_client,
            case_randomization=self.config.dns0x20,
            timeout=self.config.upstream_timeout,
            retransmit=self.config.retransmit_after(),
            retries=self.config.upstream_retries,
            log_queries=self.config.log_queries,
            log_sample=self.config.log_sample,
            max_ttl=self.config.max_ttl,
        )
        self.set_policy(policy, endpoints)
        self.stats = ProxyStats()
        self._clients: dict[int, _Client] = {}
        self._listeners: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._pool: _UpstreamPool | None = None
        #: Configured upstreams by (address, port): where their answers come from.
        self._upstream_channels: dict[tuple[str, int], int] = {}
        for channel, (host, port) in reversed(list(enumerate(self.upstreams))):
            self._upstream_channels[(host, port)] = channel
        self._upstream_failures = [0] * len(self.upstreams)
        #: Upstreams the last route check found unreachable, and when to check again (0: no
        #: check due).
        self._unroutable: set[int] = set()
        self._route_check_at = 0.0
        self._upstream_hosts = [host for host, _ in self.upstreams]
        # The upstream in use, and when to look again (0: none is failed over).
        self._upstream = 0
        self._upstream_recheck = 0.0
        # With the default clock the engine reads the time itself (no Python call per packet).
        self._now: Callable[[], float | None] = (lambda: None) if clock is time.time else clock
        self._upstream_down_until = [0.0] * len(self.upstreams)
        self._tcp_clients: set[_TcpClient] = set()
        #: The open connections of each client (an endpoint, or a source no endpoint claims).
        self._tcp_by_client: dict[tuple[str, Any], set[_TcpClient]] = {}
        self._upstream_tcp: set[_UpstreamTcp] = set()
        self._tcp_channels = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._held: dict[int, tuple[bytes, _Client]] = {}
        self._held_seq = 0
        self._next_changes: list[Any] = []
        self._next_held: list[int] = []
        self._next_adds = False
        self._adds_inflight = False
        self._applier: asyncio.Task[None] | None = None
        #: Where applied changes are written before their answers are released (the state
        #: directory's journal, see fqdnguard.state); None: nowhere.
        self.journal: Journal | None = None
        self._running = False
        self._stopping = False
        # udp_io "rust": the UDP sockets are served by a Rust thread (see `_core.UdpIo`); what
        # Python must see comes in batches (held answers by id, changes, log records).
        self._io: UdpIo | None = None
        self._udp_sockets: list[socket.socket] = []  # dups of its listeners, for socket options
        self._next_held_io: list[int] = []
        self._next_io_seq = 0
        self._io_answers = [0] * len(self.upstreams)

    # -- policy -------------------------------------------------------------------------------

    def set_policy(self, policy: Any, endpoints: Any) -> None:
        """Swaps in a new compiled policy and endpoint set, atomically for the data path."""
        table = engine_table(policy, endpoints, self.config.unknown_endpoint)
        #: Source address -> endpoint id: whose share a TCP connection counts against.
        self._endpoint_ids = {ip: ref[0] for ip, ref in table[1].items()}
        # Backends that derive a ruleset from the policy (nftables) get it first: if the kernel
        # refuses it, the policy in force stays in force everywhere.
        if hasattr(self.backend, "set_policy"):
            self.backend.set_policy(
                policy, endpoints, listen=self.config.listen, names_for=self.cache.names_for
            )
        self.engine.set_policy(*table)
        self.policy, self.endpoints = policy, endpoints
        # After the engine has the endpoints, so a newly policed source is known when its DNS
        # starts arriving.
        if self.intercept is not None:
            self.intercept.set_sources(*policed_sources(policy, endpoints))

    async def adopt(self, entries: Iterable[tuple[int, str, str, float]]) -> int:
        """Records another proxy's cache entries ((endpoint, name, ip, expires_at), as
        ``DnsCache.entries`` lists them) as if their answers had come here: the hand-over of a
        hot restart. What is new to this cache is programmed as answers are and goes to the
        backend; returns how many changes. Yields to the loop between chunks."""
        now = self.clock()
        count = 0
        for endpoint, items in entries_as_answers(entries, now).items():
            for i in range(0, len(items), ADOPT_CHUNK):
                recorded = self.cache.record_many(endpoint, items[i : i + ADOPT_CHUNK], now)
                changes = self.engine.program_changes(recorded, now) if recorded else recorded
                if changes:
                    self._queue_changes(changes)
                    count += len(changes)
                await asyncio.sleep(0)
        return count

    def forget_endpoints(self, ids: Iterable[int]) -> int:
        """Drops what the endpoints ``ids`` learned (gone for good: a deleted pod, whose id is
        never given again) from the cache and the backend; returns how many removals."""
        now = self.clock()
        count = 0
        for ep in ids:
            removed = self.cache.forget(ep)
            changes = self.engine.program_changes(removed, now) if removed else removed
            if changes:
                self._queue_changes(changes)
                count += len(changes)
        return count

    def upstream_sockets(self) -> int:
        """Sockets per address family UDP queries leave from, each on a random port."""
        if self._io is not None:
            return self._io.source_ports()
        return self._pool.size if self._pool is not None else 0

    def counters(self) -> dict[str, int]:
        """The proxy's integer counters, the Rust UDP path's included (one read of them)."""
        return self.stats.counters(self._io)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self,
        *,
        taking_over: bool = False,
        inherited: Inherited | None = None,
        policy_in_force: bool = True,
    ) -> None:
        """Starts the backend and the listeners. ``taking_over``: another proxy still serves
        the same clients (a hot restart), so what the backend enforces beyond this proxy's
        cache is the other one's recent learning and is kept, not pruned.
        ``policy_in_force=False``: this proxy has no policy yet (its state could not be read):
        what the node enforces and intercepts now stays, nothing is pruned or made anew from
        the empty policy (the pods it restricts stay restricted, their DNS refused here) until
        :meth:`set_policy` brings one. ``inherited``: the
        listening sockets that proxy handed over, by (``"udp"`` or ``"tcp"``, host, port);
        each one found is used instead of binding a new one (its queue, with whatever the
        other proxy has not read, comes with it). Those given to the Rust UDP thread are
        duplicated by it and closed here; the others belong to their transports."""
        inherited = dict(inherited or {})
        loop = asyncio.get_running_loop()
        raise_open_files_limit()
        if not policy_in_force and "keep" in inspect.signature(self.backend.start).parameters:
            await self.backend.start(keep=True)  # type: ignore[call-arg]
        else:
            await self.backend.start()
        # Bring the enforced state to what the engine has programmed (e.g. a restored cache).
        programmed_state = getattr(self.engine, "programmed_state", None)
        if programmed_state is not None:
            current = programmed_state(self.clock())
            if not taking_over and policy_in_force:
                await self.backend.reconcile(current)
            elif "prune" in inspect.signature(self.backend.reconcile).parameters:
                await self.backend.reconcile(current, prune=False)
            else:  # a backend of its own that only reconciles exactly: adding prunes nothing
                await self.backend.apply(current)
        self._stopping = False
        bound = list(self.config.listen)
        if self.config.udp_io == "rust":
            # One thread for the direct listeners and (--intercept) the transparent ones: one
            # pending table, one sweep answering every timed-out UDP client, one drain.
            transparent = (
                [(host, self.intercept.settings.port) for host in (LISTEN4, LISTEN6)]
                if self.intercept is not None
                else []
            )
            given = [inherited.pop(("udp", h, p), None) for h, p in [*bound, *transparent]]
            try:
                self._io = UdpIo(
                    self.engine,
                    bound,
                    list(self.upstreams),
                    buffer=SOCKET_BUFFER,
                    mark=self._mark or None,
                    transparent_listen=transparent,
                    forward_to_original=not self._override,
                    source_ports=self.config.upstream_sockets,
                    inherited=[g.fileno() if g is not None else None for g in given],
                )
            finally:
                for g in given:
                    if g is not None:
                        g.close()
            self._io.set_upstream(self._upstream)
            direct = len(bound)
            bound = self._io.local_addresses()
            self._transparent_locals.update(bound[direct:])
            bound = bound[:direct]
            self._udp_sockets = [
                socket.socket(fileno=os.dup(fd)) for fd in self._io.listener_fds()[:direct]
            ]
            loop.add_reader(self._io.fileno(), self._on_io_events)
            self._io.start()
        # Python's own upstream sockets (asyncio UDP, with its transparent listeners too): the
        # families of the configured upstreams, and both when intercepted queries go to the
        # server they asked.
        if self._io is None:
            families = {
                socket.AF_INET6 if ":" in host else socket.AF_INET for host, _ in self.upstreams
            }
            if self.intercept is not None and not self._override:
                # Servers pods ask may be of either family; one the node cannot make sockets
                # of (IPv6 turned off) is left out, and queries to such servers time out.
                families |= {f for f in (socket.AF_INET, socket.AF_INET6) if _family_works(f)}
            avoid = {port for _, port in self.config.listen}
            if self.intercept is not None:
                avoid.add(self.intercept.settings.port)
            self._pool = _UpstreamPool(
                self, self.config.upstream_sockets, sorted(families), self._mark, avoid
            )
        try:
            for host, port in bound:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                if self._io is None:
                    udp_sock = inherited.pop(("udp", host, port), None)
                    transport, _ = await (
                        loop.create_datagram_endpoint(
                            functools.partial(_UdpServer, self, (host, port)),
                            local_addr=(host, port),
                            family=family,
                            reuse_port=True,
                        )
                        if udp_sock is None
                        else loop.create_datagram_endpoint(
                            functools.partial(_UdpServer, self, (host, port)), sock=udp_sock
                        )
                    )
                    _grow_buffers(transport)
                    self._listeners.append(transport)
                tcp_sock = inherited.pop(("tcp", host, port), None)
                server = await (
                    loop.create_server(
                        lambda: _TcpClient(self),
                        host,
                        port,
                        family=family,
                        reuse_port=True,
                        backlog=1024,
                    )
                    if tcp_sock is None
                    else loop.create_server(lambda: _TcpClient(self), sock=tcp_sock, backlog=1024)
                )
                self._servers.append(server)
            if self.intercept is not None:
                for host in (LISTEN4, LISTEN6):
                    port = self.intercept.settings.port
                    await self._listen_transparent(loop, (host, port), inherited)
        except OSError as e:
            await self._close_sockets()
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
        finally:
            for left in inherited.values():  # handed over but not configured here
                left.close()
        if self.intercept is not None:
            try:
                if policy_in_force:
                    self.intercept.install()
                else:
                    self.intercept.install(keep=True)
            except Exception:
                await self._close_sockets()
                raise
            self._intercept_installed = True
        sockets = self.upstream_sockets()
        if sockets < self.config.upstream_sockets:
            log.warning(
                "only %d upstream sockets per address family (upstream_sockets: %d): the open "
                "files limit is too low; random source ports guard less against forged answers",
                sockets,
                self.config.upstream_sockets,
            )
        self._running = True
        self._spawn(self._sweeper())
        self._spawn(self._expirer())
        log.info(
            "listening on %s, upstreams %s",
            ", ".join(f"{h}:{p}" for h, p in self.config.listen),
            ", ".join(f"{h}:{p}" for h, p in self.upstreams),
        )
        self._log_how_it_decides()
        self._check_routes()  # an upstream without a route is named now, not at a timeout

    def _log_how_it_decides(self) -> None:
        """At start: what a person reading the log needs to make sense of the verdicts."""
        if not self._endpoint_ids and self.config.unknown_endpoint is None:
            log.warning(
                "no endpoints: every query will be refused as coming from an unknown source "
                "(give an endpoints file with the clients' addresses, or --unknown-endpoint "
                "NS/NAME to treat unknown sources as that endpoint)"
            )
        if not self.config.intercept:
            log.info(
                "direct-listen mode: DNS rules see each query as sent to the upstream in use, "
                "%s port 53, whatever address the client asked",
                self._upstream_hosts[self._upstream],
            )

    async def _listen_transparent(
        self, loop: asyncio.AbstractEventLoop, local: tuple[str, int], inherited: Inherited
    ) -> None:
        if self._io is None:  # else the Rust UDP thread serves the transparent UDP listener
            udp = _TransparentUdp(self, local, inherited.pop(("udp", *local), None))
            self._transparent_udp.append(udp)
            self._transparent_locals.add(udp.local)
            udp.start(loop)
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = inherited.pop(("tcp", *local), None) or transparent_socket(
            family, socket.SOCK_STREAM, local, listener=True
        )
        try:
            sock.listen(1024)
            server = await loop.create_server(lambda: _TransparentTcpClient(self), sock=sock)
        except OSError:
            sock.close()
            raise
        self._servers.append(server)

    @staticmethod
    def listener_keys(config: ProxyConfig) -> list[tuple[str, str, int]]:
        """The listeners ``config`` makes a proxy open, as :meth:`handover_sockets` names
        them: what a successor asks its predecessor for."""
        direct = list(config.listen)
        transparent = (
            [(host, config.intercept_port) for host in (LISTEN4, LISTEN6)]
            if config.intercept
            else []
        )
        out = [("tcp", host, port) for host, port in [*direct, *transparent]]
        return [("udp", host, port) for host, port in [*direct, *transparent]] + out

    def handover_sockets(self) -> list[tuple[str, str, int, int]]:
        """The listening sockets a successor takes over (a hot restart): (``"udp"`` or
        ``"tcp"``, host, port, descriptor), direct and transparent, keyed by the address
        configured (the key :meth:`start` looks ``inherited`` up by)."""
        out: list[tuple[str, str, int, int]] = []
        direct = list(self.config.listen)
        transparent = (
            [(host, self.intercept.settings.port) for host in (LISTEN4, LISTEN6)]
            if self.intercept is not None
            else []
        )
        if self._io is not None:
            for (host, port), fd in zip(
                [*direct, *transparent], self._io.listener_fds(), strict=True
            ):
                out.append(("udp", host, port, fd))
        else:
            for (host, port), t in zip(direct, self._listeners, strict=True):
                sock = t.get_extra_info("socket")
                if sock is not None:
                    out.append(("udp", host, port, sock.fileno()))
            for (host, port), udp in zip(transparent, self._transparent_udp, strict=True):
                out.append(("udp", host, port, udp.sock.fileno()))
        for (host, port), server in zip([*direct, *transparent], self._servers, strict=True):
            for sock in server.sockets or ():
                out.append(("tcp", host, port, sock.fileno()))
        return out

    def stop_listening(self, keys: Iterable[tuple[str, str, int]]) -> None:
        """Stops taking new queries and connections on the listeners ``keys`` (as
        :meth:`handover_sockets` names them), and keeps answering those already taken: a
        successor holds the same sockets (handed over) and reads them now. The TCP servers
        close their descriptors (the successor's stay open, with their queues), the
        transparent UDP listeners of ``udp_io: asyncio`` stop being read, the Rust UDP
        thread stops reading its listeners when every one of them was taken (else it reads
        on: each datagram is read by one of the two proxies and answered by it); the direct
        UDP listeners of ``udp_io: asyncio`` are read until :meth:`stop` (uvloop's datagram
        transports cannot pause)."""
        taken = set(keys)
        mine = {(kind, host, port) for kind, host, port, _ in self.handover_sockets()}
        if self._io is not None and {k for k in mine if k[0] == "udp"} <= taken:
            self._io.stop_listening()
        direct = list(self.config.listen)
        transparent = (
            [(host, self.intercept.settings.port) for host in (LISTEN4, LISTEN6)]
            if self.intercept is not None
            else []
        )
        for (host, port), server in zip([*direct, *transparent], self._servers, strict=True):
            if ("tcp", host, port) in taken:
                server.close()
        if self._io is None:  # else the Rust UDP thread reads the transparent listeners too
            for (host, port), udp in zip(transparent, self._transparent_udp, strict=True):
                if ("udp", host, port) in taken:
                    udp.pause_reading()

    def remove_interception(self) -> None:
        """Removes the node's interception rules now (``fqdnguard intercept cleanup`` does it;
        a proxy that stops leaves them: they belong to the node)."""
        if self.intercept is not None and self._intercept_installed:
            try:
                self.intercept.remove()
            except Exception:
                log.exception("removing the interception rules failed")
            self._intercept_installed = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound listen addresses (with the real port when 0 was asked)."""
        if self._io is not None:
            return self._io.local_addresses()[: len(self.config.listen)]
        return [t.get_extra_info("sockname")[:2] for t in self._listeners]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stops accepting, lets in-flight queries finish (up to ``timeout``), flushes holds."""
        if not self._running:
            return
        self._running = False
        self._stopping = True
        # The interception rules stay: they belong to the node, not to this process. A
        # successor takes over from them; without one, the drop rules after the tproxy rule
        # keep the policed pods' DNS from going around the firewall (docs/intercept.md).
        if self._io is not None:
            self._io.stop_listening()
        for s in self._servers:
            s.close()
        for udp in self._transparent_udp:
            udp.stop_reading()  # its reply sockets stay for the answers still owed
        deadline = time.monotonic() + timeout
        while (self._clients or (self._io is not None and self._io.inflight())) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        if self._io is not None:
            self._on_io_events()
        if self._applier is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.shield(self._applier), max(0.0, deadline - time.monotonic())
                )
        self._release(list(self._held))
        if self._io is not None:
            self._io.release_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_sockets()
        await self.backend.close()

    async def _close_sockets(self) -> None:
        for t in self._listeners:
            t.close()
        for s in self._servers:
            s.close()
            with contextlib.suppress(Exception):
                await s.wait_closed()
        for c in list(self._tcp_clients):
            if c.transport is not None:
                c.transport.close()
        for up in list(self._upstream_tcp):
            up.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for udp in self._transparent_udp:
            udp.close()
        self._transparent_udp, self._orig_upstreams = [], OrderedDict()
        self._orig_by_channel = {}
        if self.intercept is not None:
            self.intercept.close()
        if self._io is not None:
            asyncio.get_running_loop().remove_reader(self._io.fileno())
            self._io.stop()
            self._io.release_all()
        for sock in self._udp_sockets:
            sock.close()
        self._udp_sockets = []
        await asyncio.sleep(0)  # let the transports deliver connection_lost
        self._listeners, self._servers = [], []

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the data path ------------------------------------------------------------------------

    def _pick_upstream(self) -> int:
        """The first upstream not failed over (recomputed when one fails or comes back)."""
        now = time.monotonic()
        for i in range(len(self.upstreams)):
            if self._upstream_down_until[i] <= now:
                return i
        return min(range(len(self.upstreams)), key=self._upstream_down_until.__getitem__)

    def _choose_upstream(self) -> None:
        self._upstream = self._pick_upstream()
        if self._io is not None:
            self._io.set_upstream(self._upstream)
        now = time.monotonic()
        pending = [t for t in self._upstream_down_until if t > now]
        self._upstream_recheck = min(pending) if pending else 0.0

    def _on_query(
        self,
        data: bytes,
        client: _Client,
        src_ip: str,
        tcp: bool,
        orig: tuple[str, int] | None = None,
    ) -> None:
        """One query from ``src_ip``; ``orig`` is the (server, port) it was sent to when it was
        intercepted (the verdict's server, and where it goes unless upstreams override it)."""
        if self._upstream_recheck and time.monotonic() >= self._upstream_recheck:
            self._choose_upstream()
        channel = self._upstream
        if orig is None:
            server, port = self._upstream_hosts[channel], 53
        else:
            server, port = orig
            if not self._override:
                # A server asked that is also a configured upstream shares its channel.
                found = self._orig_upstreams.get(orig)
                if orig in self._upstream_channels:
                    channel = self._upstream_channels[orig]
                else:
                    channel = found.channel if found is not None else self._orig_channel()
        if tcp:
            assert client.tcp is not None
            if orig is not None and not self._override:
                client.tcp.upstream_addr = orig
            channel = self._tcp_channel(client.tcp, channel)
        slots = 1 if tcp or self._pool is None else self._pool.size
        action, payload, token, record, slot = self.engine.query(
            src_ip, server, port, tcp, data, channel, self._now(), slots
        )
        if record is not None:
            self._log_query(record)
        if action in (FORWARD, MERGED):
            self._clients[token] = client
            if tcp:
                assert client.tcp is not None
                client.tcp.tokens.add(token)
        if action == FORWARD:
            if tcp:
                assert client.tcp is not None
                self._send_tcp_upstream(client.tcp, payload)
            elif self._pool is not None:
                if channel < ORIG_CHANNEL_BASE:
                    self._pool.sendto(slot, payload, self.upstreams[channel])
                else:
                    upstream = self._orig_upstream(orig, channel)  # type: ignore[arg-type]
                    if upstream is not None:  # else the query times out: SERVFAIL
                        upstream.last_sent = time.monotonic()
                        self._pool.sendto(slot, payload, upstream.server)
        elif action == REPLY:
            client.send(payload)

    def _orig_channel(self) -> int:
        """The channel the next server asked will get (taken only when a query goes to it):
        never one a live server holds, once the counter has wrapped."""
        while True:
            channel = ORIG_CHANNEL_BASE + self._orig_next % (TCP_CHANNEL_BASE - ORIG_CHANNEL_BASE)
            if channel not in self._orig_by_channel:
                return channel
            self._orig_next += 1

    def _orig_upstream(self, orig: tuple[str, int], channel: int) -> _OriginalUpstream | None:
        """The channel of the server ``orig``, taken on ``channel`` when it has none. At most
        MAX_ORIG_UPSTREAMS: the least recently used one is replaced only when it is idle
        (nothing sent for an upstream timeout, so no answer is still owed on it); when every
        one is busy, the new server gets none (its query times out) rather than the queries
        of the others being lost."""
        upstreams = self._orig_upstreams
        upstream = upstreams.get(orig)
        if upstream is not None:
            upstreams.move_to_end(orig)
            return upstream
        self._orig_next += 1  # the channel is used up either way: a pending query names it
        if len(upstreams) >= MAX_ORIG_UPSTREAMS:
            oldest = next(iter(upstreams.values()))
            if oldest.last_sent + self.config.upstream_timeout > time.monotonic():
                self.stats.orig_upstream_refused += 1
                return None
            _, gone = upstreams.popitem(last=False)
            self._orig_by_channel.pop(gone.channel, None)
        upstream = _OriginalUpstream(channel, orig)
        upstreams[orig] = upstream
        self._orig_by_channel[channel] = upstream
        return upstream

    def _on_pool_answer(self, slot: int, data: bytes, addr: Any) -> None:
        """A datagram on the upstream socket of ``slot``: an answer only if it comes from an
        address a query went to (a configured upstream, or a server clients asked)."""
        source = (addr[0].split("%")[0], addr[1])
        channel = self._upstream_channels.get(source)
        if channel is None:
            orig = self._orig_upstreams.get(source)
            if orig is None:
                self.stats.unexpected_source += 1
                return
            channel = orig.channel
        self._on_answer(channel, data, slot)

    def _on_answer(self, channel: int, data: bytes, slot: int = 0) -> None:
        answers = self.engine.response(channel, slot, data, self._now())
        if not answers:
            return  # unmatched or malformed: dropped and counted by the engine
        if channel < ORIG_CHANNEL_BASE:
            self._upstream_failures[channel] = 0
        for answer in answers:
            self._answer_client(answer)

    def _answer_client(self, answer: tuple[int, bytes, Any, bool, bool, Any]) -> None:
        """One waiting client's answer: sent, or held until the backend applied its changes."""
        token, payload, changes, hold, has_addresses, record = answer
        if record is not None:
            self._log_query(record)
        client = self._clients.pop(token, None)
        if client is None:
            self.stats.client_gone += 1
            if changes:
                self._queue_changes(changes)
            return
        if client.tcp is not None:
            client.tcp.tokens.discard(token)
        # New addresses wait for the firewall; so does any answer with addresses while a batch
        # of additions is still on its way (it may be adding this answer's addresses).
        if hold or (has_addresses and self._adds_pending):
            self._hold(payload, client, changes, hold)
        else:
            if changes:
                self._queue_changes(changes)
            client.send(payload)

    def _on_io_events(self) -> None:
        """What the Rust UDP thread published: held answers, changes, log records."""
        if self._io is None:
            return
        held, changes, adds_seq, logs = self._io.drain()
        for record in logs:
            self._log_query(record)
        if held:
            self._next_held_io.extend(held)
            self.stats.held += len(held)
        if adds_seq:
            self._next_adds = True
            self._next_io_seq = max(self._next_io_seq, adds_seq)
        if changes or held:
            self._queue_changes(changes)

    # -- TCP ----------------------------------------------------------------------------------

    def _tcp_client(self, conn: _TcpClient) -> tuple[str, Any]:
        """Whose share ``conn`` counts against: its endpoint, or its source address."""
        ip = str(conn.peer[0]).split("%")[0] if conn.peer else ""
        endpoint = self._endpoint_ids.get(ip)
        return ("endpoint", endpoint) if endpoint is not None else ("source", ip)

    def _tcp_open(self, conn: _TcpClient) -> bool:
        """Admits a new connection within its client's share and the global cap. With every
        connection taken, the client holding the most gives up its longest idle one, if it
        holds more than this client would; else the new one is refused."""
        if not self._running:
            self.stats.tcp_refused += 1
            return False
        key = self._tcp_client(conn)
        mine = self._tcp_by_client.get(key, set())
        if len(mine) >= self.config.max_tcp_per_client:
            self.stats.tcp_refused += 1
            return False
        if len(self._tcp_clients) >= self.config.max_tcp_connections:
            heavy = max(self._tcp_by_client.values(), key=len, default=set())
            if len(heavy) <= len(mine) + 1:
                self.stats.tcp_refused += 1
                return False
            victim = min(heavy, key=lambda c: (bool(c.tokens), c.opened))
            self.stats.tcp_evicted += 1
            self._tcp_forget(victim)
            if victim.transport is not None:
                victim.transport.close()
        conn.client_key = key
        conn.opened = time.monotonic()
        self._tcp_clients.add(conn)
        self._tcp_by_client.setdefault(key, set()).add(conn)
        self.stats.tcp_connections += 1
        return True

    def _tcp_forget(self, conn: _TcpClient) -> None:
        self._tcp_clients.discard(conn)
        mine = self._tcp_by_client.get(conn.client_key)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self._tcp_by_client[conn.client_key]

    def _tcp_closed(self, conn: _TcpClient) -> None:
        self._tcp_forget(conn)
        for token in conn.tokens:
            self._clients.pop(token, None)
            self.engine.cancel(token)
        conn.tokens.clear()
        if conn.upstream is not None:
            conn.upstream.close()

    def _tcp_channel(self, conn: _TcpClient, upstream: int) -> int:
        if conn.channel == 0:
            # Cycling below the Rust path's channels (a connection lives far shorter than
            # the ~267M connections it takes to come round).
            self._tcp_channels = (self._tcp_channels + 1) % (
                IO_ORIG_CHANNEL_BASE - TCP_CHANNEL_BASE
            )
            conn.channel = TCP_CHANNEL_BASE + self._tcp_channels
            conn.upstream_index = upstream  # type: ignore[attr-defined]
        return conn.channel

    def _send_tcp_upstream(self, conn: _TcpClient, payload: bytes) -> None:
        upstream = conn.upstream
        if upstream is None or upstream.closed:
            upstream = _UpstreamTcp(self, conn.channel)
            conn.upstream = upstream
            self._upstream_tcp.add(upstream)
            self._spawn(self._connect_tcp_upstream(conn, upstream))
        upstream.send(payload)

    async def _connect_tcp_upstream(self, conn: _TcpClient, upstream: _UpstreamTcp) -> None:
        loop = asyncio.get_running_loop()
        host, port = conn.upstream_addr or self.upstreams[getattr(conn, "upstream_index", 0)]
        try:
            if self._mark:  # marked so that interception skips it
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
                    await loop.sock_connect(sock, (host, port))
                    await loop.create_connection(lambda: upstream, sock=sock)
                except BaseException:
                    sock.close()
                    raise
            else:
                await loop.create_connection(lambda: upstream, host, port)
        except OSError as e:
            # The queries it carried time out and their clients get SERVFAIL.
            log.debug("tcp upstream %s:%d: %s", host, port, e)
            upstream.closed = True
            self._upstream_tcp.discard(upstream)

    # -- holding answers until the backend has applied their changes -------------------------

    def _hold(self, payload: bytes, client: _Client, changes: Sequence[Any], adds: bool) -> None:
        self._held_seq += 1
        self._held[self._held_seq] = (payload, client)
        if client.tcp is not None:  # owed: its connection stays open for it
            client.tcp.held += 1
        self._next_held.append(self._held_seq)
        self.stats.held += 1
        if adds:
            self._next_adds = True
            if self._io is not None:  # the Rust UDP path holds answers with addresses meanwhile
                self._next_io_seq = max(self._next_io_seq, self._io.note_adds())
        self._queue_changes(changes)

    def _queue_changes(self, changes: Sequence[Any]) -> None:
        self._next_changes.extend(changes)
        if self._applier is None:
            self._applier = asyncio.ensure_future(self._apply_batches())

    async def _apply_batches(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next_changes or self._next_held or self._next_held_io:
                await asyncio.sleep(0)  # let this loop iteration's answers join the batch
                changes, held, adds = self._next_changes, self._next_held, self._next_adds
                self._next_changes, self._next_held, self._next_adds = [], [], False
                held_io, io_seq = self._next_held_io, self._next_io_seq
                self._next_held_io, self._next_io_seq = [], 0
                self._adds_inflight = adds
                started = loop.time()
                timer = loop.call_later(self.config.hold_max, self._hold_expired, held, held_io)
                try:
                    if changes:
                        await self.backend.apply(changes)
                except Exception:
                    self.stats.backend_errors += 1
                    log.exception(
                        "backend %s failed to apply %d changes", self.backend.name, len(changes)
                    )
                finally:
                    timer.cancel()
                if changes and self.journal is not None:
                    self._write_journal(changes)
                self.stats.batches += 1
                self.stats.hold_seconds.append(loop.time() - started)
                if len(self.stats.hold_seconds) > 4096:
                    del self.stats.hold_seconds[:2048]
                self._adds_inflight = False
                if io_seq and self._io is not None:
                    self._io.adds_applied(io_seq)
                self._release(held, held_io)
        finally:
            self._applier = None
            self._adds_inflight = False

    def _write_journal(self, changes: Sequence[Any]) -> None:
        """Journals what a batch taught, before its answers go out: a crash loses none of it.
        A failed write is logged and counted; the answers are released all the same (the
        firewall has the addresses; the next save holds them)."""
        assert self.journal is not None
        try:
            self.journal.append(journal_entries(self.cache, changes))
        except (OSError, ValueError) as e:
            self.stats.journal_errors += 1
            log.error("journal %s: %s", self.journal.path, e)

    @property
    def _adds_pending(self) -> bool:
        return (
            self._next_adds
            or self._adds_inflight
            or (self._io is not None and self._io.adds_pending())
        )

    def _hold_expired(self, held: list[int], held_io: list[int]) -> None:
        expired = any(h in self._held for h in held)
        if held_io and self._io is not None and self._io.release(held_io):
            expired = True
        if expired:
            self.stats.hold_timeouts += 1
            self._release(held)

    def _release(self, held: list[int], held_io: Sequence[int] = ()) -> None:
        for h in held:
            entry = self._held.pop(h, None)
            if entry is not None:
                payload, client = entry
                if client.tcp is not None:
                    client.tcp.held -= 1
                client.send(payload)
        if held_io and self._io is not None:
            self._io.release(list(held_io))

    # -- timers -------------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        interval = min(0.1, self.config.upstream_timeout / 4)
        if self._io is None and self.config.retransmit_after():
            interval = min(interval, self.config.retransmit_after() / 2)  # copies sent on time
        while True:
            await asyncio.sleep(interval)
            # No Python runs per UDP query on the Rust path: look for recovered upstreams here.
            recheck = self._upstream_recheck
            if self._io is not None and recheck and time.monotonic() >= recheck:
                self._choose_upstream()
            if self._route_check_at and time.monotonic() >= self._route_check_at:
                self._check_routes()
            if self._io is None:  # the Rust UDP path sends its own retransmissions
                self._retransmit()
            # The Rust UDP path answers its own timed-out clients and returns them all.
            sweep = self._io.sweep if self._io is not None else self.engine.sweep
            for token, payload, channel, record in sweep(self.clock()):
                if record is not None:
                    self._log_query(record)
                client = self._clients.pop(token, None)
                if client is not None:
                    if client.tcp is not None:
                        client.tcp.tokens.discard(token)
                    client.send(payload)
                if channel is not None and channel < ORIG_CHANNEL_BASE:
                    self._upstream_failed(channel)

    def _retransmit(self) -> None:
        """Sends again the UDP queries still unanswered after ``upstream_retransmit`` (the
        asyncio path; the Rust thread does its own): the same bytes, from the socket each
        first left from, to the server it went to."""
        for _token, channel, slot, payload, started in self.engine.retransmits(self.clock()):
            if self._pool is None:
                return
            if channel < ORIG_CHANNEL_BASE:
                server: tuple[str, int] | None = self.upstreams[channel]
            else:
                known = self._orig_by_channel.get(channel)
                server = known.server if known is not None else None
                if known is not None:
                    known.last_sent = time.monotonic()
            if server is not None:  # else a server no longer known: it times out as it would
                self._pool.sendto(slot, payload, server, started)

    def _check_routes(self) -> None:
        """Asks the kernel for a route to each configured upstream (a UDP ``connect`` on a
        throwaway socket: a route lookup, nothing sent). The query sockets are unconnected, so
        an upstream without a route is never fatal, at start or later: its queries cannot be
        sent and time out into SERVFAIL (fail closed). This check names it: logged once per
        outage, counted (``upstream_unreachable``), skipped by failover while another upstream
        is usable, checked again every UPSTREAM_RECHECK seconds; forwarding resumes by itself
        when a route appears."""
        now = time.monotonic()
        for channel, (host, port) in enumerate(self.upstreams):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    if self._mark:
                        probe.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
                    probe.connect((host, port))
            except OSError as e:
                self.stats.upstream_unreachable += 1
                if channel not in self._unroutable:
                    self._unroutable.add(channel)
                    log.warning(
                        "upstream %s:%d unreachable (%s): its queries get SERVFAIL until it is",
                        host, port, e.strerror or e,
                    )  # fmt: skip
                if len(self.upstreams) > 1:
                    self._upstream_down_until[channel] = now + UPSTREAM_RECHECK
                continue
            if channel in self._unroutable:
                self._unroutable.discard(channel)
                self._upstream_down_until[channel] = 0.0
                log.warning("upstream %s:%d reachable again", host, port)
        self._route_check_at = now + UPSTREAM_RECHECK if self._unroutable else 0.0
        self._choose_upstream()

    def _upstream_failed(self, channel: int) -> None:
        if not self._route_check_at:  # a route lost shows first as timeouts
            self._route_check_at = time.monotonic()
        if self._io is not None:  # answers since the last timeout: the failures were not in a row
            seen = self._io.answers(channel)
            if seen != self._io_answers[channel]:
                self._io_answers[channel] = seen
                self._upstream_failures[channel] = 0
        self._upstream_failures[channel] += 1
        if self._upstream_failures[channel] >= UPSTREAM_FAILURES and len(self.upstreams) > 1:
            if self._upstream_down_until[channel] <= time.monotonic():
                self.stats.upstream_failovers += 1
                host, port = self.upstreams[channel]
                log.warning(
                    "upstream %s:%d not answering; failing over for %.0fs",
                    host,
                    port,
                    UPSTREAM_RETRY,
                )
            self._upstream_down_until[channel] = time.monotonic() + UPSTREAM_RETRY
            self._upstream_failures[channel] = 0
            self._choose_upstream()

    async def _expirer(self) -> None:
        while True:
            await asyncio.sleep(self.config.expire_interval)
            changes = self.engine.expire(self.clock())
            if changes:
                self._queue_changes(changes)

    # -- logs ---------------------------------------------------------------------------------

    def _log_query(self, record: tuple[Any, ...]) -> None:
        when, endpoint, qname, qtype, verdict, rcode, upstream_ms, answers = record
        query_log.info(
            json.dumps(
                {
                    "time": round(when, 6),
                    "endpoint": endpoint,
                    "qname": qname,
                    "qtype": qtype,
                    "verdict": verdict,
                    "rcode": rcode,
                    "upstream_ms": upstream_ms,
                    "answers": answers,
                },
                separators=(",", ":"),
            )
        )
