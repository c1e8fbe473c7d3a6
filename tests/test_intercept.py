"""Interception pieces that need no namespace: which sources are policed, the ruleset, the
original-destination parsing, the options, and the proxy's use of an original destination
(verdict on the server asked, forwarded there or to the override) against a real Knot.

The kernel side (TPROXY, policy routing, transparent sockets) is in test_e2e_intercept_netns.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard import proxy as proxy_mod
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.intercept import Interceptor, InterceptSettings, policed_sources
from fqdnguard.metrics import registry_for
from fqdnguard.proxy import (
    IP_RECVORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    Proxy,
    _Client,
    _TransparentUdp,
    original_destination,
)
from fqdnguard.testing import KnotServer, free_port
from prometheus_client import generate_latest

from tests.proxy_fixtures import POD_IP, STRANGER_IP, UPSTREAM_IP, run

ENDPOINTS = """
endpoints:
  - {name: dns-pod, namespace: default, ips: [10.0.0.2, "fd00::2"], labels: {app: dns-pod}}
  - {name: l4-pod, namespace: default, ips: [10.0.0.3], labels: {app: l4-pod}}
  - {name: free, namespace: default, ips: [10.0.0.4], labels: {app: free}}
  - {name: alt-port, namespace: default, ips: [10.0.0.5], labels: {app: alt-port}}
  - {name: kube-dns, namespace: kube-system, ips: [10.96.0.10], labels: {k8s-app: kube-dns}}
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: dns-pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: l4-pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts: [{ports: [{port: "53", protocol: ANY}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: alt-port, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: alt-port}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "5353", protocol: UDP}, {port: "8053", protocol: TCP}]
          rules: {dns: [{matchPattern: "*"}]}
