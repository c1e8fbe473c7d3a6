"""The Python peer: the same proxy job done the ordinary Python way, with dnspython.

Parses each query with dnspython, finds the endpoint by source IP, matches the name against the
endpoint's patterns compiled into one regex alternation (as Cilium compiles a selector), forwards
allowed queries with a fresh id, and on the answer follows the CNAME chain, records the IPs in a
dict cache with their expiry, and re-serialises the answer with the client's id. Denied queries
get REFUSED. Usage: pyproxy.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT POLICY_JSON

POLICY_JSON: {"endpoints": {"ip": endpoint_id}, "patterns": {endpoint_id: [matchPattern, ...]}}
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corpus import cilium_regex


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: PyProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy.answer(data)


class PyProxy(asyncio.DatagramProtocol):
    def __init__(self, policy: dict[str, dict[str, object]]) -> None:
        self.endpoints = {ip: str(ep) for ip, ep in policy["endpoints"].items()}
        self.rules = {
            str(ep): re.compile("^(?:" + "|".join(cilium_regex(p) for p in pats) + ")$")  # type: ignore[attr-defined]
            for ep, pats in policy["patterns"].items()
        }
        self.pending: dict[int, tuple[tuple[str, int], dns.message.Message, str]] = {}
        self.cache: dict[str, dict[str, dict[str, float]]] = {}
        self.client: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]  # uvloop's UDP transport class

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.client is not None and self.upstream is not None
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        endpoint = self.endpoints.get(addr[0])
        qname = query.question[0].name.to_text().lower() if query.question else ""
        rule = self.rules.get(endpoint) if endpoint is not None else None
        if endpoint is None or rule is None or not rule.match(qname):
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.REFUSED)
            self.client.sendto(reply.to_wire(), addr)
            return
        new_id = secrets.randbits(16)
        orig = query.id
        query.id = new_id
        self.pending[new_id] = (addr, query, endpoint)
        self.upstream.sendto(query.to_wire())
        query.id = orig

    def answer(self, data: bytes) -> None:
        try:
            msg = dns.message.from_wire(data)
        except Exception:
            return
        entry = self.pending.pop(msg.id, None)
        if entry is None or self.client is None:
            return
        addr, query, endpoint = entry
        if msg.question != query.question:
            return
        now = time.time()
        name = query.question[0].name
        ttl = 1 << 31
        for _ in range(16):
            cname = None
            for rrset in msg.answer:
                if rrset.name != name:
                    continue
                ttl_here = min(ttl, rrset.ttl)
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    ips = self.cache.setdefault(endpoint, {}).setdefault(
                        query.question[0].name.to_text(), {}
                    )
                    for rd in rrset:
                        ips[rd.address] = max(ips.get(rd.address, 0.0), now + ttl_here)
                elif rrset.rdtype == dns.rdatatype.CNAME:
                    cname, ttl = rrset[0].target, ttl_here
            if cname is None:
                break
            name = cname
        msg.id = query.id
        self.client.sendto(msg.to_wire(), addr)


async def main(listen: tuple[str, int], upstream: tuple[str, int], policy_path: str) -> None:
    with open(policy_path) as f:
        policy = json.load(f)
    loop = asyncio.get_running_loop()
    proxy = PyProxy(policy)
    await loop.create_datagram_endpoint(lambda: proxy, local_addr=listen)
    up, _ = await loop.create_datagram_endpoint(lambda: Upstream(proxy), remote_addr=upstream)
    proxy.upstream = up
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


if __name__ == "__main__":
    a = sys.argv[1:]
    uvloop.run(main((a[0], int(a[1])), (a[2], int(a[3])), a[4]))
