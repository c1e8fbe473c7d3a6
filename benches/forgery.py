"""Forged answers per success: an off-path sender against a pending query (RFC 5452).

The attacker runs a name's server, so it sees the source port of one query of the proxy (a
probe for its own name). It then makes 3,000 clients ask one allowed name whose server is slow
(here: never answers), and floods the port it saw with answers for that name, random ids, its
own address in them, from the real server's address and port (what spoofing gives it). It counts
the packets until the proxy's cache holds its address, or gives up at a cap.

Configurations, side by side in one run (the same proxy code, options changed):
  one socket    upstream_sockets 1, dns0x20 off: every query leaves from the port it saw
  ports         upstream_sockets 1024 (each query from one drawn at random), dns0x20 off
  default       upstream_sockets 1024 and dns0x20 (as shipped)
Identical questions in flight are merged in all three (3,000 clients, one upstream query).

Expected packets per success, random ids at one port: 65,536 / (upstream queries pending for
the name on that port). Before merging, 3,000 were pending: ~22 (the hardening report measured
8-24). Merged: 65,536 x (1,024 with the pool: the chance the query left from the port seen) x
2^letters with 0x20. A configuration that never succeeded prints "> N" (the packets it sent).

    python benches/forgery.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fqdnguard import Endpoints, Policy, Proxy
from fqdnguard.config import ProxyConfig
from fqdnguard.testing import free_port

from tests.proxy_fixtures import ENDPOINTS, POD_IP, POLICY, SECOND_UPSTREAM_IP

FORGED = "6.6.6.6"
NAME = "slow.example.com"
CONFIGS: dict[str, dict[str, Any]] = {
    "one socket": {"upstream_sockets": 1, "dns0x20": False},
    "ports": {"upstream_sockets": 1024, "dns0x20": False},
    "default": {},
}


class Upstream(asyncio.DatagramProtocol):
    """Answers the attacker's probe (and remembers its source port); never answers NAME."""

    def __init__(self) -> None:
        self.probe_port: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name
        if name.to_text().lower().startswith("probe"):
            self.probe_port = addr[1]
            answer = dns.message.make_response(query)
            answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
            self.transport.sendto(answer.to_wire(), addr)


async def one_round(config: dict[str, Any], clients: int, cap: int) -> int | None:
    """Packets sent until the forged address was accepted; None when `cap` was reached."""
    loop = asyncio.get_running_loop()
    up_port = free_port(SECOND_UPSTREAM_IP)
    transport, upstream = await loop.create_datagram_endpoint(
        Upstream, local_addr=(SECOND_UPSTREAM_IP, up_port)
    )
    port = free_port()
    known = set(ProxyConfig.OPTIONS)
    options = {k: v for k, v in config.items() if k in known}
    cfg = ProxyConfig(
        listen=[("127.0.0.1", port)], log_queries="none", upstream_timeout=30.0, **options
    )
    endpoints = Endpoints.from_yaml(ENDPOINTS)
    policy = Policy.from_yaml(POLICY, endpoints=endpoints)
    proxy = Proxy(policy, endpoints, upstreams=[f"{SECOND_UPSTREAM_IP}:{up_port}"], config=cfg)
    await proxy.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((POD_IP, 0))
    client.setblocking(False)
    try:
        client.sendto(
            dns.message.make_query("probe.example.com", "A").to_wire(), ("127.0.0.1", port)
        )
        for _ in range(200):
            if upstream.probe_port is not None:
                break
            await asyncio.sleep(0.005)
        assert upstream.probe_port is not None, "the probe never reached the upstream"
        wire = bytearray(dns.message.make_query(NAME, "A").to_wire())
        for i in range(clients):  # the clients' identical questions, each with its own id
            wire[0:2] = (i & 0xFFFF).to_bytes(2, "big")
            client.sendto(bytes(wire), ("127.0.0.1", port))
            if i % 200 == 199:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        forged = dns.message.make_response(dns.message.make_query(NAME, "A"))
        forged.answer.append(dns.rrset.from_text(NAME + ".", 86400, "IN", "A", FORGED))
        packet = bytearray(forged.to_wire())
        target = ("127.0.0.1", upstream.probe_port)
        sent = 0
        while sent < cap:
            for _ in range(8):
                packet[0:2] = random.getrandbits(16).to_bytes(2, "big")
                upstream.transport.sendto(bytes(packet), target)
                sent += 1
            await asyncio.sleep(0.0002)
            if proxy.cache.names_for(FORGED):
                return sent
        await asyncio.sleep(0.1)
        return sent if proxy.cache.names_for(FORGED) else None
    finally:
        client.close()
        await proxy.stop(timeout=0.1)
        transport.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, config in CONFIGS.items():
        counts: list[int] = []
        sent_total = 0
        for _ in range(args.rounds):
            got = await one_round(config, args.clients, args.cap)
            if got is None:
                sent_total += args.cap
            else:
                counts.append(got)
                sent_total += got
        out[name] = {"rounds": args.rounds, "successes": len(counts), "packets": sent_total}
        if counts:
            counts.sort()
            out[name]["median_packets_per_success"] = counts[len(counts) // 2]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a lower cap (CI)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--cap", type=int, default=200_000, help="packets per round at most")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.cap = 2, 100_000
    results = uvloop.run(main_async(args))
    print(f"\nforged answers per success ({args.clients} clients asking {NAME}, one port seen)")
    for name, r in results.items():
        if r["successes"]:
            per = f"{r['median_packets_per_success']:,} (median)"
        else:
            per = f"> {r['packets']:,} (none accepted)"
        print(f"  {name:<11} {r['successes']}/{r['rounds']} rounds  packets per success: {per}")
    ok = results["default"]["successes"] == 0
    print(f"  {'OK  ' if ok else 'MISS'}  no forged answer accepted with the defaults")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
