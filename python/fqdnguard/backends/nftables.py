"""Enforcement in the Linux kernel with nftables, through libnftables in-process.

The ruleset lives in one table, ``inet fqdnguard``, and never needs flushing::

    table inet fqdnguard {
      map src4 { type ipv4_addr : verdict }          # endpoint address -> its chain
      map src6 { type ipv6_addr : verdict }
      chain egress {                                  # shared by both hooks
        ct state established,related accept           # live connections outlive their TTL
        ip saddr vmap @src4
        ip6 saddr vmap @src6
      }                                               # sources no policy restricts: untouched
      chain forward { type filter hook forward priority filter; policy accept; jump egress }
      chain output  { type filter hook output priority filter; policy accept; jump egress }
      chain antispoof {                               # reverse_path_check (the default)
        type filter hook prerouting priority raw; policy accept;
        ip saddr != 0.0.0.0 fib saddr . iif oif missing counter drop
        ip6 saddr != :: fib saddr . iif oif missing counter drop
      }
      chain ep_7 {                                    # one per restricted endpoint
        meta l4proto { tcp, udp } ip daddr 10.0.0.1 th dport 53 accept        # DNS to the proxy
        ip daddr @ep_7_f0_4 meta l4proto . th dport { tcp . 443 } accept        # toFQDNs rule 0
        ip6 daddr @ep_7_f0_6 meta l4proto . th dport { tcp . 443 } accept
        ip daddr @peer_3f2a_4 meta l4proto . th dport { udp . 53 } accept       # toEndpoints,
        ip6 daddr @peer_3f2a_6 meta l4proto . th dport { udp . 53 } accept      # toCIDR(Set)...
        counter drop
      }
      set ep_7_f0_4 { type ipv4_addr; flags timeout; }  # learned IPs, each with its own timeout
      set ep_7_f0_6 { type ipv6_addr; flags timeout; }
      set peer_3f2a_4 { type ipv4_addr; flags interval; elements = { 10.96.0.10, ... } }
      set peer_3f2a_6 { type ipv6_addr; flags interval; }    # one pair per rule, shared
    }

Sources: endpoints are known by their source address, so a pod sending with another's (or the
DNS server's) would get its policy, at the DNS proxy and in ``egress``. ``antispoof`` drops, before
anything else sees them (conntrack, interception, the proxy's sockets), packets whose source does
not route back through the interface they came in on (strict reverse path, as ``rp_filter=1``
does for IPv4 only). Packets from the unspecified address (DHCP, duplicate address detection)
are left alone: nothing can answer them. Loopback traffic always passes (the kernel's fib
expression treats it so). ``reverse_path_check=False`` leaves the chain out, for nodes with
asymmetric routing.

Ports: one address set per (endpoint, distinct port list of its ``toFQDNs`` rules), matched by a
rule that also checks protocol and destination port against the rule's ``toPorts`` (an anonymous
concatenated set). In the usual case an endpoint's ``toFQDNs`` rules share one port list, so each
learned IP is one element; when they differ, an IP goes into the sets of the rules whose selectors
match one of the names it was learned under (asked of the cache), exactly as ``egress_verdict``.

Peers: the addresses a rule's L3 selectors pick (``toEndpoints``' pods, ``toCIDR``,
``toCIDRSet`` with its excepts, whatever ``EgressPlan.peers`` lists) are in a pair of interval
sets named after the rule (a digest of its policy, spec and egress index), never inline: the
endpoints the rule applies to share them. Each CIDR minus its own excepts and each address are
intervals; overlapping ones are merged, touching ones stay apart (one address, one element), so a
set admits exactly what ``egress_verdict`` does. A policy update is a diff against what the kernel
holds: nothing when nothing changed, one netlink element transaction when only addresses did
(a peer pod's new IP rewrites no chain), else one nft text transaction with only the changed
chains, map entries, elements and the deletions.

Changes: one batch is one nftables transaction. The ruleset goes through libnftables as text
(``nft_run_cmd_from_buffer``); element batches go straight to the kernel as nf_tables netlink
messages (``ElementSocket``: NEWSETELEM/DELSETELEM between BATCH_BEGIN and BATCH_END), because
libnftables re-reads every set and chain of the table before each command, which made a batch's
cost grow with the number of endpoints. An element's timeout is its ``expires_at`` minus now (at
least 1 s). nftables cannot change the timeout of an existing element, so an extension (and a
removal, which must not fail when the kernel already timed the element out) is written ``add``
(tiny timeout, a no-op when present), ``delete``, ``add`` (new timeout): inside one transaction,
so the element is never absent.

Restart: ``start`` installs the table, sets and chains with ``add`` (idempotent) and replaces each
chain's rules with ``flush chain`` + rules, and each peer set's elements with ``flush set`` +
elements, in the same transaction; learned-IP sets are never flushed, so a restart neither opens
nor closes a window. The same whole install follows an update the kernel refused (what it holds
is then in doubt). ``reconcile`` then brings the sets to exactly the
live state. ``close`` leaves the ruleset in place (fail closed: the elements lapse on their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fqdnguard.backends import Backend, BackendError

__all__ = ["Libnftables", "NftError", "Nftables"]

log = logging.getLogger("fqdnguard.backend.nftables")

TABLE = "fqdnguard"
#: The names (presentation form, absolute) a `toFQDNs` selector can match: Cilium's regex for a
#: match-all selector (matchpattern.ToAnchoredRegexp); the others require it label by label.
SELECTABLE_NAME = re.compile(r"(?:[-a-zA-Z0-9_]+\.)+|\.")
FAMILY = "inet"
#: nft_ctx_output_set_flags: NFT_CTX_OUTPUT_JSON (libnftables.h).
_OUTPUT_JSON = 1 << 4
#: Batches with more elements than this go to a worker thread so the event loop keeps serving.
INLINE_ELEMENTS = 512
#: The reverse path check (see the module docstring): its chain, hook and rules.
ANTISPOOF = "antispoof"
ANTISPOOF_HOOK = "type filter hook prerouting priority raw; policy accept;"
ANTISPOOF_RULES = (
    "ip saddr != 0.0.0.0 fib saddr . iif oif missing counter drop",
    "ip6 saddr != :: fib saddr . iif oif missing counter drop",
)
_PROTOS = {"TCP": ("tcp",), "UDP": ("udp",), "SCTP": ("sctp",), "ANY": ("tcp", "udp", "sctp")}


class NftError(BackendError):
    """libnftables refused a command; the message is its error output."""


class Libnftables:
    """A minimal ctypes binding to libnftables.so.1: one context, text commands in, text or JSON
    out. Not thread-safe by itself; callers serialise (``Nftables`` holds a lock)."""

    def __init__(self, path: str | None = None) -> None:
        name = path or ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise BackendError(
                f"nftables backend: cannot load {name} ({e}); install the Debian package "
                "'libnftables1' (or your distribution's libnftables)"
            ) from None
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise BackendError("nftables backend: nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise BackendError("nftables backend: cannot buffer libnftables output")
        self._lib = lib
        self._ctx: int | None = ctx
        self._flags = lib.nft_ctx_output_get_flags(ctx)

    def run(self, script: str, json_output: bool = False) -> str:
        """Runs a script of nft commands as one transaction; returns the output (JSON text when
        ``json_output``). Raises :class:`NftError` with libnftables' message on failure."""
        if self._ctx is None:
            raise BackendError("nftables backend: the libnftables context is closed")
        lib, ctx = self._lib, self._ctx
        flags = self._flags | (_OUTPUT_JSON if json_output else 0)
        lib.nft_ctx_output_set_flags(ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(err.strip() or f"libnftables returned {rc}")
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


# -- set elements straight to the kernel -------------------------------------------------------
#
# libnftables fetches the table's sets and chains from the kernel before every command it runs
# (its cache), even for an ``add element`` into a set it is told by name: with 250 restricted
# endpoints (500 sets, 250 chains) that dump was ~90% of a transaction's cost and grew with the
# number of endpoints. Element batches need none of it: they go as nf_tables netlink messages
# (NEWSETELEM / DELSETELEM in one BATCH_BEGIN..BATCH_END transaction), whose cost depends only on
# the elements they carry. The ruleset itself (tables, sets, chains, rules) stays nft text.

_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10  # errors echo only the header of the failed message
_NETLINK_EXT_ACK = 11  # the kernel's own error text (extack)
_SO_SNDBUFFORCE = 32
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_CREATE = 0x1, 0x4, 0x400
_NLMSG_ERROR = 2
_NLM_F_ACK_TLVS = 0x200
_NLMSGERR_ATTR_MSG = 1
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NEWSETELEM = (_NFNL_SUBSYS_NFTABLES << 8) | 12
_DELSETELEM = (_NFNL_SUBSYS_NFTABLES << 8) | 14
_NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
_NLA_F_NESTED = 0x8000
# nft_set_elem_list_attributes, nft_list_attributes, nft_set_elem_attributes, nft_data_attributes
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS = 1, 2, 3
_LIST_ELEM = 1
_ELEM_KEY, _ELEM_TIMEOUT = 1, 4
_DATA_VALUE = 1
#: Elements per message: the nested element list's length is 16 bits (IPv6 elements ~48 bytes).
_CHUNK = 1024
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


def _key(ip: str) -> bytes:
    """The set key of an address (network order, as the kernel stores ipv4_addr/ipv6_addr)."""
    try:
        raw = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise NftError(f"not an IP address: {ip!r}") from None
    return _nla(_ELEM_KEY | _NLA_F_NESTED, _nla(_DATA_VALUE, raw))


def _element(key: bytes, timeout_ms: int | None) -> bytes:
    if timeout_ms is not None:
        key += _nla(_ELEM_TIMEOUT, struct.pack(">Q", timeout_ms))
    return _nla(_LIST_ELEM | _NLA_F_NESTED, key)


class ElementSocket:
    """Set-element transactions over a NETLINK_NETFILTER socket. One transaction per
    :meth:`send`: the kernel applies all of its messages or none. Not thread-safe by itself."""

    def __init__(self, family: str, table: str, timeout: float = 10.0) -> None:
        self._family = _NFPROTO[family]
        self._timeout = timeout
        self._table = _nla(_LIST_TABLE, table.encode() + b"\0")
        self._seq = int(time.time()) & 0x7FFFFFFF
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        except OSError as e:
            raise BackendError(
                f"nftables backend: cannot open a netfilter netlink socket: {e}"
            ) from None
        with contextlib.suppress(OSError):  # older kernels: full echo, no text; still works
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(timeout)
        self._sock: socket.socket | None = sock
        # netlink_sendmsg refuses a message longer than the (reported) send buffer minus 32.
        self._sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32

    def _msg(self, kind: int, flags: int, family: int, res_id: int, body: bytes) -> bytes:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        header = _NLMSG.pack(_NLMSG.size + _NFGEN.size + len(body), kind, flags, self._seq, 0)
        return header + _NFGEN.pack(family, 0, res_id) + body

    def send(self, batch: Sequence[tuple[int, str, list[bytes]]]) -> int:
        """Applies ``batch`` ((message type, set, encoded elements), in order) as one
        transaction; returns the number of messages. Raises :class:`NftError` naming the
        operation and set the kernel refused (nothing of the batch is then applied)."""
        if self._sock is None:
            raise BackendError("nftables backend: the netlink socket is closed")
        subsys = socket.htons(_NFNL_SUBSYS_NFTABLES)
        parts = [self._msg(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, 0, subsys, b"")]
        begin = self._seq
        pending: dict[int, str] = {}
        for kind, set_name, elements in batch:
            head = self._table + _nla(_LIST_SET, set_name.encode() + b"\0")
            flags = _NLM_F_REQUEST | _NLM_F_ACK | (_NLM_F_CREATE if kind == _NEWSETELEM else 0)
            for i in range(0, len(elements), _CHUNK):
                body = head + _nla(
                    _LIST_ELEMENTS | _NLA_F_NESTED, b"".join(elements[i : i + _CHUNK])
                )
                parts.append(self._msg(kind, flags, self._family, 0, body))
                op = "add" if kind == _NEWSETELEM else "delete"
                pending[self._seq] = f"{op} element {set_name}"
        parts.append(self._msg(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, 0, subsys, b""))
        count = len(pending)
        if not count:
            return 0
        data = b"".join(parts)
        if len(data) > self._sndbuf:  # a netlink message goes whole: grow the buffer (as nft)
            self._grow_sndbuf(len(data))
        self._sock.sendall(data)
        return self._acks(pending, begin, count)

    def _grow_sndbuf(self, size: int) -> None:
        assert self._sock is not None
        try:  # root may exceed net.core.wmem_max
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, size)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        self._sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32

    def _acks(self, pending: dict[int, str], begin: int, count: int) -> int:
        """Reads one answer per message (an ack, or the kernel's refusal)."""
        assert self._sock is not None
        errors: list[str] = []
        while pending:
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                if errors:
                    break
                raise NftError("netlink: no answer from the kernel") from None
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, flags, seq, _ = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    break
                if kind == _NLMSG_ERROR and (seq in pending or seq == begin):
                    what = pending.pop(seq, "transaction")
                    (code,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    if code:
                        reason = f"{os.strerror(-code)}{_extack(data, off, flags)}"
                        errors.append(f"netlink {what}: {reason}")
                        if seq == begin:  # refused whole (no permission): nothing else comes
                            pending.clear()
                off += (length + 3) & ~3
            if errors and pending:
                self._sock.settimeout(0.2)  # the kernel answers the rest, then aborts
        if errors:
            self._sock.settimeout(self._timeout)
            raise NftError("; ".join(errors))
        return count

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _extack(data: bytes, off: int, flags: int) -> str:
    """`` (the kernel's message)`` from an error's extack attributes, or ''."""
    if not flags & _NLM_F_ACK_TLVS:
        return ""
    length = _NLMSG.unpack_from(data, off)[0]
    pos, end = off + _NLMSG.size + 4 + _NLMSG.size, off + length
    while pos + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, pos)
        if n < 4:
            break
        if kind == _NLMSGERR_ATTR_MSG:
            text = data[pos + 4 : pos + n].rstrip(b"\0").decode(errors="replace")
            return f" ({text})"
        pos += (n + 3) & ~3
    return ""


