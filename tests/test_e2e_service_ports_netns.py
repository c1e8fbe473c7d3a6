"""End to end: DNS sent to a Service, translated by a kube-proxy-like DNAT on the node, with
``fqdnguard run --intercept`` and real nftables in network namespaces (tests/netns.py).

Interception sees the port a pod asked, before the Service translation; Cilium applies policy
after it. So (1) a DNS Service on another port (1053) that sends to the DNS pods' port 53 must be
intercepted (else, translated to port 53 of a server the rule admits at L4, the pod's DNS goes
around the proxy: a denied name is answered), and (2) a query to a Service's port 53 that sends
to the pods' 5353 is decided as a query on 5353, the port the DNS pods see. And (3) the usual DNS
Service (ClusterIP:53 -> the pods' 53) is intercepted over UDP and TCP, IPv4 and IPv6: the later
packets of a TCP connection reach the connection fqdnguard accepted although the node translates
them after interception has seen them, and an old connection made before the pod was policed
goes nowhere (docs/intercept.md, "TCP to a translated address").

Needs root, iproute2, knotd, libnftables and the kernel's nft_tproxy; skipped otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard.testing import KnotServer

from tests.netns import CLUSTER_DNS4, CLUSTER_DNS6, InterceptTopology
from tests.proxy_fixtures import require_knot
from tests.test_e2e_intercept_netns import POLICY, ZONE, Env, _recv_exact, _wait, endpoints_yaml
from tests.test_e2e_netns import _skip_reason

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)

#: kube-dns-alt: ClusterIP ALT_IP, port 1053 -> the DNS pods' 53.
ALT_IP = "10.96.0.53"
#: kube-dns-5353: ClusterIP MAPPED_IP, port 53 -> the DNS pods' 5353 (the rule admits 5353/UDP).
MAPPED_IP = "10.96.0.54"
#: kube-dns: ClusterIPs KUBE_DNS4 and KUBE_DNS6, port 53 -> the DNS pods' 53 (the usual Service).
KUBE_DNS4, KUBE_DNS6 = "10.96.0.55", "fd96::55"

CLUSTER = f"""
cluster:
  node: node-a
  nodes: [{{name: node-a, addresses: [10.79.1.1]}}]
  services:
    - namespace: kube-system
      name: kube-dns-alt
      labels: {{k8s-app: kube-dns}}
      clusterIPs: [{ALT_IP}]
      selector: {{k8s-app: kube-dns}}
      backends: [{CLUSTER_DNS4}]
      ports:
        - {{name: dns, port: 1053, protocol: UDP, targetPort: 53}}
        - {{name: dns-tcp, port: 1053, protocol: TCP, targetPort: 53}}
    - namespace: kube-system
      name: kube-dns-5353
      clusterIPs: [{MAPPED_IP}]
      selector: {{k8s-app: kube-dns}}
      backends: [{CLUSTER_DNS4}]
      ports:
        - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
    - namespace: kube-system
      name: kube-dns
      clusterIPs: [{KUBE_DNS4}, "{KUBE_DNS6}"]
      selector: {{k8s-app: kube-dns}}
      backends: [{CLUSTER_DNS4}, "{CLUSTER_DNS6}"]
      ports:
        - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
        - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
