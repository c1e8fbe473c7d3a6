"""What a policy set means when it is empty, truncated, or uses what fqdnguard cannot enforce:
empty files and directories are errors (unless meant), truncated specs are Cilium's errors, L7
rules fail closed (unless ``unenforced_l7: allow-port``), named ports resolve against the ports
destination endpoints declare. Both verdict sides (DNS, egress) and the nftables ruleset agree."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from fqdnguard import Endpoints, Policy, PolicyError
from fqdnguard.backends.nftables import Nftables
from fqdnguard.policy import lifted, lint

ENDPOINTS = Endpoints.from_yaml(
    textwrap.dedent(
        """
        endpoints:
          - name: coredns-0
            namespace: kube-system
            ips: [10.96.0.10]
            labels: {k8s-app: kube-dns}
            ports:
              - {name: dns, port: 53, protocol: UDP}
              - {name: DNS-TCP, port: 53, protocol: TCP}
              - {name: metrics, port: 9153}
          - name: coredns-alt
            namespace: kube-system
            ips: [10.96.0.11]
            labels: {k8s-app: kube-dns-alt, tier: dns}
            ports: [{name: dns, port: 5353, protocol: UDP}]
          - name: resolver
            namespace: kube-system
            ips: [10.96.0.12]
            labels: {tier: dns}
            ports: [{name: dns, port: 53, protocol: UDP}]
          - {name: web-0, namespace: default, ips: [10.244.1.5], labels: {app: web}}
          - {name: job-0, namespace: default, ips: [10.244.1.7], labels: {app: job}}
        """
    )
)
WEB = ENDPOINTS.by_ip("10.244.1.5")
JOB = ENDPOINTS.by_ip("10.244.1.7")

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchName: www.example.com}]}
"""


class NoNames:
    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        return []


class Names:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        return self.names


def load(text: str, **kw: object) -> Policy:
    return Policy.from_yaml(textwrap.dedent(text), endpoints=ENDPOINTS, filename="p.yaml", **kw)  # type: ignore[arg-type]


def dns_allowed(p: Policy, name: str, server: str = "10.96.0.10", port: int = 53,
                proto: str = "UDP") -> bool:  # fmt: skip
    return p.dns_verdict(WEB, server, port, proto, name).allowed


def egress_allowed(p: Policy, ip: str, port: int, proto: str = "TCP", cache: object = None) -> bool:
    return p.egress_verdict(WEB, ip, port, proto, cache or NoNames()).allowed  # type: ignore[arg-type]


def web_chain(p: Policy) -> list[str]:
    b = Nftables()
    b.set_policy(p, ENDPOINTS, listen=[("10.0.0.1", 53)])
    assert WEB is not None
    chain = b.ruleset().split(f"chain ep_{WEB.id} {{")[1].split("}\n")[0]
    return [line.strip() for line in chain.splitlines()[1:] if line.strip()]


# -- item 5: empty and truncated sets ---------------------------------------------------------

TRUNCATED_MID_EGRESS = POLICY[: POLICY.index("    - toEndpoints")]  # ends with "  egress:\n"


@pytest.mark.parametrize(
    ("shape", "files", "reason"),
    [
        ("emptied file", {"web.yaml": ""}, "no policy document in the file"),
        ("only ---", {"web.yaml": "---\n"}, "no policy document in the file"),
        ("only comments", {"web.yaml": "# nothing\n---\n...\n"}, "no policy document"),
        ("emptied directory", {}, "no policy file (*.yaml, *.yml, *.json)"),
    ],
)
def test_an_empty_file_or_directory_is_an_error_unless_meant(
    tmp_path: Path, shape: str, files: dict[str, str], reason: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path, endpoints=ENDPOINTS)
    assert reason in info.value.reason and "allow_empty_policy" in info.value.reason
    errors, _ = lint(tmp_path)
    assert [e.reason for e in errors] == [info.value.reason]
    p = Policy.load(tmp_path, endpoints=ENDPOINTS, allow_empty=True)
    assert len(p) == 0 and p.restricted() == frozenset()


def test_one_empty_file_beside_good_ones_is_still_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY)
    (tmp_path / "b.yaml").write_text("")
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path, endpoints=ENDPOINTS)
    assert info.value.file.endswith("b.yaml") and info.value.line == 1
    assert len(Policy.load(tmp_path, endpoints=ENDPOINTS, allow_empty=True)) == 1


HEADER = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: w}\n"


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        # Cut right after `egress:`: a rule with no ingress/egress at all (Cilium rejects it).
        (TRUNCATED_MID_EGRESS, "spec", "at least one of ingress, ingressDeny, egress"),
        # Cut before `egress:`.
        (POLICY[: POLICY.index("  egress:")], "spec", "at least one of ingress"),
        (HEADER + "spec:\n", "spec", "a policy needs spec or specs"),
        (HEADER + "specs:\n", "spec", "a policy needs spec or specs"),
    ],
)
def test_truncated_specs_are_errors_as_in_cilium(text: str, path: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text, endpoints=ENDPOINTS, allow_empty=True)
    assert info.value.path == path and reason in info.value.reason