# -- the ruleset from the policy ----------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _port_expr(ports: Any) -> str:
    """``meta l4proto . th dport { tcp . 443, udp . 53-54 }`` for a plan's ports ('' = all)."""
    if ports is None:
        return ""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for lo, hi, proto in ports:
        span = (0, 65535) if lo == 0 else (lo, max(lo, hi))
        for p in _PROTOS.get(proto, ()):
            ranges.setdefault(p, []).append(span)
    items: list[str] = []
    for proto in sorted(ranges):
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges[proto]):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        items += [f"{proto} . {lo}" if lo == hi else f"{proto} . {lo}-{hi}" for lo, hi in merged]
    if not items:  # the policy reader keeps only TCP/UDP/SCTP/ANY ranges: never "all" by accident
        raise BackendError(f"nftables backend: no enforceable protocol in ports {ports!r}")
    return "meta l4proto . th dport { " + ", ".join(items) + " }"


def _class_id(ports: Any) -> str:
    """A short stable name for a port list (so a set keeps its name across policy reloads)."""
    text = "all" if ports is None else repr(sorted(ports))
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# -- peer sets: the addresses of a rule's toEndpoints, toCIDR, toCIDRSet (and any other L3 peers)

#: Sorted, disjoint, closed intervals of addresses (as integers) of one family.
Intervals = tuple[tuple[int, int], ...]
_BITS = {4: 32, 6: 128}
#: nft_set_elem_attributes NFTA_SET_ELEM_FLAGS and its NFT_SET_ELEM_INTERVAL_END flag.
_ELEM_FLAGS, _INTERVAL_END = 3, 1