"""


def test_only_endpoints_a_policy_with_dns_rules_selects_are_policed() -> None:
    endpoints = Endpoints.from_yaml(ENDPOINTS)
    policy = Policy.from_yaml(POLICY, endpoints=endpoints)
    # l4-pod is restricted too, but without DNS rules: its DNS is not intercepted (as Cilium).
    # Port 53 always; alt-port's DNS rules are on 5353 and 8053: DNS there is policed too (a
    # pod must not reach kube-dns:5353 around the proxy because the rule is not on port 53).
    assert policed_sources(policy, endpoints) == (
        ["10.0.0.2 . 53", "10.0.0.5 . 53", "10.0.0.5 . 5353", "10.0.0.5 . 8053"],
        ["fd00::2 . 53"],
    )
    assert policy.dns_ports(endpoints.by_ip("10.0.0.3")) == set()  # type: ignore[arg-type]


def test_ruleset_names_the_sources_port_marks_and_routing() -> None:
    interceptor = Interceptor(
        InterceptSettings(port=10099, tproxy_mark=0x40, proxy_mark=0x80),
        exclude=[("10.0.0.1", 53), ("::", 5353)],
    )
    interceptor.sources = (["10.0.0.2 . 53", "10.0.0.5 . 5353"], ["fd00::2 . 53"])
    text = interceptor.ruleset()
    assert text.startswith("table inet fqdnguard_intercept {")
    assert "type ipv4_addr . inet_service" in text and "type ipv6_addr . inet_service" in text
    assert "elements = { 10.0.0.2 . 53, 10.0.0.5 . 5353 }" in text
    assert "elements = { fd00::2 . 53 }" in text
    assert "meta mark & 0x80 == 0x80 return" in text
    # The proxy's own listen addresses are never intercepted (no loop).
    assert "ip daddr 10.0.0.1 meta l4proto { tcp, udp } th dport 53 return" in text
    assert "fib daddr type local meta l4proto { tcp, udp } th dport 5353 return" in text
    assert (
        "meta l4proto { tcp, udp } ip saddr . th dport @policed4 tproxy ip to 127.0.0.1:10099 "
        "meta mark set meta mark | 0x40 accept"
    ) in text
    assert "ip6 saddr . th dport @policed6 tproxy ip6 to [::1]:10099" in text
    assert "meta l4proto { tcp, udp } ip saddr . th dport @policed4 counter drop" in text
    assert "# ip -4 rule add fwmark 0x40/0x40 lookup 153 priority 153" in text
    assert "# ip -6 route replace local ::/0 dev lo table 153" in text
    # The mark skip comes first, the drops last (after tproxy found no listener).
    rules = interceptor.rules()
    assert rules[0].endswith("return") and rules[-1].endswith("drop")


def test_original_destination_from_control_messages() -> None:
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 53, socket.inet_aton("10.96.0.10"))
    v4 = struct.pack("=H", socket.AF_INET) + v4[2:]  # sin_family is host order
    assert original_destination([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, v4)]) == (
        "10.96.0.10",
        53,
    )
    addr6 = socket.inet_pton(socket.AF_INET6, "fd96::10")
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI16sI", 5353, 0, addr6, 0)
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, v6)]) == (
        "fd96::10",
        5353,
    )
    # Other control messages, or a truncated one: no destination (the query is not answered).
    assert original_destination([(socket.IPPROTO_IP, 8, v4)]) is None
    assert original_destination([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, v4[:6])]) is None
    assert original_destination([]) is None


def test_intercept_options_are_checked() -> None:
    assert ProxyConfig.from_mapping({"intercept": "yes", "intercept-port": 10054}).intercept
    with pytest.raises(ConfigError, match="intercept_port"):
        ProxyConfig(intercept_port=70000)
    with pytest.raises(ConfigError, match=r"config: intercept: 'maybe' is not true or false"):
        ProxyConfig.from_mapping({"intercept": "maybe"})


def test_dry_run_prints_the_interception_table(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "e.yaml").write_text(ENDPOINTS)
    out = subprocess.run(
        [sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables", "--dry-run",
         "--intercept", "--intercept-port", "10077",
         "--policy", str(tmp_path / "p.yaml"), "--endpoints", str(tmp_path / "e.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("table inet fqdnguard {")
    assert "table inet fqdnguard_intercept {" in out
    assert "elements = { 10.0.0.2 . 53, 10.0.0.5 . 53, 10.0.0.5 . 5353" in out
    assert "127.0.0.1:10077" in out


# -- the proxy given original destinations (as the transparent listeners pass them) ------------

LOOP_ENDPOINTS = f"""
endpoints:
  - {{name: kube-dns, namespace: kube-system, ips: [{UPSTREAM_IP}], labels: {{k8s-app: kube-dns}}}}
  - {{name: pod, namespace: default, ips: [{POD_IP}], labels: {{app: pod}}}}
"""

LOOP_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: pod, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: pod}}}}
  egress:
    - toEndpoints:
        - matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}
      toPorts:
        - ports: [{{port: "{port}", protocol: ANY}}]
          rules: {{dns: [{{matchPattern: "*.example.com"}}]}}
"""


class Sink:
    """The transport half ``_Client`` uses: records what is sent and to whom."""

    def __init__(self) -> None:
        self.sent: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def is_closing(self) -> bool:
        return False

    def sendto(self, payload: bytes, addr: Any) -> None:
        self.sent.put_nowait((payload, addr))


def _proxy(knot: KnotServer, override: bool) -> Proxy:
    endpoints = Endpoints.from_yaml(LOOP_ENDPOINTS)
    policy = Policy.from_yaml(LOOP_POLICY.format(port=knot.port), endpoints=endpoints)
    port = free_port()
    proxy = Proxy(
        policy,
        endpoints,
        upstreams=[f"{UPSTREAM_IP}:{knot.port}"],
        listen=[f"127.0.0.1:{port}"],
        # Queries are handed to the transparent path directly, without interception set up, so
        # the proxy must have Python's own upstream sockets (it makes them with --intercept).
        config=ProxyConfig(log_queries="none", udp_io="asyncio"),
    )
    proxy._override = override  # as when no --upstream is configured
    return proxy