def test_cilium_meanings_of_empty_egress_are_kept() -> None:
    # An ingress-only rule is valid (ingress is not enforced here): egress is not default-deny.
    p = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress: [{fromEndpoints: [{}]}]
          egress:
        """
    )
    assert p.restricted() == frozenset()
    # `egress: [{}]` denies all egress; a rule cut after `- toFQDNs:` reads as `{}` too.
    for tail in ("  egress: [{}]\n", "  egress:\n  - toFQDNs:\n"):
        p = load(POLICY[: POLICY.index("  egress:")] + tail)
        assert p.restricted() == {("default", "web-0")}
        assert not dns_allowed(p, "www.example.com")


def test_lifted_lists_endpoints_left_with_no_restriction() -> None:
    old = load(POLICY)
    other = POLICY.replace("app: web", "app: job").replace("name: web,", "name: job,")
    new = load(other)
    assert lifted(old, new) == ["default/web-0"]
    assert lifted(old, old) == [] and lifted(None, new) == []
    # An endpoint the new registry no longer has is gone, not lifted.
    fewer = Endpoints([ep for ep in ENDPOINTS if ep.name != "web-0"])
    assert lifted(old, Policy.from_yaml(other, endpoints=fewer)) == []


# -- item 6: L7 rules fqdnguard cannot enforce ------------------------------------------------

L7_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET, path: /public}]}
    - toPorts:
        - ports: [{port: "9092", protocol: TCP}]
          rules: {kafka: [{role: consume, topic: logs}]}
    - toFQDNs: [{matchName: api.example.com}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
          serverNames: [api.example.com]
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: TCP}]
          rules: {http: [{}]}
    - toPorts:
        - ports: [{port: "22", protocol: TCP}]
"""


def test_unenforced_l7_rules_allow_nothing_by_default() -> None:
    p = load(L7_POLICY)
    api = Names(["api.example.com."])
    assert not egress_allowed(p, "203.0.113.9", 80)
    assert not egress_allowed(p, "203.0.113.9", 9092)
    assert not egress_allowed(p, "203.0.113.9", 443, cache=api)
    # HTTP rules on the DNS port over TCP do not open DNS to every name.
    assert not dns_allowed(p, "anything.org", proto="TCP")
    assert egress_allowed(p, "203.0.113.9", 22)  # the plain L4 rule still holds
    paths = [w.path for w in p.warnings]
    assert paths == [
        "spec.egress[0].toPorts[0].rules.http",
        "spec.egress[1].toPorts[0].rules.kafka",
        "spec.egress[2].toPorts[0].serverNames",
        "spec.egress[3].toPorts[0].rules.http",
    ]
    assert all("this port rule allows nothing" in w.message for w in p.warnings)
    rules = web_chain(p)
    assert not any(port in r for r in rules for port in ("tcp . 80 ", "tcp . 9092", "tcp . 443"))
    assert "meta l4proto . th dport { tcp . 22 } accept" in rules


def test_allow_port_opens_the_port_at_l4_as_before() -> None:
    p = load(L7_POLICY, unenforced_l7="allow-port")
    assert egress_allowed(p, "203.0.113.9", 80)
    assert egress_allowed(p, "203.0.113.9", 9092)
    assert egress_allowed(p, "203.0.113.9", 443, cache=Names(["api.example.com."]))
    assert not egress_allowed(p, "203.0.113.9", 443)  # still only to the name's addresses
    assert dns_allowed(p, "anything.org", proto="TCP")
    assert all("allowed at L4 without them" in w.message for w in p.warnings)
    rules = web_chain(p)
    assert "meta l4proto . th dport { tcp . 80 } accept" in rules
    assert any("tcp . 443" in r and "@ep_" in r for r in rules)
    with pytest.raises(ValueError, match="unenforced_l7"):
        load(L7_POLICY, unenforced_l7="allow")


def test_server_names_with_l7_rules_need_tls_termination() -> None:
    with pytest.raises(PolicyError) as info:
        load(
            L7_POLICY.replace(
                "          serverNames: [api.example.com]",
                "          serverNames: [api.example.com]\n          rules: {http: [{}]}",
            )
        )
    assert "without terminatingTLS" in info.value.reason


# -- item 6: named ports ----------------------------------------------------------------------

NAMED = POLICY.replace('[{port: "53", protocol: ANY}]', "[{port: Dns, protocol: ANY}]")


