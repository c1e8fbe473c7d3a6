"""``toEntities`` and ``toServices`` as Cilium 1.19 defines them, resolved against the cluster
facts (fqdnguard.cluster.Cluster): through ``egress_verdict`` and ``egress_plan`` (which the
nftables backend programs) alike, and the kube-dns ClusterIP in the DNS verdict. One test runs
the rules in real nftables, in network namespaces of its own."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from fqdnguard import Endpoints, Policy, PolicyError
from fqdnguard.backends.nftables import Nftables
from fqdnguard.cluster import Cluster, Node, ServicePort
from fqdnguard.endpoints import Endpoint, from_yaml_with_cluster, load_with_cluster
from fqdnguard.policy import EgressPlan

from tests.netns import WORLD4, Topology, echo_ok, netns_unavailable

FILE = """
endpoints:
  - {name: client, namespace: default, ips: [10.244.1.5, "fd00:244:1::5"], labels: {app: client}}
  - name: coredns
    namespace: kube-system
    ips: [10.244.2.10, "fd00:244:2::10"]
    labels: {k8s-app: kube-dns}
    ports: [{name: dns, port: 53, protocol: UDP}]
  - {name: web, namespace: shop, ips: [10.244.2.20], labels: {app: web}}
cluster:
  node: node-a
  nodes:
    - {name: node-a, addresses: [192.168.10.1, "fd00:10::1"],
       podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]}
    - {name: node-b, addresses: [192.168.10.2, "fd00:10::2"],
       podCIDRs: [10.244.2.0/24, "fd00:244:2::/64"]}
  apiserver: {addresses: [172.16.0.100]}
  services:
    - namespace: kube-system
      name: kube-dns
      labels: {k8s-app: kube-dns}
      clusterIPs: [10.96.0.10, "fd00:96::10"]
      selector: {k8s-app: kube-dns}
      backends: [10.244.2.10, "fd00:244:2::10"]
      ports:
        - {name: dns, port: 53, protocol: UDP, targetPort: 53}
        - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
    - namespace: shop
      name: web
      labels: {tier: front}
      clusterIPs: [10.96.0.30]
      selector: {app: web}
      backends: [10.244.2.20]
      ports: [{port: 80, targetPort: 8080}]
    - namespace: shop
      name: db
      labels: {tier: db}
      clusterIPs: [10.96.0.40]
      backends: [203.0.113.7, 10.244.2.99]
"""

EPS, CLUSTER = from_yaml_with_cluster(FILE, "endpoints.yaml")
assert CLUSTER is not None
CLIENT = EPS.by_name("default", "client")
assert CLIENT is not None

POD, POD6, OTHER_POD, UNASSIGNED = "10.244.1.5", "fd00:244:1::5", "10.244.2.10", "10.244.2.77"
HOST, HOST6, REMOTE, REMOTE6 = "192.168.10.1", "fd00:10::1", "192.168.10.2", "fd00:10::2"
APISERVER, OUTSIDE, OUTSIDE6 = "172.16.0.100", "8.8.8.8", "2001:4860::8888"
KUBE_DNS_IP = "10.96.0.10"
EVERY = [POD, POD6, OTHER_POD, UNASSIGNED, HOST, HOST6, REMOTE, REMOTE6, APISERVER, OUTSIDE,
         OUTSIDE6, KUBE_DNS_IP, "fd00:244:2::77", "203.0.113.7"]  # fmt: skip


class NoNames:
    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        return []


def policy(egress: str, cluster: Cluster | None = CLUSTER, eps: Endpoints = EPS) -> Policy:
    text = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
{textwrap.indent(textwrap.dedent(egress).strip(), "    ")}
"""
    return Policy.from_yaml(text, endpoints=eps, filename="p.yaml", cluster=cluster)


def plan_admits(plan: EgressPlan, ip: str, port: int, proto: str) -> bool:
    """What the nftables rules derived from ``plan`` let through (its peers only)."""
    addr = ipaddress.ip_address(ip)

    def in_ports(ports: tuple[tuple[int, int, str], ...] | None) -> bool:
        return ports is None or any(
            p in ("ANY", proto) and (lo == 0 or lo <= port <= max(hi, lo)) for lo, hi, p in ports
        )

    for peers, ports in plan.peers:
        if not in_ports(ports):
            continue
        if peers is None:
            return True
        ips, cidrs = peers
        if str(addr) in ips:
            return True
        for a, b, excepts in cidrs:
            net = ipaddress.ip_network(f"{a}/{b}")
            if (
                addr.version == net.version
                and addr in net
                and not any(addr in ipaddress.ip_network(f"{x}/{y}") for x, y in excepts)
            ):
                return True
    return False


