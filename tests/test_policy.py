"""Verdicts for policies written like Cilium's documentation examples."""

from __future__ import annotations

import logging
import pathlib
import textwrap

import pytest
from fqdnguard import Endpoint, Endpoints, Policy, PolicyError

ENDPOINTS = Endpoints.from_yaml(
    textwrap.dedent(
        """
        endpoints:
          - {name: coredns-0, namespace: kube-system, ips: [10.244.0.10, 10.96.0.10],
             labels: {k8s-app: kube-dns}}
          - {name: web-0, namespace: default, ips: [10.244.1.5, "fd00::5"],
             labels: {app: web, env: prod}, serviceAccount: web}
          - {name: web-1, namespace: staging, ips: [10.244.1.6], labels: {app: web, env: dev}}
          - {name: job-0, namespace: default, ips: [10.244.1.7], labels: {app: job}}
        """
    )
)
WEB = ENDPOINTS.by_ip("10.244.1.5")
STAGING = ENDPOINTS.by_ip("10.244.1.6")
JOB = ENDPOINTS.by_ip("10.244.1.7")
KUBE_DNS = "10.96.0.10"

KUBE_DNS_SELECTOR = """
        - matchLabels:
            k8s:io.kubernetes.pod.namespace: kube-system
            k8s:k8s-app: kube-dns"""


KUBE_DNS_FLOW = (
    ' [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]'
)


def load(text: str) -> Policy:
    return Policy.from_yaml(textwrap.dedent(text), endpoints=ENDPOINTS, filename="p.yaml")


def dns(policy: Policy, ep: Endpoint | None, name: str, *, server: str | None = KUBE_DNS,
        port: int = 53, proto: str = "UDP"):  # fmt: skip
    return policy.dns_verdict(ep, server=server, port=port, protocol=proto, qname=name)


DNS_DOC = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fqdn
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: web
  egress:
  - toEndpoints:{KUBE_DNS_SELECTOR}
    toPorts:
    - ports:
      - port: "53"
        protocol: ANY
      rules:
        dns:
        - matchName: "cilium.io"
        - matchPattern: "*.cilium.io"
        - matchPattern: "**.api.cilium.io"
  - toFQDNs:
    - matchName: "cilium.io"
    - matchPattern: "*.cilium.io"
    toPorts:
    - ports:
      - port: "443"
        protocol: TCP
"""


@pytest.mark.parametrize(
    ("name", "allowed", "selector"),
    [
        ("cilium.io", True, 'toPorts[0].rules.dns[0].matchName: "cilium.io"'),
        ("CILIUM.io.", True, 'toPorts[0].rules.dns[0].matchName: "cilium.io"'),
        ("docs.cilium.io", True, 'toPorts[0].rules.dns[1].matchPattern: "*.cilium.io"'),
        ("a.b.api.cilium.io", True, 'toPorts[0].rules.dns[2].matchPattern: "**.api.cilium.io"'),
        ("a.docs.cilium.io", False, None),
        ("api.cilium.io.evil.com", False, None),
        ("notcilium.io", False, None),
    ],
)
def test_dns_match_name_and_patterns(name: str, allowed: bool, selector: str | None) -> None:
    v = dns(load(DNS_DOC), WEB, name)
    assert v.allowed is allowed
    assert v.selector == selector
    if allowed:
        assert v.policy == "default/fqdn"
        assert v.rule_index == 0
        assert v.reason == (
            f"allowed by CiliumNetworkPolicy default/fqdn egress rule 0: {selector} matches the "
            f"name, and the rule allows DNS to {KUBE_DNS} port 53/UDP"
        )
    else:
        assert v.policy is None and v.rule_index is None
        assert v.kind == "name-not-allowed"
        assert "default/fqdn" in v.reason and "no rules.dns selector" in v.reason


def test_dns_server_and_port_must_be_admitted() -> None:
    p = load(DNS_DOC)
    # kube-dns by its pod address too; any protocol (ANY) on 53.
    assert dns(p, WEB, "cilium.io", server="10.244.0.10", proto="TCP").allowed
    v = dns(p, WEB, "cilium.io", server="8.8.8.8")
    assert not v.allowed and v.kind == "no-rule"
    assert v.reason.endswith("and no egress rule allows DNS to 8.8.8.8 port 53/UDP")
    assert not dns(p, WEB, "cilium.io", port=5353).allowed
    # No server given: any server a rule admits.
    assert dns(p, WEB, "cilium.io", server=None).allowed


def test_unselected_endpoints_are_unrestricted_unknown_are_denied() -> None:
    p = load(DNS_DOC)
    v = dns(p, JOB, "evil.com")
    assert v.allowed and v.kind == "unrestricted" and "no egress policy selects" in v.reason
    # The namespaced policy selects app=web in default only, not in staging.
    assert dns(p, STAGING, "evil.com").allowed
    v = dns(p, None, "cilium.io")
    assert not v.allowed and v.kind == "unknown-endpoint"


def test_bare_star_allows_every_name_but_only_to_kube_dns() -> None:
    p = load(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {{name: all-dns}}
        spec:
          endpointSelector: {{}}
          egress:
          - toEndpoints:{KUBE_DNS_FLOW}
            toPorts:
            - ports: [{{port: "53", protocol: UDP}}, {{port: "53", protocol: TCP}}]
              rules:
                dns: [{{matchPattern: "*"}}]
        """
    )
    for ep in (WEB, STAGING, JOB):
        v = dns(p, ep, "anything.example.net")
        assert v.allowed and v.policy == "all-dns"
        assert v.selector == 'toPorts[0].rules.dns[0].matchPattern: "*"'
    assert not dns(p, WEB, "x.com", server="1.1.1.1").allowed
    assert not dns(p, WEB, "x.com", proto="SCTP").allowed