"""

#: What kube-proxy would install on the node for the two Services (prerouting for the pods,
#: output for the proxy's own upstream queries).
KUBE_PROXY = f"""
table ip fakekubeproxy {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {ALT_IP} meta l4proto {{ tcp, udp }} th dport 1053 dnat to {CLUSTER_DNS4}:53
        ip daddr {MAPPED_IP} udp dport 53 dnat to {CLUSTER_DNS4}:5353
        ip daddr {KUBE_DNS4} meta l4proto {{ tcp, udp }} th dport 53 dnat to {CLUSTER_DNS4}:53
    }}
    chain out {{
        type nat hook output priority -100; policy accept;
        ip daddr {ALT_IP} meta l4proto {{ tcp, udp }} th dport 1053 dnat to {CLUSTER_DNS4}:53
        ip daddr {MAPPED_IP} udp dport 53 dnat to {CLUSTER_DNS4}:5353
        ip daddr {KUBE_DNS4} meta l4proto {{ tcp, udp }} th dport 53 dnat to {CLUSTER_DNS4}:53
    }}
}}
table ip6 fakekubeproxy {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip6 daddr {KUBE_DNS6} meta l4proto {{ tcp, udp }} th dport 53 dnat to [{CLUSTER_DNS6}]:53
    }}
    chain out {{
        type nat hook output priority -100; policy accept;
        ip6 daddr {KUBE_DNS6} meta l4proto {{ tcp, udp }} th dport 53 dnat to [{CLUSTER_DNS6}]:53
    }}
}}
"""


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_knot()
    topo = InterceptTopology(f"fs{os.getpid() % 100000}").create()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-svcports-"))
    e = Env(topo, state)
    try:
        topo.start_echo_servers(sys.executable)
        (state / "policy.yaml").write_text(POLICY)
        (state / "endpoints.yaml").write_text(endpoints_yaml() + CLUSTER)
        loaded = e.node("nft", "-f", "-", input=KUBE_PROXY)
        assert loaded.returncode == 0, loaded.stderr
        with KnotServer(
            {"e2e.test": ZONE},
            host=CLUSTER_DNS4,
            port=53,
            extra_listen=[(CLUSTER_DNS4, 5353), (CLUSTER_DNS6, 53)],
            netns=topo.dns,
        ):
            e.start()
            yield e
            if e.proxy is not None:
                e.stop()
    finally:
        topo.close()


def _verdicts(env: Env, count: int) -> set[tuple[str, str]]:
    """(name, verdict) of the next ``count`` query log records (written after the answer)."""
    records: list[dict[str, Any]] = []

    def arrived() -> bool:
        records.extend(env.logged())
        return len(records) >= count

    _wait(arrived, f"{count} query log records")
    return {(r["qname"], r["verdict"]) for r in records}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_dns_service_on_another_port_is_intercepted(env: Env, tcp: bool) -> None:
    env.logged()
    denied = env.ask(env.topo.pod, "denied.blocked.e2e.test", ALT_IP, port=1053, tcp=tcp)
    assert (denied.rcode, denied.addrs) == (dns.rcode.REFUSED, []), "went around the proxy"
    assert denied.source == (ALT_IP, 1053)
    allowed = env.ask(env.topo.pod, "web.allowed.e2e.test", ALT_IP, port=1053, tcp=tcp)
    assert (allowed.rcode, allowed.addrs) == (dns.rcode.NOERROR, ["10.79.2.10"])
    assert _verdicts(env, 2) == {
        ("denied.blocked.e2e.test.", "denied"),
        ("web.allowed.e2e.test.", "allowed"),
    }
    table = env.node("nft", "list", "set", "inet", "fqdnguard_intercept", "policed4")
    assert " . 1053" in table.stdout, table.stdout + table.stderr


def test_a_query_to_a_service_port_is_decided_on_the_pods_port(env: Env) -> None:
    """ClusterIP:53 sends to the DNS pods' 5353, which the rule admits (UDP): allowed, as Cilium
    decides it after the translation; a name the rule does not allow is still refused. (Here the
    node's DNAT already hands the proxy the translated address; where the proxy sees the
    ClusterIP itself, the policy gives the same view: tests/test_policy_service_ports.py.)"""
    allowed = env.ask(env.topo.pod, "web.allowed.e2e.test", MAPPED_IP)
    assert (allowed.rcode, allowed.addrs) == (dns.rcode.NOERROR, ["10.79.2.10"])
    assert allowed.source == (MAPPED_IP, 53)
    denied = env.ask(env.topo.pod, "denied.blocked.e2e.test", MAPPED_IP)
    assert denied.rcode == dns.rcode.REFUSED


def test_the_service_ports_view_needs_the_rule_to_admit_the_target_port(env: Env) -> None:
    """The same Service over TCP has no port mapping (only UDP 53 -> 5353): nothing admits
    ClusterIP:53/TCP, and the query is refused, never sent around the proxy."""
    got = env.ask(env.topo.pod, "web.allowed.e2e.test", MAPPED_IP, tcp=True)
    assert got.rcode == dns.rcode.REFUSED


@pytest.mark.parametrize(
    ("server", "tcp", "rdtype", "ip"),
    [
        pytest.param(KUBE_DNS4, False, "A", "10.79.2.10", id="udp4"),
        pytest.param(KUBE_DNS4, True, "A", "10.79.2.10", id="tcp4"),
        pytest.param(KUBE_DNS6, False, "AAAA", "fd79:2::10", id="udp6"),
        pytest.param(KUBE_DNS6, True, "AAAA", "fd79:2::10", id="tcp6"),
    ],
)
def test_dns_to_a_cluster_ip_the_node_translates_is_intercepted(
    env: Env, server: str, tcp: bool, rdtype: str, ip: str
) -> None:
    """The usual DNS Service (ClusterIP:53 -> the DNS pods' 53, DNATed by the node): over UDP
    and TCP (a truncated answer's retry), IPv4 and IPv6, the policed pod is answered from the
    ClusterIP it asked and its denied names are refused. Over TCP the connection's later
    packets must reach the connection fqdnguard accepted, although the node translates their
    destination after interception has seen them (they were reset: docs/intercept.md)."""
    env.logged()
    allowed = env.ask(env.topo.pod, "web.allowed.e2e.test", server, tcp=tcp, rdtype=rdtype)
    assert (allowed.rcode, allowed.addrs, allowed.source) == (dns.rcode.NOERROR, [ip], (server, 53))
    denied = env.ask(env.topo.pod, "denied.blocked.e2e.test", server, tcp=tcp, rdtype=rdtype)
    assert (denied.rcode, denied.addrs, denied.source) == (dns.rcode.REFUSED, [], (server, 53))
    assert _verdicts(env, 2) == {
        ("web.allowed.e2e.test.", "allowed"),
        ("denied.blocked.e2e.test.", "denied"),
    }


def _ask_on(s: socket.socket, name: str) -> int:
    """One query over an open TCP connection; the answer's rcode."""
    wire = dns.message.make_query(name, "A").to_wire()
    s.sendall(len(wire).to_bytes(2, "big") + wire)
    size = int.from_bytes(_recv_exact(s, 2), "big")
    return dns.message.from_wire(_recv_exact(s, size)).rcode()


@pytest.mark.parametrize("server", [KUBE_DNS4, CLUSTER_DNS4], ids=["translated", "direct"])
def test_a_tcp_connection_opened_before_the_pod_was_policed_goes_nowhere(
    env: Env, server: str
) -> None:
    """The free pod holds a TCP connection to the DNS server (answered by the server itself),
    then becomes policed: the next query on that connection is neither answered by the server
    (around the proxy) nor seen by fqdnguard, which has no such connection. Later packets of
    intercepted connections pass only to fqdnguard's own sockets."""
    assert env.proxy is not None
    s = env.topo.open_socket(env.topo.free, socket.AF_INET, socket.SOCK_STREAM)
    policed = env.status()["policed4"]
    try:
        s.settimeout(3)
        s.connect((server, 53))
        assert _ask_on(s, "denied.blocked.e2e.test") == dns.rcode.NOERROR  # not policed yet
        (env.state / "endpoints.yaml").write_text(endpoints_yaml(free_label="policed") + CLUSTER)
        env.proxy.send_signal(signal.SIGHUP)
        _wait(lambda: env.status()["policed4"] > policed, "the reload to police the free pod")
        before = env.queries()
        s.settimeout(1)
        with pytest.raises(OSError):  # dropped or reset, never answered
            _ask_on(s, "denied.blocked.e2e.test")
        assert env.queries() == before
        # A new connection is intercepted.
        got = env.ask(env.topo.free, "denied.blocked.e2e.test", server, tcp=True)
        assert (got.rcode, got.source) == (dns.rcode.REFUSED, (server, 53))
    finally:
        s.close()
        (env.state / "endpoints.yaml").write_text(endpoints_yaml() + CLUSTER)
        env.proxy.send_signal(signal.SIGHUP)
        _wait(lambda: env.status()["policed4"] == policed, "the reload to free the pod")