def reached(pol: Policy, port: int = 443, proto: str = "TCP") -> set[str]:
    """The addresses of EVERY the client may reach, asserting that the verdict and the
    firewall plan agree on each."""
    plan = pol.egress_plan(CLIENT)
    assert plan is not None
    out = set()
    for ip in EVERY:
        verdict = pol.egress_verdict(CLIENT, ip, port, proto, NoNames()).allowed
        assert verdict == plan_admits(plan, ip, port, proto), ip
        if verdict:
            out.add(ip)
    return out


def test_world_is_every_address_outside_the_cluster_ipv4_and_ipv6() -> None:
    pol = policy("- toEntities: [world]")
    # An API server outside the cluster is also world (Cilium gives it a CIDR identity).
    assert reached(pol) == {OUTSIDE, OUTSIDE6, APISERVER, "203.0.113.7"}
    v = pol.egress_verdict(CLIENT, OUTSIDE, 443, "TCP", NoNames())
    assert v.selector == "toEntities world" and v.rule_index == 0
    assert pol.warnings == ()


def test_world_v4_and_v6_only_in_a_dual_stack_cluster() -> None:
    assert reached(policy("- toEntities: [world-ipv4]")) == {OUTSIDE, APISERVER, "203.0.113.7"}
    assert reached(policy("- toEntities: [world-ipv6]")) == {OUTSIDE6}
    single = replace(CLUSTER, nodes=tuple(
        replace(n, pod_cidrs=tuple(c for c in n.pod_cidrs if ":" not in c)) for n in CLUSTER.nodes
    ))  # fmt: skip
    pol = policy("- toEntities: [world-ipv4]", cluster=single)
    assert reached(pol) == set()
    assert "only in a dual-stack cluster" in pol.warnings[0].message
    assert reached(policy("- toEntities: [world]", cluster=single)) >= {OUTSIDE, OUTSIDE6}


def test_cluster_host_remote_node_and_kube_apiserver() -> None:
    inside = {POD, POD6, OTHER_POD, UNASSIGNED, HOST, HOST6, REMOTE, REMOTE6, APISERVER,
              "fd00:244:2::77"}  # fmt: skip
    assert reached(policy("- toEntities: [cluster]")) == inside
    assert reached(policy("- toEntities: [host]")) == {HOST, HOST6}
    assert reached(policy("- toEntities: [remote-node]")) == {REMOTE, REMOTE6}
    pol = policy("- toEntities: [kube-apiserver]")
    assert reached(pol) == {APISERVER}
    assert pol.egress_verdict(CLIENT, APISERVER, 443, "TCP", NoNames()).selector == (
        "toEntities kube-apiserver"
    )
    both = policy("- toEntities: [host, remote-node]\n  toPorts: [{ports: [{port: '22'}]}]")
    assert reached(both, port=22) == {HOST, HOST6, REMOTE, REMOTE6}
    assert reached(both, port=443) == set()


def test_all_and_none() -> None:
    assert reached(policy("- toEntities: [all]")) == set(EVERY)
    assert reached(policy("- toEntities: [all]", cluster=None)) == set(EVERY)
    pol = policy("- toEntities: [none]")
    assert reached(pol) == set() and pol.warnings == ()


def test_an_entity_that_cannot_be_resolved_allows_nothing_and_says_so() -> None:
    pol = policy("- toEntities: [world]\n- toEntities: [kube-apiserver]", cluster=None)
    assert reached(pol) == set()
    assert [(w.line, w.path) for w in pol.warnings] == [
        (8, "spec.egress[0].toEntities"),
        (9, "spec.egress[1].toEntities"),
    ]
    assert "needs the cluster's facts" in pol.warnings[0].message
    no_cidrs = replace(CLUSTER, nodes=tuple(replace(n, pod_cidrs=()) for n in CLUSTER.nodes))
    pol = policy("- toEntities: [world]", cluster=no_cidrs)
    assert reached(pol) == set() and "no pod CIDR is known" in pol.warnings[0].message
    pol = policy("- toEntities: [health, ingress]")
    assert reached(pol) == set()
    assert [w.path for w in pol.warnings] == [
        "spec.egress[0].toEntities[0]",
        "spec.egress[0].toEntities[1]",
    ]
    lost = replace(CLUSTER, node="node-z")
    assert reached(policy("- toEntities: [host]", cluster=lost)) == set()


