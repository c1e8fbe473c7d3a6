"""What Cilium v1.19.0 rejects in a CiliumNetworkPolicy, as a table shared by the loader test
(tests/test_policy_cilium_rejects.py) and the CRD oracle test (tests/test_cilium_crd_oracle.py).

Each case is a whole object. ``schema`` says whether Cilium's CRD schema makes the API server
refuse it; a case the schema accepts but Cilium's agent refuses names the function of
``pkg/policy/api`` (rule_validation.go, fqdn.go) that does, in ``sanitizer``. ``path`` is the
field fqdnguard's error names (None: a valid object, which both must accept)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

CILIUM_VERSION = "v1.19.0"


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    path: str | None = None  # the field fqdnguard names; None: valid
    reason: str = ""  # a part of fqdnguard's reason
    schema: bool = False  # the CRD schema refuses it
    sanitizer: str = ""  # else the Cilium function that refuses it

    def object(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": self.name, "namespace": namespace},
            "spec": copy.deepcopy(self.spec),
        }

    def text(self, namespace: str = "default") -> str:
        return json.dumps(self.object(namespace))  # JSON is YAML


SEL = {"matchLabels": {"app": "web"}}
DNS = {"toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns"}}]}


def _egress(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"endpointSelector": SEL, "egress": list(rules)}


def _ports(*ports: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"ports": list(ports), **extra}


def _dns_rule(port: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**DNS, "toPorts": [_ports(port, rules={"dns": [{"matchPattern": "*"}]}, **extra)]}


UDP53 = {"port": "53", "protocol": "UDP"}
P = "spec.egress[0].toPorts[0]"

CASES = [
    # Valid: both accept.
    Case("valid-dns", _egress(_dns_rule(UDP53))),
    Case(
        "valid-fqdn",
        _egress(
            {
                "toFQDNs": [{"matchName": "api.example.com"}, {"matchPattern": "*.example.org"}],
                "toPorts": [_ports({"port": "443", "protocol": "TCP"})],
            }
        ),
    ),
    Case("valid-vrrp", _egress({"toPorts": [_ports({"port": "0", "protocol": "VRRP"})]})),
    Case(
        "valid-ingress-http",
        {
            "endpointSelector": SEL,
            "ingress": [
                {
                    "fromEndpoints": [{}],
                    "toPorts": [
                        _ports({"port": "80", "protocol": "TCP"}, rules={"http": [{"path": "/"}]})
                    ],
                }
            ],
        },
    ),
    Case("valid-icmps", _egress({"icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]})),
    # The CRD schema refuses these: in Kubernetes mode they never arrive; files need the check.
    Case(
        "icmp-in-toports",
        _egress({"toPorts": [_ports({"port": "53", "protocol": "ICMP"})]}),
        f"{P}.ports[0].protocol",
        "unsupported protocol 'ICMP' (expected one of: TCP, UDP, SCTP, VRRP, IGMP, ANY)",
        schema=True,
    ),
    Case(
        "lowercase-protocol",
        _egress({"toPorts": [_ports({"port": "53", "protocol": "udp"})]}),
        f"{P}.ports[0].protocol",
        "unsupported protocol 'udp'",
        schema=True,
    ),
    Case(
        "empty-rules",
        _egress({**DNS, "toPorts": [_ports(UDP53, rules={})]}),
        f"{P}.rules",
        "must have exactly one of http, kafka, dns and l7proto",
        schema=True,
    ),
    Case(
        "l7-without-l7proto",
        _egress({"toPorts": [_ports({"port": "80", "protocol": "TCP"}, rules={"l7": [{}]})]}),
        f"{P}.rules",
        "must have exactly one of http, kafka, dns and l7proto",
        schema=True,
    ),
    Case(
        "two-l7-kinds",
        _egress(
            {"toPorts": [_ports(UDP53, rules={"dns": [{"matchName": "a.com"}], "http": [{}]})]}
        ),
        f"{P}.rules",
        "multiple L7 protocol rule types",
        schema=True,
    ),
    Case(
        "empty-server-name",
        _egress({"toPorts": [_ports({"port": "443", "protocol": "TCP"}, serverNames=[""])]}),
        f"{P}.serverNames[0]",
        "empty server name",
        schema=True,
    ),
    Case(
        "no-server-names",
        _egress({"toPorts": [_ports({"port": "443", "protocol": "TCP"}, serverNames=[])]}),
        f"{P}.serverNames",
        "must not be an empty list",
        schema=True,
    ),
    Case(
        "bad-server-name",
        _egress({"toPorts": [_ports({"port": "443", "protocol": "TCP"}, serverNames=["a b"])]}),
        f"{P}.serverNames[0]",
        "is not a server name",
        schema=True,
    ),
    Case(
        "empty-match-name",
        _egress({"toFQDNs": [{"matchName": ""}]}),
        "spec.egress[0].toFQDNs[0].matchName",
        "",
        schema=True,
    ),
    Case(
        "icmp-family",
        _egress({"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}),
        "spec.egress[0].icmps[0].fields[0].family",
        "wrong family 'IPv5'",
        schema=True,
    ),
    Case(
        "no-direction",
        {"endpointSelector": SEL},
        "spec",
        "a rule must have at least one of ingress, ingressDeny, egress and egressDeny",
        schema=True,
    ),
    Case(
        "two-selectors",
        {"endpointSelector": SEL, "nodeSelector": SEL, "egress": [{}]},
        "spec",
        "exactly one of endpointSelector and nodeSelector",
        schema=True,
    ),
    Case(
        "too-many-ports",
        _egress({"toPorts": [_ports(*({"port": str(p), "protocol": "TCP"} for p in range(41)))]}),
        f"{P}.ports",
        "too many ports, the max is 40",
        schema=True,
    ),
    # The schema takes these; Cilium's agent refuses them when it sanitises the rule.
    Case(
        "dns-on-ingress",
        {
            "endpointSelector": SEL,
            "ingress": [{"toPorts": [_ports(UDP53, rules={"dns": [{"matchName": "a.com"}]})]}],
        },
        "spec.ingress[0].toPorts[0].rules.dns",
        "DNS rules are not allowed on ingress",
        sanitizer="PortRule.sanitize (ingress)",
    ),
    Case(
        "dns-on-ingress-deny-free",
        {
            "endpointSelector": SEL,
            "egress": [{}],
            "ingress": [
                {
                    "fromEndpoints": [{}],
                    "toPorts": [
                        _ports(
                            {"port": "5353", "protocol": "ANY"},
                            rules={"dns": [{"matchPattern": "*"}]},
                        )
                    ],
                }
            ],
        },
        "spec.ingress[0].toPorts[0].rules.dns",
        "DNS rules are not allowed on ingress",
        sanitizer="PortRule.sanitize (ingress)",
    ),
    Case(
        "port-out-of-range",
        _egress({"toPorts": [_ports({"port": "99999", "protocol": "TCP"})]}),
        f"{P}.ports[0].port",
        "not between 0 and 65535",
        sanitizer="PortProtocol.sanitize",
    ),
    Case(
        "vrrp-with-a-port",
        _egress({"toPorts": [_ports({"port": "53", "protocol": "VRRP"})]}),
        f"{P}.ports[0].port",
        "port must be empty or 0 for VRRP",
        sanitizer="PortProtocol.sanitize",
    ),
    Case(
        "dns-port-range",
        _egress(_dns_rule({"port": "53", "endPort": 60, "protocol": "UDP"})),
        f"{P}.ports",
        "DNS rules do not support port ranges",
        sanitizer="PortProtocol.sanitize",
    ),
    Case(
        "dns-without-ports",
        _egress({**DNS, "toPorts": [{"rules": {"dns": [{"matchName": "a.com"}]}}]}),
        f"{P}.rules.dns",
        "Port 53 must be specified for DNS rules",
        sanitizer="L7Rules.sanitize",
    ),
    Case(
        "http-on-udp",
        _egress({"toPorts": [_ports({"port": "80", "protocol": "UDP"}, rules={"http": [{}]})]}),
        f"{P}.ports",
        "L7 rules can only apply to TCP",
        sanitizer="PortRule.sanitize",
    ),
    Case(
        "l7-on-port-0",
        _egress({"toPorts": [_ports({"port": "0", "protocol": "TCP"}, rules={"http": [{}]})]}),
        f"{P}.rules",
        "L7 rules can not be used when a port is 0",
        sanitizer="PortRule.sanitize",
    ),
    Case(
        "listener-with-l7",
        _egress(
            {
                "toPorts": [
                    _ports(
                        {"port": "80", "protocol": "TCP"},
                        rules={"http": [{}]},
                        listener={"envoyConfig": {"name": "e"}, "name": "l"},
                    )
                ]
            }
        ),
        f"{P}.listener",
        "listener is not allowed with L7 rules",
        sanitizer="PortRule.sanitize",
    ),
    Case(
        "server-names-with-l7",
        _egress(
            {
                "toPorts": [
                    _ports(
                        {"port": "443", "protocol": "TCP"},
                        rules={"http": [{}]},
                        serverNames=["a.com"],
                    )
                ]
            }
        ),
        f"{P}.serverNames",
        "serverNames are not allowed with L7 rules without terminatingTLS",
        sanitizer="PortRule.sanitize",
    ),
    Case(
        "icmps-with-toports",
        _egress({"icmps": [{"fields": [{"type": 8}]}], "toPorts": [_ports(UDP53)]}),
        "spec.egress[0].icmps",
        "icmps may only be present without toPorts",
        sanitizer="EgressRule.sanitize",
    ),
    Case(
        "fqdns-and-endpoints",
        _egress({**DNS, "toFQDNs": [{"matchName": "a.com"}]}),
        "spec.egress[0]",
        "combining toEndpoints and toFQDNs",
        sanitizer="EgressCommonRule.sanitize",
    ),
    Case(
        "empty-egress",
        {"endpointSelector": SEL, "egress": []},
        "spec",
        "a rule must have at least one of ingress, ingressDeny, egress and egressDeny",
        sanitizer="Rule.Sanitize",
    ),
    Case(
        "except-outside-cidr",
        _egress({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]}),
        "spec.egress[0].toCIDRSet[0].except[0]",
        "",
        sanitizer="CIDRRule.sanitize",
    ),
    Case(
        "ingress-two-peer-kinds",
        {
            "endpointSelector": SEL,
            "ingress": [{"fromEndpoints": [{}], "fromCIDR": ["10.0.0.0/8"]}],
        },
        "spec.ingress[0]",
        "combining fromEndpoints and fromCIDR",
        sanitizer="IngressCommonRule.sanitize",
    ),
    Case(
        "ingress-bad-cidr",
        {"endpointSelector": SEL, "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/33"}]}]},
        "spec.ingress[0].fromCIDRSet[0].cidr",
        "",
        schema=True,  # the CRD's format: cidr
    ),
    Case(
        "host-egress-http",
        {
            "nodeSelector": {},
            "egress": [
                {"toPorts": [_ports({"port": "80", "protocol": "TCP"}, rules={"http": [{}]})]}
            ],
        },
        f"{P}.rules.http",
        "L7 http rules are not supported on host egress",
        sanitizer="EgressRule.sanitize (host policy)",
    ),
    Case(
        "host-ingress-l7",
        {
            "nodeSelector": {},
            "ingress": [
                {"toPorts": [_ports({"port": "80", "protocol": "TCP"}, rules={"http": [{}]})]}
            ],
        },
        "spec.ingress[0].toPorts[0].rules",
        "L7 rules are not supported on a host's ingress",
        sanitizer="IngressRule.sanitize (host policy)",
    ),
    Case(
        "l7-empty-key",
        _egress(
            {
                "toPorts": [
                    _ports(
                        {"port": "80", "protocol": "TCP"}, rules={"l7proto": "x", "l7": [{"": "v"}]}
                    )
                ]
            }
        ),
        f"{P}.rules.l7[0]",
        "empty key not allowed",
        sanitizer="PortRuleL7.Sanitize",
    ),
]