async def _ask(proxy: Proxy, name: str, orig: tuple[str, int]) -> dns.message.Message:
    sink = Sink()
    query = dns.message.make_query(name, "A")
    proxy._on_query(query.to_wire(), _Client(sink, (POD_IP, 4242)), POD_IP, False, orig)
    payload, addr = await asyncio.wait_for(sink.sent.get(), 3)
    assert addr == (POD_IP, 4242)
    answer = dns.message.from_wire(payload)
    assert answer.id == query.id
    return answer


@pytest.mark.parametrize("override", [False, True], ids=["to-the-server-asked", "override"])
def test_the_verdict_sees_the_server_and_port_asked(knot: KnotServer, override: bool) -> None:
    async def scenario() -> None:
        proxy = _proxy(knot, override)
        await proxy.start()
        try:
            answer = await _ask(proxy, "www.example.com", (UPSTREAM_IP, knot.port))
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer
            # The same server on another port, or a server toEndpoints does not admit: refused,
            # though the upstream it would go to (with an override) is admitted.
            for orig in ((UPSTREAM_IP, knot.port + 1), (STRANGER_IP, knot.port)):
                assert (await _ask(proxy, "www.example.com", orig)).rcode() == dns.rcode.REFUSED
            # The server asked is the configured upstream: its answers are matched on that
            # upstream's channel (one address, one channel), with or without the override.
            assert [u.channel for u in proxy._orig_upstreams.values()] == []
        finally:
            await proxy.stop()

    run(scenario)


# -- resources an untrusted pod can make the proxy hold -----------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="transparent sockets need root")

#: Servers "asked" in these tests: addresses of nobody (TEST-NET-1), which transparent sockets
#: may still answer from.
CIDR_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: pod, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: pod}}}}
  egress:
    - toCIDR: [{cidr}]
      toPorts:
        - ports: [{ports}]
          rules: {{dns: [{{matchPattern: "*.example.com"}}]}}
"""


class QueuedSocket:
    """Stands in for the transparent listener's socket: hands out datagrams as TPROXY would,
    with their IP_ORIGDSTADDR."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.queue: list[tuple[bytes, list[tuple[int, int, bytes]], int, Any]] = []

    def push(self, data: bytes, orig: tuple[str, int], src: tuple[str, int]) -> None:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack(
            "!H4s8x", orig[1], socket.inet_aton(orig[0])
        )
        self.queue.append((data, [(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, raw)], 0, src))

    def recvmsg(self, bufsize: int, ancbufsize: int) -> Any:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


def _cidr_proxy(
    knot: KnotServer,
    cidr: str,
    override: bool,
    ports: tuple[int, ...] = (53,),
    upstream: str | None = None,
) -> Proxy:
    endpoints = Endpoints.from_yaml(LOOP_ENDPOINTS)
    entries = ", ".join(f'{{port: "{port}", protocol: ANY}}' for port in ports)
    policy = Policy.from_yaml(CIDR_POLICY.format(cidr=cidr, ports=entries), endpoints=endpoints)
    proxy = Proxy(
        policy,
        endpoints,
        upstreams=[upstream or f"{UPSTREAM_IP}:{knot.port}"],
        listen=[f"127.0.0.1:{free_port()}"],
        # As in _proxy: the transparent path is driven directly, so Python's upstream sockets.
        config=ProxyConfig(log_queries="none", upstream_timeout=1.0, udp_io="asyncio"),
    )
    proxy._override = override
    return proxy