def test_namespaced_empty_selector_selects_only_its_namespace() -> None:
    p = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-all-egress, namespace: staging}
        spec:
          endpointSelector: {}
          egress:
          - {}
        """
    )
    v = dns(p, STAGING, "a.com")
    assert not v.allowed and v.kind == "no-rule"
    assert "CiliumNetworkPolicy staging/deny-all-egress" in v.reason
    assert dns(p, WEB, "a.com").allowed  # other namespace: unrestricted


def test_several_policies_selecting_one_pod_are_ored() -> None:
    p = load(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: a, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: web}}}}
          egress:
          - toEndpoints:{KUBE_DNS_FLOW}
            toPorts:
            - ports: [{{port: "53", protocol: UDP}}]
              rules: {{dns: [{{matchPattern: "*.a.com"}}]}}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: b, namespace: default}}
        spec:
          endpointSelector:
            matchExpressions:
            - {{key: env, operator: In, values: [prod, canary]}}
            - {{key: k8s:app, operator: Exists}}
            - {{key: legacy, operator: DoesNotExist}}
            - {{key: io.cilium.k8s.policy.serviceaccount, operator: NotIn, values: [admin]}}
          egress:
          - toEndpoints:{KUBE_DNS_FLOW}
            toPorts:
            - ports: [{{port: "53", protocol: TCP}}]
              rules: {{dns: [{{matchPattern: "*.b.com"}}]}}
        """
    )
    assert p.selecting(WEB) == ["CiliumNetworkPolicy default/a", "CiliumNetworkPolicy default/b"]
    v = dns(p, WEB, "x.a.com")
    assert v.allowed and v.policy == "default/a"
    v = dns(p, WEB, "x.b.com", proto="TCP")
    assert v.allowed and v.policy == "default/b"
    assert not dns(p, WEB, "x.b.com", proto="UDP").allowed  # b allows TCP only
    v = dns(p, WEB, "x.c.com")
    assert "default/a" in v.reason and "default/b" in v.reason


def test_clusterwide_vs_namespaced_to_endpoints() -> None:
    # A namespaced policy's toEndpoints without a namespace label means its own namespace, so
    # k8s-app=kube-dns alone selects nothing in "default"; a clusterwide one selects kube-system.
    body = """
        spec:
          endpointSelector: {matchLabels: {app: web}}
          egress:
          - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]
            toPorts:
            - ports: [{port: "53", protocol: UDP}]
              rules: {dns: [{matchPattern: "*"}]}
        """
    head = "apiVersion: cilium.io/v2\nkind: {}\nmetadata: {{name: x, namespace: default}}\n"
    cnp = load(head.format("CiliumNetworkPolicy") + textwrap.dedent(body))
    v = dns(cnp, WEB, "a.com")
    assert not v.allowed and v.kind == "no-rule"
    ccnp = Policy.from_yaml(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x}\n"
        + textwrap.dedent(body),
        endpoints=ENDPOINTS,
    )
    assert dns(ccnp, WEB, "a.com").allowed
    assert dns(ccnp, STAGING, "a.com").allowed  # clusterwide: app=web in every namespace


def test_l4_only_rule_lets_every_name_through() -> None:
    p = load(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: dns-l4, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: web}}}}
          egress:
          - toEndpoints:{KUBE_DNS_FLOW}
            toPorts:
            - ports: [{{port: "53", protocol: UDP}}]
        """
    )
    v = dns(p, WEB, "anything.com")
    assert v.allowed and v.kind == "dns-open"
    assert v.selector == "toPorts[0] (no rules.dns)"
    assert "every name is allowed" in v.reason


class FakeCache:
    """The `names_for` part of DnsCache."""

    def __init__(self, entries: dict[tuple[int, str], list[str]]) -> None:
        self.entries = entries
        self.calls: list[tuple[str, int | None]] = []

    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        self.calls.append((ip, endpoint))
        return list(self.entries.get((endpoint or 0, ip), []))


def test_egress_verdicts_use_the_cache() -> None:
    assert WEB is not None and JOB is not None
    p = load(
        DNS_DOC
        + """
  - toCIDRSet:
    - cidr: 192.168.0.0/16
      except: [192.168.99.0/24]
