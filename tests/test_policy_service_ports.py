"""The port a DNS rule sees for a query to a Service's ClusterIP, and which Service ports are
intercepted. Cilium applies policy after the Service translation, so a query to ClusterIP:53 of
a Service that sends to the pods' 5353 is matched against 5353; and DNS to any Service port that
leads to a DNS rule's port must be intercepted (tests/test_e2e_service_ports_netns.py shows it
with real nftables)."""

from __future__ import annotations

from dataclasses import replace

from fqdnguard import Policy
from fqdnguard.cluster import Cluster, ServicePort
from fqdnguard.intercept import policed_sources

from tests.test_policy_entities import CLIENT, CLUSTER, KUBE_DNS_IP, policy

DNS_PODS = "- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]"  # noqa: E501


def rule(port: int) -> str:
    return f"""
{DNS_PODS}
  toPorts: [{{ports: [{{port: "{port}", protocol: UDP}}], rules: {{dns: [{{matchPattern: "*.example.com"}}]}}}}]
"""  # noqa: E501


def with_ports(*ports: ServicePort) -> Cluster:
    (dns,) = [s for s in CLUSTER.services if s.name == "kube-dns"]
    return replace(CLUSTER, services=(replace(dns, ports=ports),))


def allowed(pol: Policy, port: int, name: str = "a.example.com", proto: str = "UDP") -> bool:
    return bool(pol.dns_verdict(CLIENT, KUBE_DNS_IP, port, proto, name).allowed)


def test_a_query_to_the_clusterip_is_matched_against_the_target_port() -> None:
    cluster = with_ports(ServicePort("dns", 53, "UDP", 5353))
    on_5353 = policy(rule(5353), cluster=cluster)
    assert allowed(on_5353, 53)  # Service port 53 reaches the pods' 5353, which the rule admits
    assert not allowed(on_5353, 53, "a.example.org")  # with the rule's DNS rules
    assert not allowed(on_5353, 5353)  # the Service has no port 5353
    assert not allowed(on_5353, 53, proto="TCP")  # nor a TCP mapping
    assert not allowed(policy(rule(53), cluster=cluster), 53)  # after translation: 5353


def test_a_service_on_another_port_counts_as_the_dns_pods_port() -> None:
    cluster = with_ports(ServicePort("dns", 1053, "UDP", 53))
    pol = policy(rule(53), cluster=cluster)
    assert allowed(pol, 1053)
    assert not allowed(pol, 1053, "a.example.org")
    assert not allowed(pol, 53)
    # A target port no EndpointSlice resolved (a name) admits nothing.
    assert not allowed(
        policy(rule(53), cluster=with_ports(ServicePort("dns", 1053, "UDP", None))), 1053
    )


def test_every_service_port_leading_to_a_dns_rules_port_is_intercepted() -> None:
    cluster = with_ports(
        ServicePort("dns", 1053, "UDP", 53),
        ServicePort("metrics", 9153, "TCP", 9153),  # leads to no DNS rule's port
    )
    pol = policy(rule(53), cluster=cluster)
    v4, _ = policed_sources(pol, [CLIENT])
    client = sorted(p for p in v4 if p.startswith(f"{CLIENT.ips[0]} ."))
    assert client == [f"{CLIENT.ips[0]} . 1053", f"{CLIENT.ips[0]} . 53"]
    assert pol.dns_service_ports(CLIENT) == {1053}
    # Without cluster facts: port 53 and the rules' ports, as before.
    assert policy(rule(53), cluster=None).dns_service_ports(CLIENT) == set()