@needs_root
def test_answers_owed_survive_reply_sockets_being_recycled(
    knot: KnotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod asking many servers (each refused) must not make answers already owed to another
    query vanish when the reply socket of the server it asked is closed to make room."""
    monkeypatch.setattr(proxy_mod, "MAX_REPLY_SOCKETS", 2)

    async def scenario() -> None:
        proxy = _cidr_proxy(knot, "192.0.2.0/24", override=True)
        await proxy.start()
        pod = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pod.bind((POD_IP, 0))
        pod.setblocking(False)
        udp = _TransparentUdp(proxy, ("127.0.0.1", 0))
        fake = QueuedSocket(udp.sock)
        udp.sock = fake  # type: ignore[assignment]
        try:
            where = pod.getsockname()
            asked = dns.message.make_query("www.example.com", "A")
            fake.push(asked.to_wire(), ("192.0.2.1", 53), where)
            udp._readable()  # forwarded to Knot (the override)
            # In the same turn, before Knot answers: five servers no rule admits (refused).
            for i in range(5):
                fake.push(dns.message.make_query("www.example.com", "A").to_wire(),
                          (f"198.51.100.{i + 1}", 53), where)  # fmt: skip
            udp._readable()
            got: dict[tuple[str, int], dns.message.Message] = {}
            deadline = asyncio.get_running_loop().time() + 3
            while ("192.0.2.1", 53) not in got:
                assert asyncio.get_running_loop().time() < deadline, f"answered only by {got}"
                try:
                    data, source = pod.recvfrom(65535)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                got[source] = dns.message.from_wire(data)
            assert all(got[(f"198.51.100.{i + 1}", 53)].rcode() == dns.rcode.REFUSED
                       for i in range(5))  # fmt: skip
            answer = got[("192.0.2.1", 53)]
            assert answer.id == asked.id and answer.rcode() == dns.rcode.NOERROR and answer.answer
            assert proxy.stats.reply_errors == 0
            assert len(udp._replies) <= 2
        finally:
            udp.close()
            pod.close()
            await proxy.stop()

    run(scenario)


@needs_root
def test_busy_upstream_channels_are_not_closed_for_a_new_server(
    knot: KnotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every upstream channel carrying a query, a new server asked gets none (its query
    times out into SERVFAIL) instead of the busy one being taken under its pending answer."""
    monkeypatch.setattr(proxy_mod, "MAX_ORIG_UPSTREAMS", 1)

    async def scenario() -> None:
        nobody = ("127.0.0.98", free_port())  # nobody serves there
        # The configured upstream is not a server asked (that one would share its channel).
        proxy = _cidr_proxy(
            knot, "127.0.0.0/8", override=False, ports=(knot.port, nobody[1]),
            upstream="127.0.0.97:53",
        )  # fmt: skip
        await proxy.start()
        try:
            first, second = Sink(), Sink()
            query = dns.message.make_query("www.example.com", "A")
            proxy._on_query(query.to_wire(), _Client(first, (POD_IP, 1)), POD_IP, False,
                            (UPSTREAM_IP, knot.port))  # fmt: skip
            # Asked while the first query is in flight.
            other = dns.message.make_query("www.example.com", "A")
            proxy._on_query(other.to_wire(), _Client(second, (POD_IP, 2)), POD_IP, False, nobody)
            payload, _ = await asyncio.wait_for(first.sent.get(), 3)
            answer = dns.message.from_wire(payload)
            assert answer.id == query.id and answer.rcode() == dns.rcode.NOERROR
            assert proxy.stats.orig_upstream_refused == 1
            payload, _ = await asyncio.wait_for(second.sent.get(), 3)
            assert dns.message.from_wire(payload).rcode() == dns.rcode.SERVFAIL
            # Once the first one is idle (nothing sent for an upstream timeout), it makes room.
            proxy._orig_upstreams[(UPSTREAM_IP, knot.port)].last_sent -= 5
            proxy._on_query(other.to_wire(), _Client(second, (POD_IP, 2)), POD_IP, False, nobody)
            assert list(proxy._orig_upstreams) == [nobody]
        finally:
            await proxy.stop()

    run(scenario)


def test_a_server_the_kernel_cannot_reach_does_not_break_the_reader(knot: KnotServer) -> None:
    """A link-local server without a scope (or one without a route, or of a family no
    upstream socket has): the query cannot be sent. It times out into SERVFAIL, counted;
    nothing is raised into the reader callback (which would lose the rest of its batch)."""

    async def scenario() -> None:
        proxy = _cidr_proxy(knot, "fe80::/10", override=False)
        await proxy.start()
        try:
            sink = Sink()
            query = dns.message.make_query("www.example.com", "AAAA")
            proxy._on_query(query.to_wire(), _Client(sink, (POD_IP, 1)), POD_IP, False,
                            ("fe80::1", 53))  # fmt: skip
            payload, _ = await asyncio.wait_for(sink.sent.get(), 3)
            assert dns.message.from_wire(payload).rcode() == dns.rcode.SERVFAIL
            # The first send and its copy (upstream_retransmit) each failed, counted.
            assert proxy.engine.stats()["retransmits"] == 1
            assert proxy.stats.upstream_send_errors == 2
        finally:
            await proxy.stop()

    run(scenario)


class _NoRules(Interceptor):
    """The proxy's side of interception without touching the node's rules."""

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def set_sources(self, v4: Any, v6: Any) -> None:
        pass


@needs_root
@pytest.mark.parametrize("udp_io", ["rust", "asyncio"])
def test_dns_straight_to_the_transparent_listeners_is_not_looped(
    knot: KnotServer, udp_io: str
) -> None:
    """Not handed over by TPROXY (a process on the node sent it there): forwarding to "the
    server asked" would send it back to the listener, again and again. UDP drops such queries
    (the Rust thread or the asyncio reader, per ``udp_io``); TCP closes the connection."""

    async def scenario() -> None:
        endpoints = Endpoints.from_yaml(LOOP_ENDPOINTS)
        policy = Policy.from_yaml(LOOP_POLICY.format(port=knot.port), endpoints=endpoints)
        port = free_port()
        proxy = Proxy(
            policy,
            endpoints,
            upstreams=[f"{UPSTREAM_IP}:{knot.port}"],
            listen=[f"127.0.0.1:{free_port()}"],
            config=ProxyConfig(log_queries="none", udp_io=udp_io),
            intercept=_NoRules(InterceptSettings(port=port)),
        )
        await proxy.start()
        try:
            assert (proxy._io is not None) == (udp_io == "rust")
            wire = dns.message.make_query("www.example.com", "A").to_wire()
            for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.setblocking(False)
                    s.sendto(wire, (host, port))
                    await asyncio.sleep(0.3)  # the loop serves the asyncio listeners meanwhile
                    with pytest.raises(BlockingIOError):
                        s.recvfrom(512)
            assert proxy.counters()["not_intercepted"] == 2
            assert proxy.engine.stats()["queries"] == 0
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(len(wire).to_bytes(2, "big") + wire)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert proxy.counters()["not_intercepted"] == 3
            text = generate_latest(registry_for(proxy)).decode()
            assert 'fqdnguard_interception_dropped_total{reason="not_intercepted"} 3.0' in text
            assert 'fqdnguard_interception_dropped_total{reason="reply_error"} 0.0' in text
            # closed before it was served: no accepted connection
            assert 'fqdnguard_tcp_connections_total{outcome="accepted"} 0.0' in text
        finally:
            await proxy.stop()

    run(scenario)


def test_a_new_server_asked_skips_the_channels_live_servers_hold(knot: KnotServer) -> None:
    """Answers and retransmitted copies go to a server asked by its channel: once the counter
    has come round, a new server must not take the channel a live one holds (else a copy of
    one pod's query could go to another pod's server)."""
    proxy = _cidr_proxy(knot, "127.0.0.0/8", override=False, upstream="127.0.0.97:53")
    a, b, c = ("127.0.0.50", 53), ("127.0.0.51", 53), ("127.0.0.52", 53)
    first = proxy._orig_channel()
    assert proxy._orig_upstream(a, first) is not None
    proxy._orig_next = first - proxy_mod.ORIG_CHANNEL_BASE  # the counter is back at a's channel
    second = proxy._orig_channel()
    assert second != first
    assert proxy._orig_upstream(b, second) is not None
    third = proxy._orig_channel()
    assert third not in (first, second)
    held = proxy._orig_upstreams
    assert proxy._orig_by_channel == {first: held[a], second: held[b]}
    assert proxy._orig_upstream(c, third) is not None
    assert proxy._orig_by_channel[third].server == c
