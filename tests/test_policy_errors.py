"""Every kind of bad input: PolicyError with the exact file, line, field path and reason."""

from __future__ import annotations

import textwrap

import pytest
from fqdnguard import Endpoints, FqdnGuardError, Policy, PolicyError
from fqdnguard.policy import lint

HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
"""


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text, filename="bad.yaml")
    return info.value


CASES = [
    # (egress body appended at line 10, line, path, reason fragment)
    (
        '  - toFQDNs:\n    - matchName: "a.com"\n    - matchPattern: "a..com"\n',
        12,
        "spec.egress[0].toFQDNs[1].matchPattern",
        'invalid matchPattern "a..com": empty label at position 2',
    ),
    (
        '  - toFQDNs:\n    - matchName: "*.a.com"\n',
        11,
        "spec.egress[0].toFQDNs[0].matchName",
        "'*' at position 0 is not allowed in a matchName",
    ),
    (
        '  - toFQDNs:\n    - {matchName: a.com, matchPattern: "*.a.com"}\n',
        11,
        "spec.egress[0].toFQDNs[0]",
        "must have exactly one of matchName and matchPattern",
    ),
    (
        "  - toFQDNs:\n    - {}\n",
        11,
        "spec.egress[0].toFQDNs[0]",
        "must have exactly one of matchName and matchPattern",
    ),
    (
        "  - toFQDNs:\n    - matchNames: a.com\n",
        11,
        "spec.egress[0].toFQDNs[0].matchNames",
        "unknown field 'matchNames'",
    ),
    (
        "  - toPorts:\n    - ports:\n      - port: 53\n        protocol: UDP\n",
        12,
        "spec.egress[0].toPorts[0].ports[0].port",
        "must be a string, not an integer (quote it)",
    ),
    (
        '  - toPorts:\n    - ports:\n      - port: "53"\n        protocol: udp\n',
        13,
        "spec.egress[0].toPorts[0].ports[0].protocol",
        "unsupported protocol 'udp'",
    ),
    (
        '  - toPorts:\n    - ports:\n      - port: "70000"\n',
        12,
        "spec.egress[0].toPorts[0].ports[0].port",
        "70000 is not between 0 and 65535",
    ),
    (
        "  - toPorts:\n    - rules:\n        dns:\n        - matchPattern: '*'\n",
        12,
        "spec.egress[0].toPorts[0].rules.dns",
        "Port 53 must be specified for DNS rules",
    ),
    (
        '  - toPorts:\n    - ports: [{port: "53", endPort: 60}]\n'
        "      rules: {dns: [{matchPattern: '*'}]}\n",
        11,
        "spec.egress[0].toPorts[0].ports",
        "DNS rules do not support port ranges",
    ),
    (
        '  - toPorts:\n    - ports: [{port: "0"}]\n      rules: {dns: [{matchPattern: "*"}]}\n',
        11,
        "spec.egress[0].toPorts[0].rules",
        "L7 rules can not be used when a port is 0",
    ),
    (
        "  - toFQDNs: [{matchName: a.com}]\n    toCIDR: [10.0.0.0/8]\n",
        10,
        "spec.egress[0]",
        "combining toCIDR and toFQDNs in one rule is not supported",
    ),
    (
        "  - toEndpoints: [{}]\n    toFQDNs: [{matchName: a.com}]\n",
        10,
        "spec.egress[0]",
        "combining toEndpoints and toFQDNs",
    ),
    (
        "  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [192.168.0.0/16]\n",
        12,
        "spec.egress[0].toCIDRSet[0].except[0]",
        "192.168.0.0/16 is not inside 10.0.0.0/8",
    ),
    (
        "  - toCIDR: [10.0.0.0/33]\n",
        10,
        "spec.egress[0].toCIDR[0]",
        "'10.0.0.0/33' is not an IP address or prefix",
    ),
    (
        "  - toEndpoints:\n    - matchExpressions:\n      - {key: app, operator: Has}\n",
        12,
        "spec.egress[0].toEndpoints[0].matchExpressions[0].operator",
        "unknown operator 'Has'",
    ),
    (
        "  - toEndpoints:\n    - matchExpressions:\n      - {key: app, operator: In}\n",
        12,
        "spec.egress[0].toEndpoints[0].matchExpressions[0].values",
        "must not be empty when the operator is In",
    ),
    (
        "  - toEndpoints:\n    - matchLabels: {app: true}\n",
        11,
        "spec.egress[0].toEndpoints[0].matchLabels.app",
        "must be a string, not a boolean",
    ),
    (
        "  - toFQDNs: {matchName: a.com}\n",
        10,
        "spec.egress[0].toFQDNs",
        "must be a list, not an object",
    ),
    (
        "  - toPort: []\n",
        10,
        "spec.egress[0].toPort",
        "unknown field 'toPort'",
    ),
    (
        "  - toEntities: [everything]\n",
        10,
        "spec.egress[0].toEntities[0]",
        "unsupported entity 'everything'",
    ),
    (
        "  - toFQDNs: [{matchName: a.com}]\n  - toFQDNs: [{matchName: a.com}]\n    toFQDNs: []\n",
        12,
        "spec.egress[1].toFQDNs",
        "duplicate field",
    ),
    ("  - toFQDNs: [{matchName: a.com}\n", 11, "", "invalid YAML"),
]


@pytest.mark.parametrize(("body", "line", "path", "reason"), CASES)
def test_bad_egress(body: str, line: int, path: str, reason: str) -> None:
    e = error_of(HEAD + body)
    assert (e.file, e.line, e.path) == ("bad.yaml", line, path), str(e)
    assert reason in e.reason
    assert str(e).startswith(f"bad.yaml:{line}: ")
    assert isinstance(e, FqdnGuardError) and isinstance(e, ValueError)


@pytest.mark.parametrize(
    ("text", "line", "path", "reason"),
    [
        (HEAD.replace("cilium.io/v2", "cilium.io/v1"), 1, "apiVersion", "must be 'cilium.io/v2'"),
        (HEAD.replace("  name: p\n", ""), 3, "metadata.name", "required field is missing"),
        (HEAD.replace("  endpointSelector:\n    matchLabels: {app: web}\n", ""), 6, "spec",
         "exactly one of endpointSelector and nodeSelector"),
        (HEAD.replace("matchLabels", "matchLabel"), 8, "spec.endpointSelector.matchLabel",
         "unknown field"),
        (HEAD + "  - {}\nstatus: {}\nextra: 1\n", 12, "extra", "unknown field 'extra'"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n", 1, "spec",
         "a policy needs spec or specs"),
        (HEAD + "  - {}\n---\n" + HEAD + "  - {}\n", 12, "metadata.name",
         "is also defined at bad.yaml:1"),
        ("apiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n"
         "  kind: CiliumNetworkPolicy\n  metadata: {name: x}\n  spec:\n"
         "    endpointSelector: {}\n    egress: [{toFQDNs: [{matchName: 'a b'}]}]\n",
         9, "items[0].spec.egress[0].toFQDNs[0].matchName", "character ' ' at position 1"),
    ],
)  # fmt: skip
def test_bad_documents(text: str, line: int, path: str, reason: str) -> None:
    e = error_of(text)
    assert (e.line, e.path) == (line, path), str(e)
    assert reason in e.reason


def test_all_problems_are_listed_and_the_set_is_atomic(tmp_path) -> None:
    (tmp_path / "good.yaml").write_text(
        HEAD.replace("name: p", "name: q") + "  - toFQDNs: [{matchName: a.com}]\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.yml").write_text(
        HEAD + "  - toFQDNs: [{matchName: 'a..com'}]\n  - toPorts: [{ports: [{port: x_y}]}]\n"
    )
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path)
    errs = info.value.errors
    bad = str(tmp_path / "sub" / "bad.yml")
    assert [(e.file, e.line, e.path) for e in errs] == [
        (bad, 10, "spec.egress[0].toFQDNs[0].matchName"),
        (bad, 11, "spec.egress[1].toPorts[0].ports[0].port"),
    ]
    assert str(info.value).endswith("(and 1 more problem)")
    errors, warnings = lint([tmp_path])
    assert [e.line for e in errors] == [10, 11] and warnings == []


def test_missing_path() -> None:
    with pytest.raises(PolicyError, match="no such file or directory"):
        Policy.load("/nonexistent/policies")


@pytest.mark.parametrize(
    ("text", "line", "path", "reason"),
    [
        ("endpoints:\n- {name: a, ips: [10.0.0.300]}\n", 2, "endpoints[0].ips[0]",
         "'10.0.0.300' is not an IP address"),
        ("endpoints:\n- {ips: [10.0.0.1]}\n", 2, "endpoints[0].name", "required field"),
        ("endpoints:\n- {name: a, ips: [10.0.0.1]}\n- {name: b, ips: [10.0.0.1]}\n", 3,
         "endpoints[1].ips", "10.0.0.1 also belongs to default/a"),
        ("endpoints:\n- {name: a, label: {}}\n", 2, "endpoints[0].label", "unknown field"),
        ("endpoint: []\n", 1, "endpoint", "unknown field"),
    ],
)  # fmt: skip
def test_bad_endpoints(text: str, line: int, path: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        Endpoints.from_yaml(text, filename="eps.yaml")
    e = info.value
    assert (e.file, e.line, e.path) == ("eps.yaml", line, path), str(e)
    assert reason in e.reason


def test_endpoints_registry() -> None:
    eps = Endpoints.from_yaml(
        textwrap.dedent(
            """
            endpoints:
            - {name: a, namespace: ns, ips: [10.0.0.1, "FD00::0001"], labels: {"k8s:app": x},
               serviceAccount: sa}
            - {name: b, ips: [10.0.0.2], id: 42}
            """
        )
    )
    a = eps.by_ip("fd00::1")
    assert a is not None and a is eps.by_ip("FD00:0:0::1") and a.id == 1
    assert a.ipv4 == ("10.0.0.1",) and a.ipv6 == ("fd00::1",)
    assert dict(a.labels) == {
        "app": "x",
        "io.kubernetes.pod.namespace": "ns",
        "io.cilium.k8s.policy.serviceaccount": "sa",
    }
    b = eps.by_name("default", "b")
    assert b is not None and b.id == 42 and eps.by_ip("10.0.0.3") is None
    assert eps.by_ip("not an ip") is None and len(eps) == 2
