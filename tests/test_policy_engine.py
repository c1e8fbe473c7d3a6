"""What the proxy engine is handed (Policy.engine_table), and identities found from endpoint
objects, whether the policy's registry holds them or not."""

from __future__ import annotations

import gc
import textwrap

import pytest
from fqdnguard import Endpoint, Endpoints, Policy

from tests.test_policy import DNS_DOC, ENDPOINTS, JOB, KUBE_DNS, STAGING, WEB, dns, load

# Selects web (default) and coredns (kube-system): two restricted identities; job-0 and web-1
# (staging) stay unrestricted.
TWO_POLICIES = (
    DNS_DOC
    + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-self, namespace: kube-system}
spec:
  endpointSelector: {matchLabels: {k8s-app: kube-dns}}
  egress:
  - toCIDR: [8.8.8.8/32]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"""
)


def test_engine_table_maps_every_address_to_endpoint_and_identity() -> None:
    p = load(TWO_POLICIES)
    compiled, table, unknown = p.engine_table()
    assert unknown is None
    coredns = ENDPOINTS.by_name("kube-system", "coredns-0")
    assert coredns is not None
    assert set(table) == {"10.244.0.10", "10.96.0.10", "10.244.1.5", "fd00::5", "10.244.1.6",
                          "10.244.1.7"}  # fmt: skip
    web_id, web_ident = table["10.244.1.5"]
    assert table["fd00::5"] == (web_id, web_ident) and web_id == WEB.id
    dns_id, dns_ident = table["10.96.0.10"]
    assert table["10.244.0.10"] == (dns_id, dns_ident) and dns_id == coredns.id
    assert isinstance(web_ident, int) and isinstance(dns_ident, int) and web_ident != dns_ident
    # No egress policy selects them: unrestricted.
    assert table["10.244.1.7"] == (JOB.id, None)
    assert table["10.244.1.6"] == (STAGING.id, None)
    # The identity numbers are the compiled policy's: verdicts by number agree with the Policy's.
    for name in ("cilium.io", "evil.com"):
        by_number = compiled.dns_verdict(web_ident, KUBE_DNS, 53, "UDP", name)
        by_endpoint = dns(p, WEB, name)
        assert (by_number.allowed, by_number.kind, by_number.reason) == (
            by_endpoint.allowed, by_endpoint.kind, by_endpoint.reason)  # fmt: skip
    assert compiled.dns_verdict(dns_ident, "8.8.8.8", 53, "UDP", "a.com").allowed
    assert not compiled.dns_verdict(dns_ident, "8.8.4.4", 53, "UDP", "a.com").allowed


def test_engine_table_addresses_are_canonical() -> None:
    eps = Endpoints([Endpoint(7, "v6", "default", ("10.1.0.1",), ("FD00:0:0::A",), {"app": "web"})])
    compiled, table, _ = Policy.from_yaml(textwrap.dedent(DNS_DOC), endpoints=eps).engine_table()
    assert set(table) == {"10.1.0.1", "fd00::a"}
    assert table["fd00::a"][0] == 7 and table["fd00::a"][1] is not None
    assert compiled.is_restricted(table["fd00::a"][1])


@pytest.mark.parametrize(
    ("name", "owner"),
    [("kube-system/coredns-0", "10.96.0.10"), ("coredns-0", "10.96.0.10"), ("job-0", "10.244.1.7")],
)
def test_engine_table_unknown_source_endpoint(name: str, owner: str) -> None:
    _, table, unknown = load(TWO_POLICIES).engine_table(unknown=name)
    assert unknown == table[owner]


def test_engine_table_unknown_must_name_one_endpoint() -> None:
    eps = Endpoints([
        Endpoint.create(id=1, name="fallback", namespace="a", ips=["10.0.0.1"]),
        Endpoint.create(id=2, name="fallback", namespace="b", ips=["10.0.0.2"]),
    ])  # fmt: skip
    p = Policy.from_yaml(textwrap.dedent(DNS_DOC), endpoints=eps)
    assert p.engine_table(unknown="b/fallback")[2] == (2, None)
    with pytest.raises(ValueError, match=r"'fallback': the name is ambiguous \(a/fallback, b/fa"):
        p.engine_table(unknown="fallback")
    with pytest.raises(ValueError, match="'c/fallback': no endpoint of that name in the registry"):
        p.engine_table(unknown="c/fallback")
    bare = Policy.from_yaml(textwrap.dedent(DNS_DOC))
    assert bare.engine_table()[1] == {}
    with pytest.raises(ValueError, match="no registry"):
        bare.engine_table(unknown="fallback")


def test_endpoints_outside_the_registry_are_selected_by_their_labels() -> None:
    p = load(DNS_DOC)
    # Equal to WEB but another object: the registry's table does not hold it.
    twin = Endpoint.create(id=WEB.id, name="web-0", namespace="default", ips=["10.244.1.5"],
                           labels={"app": "web", "env": "prod"}, service_account="web")  # fmt: skip
    assert twin is not WEB
    assert dns(p, twin, "cilium.io").allowed and not dns(p, twin, "evil.com").allowed
    # Same id as WEB, other labels: decided by its own labels, not by the id.
    impostor = Endpoint.create(id=WEB.id, name="web-0", namespace="default", labels={"app": "db"})
    v = dns(p, impostor, "evil.com")
    assert v.allowed and v.kind == "unrestricted"
    # A policy without a registry finds identities the same way (its toEndpoints admit no
    # server, so WEB is denied; JOB, which no policy selects, is not).
    bare = Policy.from_yaml(textwrap.dedent(DNS_DOC))
    assert bare.dns_verdict(WEB, None, 53, "UDP", "cilium.io").kind == "no-rule"
    assert bare.dns_verdict(JOB, None, 53, "UDP", "cilium.io").kind == "unrestricted"


def test_denial_is_explained_when_asked_and_outlives_the_policy() -> None:
    p = load(DNS_DOC)
    name_denied = dns(p, WEB, "evil.com")
    port_denied = dns(p, WEB, "cilium.io", port=5353)
    del p
    gc.collect()
    assert not name_denied and not port_denied
    assert name_denied.kind == "name-not-allowed" and port_denied.kind == "no-rule"
    assert name_denied.reason == name_denied.reason  # worked out once, then kept
    assert "no rules.dns selector of theirs matches the name" in name_denied.reason
    assert port_denied.reason.endswith("no egress rule allows DNS to 10.96.0.10 port 5353/UDP")
    assert repr(port_denied) == (
        'Verdict(allowed=False, kind="no-rule", policy=None, rule_index=None)'
    )


def test_dns_verdict_takes_keywords_and_checks_arguments() -> None:
    p = load(DNS_DOC)
    v = p.dns_verdict(endpoint=WEB, server=KUBE_DNS, port=53, protocol="udp", qname=b"cilium.io")
    assert v.allowed
    for proto in ("ANY", "ICMP"):
        with pytest.raises(ValueError, match=f'invalid protocol "{proto}" for a query: expected'):
            p.dns_verdict(WEB, KUBE_DNS, 53, proto, "cilium.io")
    with pytest.raises(ValueError, match=r'invalid IP address "10\.96\.0"'):
        p.dns_verdict(WEB, "10.96.0", 53, "UDP", "cilium.io")
    with pytest.raises(OverflowError):
        p.dns_verdict(WEB, KUBE_DNS, 65536, "UDP", "cilium.io")