def test_entities_beside_tofqdns() -> None:
    pol = policy("""
        - toFQDNs: [{matchName: api.example.com}]
          toPorts: [{ports: [{port: "443", protocol: TCP}]}]
        - toEntities: [kube-apiserver]
          toPorts: [{ports: [{port: "6443", protocol: TCP}]}]
    """)

    class Cache:
        def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
            return ["api.example.com."] if ip == OUTSIDE else []

    assert pol.egress_verdict(CLIENT, OUTSIDE, 443, "TCP", Cache()).allowed
    assert not pol.egress_verdict(CLIENT, "1.2.3.4", 443, "TCP", Cache()).allowed
    assert pol.egress_verdict(CLIENT, APISERVER, 6443, "TCP", Cache()).allowed
    assert not pol.egress_verdict(CLIENT, APISERVER, 443, "TCP", Cache()).allowed
    plan = pol.egress_plan(CLIENT)
    assert plan is not None
    assert plan.fqdn == ((((443, 0, "TCP"),), ((False, "api.example.com"),)),)
    assert plan.peers == (((("172.16.0.100",), ()), ((6443, 0, "TCP"),)),)


def test_toservices_by_name_and_by_selector() -> None:
    # A Service with a selector stands for that selector in its namespace (its pods).
    named = policy("- toServices: [{k8sService: {serviceName: web, namespace: shop}}]")
    assert reached(named, port=8080) == set()
    assert named.egress_verdict(CLIENT, "10.244.2.20", 8080, "TCP", NoNames()).allowed
    # An omitted namespace matches the Service in any namespace (Cilium; not the policy's own).
    anywhere = policy("- toServices: [{k8sService: {serviceName: web}}]")
    assert anywhere.egress_verdict(CLIENT, "10.244.2.20", 8080, "TCP", NoNames()).allowed
    wrong = policy("- toServices: [{k8sService: {serviceName: web, namespace: default}}]")
    assert not wrong.egress_verdict(CLIENT, "10.244.2.20", 8080, "TCP", NoNames()).allowed
    # Without a selector: its backends as CIDRs, which never select a pod (10.244.2.99).
    for ref in ("{k8sService: {serviceName: db, namespace: shop}}",
                "{k8sServiceSelector: {selector: {matchLabels: {tier: db}}}}"):  # fmt: skip
        pol = policy(f"- toServices: [{ref}]")
        assert reached(pol) == {"203.0.113.7"}
        assert not pol.egress_verdict(CLIENT, "10.244.2.99", 443, "TCP", NoNames()).allowed
        assert pol.egress_verdict(CLIENT, "203.0.113.7", 1, "UDP", NoNames()).selector == (
            "toServices"
        )
    # toServices with toPorts is valid since Cilium 1.17: the ports restrict it.
    pol = policy("""
        - toServices: [{k8sService: {serviceName: db, namespace: shop}}]
          toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
    """)
    assert reached(pol, port=5432) == {"203.0.113.7"} and reached(pol, port=443) == set()
    without = policy("- toServices: [{k8sService: {serviceName: db}}]", cluster=None)
    assert reached(without) == set() and "needs the cluster" in without.warnings[0].message


def test_toendpoints_resolve_against_every_pod_the_cluster_knows() -> None:
    remote = Endpoint.create(id=90, name="db-0", namespace="shop", ips=["10.244.2.50"],
                             labels={"app": "db"}, ports=[("pg", 5432, "TCP")])  # fmt: skip
    peers = Endpoints([*EPS, remote])
    pol = policy("""
        - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: shop, app: db}}]
          toPorts: [{ports: [{port: pg, protocol: TCP}]}]
    """, cluster=replace(CLUSTER, peers=peers))  # fmt: skip
    assert pol.egress_verdict(CLIENT, "10.244.2.50", 5432, "TCP", NoNames()).allowed
    assert not pol.egress_verdict(CLIENT, "10.244.2.50", 5433, "TCP", NoNames()).allowed
    plan = pol.egress_plan(CLIENT, EPS)  # the cluster's peers win over the registry given
    assert plan is not None and plan_admits(plan, "10.244.2.50", 5432, "TCP")


KUBE_DNS_RULE = """
- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
  toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.example.com"}]}}]
"""


def test_dns_to_the_kube_dns_clusterip_counts_as_its_backends() -> None:
    pol = policy(KUBE_DNS_RULE)
    for server in (KUBE_DNS_IP, "fd00:96::10", OTHER_POD):
        v = pol.dns_verdict(CLIENT, server, 53, "UDP", "a.example.com")
        assert v.allowed, (server, v.reason)
    assert not pol.dns_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", "a.example.org").allowed
    assert not pol.dns_verdict(CLIENT, KUBE_DNS_IP, 53, "TCP", "a.example.com").allowed
    v = pol.egress_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", NoNames())
    assert v.selector == "toEndpoints (ClusterIP of Service kube-system/kube-dns)"
    plan = pol.egress_plan(CLIENT)
    assert plan is not None and plan_admits(plan, KUBE_DNS_IP, 53, "UDP")
    assert not plan_admits(plan, KUBE_DNS_IP, 53, "TCP")
    # Only with cluster facts: without them the ClusterIP is no server the rule names.
    assert (
        not policy(KUBE_DNS_RULE, cluster=None)
        .dns_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", "a.example.com")
        .allowed
    )