def test_a_named_dns_port_resolves_against_the_servers_declared_ports() -> None:
    p = load(NAMED)
    assert p.warnings == ()
    assert dns_allowed(p, "www.example.com")
    assert not dns_allowed(p, "other.example.com")
    assert not dns_allowed(p, "www.example.com", proto="TCP")  # "dns" is declared for UDP only
    assert not dns_allowed(p, "www.example.com", port=5353)
    assert "meta l4proto . th dport { udp . 53 } accept" in " ".join(web_chain(p))
    both = load(NAMED.replace("[{port: Dns, protocol: ANY}]", "[{port: dns}, {port: dns-tcp}]"))
    assert dns_allowed(both, "www.example.com", proto="TCP")


@pytest.mark.parametrize(
    ("ports", "selector"),
    [
        ('[{port: "nope", protocol: UDP}]', "k8s-app: kube-dns"),  # declared by no destination
        ("[{port: dns, protocol: TCP}]", "k8s-app: kube-dns"),  # not for that protocol
        ("[{port: dns, protocol: UDP}]", "tier: dns"),  # 53 and 5353: Cilium's duplicate
    ],
)
def test_a_named_port_that_resolves_to_no_port_allows_nothing(ports: str, selector: str) -> None:
    p = load(
        NAMED.replace("[{port: Dns, protocol: ANY}]", ports).replace(
            "k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns", selector
        )
    )
    for port in (53, 5353, 1):
        for proto in ("UDP", "TCP"):
            for server in ("10.96.0.10", "10.96.0.11", "10.96.0.12"):
                assert not dns_allowed(p, "www.example.com", server, port, proto)
    assert not any("10.96.0" in r or "@peer_" in r for r in web_chain(p))  # no rule for them


def test_named_ports_of_other_rules() -> None:
    p = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          egress:
            - toPorts: [{ports: [{port: metrics}]}]
            - toFQDNs: [{matchName: api.example.com}]
              toPorts: [{ports: [{port: https}]}]
        """
    )
    # No L3 selector: every endpoint's declared ports (only coredns-0 declares metrics).
    assert egress_allowed(p, "198.51.100.1", 9153)
    assert not egress_allowed(p, "198.51.100.1", 9153, "UDP")
    # toFQDNs destinations are no endpoints: the name resolves to nothing, never to every port.
    assert not egress_allowed(p, "198.51.100.1", 443, cache=Names(["api.example.com."]))
    assert not egress_allowed(p, "198.51.100.1", 1, cache=Names(["api.example.com."]))


def test_endpoint_ports_are_checked_and_optional() -> None:
    assert Endpoints.from_yaml("endpoints: [{name: a, ips: [10.0.0.1]}]").by_ip("10.0.0.1")
    at = "endpoints[0].ports[0]"
    bad = [
        ("ports: [{name: dns_1, port: 53}]", "endpoints[0].ports[0].name", "not a port name"),
        ("ports: [{name: dns, port: 0}]", "endpoints[0].ports[0].port", "between 1 and 65535"),
        ("ports: [{name: a, port: 53, protocol: ICMP}]", f"{at}.protocol", "unsupported protocol"),
        ("ports: [{port: 53}]", "endpoints[0].ports[0].name", "required field is missing"),
        (
            "ports: [{name: a, port: 53}, {name: A, port: 54}]",
            "endpoints[0].ports[1].name",
            "declared twice",
        ),
    ]
    for ports, path, reason in bad:
        with pytest.raises(PolicyError) as info:
            Endpoints.from_yaml(f"endpoints:\n  - name: a\n    ips: [10.0.0.1]\n    {ports}\n")
        assert info.value.path == path and reason in info.value.reason, info.value


def test_the_options_in_config_files_and_flags(tmp_path: Path) -> None:
    from fqdnguard.cli import main  # noqa: PLC0415
    from fqdnguard.config import ConfigError, ProxyConfig  # noqa: PLC0415

    config = ProxyConfig.from_mapping({"unenforced-l7": "allow-port", "allow_empty_policy": "yes"})
    assert config.unenforced_l7 == "allow-port" and config.allow_empty_policy is True
    assert ProxyConfig().unenforced_l7 == "deny" and ProxyConfig().allow_empty_policy is False
    with pytest.raises(ConfigError, match="unenforced_l7: 'allow'"):
        ProxyConfig.from_mapping({"unenforced_l7": "allow"})
    with pytest.raises(ConfigError, match="allow_empty_policy"):
        ProxyConfig.from_mapping({"allow_empty_policy": "maybe"})
    (tmp_path / "p.yaml").write_text(L7_POLICY)
    (tmp_path / "e.yaml").write_text(
        "endpoints: [{name: w, ips: [10.0.0.5], labels: {app: web}},\n"
        "  {name: d, namespace: kube-system, ips: [10.0.0.9], labels: {k8s-app: kube-dns}}]"
    )
    ask = ["check", "--policy", str(tmp_path / "p.yaml"), "--endpoints", str(tmp_path / "e.yaml"),
           "--ip", "10.0.0.5", "--name", "a.org", "--port", "53/tcp"]  # fmt: skip
    assert main(ask) == 1
    assert main([*ask, "--unenforced-l7", "allow-port"]) == 0
