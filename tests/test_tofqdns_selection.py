"""Property tests: which learned names a `toFQDNs` selector selects, against Cilium's regex.

Cilium matches a `toFQDNs` selector with matchpattern.ToAnchoredRegexp: a match-all selector
(`*`, `**`, `*.`, `**.`) becomes `(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)`, so it selects only names
whose labels are made of [-a-zA-Z0-9_] (unlike a DNS rule's match-all, which admits every
name); other selectors need the same label by label. Both places fqdnguard decides it are
checked: the egress verdict (Rust) and the nftables sets an address goes in.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from fqdnguard import Endpoints, Policy
from fqdnguard.backends.nftables import _EndpointRules
from hypothesis import given
from hypothesis import strategies as st

from tests.test_pattern_property import (
    name_strategy,
    pattern_strategy,
    presentation,
    reference_regex,
)

MATCH_ALL_SELECTOR = re.compile(r"(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)")
EPS = Endpoints.from_yaml("endpoints: [{name: web, ips: [10.0.0.2], labels: {app: web}}]")
WEB = EPS.by_ip("10.0.0.2")


def cilium_selects(selector: tuple[bool, str], name: str) -> bool:
    """Cilium's toFQDNs verdict for a learned name (presentation form, lower-cased)."""
    is_pattern, text = selector
    if not is_pattern:
        return name == text.lower().rstrip(".") + "."
    rx = reference_regex(text)
    return (MATCH_ALL_SELECTOR if rx is None else rx).match(name) is not None


def policy(selector: tuple[bool, str]) -> Policy:
    key = "matchPattern" if selector[0] else "matchName"
    return Policy.from_yaml(
        f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  egress:
    - toFQDNs: [{{{key}: "{selector[1]}"}}]
      toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
""",
        endpoints=EPS,
    )


class Names:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        return self.names


selectors = st.one_of(
    st.tuples(st.just(True), pattern_strategy),
    st.tuples(st.just(False), st.sampled_from(["a.b", "ab.a", "api", "a"])),
)


@given(selectors, st.lists(name_strategy, min_size=1, max_size=3))
def test_tofqdns_selects_what_cilium_selects(
    selector: tuple[bool, str], names: list[list[bytes]]
) -> None:
    texts = [presentation(n).lower() for n in names]
    want = any(cilium_selects(selector, t) for t in texts)
    assert WEB is not None
    v = policy(selector).egress_verdict(WEB, "192.0.2.1", 443, "TCP", Names(texts))
    assert v.allowed is want, (selector, texts, v.reason)
    plan = SimpleNamespace(fqdn=[(((443, 0, "TCP"),), [selector])])
    rules = _EndpointRules(WEB.id, ["10.0.0.2"], plan, [])
    assert bool(rules.classify("192.0.2.1", lambda ip, ep: texts)) is want, (selector, texts)


def test_a_match_all_selector_leaves_out_names_with_other_bytes() -> None:
    """The cases the issue names: an escaped dot, a space, a backslash in a label."""
    assert WEB is not None
    for pattern in ("*", "**.", "**", "*."):
        p = policy((True, pattern))
        for name, want in [
            ("www.example.com.", True),
            ("a\\.b.example.com.", False),
            ("a\\032b.example.com.", False),
            ("a\\\\b.example.com.", False),
            ("a!b.example.com.", False),
        ]:
            v = p.egress_verdict(WEB, "192.0.2.1", 443, "TCP", Names([name]))
            assert v.allowed is want, (pattern, name)
            # The same address learned under a selectable name too is selected.
            both = p.egress_verdict(WEB, "192.0.2.1", 443, "TCP", Names([name, "x.org."]))
            assert both.allowed
