"""Interception pieces that need no namespace: which sources are policed, the ruleset, the
original-destination parsing, the options, and the proxy's use of an original destination
(verdict on the server asked, forwarded there or to the override) against a real Knot.

The kernel side (TPROXY, policy routing, transparent sockets) is in test_e2e_intercept_netns.py.
"""

from __future__ import annotations

import asyncio
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
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.intercept import Interceptor, InterceptSettings, policed_sources
from fqdnguard.proxy import (
    IP_RECVORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    ORIG_CHANNEL_BASE,
    Proxy,
    _Client,
    original_destination,
)
from fqdnguard.testing import KnotServer, free_port

from tests.proxy_fixtures import POD_IP, STRANGER_IP, UPSTREAM_IP, run

ENDPOINTS = """
endpoints:
  - {name: dns-pod, namespace: default, ips: [10.0.0.2, "fd00::2"], labels: {app: dns-pod}}
  - {name: l4-pod, namespace: default, ips: [10.0.0.3], labels: {app: l4-pod}}
  - {name: free, namespace: default, ips: [10.0.0.4], labels: {app: free}}
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
"""


def test_only_endpoints_a_policy_with_dns_rules_selects_are_policed() -> None:
    endpoints = Endpoints.from_yaml(ENDPOINTS)
    policy = Policy.from_yaml(POLICY, endpoints=endpoints)
    # l4-pod is restricted too, but without DNS rules: its DNS is not intercepted (as Cilium).
    assert policed_sources(policy, endpoints) == (["10.0.0.2"], ["fd00::2"])


def test_ruleset_names_the_sources_port_marks_and_routing() -> None:
    interceptor = Interceptor(
        InterceptSettings(port=10099, tproxy_mark=0x40, proxy_mark=0x80),
        exclude=[("10.0.0.1", 53), ("::", 5353)],
    )
    interceptor.sources = (["10.0.0.2", "10.0.0.5"], ["fd00::2"])
    text = interceptor.ruleset()
    assert text.startswith("table inet fqdnguard_intercept {")
    assert "elements = { 10.0.0.2, 10.0.0.5 }" in text and "elements = { fd00::2 }" in text
    assert "meta mark & 0x80 == 0x80 return" in text
    # The proxy's own listen addresses are never intercepted (no loop).
    assert "ip daddr 10.0.0.1 meta l4proto { tcp, udp } th dport 53 return" in text
    assert "fib daddr type local meta l4proto { tcp, udp } th dport 5353 return" in text
    assert "tproxy ip to 127.0.0.1:10099 meta mark set meta mark | 0x40 accept" in text
    assert "tproxy ip6 to [::1]:10099" in text
    assert "ip saddr @policed4 meta l4proto { tcp, udp } th dport 53 counter drop" in text
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
    assert "elements = { 10.0.0.2 }" in out and "127.0.0.1:10077" in out


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
        config=ProxyConfig(log_queries="none"),
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
            # Forwarded to the server asked: a channel of its own; with the override: none.
            channels = [u.channel for u in proxy._orig_upstreams.values()]
            assert channels == ([] if override else [ORIG_CHANNEL_BASE])
        finally:
            await proxy.stop()

    run(scenario)