def _network(addr: str, bits: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network((addr, bits), strict=False)
    except ValueError as e:
        raise BackendError(f"nftables backend: not a CIDR: {addr}/{bits} ({e})") from None


def _minus(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b < lo or a > hi:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo - 1))
        if b > hi:
            out.append((hi + 1, b))
    return out


def _union(items: Iterable[tuple[int, int]]) -> Intervals:
    """Overlapping intervals merged; intervals that only touch stay apart, so that one address
    of a run of consecutive ones is still one element of its own (a small update)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(items):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def peer_intervals(peers: Any) -> dict[int, Intervals]:
    """What a rule's peers (``(addresses, CIDRs with their excepts)`` of an ``EgressPlan``)
    admit, per family: each address, and each CIDR minus its own excepts, as the policy's
    egress verdict decides (an except removes addresses from its CIDR only, not from another
    CIDR or address of the same rule)."""
    ips, cidrs = peers
    items: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for ip in ips:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            raise BackendError(f"nftables backend: not an IP address: {ip!r}") from None
        items[a.version].append((int(a), int(a)))
    for addr, bits, excepts in cidrs:
        net = _network(addr, bits)
        ranges = [(int(net.network_address), int(net.broadcast_address))]
        for ex_addr, ex_bits in excepts:
            ex = _network(ex_addr, ex_bits)
            if ex.version == net.version:
                ranges = _minus(ranges, int(ex.network_address), int(ex.broadcast_address))
        items[net.version].extend(ranges)
    return {f: _union(v) for f, v in items.items()}


def _address(family: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


def _interval_text(family: int, lo: int, hi: int) -> str:
    """An element of an interval set in nft syntax: ``10.0.0.1`` or ``10.0.0.0-10.95.255.255``."""
    a = _address(family, lo)
    return a if lo == hi else f"{a}-{_address(family, hi)}"


def _interval_elements(family: int, lo: int, hi: int) -> list[bytes]:
    """An interval as the kernel keeps it in a (non-concatenated) interval set: an element at
    its start, and one flagged as the end one past its last address (none when it runs to the
    family's last address). Start and end always travel in the same message (``_CHUNK`` is
    even, and only the last interval of a sorted set can lack its end)."""
    size = _BITS[family] // 8
    out = [
        _element(_nla(_ELEM_KEY | _NLA_F_NESTED, _nla(_DATA_VALUE, lo.to_bytes(size, "big"))), None)
    ]
    if hi + 1 < 1 << _BITS[family]:
        key = _nla(_ELEM_KEY | _NLA_F_NESTED, _nla(_DATA_VALUE, (hi + 1).to_bytes(size, "big")))
        out.append(
            _nla(
                _LIST_ELEM | _NLA_F_NESTED,
                key + _nla(_ELEM_FLAGS, struct.pack(">I", _INTERVAL_END)),
            )
        )
    return out


def _peer_base(rule: str) -> str:
    """The stable base name of a rule's peer sets (``peer_<digest>``; ``_4`` / ``_6`` follow)."""
    return "peer_" + hashlib.sha1(rule.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=16)