"""
    )
    cache = FakeCache({(WEB.id, "104.198.14.52"): ["docs.cilium.io."]})
    v = p.egress_verdict(WEB, "104.198.14.52", 443, "TCP", cache)
    assert v.allowed and v.kind == "fqdn" and v.rule_index == 1
    assert v.selector == 'toFQDNs[1].matchPattern: "*.cilium.io"'
    assert "matches docs.cilium.io." in v.reason
    assert cache.calls == [("104.198.14.52", WEB.id)]
    v = p.egress_verdict(WEB, "104.198.14.52", 80, "TCP", cache)
    assert not v.allowed and v.kind == "names-not-allowed" and "docs.cilium.io." in v.reason
    v = p.egress_verdict(WEB, "1.2.3.4", 443, "TCP", cache)
    assert not v.allowed and v.kind == "no-names"
    v = p.egress_verdict(WEB, "192.168.1.1", 22, "TCP", cache)
    assert v.allowed and v.rule_index == 2
    assert v.selector == "toCIDRSet[0] 192.168.0.0/16 except 192.168.99.0/24"
    assert not p.egress_verdict(WEB, "192.168.99.1", 22, "TCP", cache).allowed
    assert p.egress_verdict(JOB, "1.2.3.4", 22, "TCP", cache).allowed


def test_not_enforced_features_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fqdnguard.policy"):
        p = load(
            """
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: mixed, namespace: default}
            spec:
              endpointSelector: {matchLabels: {app: web}}
              ingress:
              - fromEndpoints: [{}]
              egress:
              - toEntities: [world]
              - toEndpoints: [{}]
                toPorts:
                - ports: [{port: "80", protocol: TCP}]
                  rules:
                    http: [{method: GET}]
            """
        )
    got = [(w.line, w.path) for w in p.warnings]
    assert got == [
        (7, "spec.ingress"),
        (10, "spec.egress[0].toEntities"),
        (15, "spec.egress[1].toPorts[0].rules.http"),
    ]
    assert all("not enforced by fqdnguard" in str(w) for w in p.warnings)
    assert len(caplog.records) == 3


def test_policy_is_immutable_and_a_bad_reload_keeps_the_old_one(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text(textwrap.dedent(DNS_DOC))
    good = Policy.load([tmp_path], endpoints=ENDPOINTS)
    with pytest.raises(AttributeError):
        good.warnings = ()  # type: ignore[misc]
    (tmp_path / "b.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n")
    with pytest.raises(PolicyError):
        Policy.load(tmp_path, endpoints=ENDPOINTS)
    assert dns(good, WEB, "cilium.io").allowed
    assert [i.name for i in good.policies] == ["fqdn"]


def test_specs_list_and_kind_list(tmp_path) -> None:
    (tmp_path / "l.yaml").write_text(
        textwrap.dedent(
            """
            apiVersion: v1
            kind: List
            items:
            - apiVersion: cilium.io/v2
              kind: CiliumNetworkPolicy
              metadata: {name: two, namespace: default}
              specs:
              - endpointSelector: {matchLabels: {app: web}}
                egress:
                - toPorts:
                  - ports: [{port: "53", protocol: UDP}]
                    rules: {dns: [{matchName: one.com}]}
              - endpointSelector: {matchLabels: {app: job}}
                egress:
                - toPorts:
                  - ports: [{port: "53", protocol: UDP}]
                    rules: {dns: [{matchName: two.com}]}
            """
        )
    )
    p = Policy.load(tmp_path, endpoints=ENDPOINTS)
    assert dns(p, WEB, "one.com", server="9.9.9.9").allowed  # no L3 selector: any server
    assert not dns(p, WEB, "two.com").allowed
    v = dns(p, JOB, "two.com")
    assert v.allowed and "specs[1]" in v.reason


def test_examples_directory() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent / "examples"
    eps = Endpoints.load(root / "endpoints.yaml")
    p = Policy.load(root / "policies", endpoints=eps)
    assert p.warnings == ()
    web = eps.by_ip("10.244.1.5")
    assert dns(p, web, "api.github.com").allowed
    assert dns(p, web, "kubernetes.default.svc.cluster.local").allowed
    assert not dns(p, web, "example.org").allowed
    crawler = eps.by_ip("10.244.2.7")
    assert dns(p, crawler, "a.b.example.org").allowed
    assert dns(p, eps.by_ip("10.244.3.8"), "anything.net").allowed  # legacy: unselected
