"""End to end: DNS sent to a Service, translated by a kube-proxy-like DNAT on the node, with
``fqdnguard run --intercept`` and real nftables in network namespaces (tests/netns.py).

Interception sees the port a pod asked, before the Service translation; Cilium applies policy
after it. So (1) a DNS Service on another port (1053) that sends to the DNS pods' port 53 must be
intercepted (else, translated to port 53 of a server the rule admits at L4, the pod's DNS goes
around the proxy: a denied name is answered), and (2) a query to a Service's port 53 that sends
to the pods' 5353 is decided as a query on 5353, the port the DNS pods see.

Needs root, iproute2, knotd, libnftables and the kernel's nft_tproxy; skipped otherwise.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from fqdnguard.testing import KnotServer

from tests.netns import CLUSTER_DNS4, InterceptTopology
from tests.proxy_fixtures import require_knot
from tests.test_e2e_intercept_netns import POLICY, ZONE, Env, endpoints_yaml
from tests.test_e2e_netns import _skip_reason

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)

#: kube-dns-alt: ClusterIP ALT_IP, port 1053 -> the DNS pods' 53.
ALT_IP = "10.96.0.53"
#: kube-dns-5353: ClusterIP MAPPED_IP, port 53 -> the DNS pods' 5353 (the rule admits 5353/UDP).
MAPPED_IP = "10.96.0.54"

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
"""

#: What kube-proxy would install on the node for the two Services (prerouting for the pods,
#: output for the proxy's own upstream queries).
KUBE_PROXY = f"""
table ip fakekubeproxy {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {ALT_IP} meta l4proto {{ tcp, udp }} th dport 1053 dnat to {CLUSTER_DNS4}:53
        ip daddr {MAPPED_IP} udp dport 53 dnat to {CLUSTER_DNS4}:5353
    }}
    chain out {{
        type nat hook output priority -100; policy accept;
        ip daddr {ALT_IP} meta l4proto {{ tcp, udp }} th dport 1053 dnat to {CLUSTER_DNS4}:53
        ip daddr {MAPPED_IP} udp dport 53 dnat to {CLUSTER_DNS4}:5353
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
            extra_listen=[(CLUSTER_DNS4, 5353)],
            netns=topo.dns,
        ):
            e.start()
            yield e
            if e.proxy is not None:
                e.stop()
    finally:
        topo.close()


def test_a_dns_service_on_another_port_is_intercepted(env: Env) -> None:
    """(Over UDP: intercepted TCP to an address the node DNATs is reset, port 53 included; a
    known problem of the interception rules, apart from which ports they take.)"""
    tcp = False
    env.logged()
    denied = env.ask(env.topo.pod, "denied.blocked.e2e.test", ALT_IP, port=1053, tcp=tcp)
    assert (denied.rcode, denied.addrs) == (dns.rcode.REFUSED, []), "went around the proxy"
    assert denied.source == (ALT_IP, 1053)
    allowed = env.ask(env.topo.pod, "web.allowed.e2e.test", ALT_IP, port=1053, tcp=tcp)
    assert (allowed.rcode, allowed.addrs) == (dns.rcode.NOERROR, ["10.79.2.10"])
    verdicts = {(r["qname"], r["verdict"]) for r in env.logged()}
    assert verdicts == {
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