def test_a_partial_backend_match_or_another_port_mapping_admits_no_clusterip() -> None:
    (dns,) = [s for s in CLUSTER.services if s.name == "kube-dns"]
    partial = replace(dns, backends=(*dns.backends, "10.244.2.11"))  # not selected by the rule
    pol = policy(KUBE_DNS_RULE, cluster=replace(CLUSTER, services=(partial,)))
    assert not pol.dns_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", "a.example.com").allowed
    assert pol.dns_verdict(CLIENT, OTHER_POD, 53, "UDP", "a.example.com").allowed
    remapped = replace(dns, ports=(ServicePort("dns", 53, "UDP", 5353),))
    pol = policy(KUBE_DNS_RULE, cluster=replace(CLUSTER, services=(remapped,)))
    assert not pol.dns_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", "a.example.com").allowed
    empty = replace(dns, backends=())
    pol = policy(KUBE_DNS_RULE, cluster=replace(CLUSTER, services=(empty,)))
    assert not pol.dns_verdict(CLIENT, KUBE_DNS_IP, 53, "UDP", "a.example.com").allowed


def test_the_endpoints_file_cluster_section(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(FILE)
    assert len(Endpoints.load(path)) == 3  # the registry alone, as before
    eps, cluster = load_with_cluster(path)
    assert cluster == CLUSTER and len(eps) == 3
    assert cluster.this_node() == Node(
        "node-a", ("192.168.10.1", "fd00:10::1"), ("10.244.1.0/24", "fd00:244:1::/64")
    )
    with pytest.raises(PolicyError, match="no such file"):
        load_with_cluster(tmp_path / "missing.yaml")
    bad = FILE.replace("apiserver: {addresses: [172.16.0.100]}", "apiserver: {addresses: [x]}")
    bad = bad.replace("node: node-a", "node: node-q").replace("targetPort: 8080", "targetPort: -1")
    with pytest.raises(PolicyError) as e:
        from_yaml_with_cluster(bad, "endpoints.yaml")
    assert sorted(str(x.location()) for x in e.value.errors) == [
        "endpoints.yaml:11: cluster.node: 'node-q' is none of the nodes listed under nodes",
        "endpoints.yaml:17: cluster.apiserver.addresses[0]: 'x' is not an IP address",
        "endpoints.yaml:34: cluster.services[1].ports[0].targetPort: -1 is not between 1 and 65535",
    ]


# -- in the kernel -----------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))


@needs_netns
def test_world_and_kube_apiserver_in_nftables(tmp_path: Path) -> None:
    """The pod (10.77.1.2) behind the node reaches, through the node's real nftables rules:
    with `world`, an outside address and not one in a cluster pod CIDR; with `kube-apiserver`,
    the API server's address and nothing else."""
    outside, apiserver, cluster_pod = WORLD4[0], WORLD4[1], WORLD4[3]  # .10, .11, .13
    eps = Endpoints([Endpoint.create(id=1, name="client", namespace="default",
                                     ips=["10.77.1.2"], labels={"app": "client"})])  # fmt: skip
    cluster = Cluster(
        node="node-a",
        nodes=(
            Node("node-a", ("10.77.1.1",), ("10.77.1.0/24",)),
            Node("node-b", ("10.77.9.1",), ("10.77.2.12/30",)),
        ),
        apiserver=(apiserver,),
    )
    topo = Topology(prefix=f"fe{os.getpid() % 100000}").create()
    try:
        topo.start_echo_servers(os.environ.get("PYTHON", "python3"))
        for entity, reach, blocked in (
            ("world", [outside, apiserver], [cluster_pod]),
            ("kube-apiserver", [apiserver], [outside, cluster_pod]),
        ):
            pol = policy(f"- toEntities: [{entity}]", cluster=cluster, eps=eps)
            b = Nftables(reverse_path_check=False)
            b.set_policy(pol, eps)
            rules = tmp_path / f"{entity}.nft"
            rules.write_text("flush ruleset\n" + b.ruleset())
            topo.ns(topo.node, "nft", "-f", str(rules))
            for ip in reach:
                s = topo.connect(topo.pod, ip, 443)
                assert s is not None and echo_ok(s), f"{entity}: {ip} must be reachable"
                s.close()
            for ip in blocked:
                assert topo.connect(topo.pod, ip, 443) is None, f"{entity}: {ip} must not be"
    finally:
        topo.close()