def _listen_rules(listen: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """DNS to the proxy's listen addresses, first in every endpoint's chain."""
    out: list[str] = []
    for host, port in listen:
        addr = ipaddress.ip_address(host)
        if addr.is_unspecified:
            dst = "fib daddr type local"
        else:
            dst = f"{'ip6' if addr.version == 6 else 'ip'} daddr {addr}"
        out.append(f"meta l4proto {{ tcp, udp }} {dst} th dport {port} accept")
    return tuple(out)


class _EndpointRules:
    """One restricted endpoint: its sources, its fqdn classes (port list -> selectors) and the
    rules of its chain."""

    def __init__(
        self, ep_id: int, sources: Sequence[str], plan: Any, peers: Sequence[tuple[str | None, Any]]
    ) -> None:
        from fqdnguard._core import PatternSet  # noqa: PLC0415

        self.id = ep_id
        self.sources = list(sources)
        self.chain = f"ep_{ep_id}"
        classes: dict[str, tuple[Any, list[tuple[bool, str]]]] = {}
        for ports, selectors in plan.fqdn:
            entry = classes.setdefault(_class_id(ports), (ports, []))
            entry[1].extend(selectors)
        self.classes: dict[str, tuple[Any, Any]] = {}
        #: Classes a bare `*` selects: every name matches them, no lookup needed.
        self._match_all: set[str] = set()
        for cid, (ports, selectors) in classes.items():
            ps = PatternSet()
            for is_pattern, text in selectors:
                (ps.add if is_pattern else ps.add_name)(text, 0)
                if is_pattern and text.rstrip(".") == "*":
                    self._match_all.add(cid)
            self.classes[cid] = (ports, ps)
        #: What decides which learned IP goes in which set: when it changes, they are re-sorted.
        self.fqdn_key = tuple((cid, tuple(sel)) for cid, (_, sel) in classes.items())
        #: Per other rule: the base name of its peer sets (None: any destination) and its ports.
        self.peers = list(peers)
        self._every = {f: tuple(self.set_name(c, f) for c in self.classes) for f in (4, 6)}

    def set_name(self, cid: str, family: int) -> str:
        return f"ep_{self.id}_{cid}_{family}"

    def sets(self) -> list[tuple[str, int]]:
        return [(self.set_name(c, f), f) for c in self.classes for f in (4, 6)]

    def classify(self, ip: str, names_for: Callable[..., list[str]] | None) -> tuple[str, ...]:
        """The sets ``ip`` belongs in: those of the `toFQDNs` rules whose selectors match a
        name it was learned under. The DNS rules may let a pod resolve names its `toFQDNs`
        rules do not select (`rules.dns: [{matchPattern: "*"}]` beside `toFQDNs: api.x.com` is
        the usual shape): such an address goes in no set. Without ``names_for``: every set of
        the family, which only removals may use (membership unknown)."""
        family = 6 if ":" in ip else 4
        if names_for is None:
            return self._every[family]
        # Cilium's toFQDNs selectors, `*` included, match only names of [-a-zA-Z0-9_] labels.
        names = [n for n in names_for(ip, self.id) if SELECTABLE_NAME.fullmatch(n)]
        if not names:
            return ()
        return tuple(
            self.set_name(cid, family)
            for cid, (_, ps) in self.classes.items()
            if cid in self._match_all or any(ps.matches(n) for n in names)
        )

    def rules(self, listen: Sequence[tuple[str, int]]) -> list[str]:
        out = list(_listen_rules(tuple(listen)))
        for cid, (ports, _) in self.classes.items():
            pe = _port_expr(ports)
            for family, match in ((4, "ip"), (6, "ip6")):
                out.append(f"{match} daddr @{self.set_name(cid, family)} {pe} accept")
        for base, ports in self.peers:
            pe = _port_expr(ports)
            if base is None:
                out.append(f"{pe} accept".strip())
                continue
            # Both families always, even with a set empty today: its first address is then an
            # element update, not a new rule.
            for family, match in ((4, "ip"), (6, "ip6")):
                out.append(f"{match} daddr @{base}_{family} {pe} accept")
        out.append("counter drop")
        return [" ".join(r.split()) for r in out]


class _Ops:
    """Element operations of one transaction, grouped by set, already encoded for netlink. A
    replacement or a removal that must not fail when the element is gone is ``add`` (1 s, a
    no-op when present), ``delete``, then ``add`` with the new timeout: the element is never
    absent in between."""

    def __init__(self) -> None:
        self.ensure: dict[str, list[bytes]] = {}
        self.delete: dict[str, list[bytes]] = {}
        self.add: dict[str, list[bytes]] = {}
        self.added = self.removed = 0

    @property
    def count(self) -> int:
        return self.added + self.removed

    def remove(self, set_name: str, ip: str) -> None:
        key = _key(ip)
        self.ensure.setdefault(set_name, []).append(_element(key, 1000))
        self.delete.setdefault(set_name, []).append(_element(key, None))
        self.removed += 1

    def put(self, set_name: str, ip: str, seconds: float, replace: bool) -> None:
        """``ip`` in ``set_name`` with ``seconds`` left (at least 1 s); ``replace`` when the
        kernel may already hold it (a plain add would keep the old timeout)."""
        key = _key(ip)
        if replace:
            self.ensure.setdefault(set_name, []).append(_element(key, 1000))
            self.delete.setdefault(set_name, []).append(_element(key, None))
        self.add.setdefault(set_name, []).append(_element(key, max(1000, int(seconds * 1000))))
        self.added += 1

    def batch(self) -> list[tuple[int, str, list[bytes]]]:
        """(message type, set, elements) in the order the transaction must apply them."""
        return (
            [(_NEWSETELEM, s, e) for s, e in self.ensure.items()]
            + [(_DELSETELEM, s, e) for s, e in self.delete.items()]
            + [(_NEWSETELEM, s, e) for s, e in self.add.items()]
        )


def _change_fields(c: Any) -> tuple[str, int, str, float | None]:
    """(kind, endpoint, ip, expires_at) of a Change object or a plain tuple."""
    if not isinstance(c, tuple):
        return c.kind, c.endpoint, c.ip, c.expires_at
    if len(c) == 4:
        return c[0], int(c[1]), str(c[2]), c[3]
    endpoint, ip, expires = c
    return "added", int(endpoint), str(ip), expires


class _Ruleset:
    """Everything the table holds besides the learned IPs, as text and intervals to compare."""

    def __init__(self, listen: list[tuple[str, int]]) -> None:
        self.listen = listen
        self.endpoints: dict[int, _EndpointRules] = {}
        #: Endpoint chain -> its rules.
        self.chains: dict[str, tuple[str, ...]] = {}
        #: src4 / src6 -> {source address: its endpoint's chain}.
        self.sources: dict[str, dict[str, str]] = {"src4": {}, "src6": {}}
        #: Learned-IP set -> family.
        self.fqdn_sets: dict[str, int] = {}
        #: Peer set (``peer_<digest>_<4|6>``) -> its elements; by base name, both families.
        self.peer_sets: dict[str, Intervals] = {}
        self.peer_content: dict[str, dict[int, Intervals]] = {}
        #: Per endpoint, what sorts its learned IPs into sets.
        self.fqdn_keys: dict[int, tuple[Any, ...]] = {}

    def add(self, ep: _EndpointRules) -> None:
        self.endpoints[ep.id] = ep
        self.chains[ep.chain] = tuple(ep.rules(self.listen))
        for ip in ep.sources:
            self.sources["src6" if ":" in ip else "src4"][ip] = ep.chain
        for set_name, family in ep.sets():
            self.fqdn_sets[set_name] = family
        self.fqdn_keys[ep.id] = ep.fqdn_key


class Nftables(Backend):
    """Programs ``inet fqdnguard``; see the module docstring for the ruleset."""

    name = "nftables"

    def __init__(
        self,
        *,
        library: str | None = None,
        table: str = TABLE,
        clock: Callable[[], float] = time.time,
        inline_elements: int = INLINE_ELEMENTS,
        reverse_path_check: bool = True,
    ) -> None:
        self.library = library
        self.reverse_path_check = reverse_path_check
        self.table = table
        self.clock = clock
        self.inline_elements = inline_elements
        self._nft: Libnftables | None = None
        self._elements_socket: ElementSocket | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._endpoints: dict[int, _EndpointRules] = {}
        #: The ruleset in force (installed, or to install at start).
        self._want = _Ruleset([])
        #: The kernel holds exactly ``_want`` (so an update may be a diff).
        self._exact = False
        self._names_for: Callable[..., list[str]] | None = None
        #: What the kernel was told: (endpoint, ip) -> (expires_at, the sets it is in).
        self._live: dict[tuple[int, str], tuple[float, tuple[str, ...]]] = {}
        #: The kernel's sets are known to hold exactly ``_live`` (fresh, or reconciled).
        self._synced = False
        self.transactions = 0

    # -- policy -----------------------------------------------------------------------------

    def set_policy(
        self,
        policy: Any,
        endpoints: Any,
        *,
        listen: Sequence[tuple[str, int]] = (),
        names_for: Callable[..., list[str]] | None = None,
    ) -> None:
        """Derives the ruleset from a policy and its endpoints (the proxy calls this on every
        policy swap); when started, brings the kernel to it in one transaction and moves the
        learned IPs into the sets the new policy gives them.

        Only what changed goes to the kernel: a reload that changes nothing sends nothing; one
        that changes only the addresses rules select (a peer pod's new address) is one element
        transaction on their peer sets; chains are rewritten only where their rules changed.
        If the kernel refuses, nothing of it is applied and the ruleset in force stays in force
        (raises :class:`NftError`); the next call then rewrites the whole table."""
        want = self._build(policy, endpoints, list(listen) if listen else self._want.listen)
        if names_for is not None:
            self._names_for = names_for
        if self._nft is None:
            self._want = want
            self._endpoints = want.endpoints
            return
        with self._lock:
            resort = want.fqdn_keys != self._want.fqdn_keys
            if self._exact:
                try:
                    self._update_locked(self._want, want)
                except NftError:
                    # Refused whole; what the kernel holds may differ from what we think it
                    # holds (someone else edited the table): the next call installs it all.
                    self._exact = False
                    raise
            else:
                self._install_locked(want)
            self._want = want
            self._endpoints = want.endpoints
            if resort:
                self._resync_locked(
                    {k: v[0] if isinstance(v, tuple) else v for k, v in self._live.items()}
                )

    def _build(self, policy: Any, endpoints: Any, listen: list[tuple[str, int]]) -> _Ruleset:
        """The ruleset for a policy. Every rule's peers get a pair of sets named after the rule
        (``EgressPlan.peer_rules``), shared by the endpoints it applies to; when two endpoints
        would see different addresses under one name (never from the policy reader), the
        second gets sets of its own."""
        want = _Ruleset(listen)
        content: dict[Any, dict[int, Intervals]] = {}
        # Endpoints with the same namespace and labels are selected alike: one plan for them
        # (each plan resolves the rules' selectors against the whole registry).
        plans: dict[Any, tuple[Any, list[tuple[str | None, Any]] | None]] = {}
        for ep in endpoints:
            if not ep.ips:
                continue
            key = getattr(ep, "key", None) or ep.id
            plan, peers_of = plans.get(key) or (policy.egress_plan(ep, endpoints), None)
            if plan is None:
                plans[key] = (None, None)
                continue
            if peers_of is not None:
                want.add(_EndpointRules(ep.id, ep.ips, plan, peers_of))
                continue
            rules = getattr(plan, "peer_rules", ())
            named = len(rules) == len(plan.peers)
            peers: list[tuple[str | None, Any]] = []
            for k, (p, ports) in enumerate(plan.peers):
                if p is None:
                    peers.append((None, ports))
                    continue
                found = content.get(p)
                if found is None:
                    found = content[p] = peer_intervals(p)
                rule = rules[k] if named else f"endpoint {ep.id} peers[{k}]"
                base = _peer_base(rule)
                shared = want.peer_content.get(base)
                if shared is not None and shared is not found and shared != found:
                    base = _peer_base(f"{rule} endpoint {ep.id} peers[{k}]")
                want.peer_content[base] = found
                peers.append((base, ports))
            plans[key] = (plan, peers if named else None)
            want.add(_EndpointRules(ep.id, ep.ips, plan, peers))
        for base, found in want.peer_content.items():
            for family in (4, 6):
                want.peer_sets[f"{base}_{family}"] = found[family]
        return want

    # -- the ruleset ------------------------------------------------------------------------

    def ruleset(self) -> str:
        """The whole table as ``nft -f`` text (what ``--dry-run`` prints)."""
        want = self._want
        lines = [f"table {FAMILY} {self.table} {{"]
        for name, kind in (("src4", "ipv4_addr"), ("src6", "ipv6_addr")):
            elems = [f"{ip} : goto {chain}" for ip, chain in want.sources[name].items()]
            lines.append(f"\tmap {name} {{\n\t\ttype {kind} : verdict")
            if elems:
                lines.append("\t\telements = { " + ", ".join(elems) + " }")
            lines.append("\t}")
        for set_name, family in want.fqdn_sets.items():
            lines.append(f"\tset {set_name} {{\n\t\ttype ipv{family}_addr\n\t\tflags timeout\n\t}}")
        for set_name, intervals in want.peer_sets.items():
            family = int(set_name[-1])
            lines.append(f"\tset {set_name} {{\n\t\ttype ipv{family}_addr\n\t\tflags interval")
            if intervals:
                items = ", ".join(_interval_text(family, lo, hi) for lo, hi in intervals)
                lines.append(f"\t\telements = {{ {items} }}")
            lines.append("\t}")
        lines.append("\tchain egress {")
        lines += [f"\t\t{r}" for r in self._egress_rules()]
        lines.append("\t}")
        for hook in ("forward", "output"):
            lines.append(
                f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;"
                "\n\t\tjump egress\n\t}"
            )
        if self.reverse_path_check:
            lines.append(f"\tchain {ANTISPOOF} {{\n\t\t{ANTISPOOF_HOOK}")
            lines += [f"\t\t{r}" for r in ANTISPOOF_RULES]
            lines.append("\t}")
        for chain, rules in want.chains.items():
            lines.append(f"\tchain {chain} {{")
            lines += [f"\t\t{r}" for r in rules]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _egress_rules() -> list[str]:
        return [
            "ct state established,related accept",
            "ip saddr vmap @src4",
            "ip6 saddr vmap @src6",
        ]

    def _peer_elements(self, verb: str, set_name: str, intervals: Iterable[tuple[int, int]]) -> str:
        family = int(set_name[-1])
        items = ", ".join(_interval_text(family, lo, hi) for lo, hi in intervals)
        return f"{verb} element {FAMILY} {self.table} {set_name} {{ {items} }}" if items else ""

    def _install_script(self, want: _Ruleset, existing: dict[str, set[str]]) -> str:
        """add (idempotent) every object, replace every chain's rules, the source maps and the
        peer sets' elements, delete the chains and sets no longer wanted: one transaction."""
        t = f"{FAMILY} {self.table}"
        cmds = [
            f"add table {t}",
            f"add map {t} src4 {{ type ipv4_addr : verdict; }}",
            f"add map {t} src6 {{ type ipv6_addr : verdict; }}",
            f"add chain {t} egress",
        ]
        for hook in ("forward", "output"):
            cmds.append(
                f"add chain {t} {hook} "
                f"{{ type filter hook {hook} priority filter; policy accept; }}"
            )
        if self.reverse_path_check:
            cmds += [
                f"add chain {t} {ANTISPOOF} {{ {ANTISPOOF_HOOK} }}",
                f"flush chain {t} {ANTISPOOF}",
                *(f"add rule {t} {ANTISPOOF} {r}" for r in ANTISPOOF_RULES),
            ]
        for chain in want.chains:
            cmds.append(f"add chain {t} {chain}")
        for set_name, family in want.fqdn_sets.items():
            cmds.append(f"add set {t} {set_name} {{ type ipv{family}_addr; flags timeout; }}")
        # Peer sets are refilled inside the transaction: no moment without their addresses.
        for set_name, intervals in want.peer_sets.items():
            cmds += [
                f"add set {t} {set_name} {{ type ipv{set_name[-1]}_addr; flags interval; }}",
                f"flush set {t} {set_name}",
            ]
            if intervals:
                cmds.append(self._peer_elements("add", set_name, intervals))
        # Rules and maps are replaced whole inside the transaction: no moment without them.
        cmds += [f"flush map {t} src4", f"flush map {t} src6", f"flush chain {t} egress"]
        cmds += [f"add rule {t} egress {r}" for r in self._egress_rules()]
        for hook in ("forward", "output"):
            cmds += [f"flush chain {t} {hook}", f"add rule {t} {hook} jump egress"]
        for chain, rules in want.chains.items():
            cmds.append(f"flush chain {t} {chain}")
            cmds += [f"add rule {t} {chain} {r}" for r in rules]
        for name in ("src4", "src6"):
            elems = [f"{ip} : goto {chain}" for ip, chain in want.sources[name].items()]
            if elems:
                cmds.append(f"add element {t} {name} {{ {', '.join(elems)} }}")
        wanted_chains = {"egress", "forward", "output"} | set(want.chains)
        if self.reverse_path_check:
            wanted_chains.add(ANTISPOOF)
        wanted_sets = {"src4", "src6"} | set(want.fqdn_sets) | set(want.peer_sets)
        stale_chains = sorted(existing.get("chain", set()) - wanted_chains)
        cmds += [f"flush chain {t} {c}" for c in stale_chains]
        cmds += [f"delete chain {t} {c}" for c in stale_chains]
        cmds += [f"delete set {t} {s}" for s in sorted(existing.get("set", set()) - wanted_sets)]
        return "\n".join(cmds) + "\n"

    def _update_locked(self, have: _Ruleset, want: _Ruleset) -> None:
        """Brings the kernel from ``have`` (what it holds) to ``want`` in one transaction, or
        sends nothing when they are the same. When only peer set elements differ, that is one
        netlink element transaction; otherwise one nft text transaction with the new sets and
        chains, the rewritten chains, the map and element changes and the deletions."""
        t = f"{FAMILY} {self.table}"
        created: list[str] = []
        changes: list[tuple[str, Intervals, Intervals]] = []  # (set, to delete, to add)
        for set_name, intervals in want.peer_sets.items():
            before = have.peer_sets.get(set_name)
            if before is None:
                created.append(
                    f"add set {t} {set_name} {{ type ipv{set_name[-1]}_addr; flags interval; }}"
                )
                changes.append((set_name, (), intervals))
            elif before != intervals:
                old, new = set(before), set(intervals)
                changes.append((set_name, tuple(sorted(old - new)), tuple(sorted(new - old))))
        created += [
            f"add set {t} {set_name} {{ type ipv{family}_addr; flags timeout; }}"
            for set_name, family in want.fqdn_sets.items()
            if set_name not in have.fqdn_sets
        ]
        chains: list[str] = []
        for chain, rules in want.chains.items():
            if have.chains.get(chain) == rules:
                continue
            if chain not in have.chains:
                created.append(f"add chain {t} {chain}")
            chains.append(f"flush chain {t} {chain}")
            chains += [f"add rule {t} {chain} {r}" for r in rules]
        sources: list[str] = []
        for name in ("src4", "src6"):
            old_map, new_map = have.sources[name], want.sources[name]
            gone = [ip for ip, c in old_map.items() if new_map.get(ip) != c]
            came = [f"{ip} : goto {c}" for ip, c in new_map.items() if old_map.get(ip) != c]
            if gone:
                sources.append(f"delete element {t} {name} {{ {', '.join(gone)} }}")
            if came:
                sources.append(f"add element {t} {name} {{ {', '.join(came)} }}")
        stale_chains = sorted(set(have.chains) - set(want.chains))
        stale_sets = sorted(
            (set(have.fqdn_sets) - set(want.fqdn_sets))
            | (set(have.peer_sets) - set(want.peer_sets))
        )
        if created or chains or sources or stale_chains or stale_sets:
            elements = [
                cmd
                for set_name, gone_, came_ in changes
                for cmd in (
                    self._peer_elements("delete", set_name, gone_),
                    self._peer_elements("add", set_name, came_),
                )
                if cmd
            ]
            cmds = [*created, *elements, *chains, *sources]
            cmds += [f"flush chain {t} {c}" for c in stale_chains]
            cmds += [f"delete chain {t} {c}" for c in stale_chains]
            cmds += [f"delete set {t} {s}" for s in stale_sets]
            self._run("\n".join(cmds) + "\n")
        elif changes:
            self._send_peer_elements(changes)

    def _send_peer_elements(self, changes: Sequence[tuple[str, Intervals, Intervals]]) -> None:
        """Peer set element changes as one netlink transaction: every deletion, then every
        addition (an interval may be replaced by ones that overlap it)."""
        assert self._elements_socket is not None
        deletions: list[tuple[int, str, list[bytes]]] = []
        additions: list[tuple[int, str, list[bytes]]] = []
        for set_name, gone, came in changes:
            family = int(set_name[-1])
            for kind, intervals, out in (
                (_DELSETELEM, gone, deletions),
                (_NEWSETELEM, came, additions),
            ):
                if intervals:
                    elems = [e for lo, hi in intervals for e in _interval_elements(family, lo, hi)]
                    out.append((kind, set_name, elems))
        if self._elements_socket.send(deletions + additions):
            self.transactions += 1

    def _list(self) -> dict[str, Any]:
        """The table as parsed JSON objects, by kind: {"set": {name: obj}, "chain": {...}}."""
        assert self._nft is not None
        try:
            text = self._nft.run(f"list table {FAMILY} {self.table}", json_output=True)
        except NftError as e:
            if "No such file or directory" in str(e):
                return {}
            raise
        out: dict[str, Any] = {}
        for item in json.loads(text).get("nftables", []):
            for kind in ("set", "map", "chain"):
                if kind in item:
                    out.setdefault("chain" if kind == "chain" else "set", {})[
                        item[kind]["name"]
                    ] = item[kind]
        return out

    def _install(self) -> None:
        with self._lock:
            self._install_locked(self._want)

    def _install_locked(self, want: _Ruleset) -> None:
        """The whole table, whatever the kernel holds (start, or after a refused update)."""
        existing = {k: set(v) for k, v in self._list().items()}
        self._run(self._install_script(want, existing))
        self._exact = True

    def _run(self, script: str) -> None:
        assert self._nft is not None
        self._nft.run(script)
        self.transactions += 1

    def _send(self, ops: _Ops) -> None:
        """One element transaction (netlink; see :class:`ElementSocket`)."""
        assert self._elements_socket is not None
        if self._elements_socket.send(ops.batch()):
            self.transactions += 1

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, *, keep: bool = False) -> None:
        """Loads libnftables, checks permission and installs the ruleset; any failure is a
        BackendError naming the cause (never a silently unenforced start). ``keep``: no policy
        is in force yet (a proxy that could not read its state): a table already there is left
        as it is (its endpoints stay restricted) until :meth:`set_policy` brings a policy."""
        if self._nft is not None:
            return
        self._nft = Libnftables(self.library)
        try:
            if keep and self._list():
                log.warning(
                    "nftables: no policy in force: table %s %s left as it is until one arrives",
                    FAMILY,
                    self.table,
                )
            else:
                self._install()
        except NftError as e:
            self._nft.close()
            self._nft = None
            hint = ""
            if "Operation not permitted" in str(e):
                hint = " (needs root or CAP_NET_ADMIN in this network namespace)"
            raise BackendError(
                f"nftables backend: cannot install table {self.table}{hint}: {e}"
            ) from None
        try:
            self._elements_socket = ElementSocket(FAMILY, self.table)
        except BackendError:
            self._nft.close()
            self._nft = None
            raise
        with self._lock:
            self._synced = not any(self._elements().values())
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fqdnguard-nft")
        log.info(
            "nftables: table %s %s installed (%d restricted endpoints)",
            FAMILY,
            self.table,
            len(self._want.endpoints),
        )

    async def close(self) -> None:
        """Leaves the ruleset in place (elements lapse on their own) and frees the context."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            if self._nft is not None:
                self._nft.close()
                self._nft = None
            if self._elements_socket is not None:
                self._elements_socket.close()
                self._elements_socket = None

    def remove_table(self) -> None:
        """Deletes the whole table (uninstall; tests). Not part of a normal shutdown."""
        nft = self._nft or Libnftables(self.library)
        with self._lock, contextlib.suppress(NftError):
            nft.run(f"delete table {FAMILY} {self.table}")
        if nft is not self._nft:
            nft.close()

    # -- changes ----------------------------------------------------------------------------

    async def apply(self, changes: Sequence[Any]) -> None:
        if self._nft is None:
            raise BackendError("nftables backend: apply before start")
        ops = self._changes(changes)
        if not ops.count:
            return
        if ops.count > self.inline_elements and self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._send_locked, ops)
        else:
            self._send_locked(ops)

    def _send_locked(self, ops: _Ops) -> None:
        with self._lock:
            self._send(ops)

    def _changes(self, changes: Iterable[Any]) -> _Ops:
        """The transaction for a batch, and its number of element operations. Records what the
        kernel holds as if it succeeded (a failed batch is logged by the proxy; the next
        refresh or reconcile repairs it)."""
        now = self.clock()
        final: dict[tuple[int, str], tuple[str, float | None]] = {}
        for c in changes:
            kind, endpoint, ip, expires = _change_fields(c)
            previous = final.get((endpoint, ip))
            if previous is not None and previous[0] != "removed" and kind == "extended":
                kind = previous[0]  # added then extended in one batch: still an addition
            final[(endpoint, ip)] = (kind, expires)
        ops = _Ops()
        live, endpoints, names_for, synced = (
            self._live,
            self._endpoints,
            self._names_for,
            self._synced,
        )
        for key, (kind, expires) in final.items():
            endpoint, ip = key
            ep = endpoints.get(endpoint)
            if ep is None:
                # Not restricted: nothing to program, but remembered, so that the sets of a
                # policy that restricts it later get what it learned meanwhile.
                if kind == "removed":
                    live.pop(key, None)
                else:
                    live[key] = (expires or now, ())
                continue
            before = live.get(key)
            if kind == "removed":
                live.pop(key, None)
                # Unknown membership (programmed before a restart): every set of the family.
                for s in before[1] if before else ep.classify(ip, None):
                    ops.remove(s, ip)
                continue
            sets = ep.classify(ip, names_for)
            seconds = (expires or now) - now
            # Surely new to the kernel: a plain add (on an element the kernel already has, add
            # would be a no-op and keep the old timeout).
            replace = not (before is None and synced and kind == "added")
            for s in before[1] if before and replace else ():
                if s not in sets:
                    ops.remove(s, ip)
            for s in sets:
                ops.put(s, ip, seconds, replace)
            live[key] = (expires or now, sets)
        return ops

    async def reconcile(self, current: Sequence[Any], *, prune: bool = True) -> None:
        """Brings the sets to ``current`` (every live (endpoint, ip, expires_at)): adds what is
        missing, refreshes timeouts that fell below half of what they should be, and with
        ``prune`` deletes what is stale; never flushes.

        ``prune=False`` is for taking over from a proxy that is still serving: what it added
        after saving the state this one started from is in the kernel but not in ``current``.
        Those elements stay (they lapse on their own timeouts) and are tracked as live."""
        if self._nft is None:
            raise BackendError("nftables backend: reconcile before start")
        live = {}
        for c in current:
            kind, endpoint, ip, expires = _change_fields(c)
            if kind != "removed":
                live[(endpoint, ip)] = expires
        with self._lock:
            self._resync_locked(live, prune=prune)

    def _resync(self, live: dict[tuple[int, str], Any]) -> None:
        with self._lock:
            self._resync_locked({k: v[0] if isinstance(v, tuple) else v for k, v in live.items()})

    def _resync_locked(
        self, live: dict[tuple[int, str], float | None], *, prune: bool = True
    ) -> None:
        now = self.clock()
        want: dict[str, dict[str, float]] = {}
        before, self._live = self._live, {}
        for (endpoint, ip), expires in live.items():
            ep = self._endpoints.get(endpoint)
            if expires is not None and expires <= now:
                continue
            if ep is None:  # unrestricted now; kept for a policy that restricts it again
                self._live[(endpoint, ip)] = (expires or now, ())
                continue
            sets = tuple(ep.classify(ip, self._names_for))
            known = before.get((endpoint, ip))
            if not sets and known and self._names_for and not self._names_for(ip, endpoint):
                # Learned by a proxy this one took over from (no names here yet): it keeps the
                # sets it was found in that the policy still has, until adopted or lapsed.
                have_sets = {name for name, _ in ep.sets()}
                sets = tuple(s for s in known[1] if s in have_sets)
            self._live[(endpoint, ip)] = (expires or now, sets)
            for s in sets:
                want.setdefault(s, {})[ip] = expires or now
        have = self._elements()
        if not prune:
            self._adopt_unwanted(want, have, now)
        ops = _Ops()
        for s in set(want) | set(have):
            wanted, present = want.get(s, {}), have.get(s, {})
            for ip in present.keys() - wanted.keys() if prune else ():
                ops.remove(s, ip)
            for ip, expires in wanted.items():
                remaining = expires - now
                if ip not in present:
                    ops.put(s, ip, remaining, replace=False)
                elif present[ip] < remaining / 2:
                    ops.put(s, ip, remaining, replace=True)
        if ops.count:
            self._send(ops)
        self._synced = True
        log.info(
            "nftables: reconciled %d entries (%d added, %d removed)",
            len(self._live),
            ops.added,
            ops.removed,
        )

    def _adopt_unwanted(
        self, want: dict[str, dict[str, float]], have: dict[str, dict[str, float]], now: float
    ) -> None:
        """Records in ``_live`` the kernel's elements that ``want`` lacks, so ``_live`` keeps
        describing the kernel (a later addition of one of them then replaces its timeout)."""
        owner = {name: ep.id for ep in self._endpoints.values() for name, _ in ep.sets()}
        for s, present in have.items():
            endpoint = owner.get(s)
            if endpoint is None:
                continue  # a set of an endpoint the policy no longer restricts
            for ip, left in present.items():
                if ip in want.get(s, {}):
                    continue
                expires, sets = self._live.get((endpoint, ip), (now, ()))
                self._live[(endpoint, ip)] = (max(expires, now + left), (*sets, s))

    def _elements(self) -> dict[str, dict[str, float]]:
        """Every element of our address sets: set -> {ip: seconds left}."""
        out: dict[str, dict[str, float]] = {}
        for name, obj in self._list().get("set", {}).items():
            if not name.startswith("ep_") or "map" in obj:
                continue
            elems = out.setdefault(name, {})
            for e in obj.get("elem", []):
                if isinstance(e, dict) and "elem" in e:
                    elems[str(e["elem"]["val"])] = float(e["elem"].get("expires", 0))
                elif isinstance(e, str):
                    elems[e] = 0.0
        return out

    def elements(self) -> dict[str, dict[str, float]]:
        """The address sets as the kernel holds them: set name -> {ip: seconds left}."""
        if self._nft is None:
            raise BackendError("nftables backend: not started")
        with self._lock:
            return self._elements()
