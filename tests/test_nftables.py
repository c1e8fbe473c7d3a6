"""The nftables backend: the ruleset it derives from a policy (anywhere), and its kernel behaviour
(in a network namespace of its own, as root: policy swaps, timeouts, restart, reconcile)."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fqdnguard
import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard.backends import BackendError
from fqdnguard.backends.nftables import (
    Nftables,
    NftError,
    _element,
    _key,
    _port_expr,
    peer_intervals,
)

from tests.netns import (
    NODE_POD4,
    NODE_POD6,
    POD4,
    POD6,
    WORLD4,
    WORLD6,
    Topology,
    echo_ok,
    netns_unavailable,
)
from tests.test_policy_entities import CLIENT as ENTITIES_CLIENT
from tests.test_policy_entities import EPS as ENTITIES_EPS
from tests.test_policy_entities import KUBE_DNS_IP, KUBE_DNS_RULE
from tests.test_policy_entities import policy as entities_policy

ROOT = Path(__file__).resolve().parent.parent

ENDPOINTS = """
endpoints:
  - {name: web, namespace: default, ips: [10.0.0.2, "fd00::2"], labels: {app: web}}
  - {name: free, namespace: default, ips: [10.0.0.3], labels: {app: free}}
  - {name: kube-dns, namespace: kube-system, ips: [10.96.0.10], labels: {k8s-app: kube-dns}}
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toFQDNs: [{matchPattern: "*.example.com"}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}, {port: "8443", endPort: 8450, protocol: TCP}]
    - toFQDNs: [{matchName: "api.other.org"}]
    - toCIDRSet: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]
      toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""


def backend(policy: str = POLICY) -> tuple[Nftables, Endpoints]:
    eps = Endpoints.from_yaml(ENDPOINTS)
    b = Nftables()
    b.set_policy(Policy.from_yaml(policy, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
    return b, eps


def test_port_expressions_merge_and_expand() -> None:
    assert _port_expr(None) == ""
    assert _port_expr(((443, 0, "TCP"),)) == "meta l4proto . th dport { tcp . 443 }"
    assert _port_expr(((53, 0, "ANY"),)) == (
        "meta l4proto . th dport { sctp . 53, tcp . 53, udp . 53 }"
    )
    # Overlapping and adjacent ranges merge (nftables rejects overlaps); port 0 is every port.
    assert _port_expr(((80, 90, "TCP"), (85, 100, "TCP"), (101, 0, "TCP"), (0, 0, "UDP"))) == (
        "meta l4proto . th dport { tcp . 80-101, udp . 0-65535 }"
    )
    with pytest.raises(BackendError, match="no enforceable protocol"):
        _port_expr(((1, 0, "ICMP"),))


def test_ruleset_follows_the_policy() -> None:
    b, eps = backend()
    web, free = eps.by_ip("10.0.0.2"), eps.by_ip("10.0.0.3")
    assert web is not None and free is not None
    text = b.ruleset()
    chain = text.split(f"chain ep_{web.id} {{")[1].split("}\n")[0]
    rules = [line.strip() for line in chain.splitlines() if line.strip()]
    sets = sorted({w[1:] for r in rules for w in r.split() if w.startswith("@")})
    fqdn = [s for s in sets if s.startswith(f"ep_{web.id}_")]
    assert len(fqdn) == 4  # two port lists (two toFQDNs rules) x two families
    peers = [s for s in sets if s.startswith("peer_")]
    assert len(peers) == 4  # the toEndpoints and toCIDRSet rules x two families
    assert rules[0] == "meta l4proto { tcp, udp } ip daddr 10.0.0.1 th dport 53 accept"
    assert any("tcp . 443, tcp . 8443-8450 }" in r and "@ep_" in r for r in rules)
    assert any(r.startswith("ip6 daddr @ep_") and r.endswith("_6 accept") for r in rules)
    # Peers are in sets of their rule, never inline; the except is cut out of the CIDR.
    elements = dict(re.findall(r"set (\S+) \{[^}]*?elements = \{ ([^}]*) \}", text))
    dns = next(r for r in rules if "sctp . 53" in r and r.startswith("ip daddr @peer_"))
    assert dns.endswith("meta l4proto . th dport { sctp . 53, tcp . 53, udp . 53 } accept")
    assert elements[dns.split()[2][1:]] == "10.96.0.10"
    db = next(r for r in rules if "tcp . 5432" in r and r.startswith("ip daddr @peer_"))
    assert elements[db.split()[2][1:]] == "192.168.0.0-192.168.0.255, 192.168.2.0-192.168.255.255"
    assert not any(r.split()[2][1:] in elements for r in rules if r.startswith("ip6 daddr @peer_"))
    assert rules[-1] == "counter drop"
    # Only restricted endpoints are dispatched; the unrestricted one is untouched.
    assert f"10.0.0.2 : goto ep_{web.id}" in text and "fd00::2 : goto" in text
    assert "10.0.0.3" not in text and f"ep_{free.id}" not in text


def test_peer_sets_are_per_rule_shared_and_kept_when_empty() -> None:
    """Endpoints one rule applies to share its sets (a peer's new address is one update,
    whatever their number), and a selector that picks nobody yet keeps its rule and empty sets
    (a selected deployment scaling up from zero changes elements, not chains)."""
    two = ENDPOINTS + "  - {name: web2, namespace: default, ips: [10.0.0.4], labels: {app: web}}\n"

    def chains_and_sets(endpoints: str) -> tuple[dict[str, list[str]], dict[str, str]]:
        eps = Endpoints.from_yaml(endpoints)
        b = Nftables()
        b.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
        text = b.ruleset()
        chains = {
            name: [r.strip() for r in body.strip().splitlines()]
            for name, body in re.findall(r"chain (ep_\d+) \{\n(.*?)\n\t\}", text, re.S)
        }
        return chains, dict(re.findall(r"set (peer_\S+) \{[^}]*?elements = \{ ([^}]*) \}", text))

    chains, elements = chains_and_sets(two)
    assert len(chains) == 2
    first, second = ([r for r in rules if "@peer_" in r] for rules in chains.values())
    assert len(first) == 4 and first == second  # the same rules on the same sets
    assert len(elements) == 2  # the kube-dns and the CIDR rule's IPv4 sets, once
    nobody, none_yet = chains_and_sets(two.replace("k8s-app: kube-dns}", "k8s-app: gone}"))
    assert nobody == chains
    assert len(none_yet) == 1 and "10.96.0.10" not in none_yet.values()


def test_peer_intervals_cut_each_except_from_its_own_cidr_and_name_bad_input() -> None:
    def ip(text: str) -> int:
        return int(ipaddress.ip_address(text))

    got = peer_intervals(
        (
            ("10.96.0.7", "fd00::1", "10.200.0.1"),
            (
                ("10.0.0.0", 8, (("10.96.0.0", 12), ("fd00::", 8))),  # other family: no effect
                ("10.96.0.0", 16, ()),  # admits again part of the first one's except
                ("10.200.0.2", 32, ()),  # touches 10.200.0.1: stays an element of its own
                ("::", 0, (("fd00::", 8),)),
            ),
        )
    )
    assert got[4] == (
        (ip("10.0.0.0"), ip("10.95.255.255")),
        (ip("10.96.0.0"), ip("10.96.255.255")),  # 10.96.0.7 merged into it
        (ip("10.112.0.0"), ip("10.255.255.255")),  # 10.200.0.x inside: merged
    )
    assert got[6] == ((0, ip("fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
                      (ip("fd00::1"), ip("fd00::1")),  # a selected pod inside the except
                      (ip("fe00::"), (1 << 128) - 1))  # fmt: skip
    touching = peer_intervals((("10.0.0.1", "10.0.0.2"), (("10.0.0.3", 32, ()),)))
    assert len(touching[4]) == 3 and touching[6] == ()
    with pytest.raises(BackendError, match=r"not an IP address: '10\.0\.0'"):
        peer_intervals((("10.0.0",), ()))
    with pytest.raises(BackendError, match=r"not a CIDR: 10\.0\.0\.0/33"):
        peer_intervals(((), (("10.0.0.0", 33, ()),)))


def test_a_services_clusterip_gets_peer_sets_of_its_own_named_by_rule_and_service() -> None:
    """A rule that admits a Service's backends also admits its ClusterIP on the mapped ports:
    a second peers entry of the same rule. It gets sets of its own, named by the rule and the
    Service (stable when the ClusterIP or the backends change), shared by the endpoints."""
    pol = entities_policy(KUBE_DNS_RULE)
    plan = pol.egress_plan(ENTITIES_CLIENT)
    assert plan is not None and len(plan.peers) == 2 == len(set(plan.peer_rules))
    assert plan.peer_rules[1] == (
        f"{plan.peer_rules[0]} toEndpoints (ClusterIP of Service kube-system/kube-dns)"
    )
    b = Nftables()
    b.set_policy(pol, ENTITIES_EPS, listen=[("10.0.0.1", 53)])
    elements = dict(re.findall(r"set (peer_\S+) \{[^}]*?elements = \{ ([^}]*) \}", b.ruleset()))
    assert KUBE_DNS_IP in elements.values() and len(elements) >= 2


def test_ips_go_to_the_sets_of_the_rules_their_names_match() -> None:
    b, eps = backend()
    web = eps.by_ip("10.0.0.2")
    assert web is not None
    names = {"1.1.1.1": ["www.example.com."], "2.2.2.2": ["api.other.org."], "3.3.3.3": ["x."]}
    b._names_for = lambda ip, ep: names[ip]
    rules = b._endpoints[web.id]
    a, c, none = (rules.classify(ip, b._names_for) for ip in ("1.1.1.1", "2.2.2.2", "3.3.3.3"))
    assert len(a) == len(c) == 1 and a != c and none == ()
    assert len(rules.classify("fd00::1", None)) == 2
    assert all(s.endswith("_6") for s in rules.classify("fd00::1", None))


def test_dry_run_prints_a_ruleset(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "e.yaml").write_text(ENDPOINTS)
    out = subprocess.run(
        [sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables", "--dry-run",
         "--policy", str(tmp_path / "p.yaml"), "--endpoints", str(tmp_path / "e.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("table inet fqdnguard {") and "hook forward" in out


# -- in the kernel -----------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(
    (_why := netns_unavailable()) is not None, reason=_why or "available"
)

SCENARIO_HEAD = f"""
import asyncio, json, time
from fqdnguard import Endpoints, Policy
from fqdnguard.backends.nftables import Nftables
ENDPOINTS = {ENDPOINTS!r}
POLICY = {POLICY!r}
eps = Endpoints.from_yaml(ENDPOINTS)
pol = Policy.from_yaml(POLICY, endpoints=eps)
WEB = eps.by_ip("10.0.0.2").id
class C:
    def __init__(s, kind, ip, ttl, ep=WEB):
        s.kind, s.endpoint, s.ip, s.expires_at = kind, ep, ip, time.time() + ttl
def make():
    b = Nftables()
    b._names_for = lambda ip, ep: ["api.other.org."] if ip.startswith("2.") else ["a.example.com."]
    b.set_policy(pol, eps, listen=[("10.0.0.1", 53)])
    return b
def flat(b):
    return {{s: sorted(v) for s, v in b.elements().items() if v}}
def handles():
    # Every chain, set and rule of the table with its kernel handle (new object, new handle).
    import subprocess
    text = subprocess.run(["nft", "-j", "list", "table", "inet", "fqdnguard"],
                          capture_output=True, text=True, check=True).stdout
    found = []
    for item in json.loads(text)["nftables"]:
        for kind, obj in item.items():
            if kind in ("chain", "set", "map"):
                found.append([kind, obj["name"], obj["handle"]])
            elif kind == "rule":
                found.append([kind, obj["chain"], obj["handle"]])
    return sorted(found)
def peer_elements():
    # The peer sets as nft lists them: set -> elements (addresses, ranges, prefixes).
    import subprocess
    text = subprocess.run(["nft", "-j", "list", "table", "inet", "fqdnguard"],
                          capture_output=True, text=True, check=True).stdout
    return {{item["set"]["name"]: item["set"].get("elem", [])
             for item in json.loads(text)["nftables"]
             if "set" in item and item["set"]["name"].startswith("peer_")}}
out = {{}}
"""


def run_in_netns(body: str) -> dict[str, object]:
    ns = f"fgu{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = SCENARIO_HEAD + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@needs_netns
def test_changes_timeouts_and_removals_in_the_kernel() -> None:
    out = run_in_netns("""
        async def main():
            b = make(); await b.start()
            await b.apply([C("added", "1.1.1.1", 60), C("added", "2.2.2.2", 60),
                           C("added", "fd00::9", 30), C("added", "9.9.9.9", 60, ep=2)])
            out["added"] = flat(b)
            out["ttl"] = max(b.elements()[s]["1.1.1.1"] for s in b.elements()
                             if "1.1.1.1" in b.elements()[s])
            await b.apply([C("extended", "1.1.1.1", 600), C("removed", "fd00::9", 0),
                           C("removed", "7.7.7.7", 0)])  # never programmed: no error
            out["after"] = flat(b)
            out["ttl2"] = max(b.elements()[s]["1.1.1.1"] for s in b.elements()
                              if "1.1.1.1" in b.elements()[s])
            out["transactions"] = b.transactions
            await b.close()
        asyncio.run(main())
    """)
    added, after = out["added"], out["after"]
    assert isinstance(added, dict) and isinstance(after, dict)
    assert sorted(ip for v in added.values() for ip in v) == ["1.1.1.1", "2.2.2.2", "fd00::9"]
    assert len(added) == 3, "1.1.1.1 and 2.2.2.2 are in different rules' sets"
    assert sorted(ip for v in after.values() for ip in v) == ["1.1.1.1", "2.2.2.2"]
    assert 55 <= out["ttl"] <= 60 and 590 <= out["ttl2"] <= 600  # type: ignore[operator]
    assert out["transactions"] == 3  # install, then one per batch


RESOLVE_ANYTHING = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toFQDNs: [{matchName: "api.github.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


@needs_netns
def test_a_name_the_dns_rules_allow_but_no_tofqdns_selects_opens_nothing() -> None:
    """The usual shape: resolve any name, connect to one. An address learned for another name
    must stay out of the set (it went in when all toFQDNs rules shared one port list)."""
    out = run_in_netns(f"""
        names = {{"1.1.1.1": ["api.github.com."], "6.6.6.6": ["evil.org."],
                  "7.7.7.7": ["evil.org.", "api.github.com."]}}
        async def main():
            b = Nftables()
            b._names_for = lambda ip, ep: names[ip]
            b.set_policy(Policy.from_yaml({RESOLVE_ANYTHING!r}, endpoints=eps), eps,
                         listen=[("10.0.0.1", 53)])
            await b.start()
            await b.apply([C("added", ip, 60) for ip in names])
            out["sets"] = flat(b)
            # 6.6.6.6 now also answers for api.github.com: the cache reports the pair as added
            # again (it gained a name), and it joins the set.
            names["6.6.6.6"].append("api.github.com.")
            await b.apply([C("added", "6.6.6.6", 60)])
            out["renamed"] = flat(b)
            await b.close()
        asyncio.run(main())
    """)
    sets, renamed = out["sets"], out["renamed"]
    assert isinstance(sets, dict) and isinstance(renamed, dict)
    assert sorted(ip for v in sets.values() for ip in v) == ["1.1.1.1", "7.7.7.7"]
    assert sorted(ip for v in renamed.values() for ip in v) == ["1.1.1.1", "6.6.6.6", "7.7.7.7"]


@needs_netns
def test_restart_keeps_elements_and_reconcile_makes_them_exact() -> None:
    out = run_in_netns("""
        async def main():
            b = make(); await b.start()
            await b.apply([C("added", "1.1.1.1", 60), C("added", "1.1.1.2", 60)])
            await b.close()
            b = make(); await b.start()  # a restart: nothing flushed
            out["restarted"] = flat(b)
            await b.reconcile([(WEB, "1.1.1.2", time.time() + 60),
                               (WEB, "1.1.1.3", time.time() + 60)])
            out["reconciled"] = flat(b)
            # Other ports for the rule: new sets, the elements move over, the old sets go.
            b.set_policy(Policy.from_yaml(POLICY.replace('port: "443"', 'port: "444"'),
                                          endpoints=eps), eps)
            out["sets"] = sorted(b.elements())
            out["swapped"] = flat(b)
            b.remove_table()
            await b.close()
        asyncio.run(main())
    """)
    restarted, reconciled = out["restarted"], out["reconciled"]
    assert isinstance(restarted, dict) and isinstance(reconciled, dict)
    assert list(restarted.values()) == [["1.1.1.1", "1.1.1.2"]]
    assert list(reconciled.values()) == [["1.1.1.2", "1.1.1.3"]]
    swapped = out["swapped"]
    assert isinstance(swapped, dict) and list(swapped.values()) == [["1.1.1.2", "1.1.1.3"]]
    assert set(swapped).isdisjoint(reconciled), "the elements should be in the new rule's set"
    sets = out["sets"]
    assert isinstance(sets, list) and len(sets) == 4 and set(swapped) <= set(sets)


@needs_netns
def test_taking_over_keeps_what_the_other_proxy_added_and_can_extend_it() -> None:
    out = run_in_netns("""
        async def main():
            old = make(); await old.start()
            await old.apply([C("added", "1.1.1.1", 60), C("added", "1.1.1.2", 60),
                             C("added", "2.2.2.2", 60)])
            # The new proxy's state was saved before the old one learned 1.1.1.1 and 2.2.2.2:
            # its cache has no names for them.
            new = make()
            known = {"1.1.1.2", "1.1.1.3"}
            new._names_for = lambda ip, ep: ["a.example.com."] if ip in known else []
            await new.start()
            await new.reconcile([(WEB, "1.1.1.2", time.time() + 60),
                                 (WEB, "1.1.1.3", time.time() + 60)], prune=False)
            out["taken_over"] = flat(new)
            # Tracked as live, so an addition of it replaces the timeout (on older kernels a
            # plain add of an element the set has is a no-op that keeps 60).
            out["tracked"] = sorted(ip for _, ip in new._live)
            # A policy push before the hand-over re-sorts the sets: nothing is lost for want
            # of names.
            new.set_policy(pol, eps)
            out["pushed"] = flat(new)
            known.add("1.1.1.1")  # adopted
            await new.apply([C("added", "1.1.1.1", 600)])
            out["ttl"] = max(v["1.1.1.1"] for v in new.elements().values() if "1.1.1.1" in v)
            await new.reconcile([(WEB, "1.1.1.3", time.time() + 60)])
            out["exact"] = flat(new)
            new.remove_table()
            await new.close(); await old.close()
        asyncio.run(main())
    """)
    taken_over, pushed, exact = out["taken_over"], out["pushed"], out["exact"]
    assert isinstance(taken_over, dict) and isinstance(exact, dict)
    assert sorted(taken_over.values()) == [["1.1.1.1", "1.1.1.2", "1.1.1.3"], ["2.2.2.2"]]
    assert out["tracked"] == ["1.1.1.1", "1.1.1.2", "1.1.1.3", "2.2.2.2"]
    assert pushed == taken_over
    assert 590 <= out["ttl"] <= 600  # type: ignore[operator]
    assert list(exact.values()) == [["1.1.1.3"]]


@needs_netns
def test_start_without_permission_is_a_clear_error() -> None:
    code = textwrap.dedent("""
        import asyncio
        from fqdnguard.backends import BackendError
        from fqdnguard.backends.nftables import Nftables
        try:
            asyncio.run(Nftables().start())
        except BackendError as e:
            print("ERROR", e)
    """)
    r = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
         sys.executable, "-c", code],
        capture_output=True, text=True, cwd=ROOT, check=False,
        # The unprivileged user may not read root's site-packages: point it at the package.
        env={**os.environ, "PYTHONPATH": str(Path(fqdnguard.__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert "ERROR nftables backend: cannot install table fqdnguard" in r.stdout, r.stderr
    assert "CAP_NET_ADMIN" in r.stdout


def test_element_encoding_is_the_kernels() -> None:
    # nla(LIST_ELEM|NESTED, nla(KEY|NESTED, nla(DATA_VALUE, 10.0.0.1)) + nla(TIMEOUT, be64 ms))
    assert _element(_key("10.0.0.1"), 1500) == bytes.fromhex(
        "1c00 0180 0c00 0180 0800 0100 0a000001 0c00 0400 00000000000005dc"
    )
    assert len(_element(_key("fd00::1"), None)) == 4 + 4 + 4 + 16
    with pytest.raises(NftError, match=r"not an IP address: '10\.0\.0'"):
        _key("10.0.0")


@needs_netns
def test_element_batches_are_atomic_big_and_name_what_failed() -> None:
    out = run_in_netns("""
        from fqdnguard.backends.nftables import NftError
        async def main():
            b = make(); await b.start()
            # 30,000 elements: several netlink messages, more than the default socket buffer.
            await b.apply([C("added", f"10.{n >> 8 & 255}.{n & 255}.{1 + n % 3}", 60)
                           for n in range(30_000)])
            # A dump right after 30k inserts can miss elements while the kernel's hash table
            # resizes in the background (seen: 25,914, then 30,000 a second later): poll.
            for _ in range(50):
                out["big"] = sum(len(v) for v in b.elements().values())
                if out["big"] == 30_000:
                    break
                await asyncio.sleep(0.1)
            # One bad message: the kernel refuses the whole transaction, nothing of it stays.
            ops = b._changes([C("added", "5.5.5.5", 60)])
            ops.add.setdefault("ep_no_such_set_4", []).extend(ops.add[next(iter(ops.add))])
            try:
                b._send_locked(ops)
            except NftError as e:
                out["error"] = str(e)
            out["partial"] = any("5.5.5.5" in v for v in b.elements().values())
            b.remove_table()
            await b.close()
        asyncio.run(main())
    """)
    assert out["big"] == 30_000
    assert out["error"] == ("netlink add element ep_no_such_set_4: No such file or directory"), out[
        "error"
    ]
    assert out["partial"] is False


def test_the_reverse_path_check_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    text = backend()[0].ruleset()
    chain = text.split("chain antispoof {")[1].split("}")[0]
    assert "type filter hook prerouting priority raw; policy accept;" in chain
    assert "ip saddr != 0.0.0.0 fib saddr . iif oif missing counter drop" in chain
    assert "ip6 saddr != :: fib saddr . iif oif missing counter drop" in chain
    eps = Endpoints.from_yaml(ENDPOINTS)
    off = Nftables(reverse_path_check=False)
    off.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
    assert "antispoof" not in off.ruleset() and "fib saddr" not in off.ruleset()
    # The flag reaches the dry run (and so the backend `run` and `proxy` make).
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "e.yaml").write_text(ENDPOINTS)
    base = [sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables", "--dry-run",
            "--policy", str(tmp_path / "p.yaml"), "--endpoints", str(tmp_path / "e.yaml"),
            "--listen", "10.0.0.1:53", "--intercept"]  # fmt: skip
    on = subprocess.run(base, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert on.count("fib saddr . iif oif missing counter drop") == 4  # 2 in each table
    out = subprocess.run(
        [*base, "--no-reverse-path-check"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "fib saddr" not in out


# -- peer sets: the addresses of toEndpoints / toCIDR / toCIDRSet, in named sets updated in place

PEERS_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: peers, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toCIDRSet:
        - {cidr: 10.0.0.0/8, except: [10.96.0.0/12, 10.200.0.0/16]}
        - {cidr: 10.200.7.0/24}
        - {cidr: 172.16.0.0/12, except: [172.16.5.5/32, 172.31.255.255/32]}
        - {cidr: "fd00::/16", except: ["fd00:96::/32", "fd00::/120"]}
        - {cidr: "fd00:96:0:7::/64"}
      toPorts: [{ports: [{port: "5432", protocol: UDP}]}]
    - toEndpoints: [{matchLabels: {app: db}}]
      toPorts: [{ports: [{port: "5432", protocol: UDP}]}]
    - toCIDRSet:
        - {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.0.2.0/24]}
        - {cidr: "::/0", except: ["fd00::/8", "2001:db8::/32"]}
      toPorts: [{ports: [{port: "8443", protocol: UDP}]}]
    - toCIDR: [0.0.0.0/0]
      toPorts: [{ports: [{port: "9999", protocol: UDP}]}]
"""
PEERS_ENDPOINTS = """
endpoints:
  - {name: client, namespace: default, ips: [192.0.2.2, "2001:db8:ffff::2"], labels: {app: client}}
  - {name: db, namespace: default, ips: [10.96.0.7, "fd00:96::7", 172.16.5.5],
     labels: {app: db}}
"""
#: Addresses a UDP datagram cannot simply be sent to from a pod (own, special, multicast).
_UNPROBEABLE = [
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "192.0.2.0/24", "224.0.0.0/3",
    "::/8", "fe80::/10", "ff00::/8", "2001:db8:ffff::/64",
]  # fmt: skip


def _samples() -> list[str]:
    """Both sides of every boundary of the policy's CIDRs and excepts, the db endpoint's
    addresses and their neighbours, and random addresses inside each prefix."""
    rng = random.Random(15)
    prefixes = re.findall(r"([0-9a-f:.]+/\d+)", PEERS_POLICY)
    out: set[str] = {"10.96.0.7", "fd00:96::7", "172.16.5.5", "10.96.0.8", "fd00:96::8"}
    for text in prefixes:
        net = ipaddress.ip_network(text)
        lo, hi = int(net.network_address), int(net.broadcast_address)
        top = (1 << net.max_prefixlen) - 1
        values = [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]
        values += [rng.randint(lo, hi) for _ in range(8)]
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        out.update(str(cls(v)) for v in values if 0 <= v <= top)
    bad = [ipaddress.ip_network(n) for n in _UNPROBEABLE]
    return sorted(
        a
        for a in out
        if not any(
            ipaddress.ip_address(a) in n
            for n in bad
            if n.version == ipaddress.ip_address(a).version
        )
    )


@needs_netns
def test_peer_sets_give_exactly_the_policys_egress_verdicts() -> None:
    """Datagrams from a restricted source through the real ruleset, against
    ``Policy.egress_verdict``, on every boundary of CIDRs with excepts (an address another
    CIDR of the rule admits again, a rule to 0.0.0.0/0 whose interval has no end), IPv4 and
    IPv6; then an except changes in place (element update, no chain touched) and they agree
    again."""
    samples = _samples()
    assert len(samples) > 150
    out = run_in_netns(f"""
        import socket, subprocess
        for cmd in ("ip link add v0 type veth peer name v1", "ip link set v0 up",
                    "ip link set v1 up", "ip addr add 192.0.2.2/24 dev v0",
                    "ip addr add 2001:db8:ffff::2/64 dev v0 nodad",
                    "ip route add default dev v0", "ip -6 route add default dev v0"):
            subprocess.run(cmd.split(), check=True)
        POLICY_TEXT, SAMPLES = {PEERS_POLICY!r}, {samples!r}
        eps = Endpoints.from_yaml({PEERS_ENDPOINTS!r})
        client = eps.by_ip("192.0.2.2")
        class NoNames:
            def names_for(self, ip, endpoint=None):
                return []
        def sent(ip, port):
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind(("2001:db8:ffff::2" if ":" in ip else "192.0.2.2", 0))
                try:
                    s.sendto(b"x", (ip, port))
                except PermissionError:  # dropped by the output hook
                    return False
                return True
        def disagreements(pol):
            wrong = []
            for ip in SAMPLES:
                for port in (5432, 8443, 9999, 53):
                    want = pol.egress_verdict(client, ip, port, "UDP", NoNames()).allowed
                    got = sent(ip, port)
                    key = str(port) + ("/6" if ":" in ip else "/4")
                    out.setdefault("answers", dict()).setdefault(key, []).append(got)
                    if got != want:
                        wrong.append([ip, port, want])
            return wrong
        async def main():
            pol = Policy.from_yaml(POLICY_TEXT, endpoints=eps)
            b = Nftables(); b.set_policy(pol, eps, listen=[("192.0.2.1", 53)])
            await b.start()
            out["wrong"] = disagreements(pol)
            out["chain"] = b.ruleset().split("chain ep_")[1]
            out["peers"] = peer_elements()
            before, transactions = handles(), b.transactions
            pol2 = Policy.from_yaml(POLICY_TEXT.replace("10.200.0.0/16", "10.201.0.0/16"),
                                    endpoints=eps)
            b.set_policy(pol2, eps)
            out["in_place"] = handles() == before
            out["transactions"] = b.transactions - transactions
            out["wrong_after"] = disagreements(pol2)
            b.remove_table(); await b.close()
        asyncio.run(main())
    """)
    assert out["wrong"] == [], "the kernel and egress_verdict disagree"
    answers = out["answers"]
    assert isinstance(answers, dict)
    for key in ("5432/4", "5432/6", "8443/4", "8443/6"):
        assert True in answers[key] and False in answers[key], key  # both verdicts sampled
    assert all(answers["9999/4"]) and not any(answers["9999/6"]) and not any(answers["53/4"])
    assert out["wrong_after"] == []
    # The peers are in sets, not written into the chain.
    chain = out["chain"]
    assert isinstance(chain, str) and "10." not in chain and "fd00" not in chain
    peers = out["peers"]
    assert isinstance(peers, dict) and len(peers) == 8  # 4 rules x 2 families
    assert {"range": ["10.0.0.0", "10.95.255.255"]} in [e for v in peers.values() for e in v]
    assert out["in_place"] is True and out["transactions"] == 1


#: POLICY with a rule for a second selected pod (a second peer set).
TWO_PEERS_POLICY = (
    POLICY
    + """    - toEndpoints: [{matchLabels: {app: db}}]
      toPorts: [{ports: [{port: "6432", protocol: TCP}]}]
"""
)


@needs_netns
def test_a_refused_update_leaves_the_ruleset_in_force() -> None:
    """The kernel refuses an update half-way (another tool put an element that overlaps the db
    pod's new address into its rule's set): nothing of it is applied, not the kube-dns set's
    change that came first in the transaction, nor a rewritten chain; the backend still
    describes the old ruleset; the next update then installs the new one whole."""
    out = run_in_netns(f"""
        import subprocess
        from fqdnguard.backends.nftables import NftError
        TEXT = {TWO_PEERS_POLICY!r}
        def load(dns, db, text=TEXT):
            e = Endpoints.from_yaml({ENDPOINTS!r}.replace("10.96.0.10", dns)
                                    + "  - {{name: db, namespace: default, ips: [" + db
                                    + "], labels: {{app: db}}}}\\n")
            return Policy.from_yaml(text, endpoints=e), e
        def peer_set_of(b, rule_port):
            chain = b.ruleset().split("chain ep_")[1]
            rule = next(r for r in chain.splitlines() if rule_port in r and "ip daddr @peer_" in r)
            return rule.split("@")[1].split()[0]
        async def refused(name, policy_text):
            b = Nftables(); b.set_policy(*load("10.96.0.10", "10.1.0.5"), listen=[("10.0.0.1", 53)])
            await b.start()
            await b.apply([C("added", "1.1.1.1", 300)])
            dns_set, db_set = peer_set_of(b, "udp . 53"), peer_set_of(b, "tcp . 6432")
            # Another tool's element, overlapping the address the db pod is about to get.
            subprocess.run(["nft", "add", "element", "inet", "fqdnguard", db_set,
                            "{{ 10.2.0.0/16 }}"], check=True)
            before, text, peers, learned = handles(), b.ruleset(), peer_elements(), flat(b)
            try:
                b.set_policy(*load("10.96.0.11", "10.2.0.5", policy_text))
            except NftError as e:
                out[name] = str(e)
            out[name + "_handles"] = handles() == before
            out[name + "_elements"] = peer_elements() == peers
            out[name + "_view"] = b.ruleset() == text
            out[name + "_learned"] = flat(b) == learned and bool(learned)
            # The next update installs the whole table (what it holds is in doubt).
            b.set_policy(*load("10.96.0.11", "10.2.0.5", policy_text))
            now = peer_elements()
            out[name + "_repaired"] = [now[dns_set], now[db_set], flat(b) == learned]
            b.remove_table(); await b.close()
        async def main():
            await refused("elements", TEXT)  # an element transaction (netlink)
            await refused("chains", TEXT.replace('"6432"', '"6433"'))  # and a chain (nft text)
        asyncio.run(main())
    """)
    assert "File exists" in str(out["elements"]) and "peer_" in str(out["elements"]), out
    # nft finds it before the kernel does: "interval overlaps with an existing one".
    assert "overlaps" in str(out["chains"]), out
    for name in ("elements", "chains"):
        assert out[f"{name}_handles"] is True, f"{name}: chains, rules or sets re-created"
        assert out[f"{name}_elements"] is True, f"{name}: part of the refused update applied"
        assert out[f"{name}_view"] is True, f"{name}: the backend describes a ruleset not in force"
        assert out[f"{name}_learned"] is True
        assert out[f"{name}_repaired"] == [["10.96.0.11"], ["10.2.0.5"], True]


@needs_netns
def test_a_reload_that_changes_nothing_sends_nothing() -> None:
    """The same policy, parsed again, and the same endpoints, in a new registry: no transaction
    (``nft monitor`` sees no new generation) and nothing re-created."""
    out = run_in_netns("""
        import subprocess
        mon = subprocess.Popen(["nft", "monitor"], stdout=subprocess.PIPE, text=True)
        def fence(n):  # a change of our own the monitor must show: what lies between is ours
            subprocess.run(["nft", "add", "table", "inet", f"fence{n}"], check=True)
            seen = []
            while f"add table inet fence{n}" not in (line := mon.stdout.readline()):
                seen.append(line.strip())
            assert mon.stdout.readline().startswith("# new generation")  # the fence's own
            return seen
        async def main():
            b = make(); await b.start()
            await b.apply([C("added", "1.1.1.1", 300)])
            before, transactions = handles(), b.transactions
            fence(1)
            e = Endpoints.from_yaml(ENDPOINTS)
            b.set_policy(Policy.from_yaml(POLICY, endpoints=e), e, listen=[("10.0.0.1", 53)])
            out["events"] = [x for x in fence(2) if x]
            out["transactions"] = b.transactions - transactions
            out["same"] = handles() == before
            mon.terminate()
            b.remove_table(); await b.close()
        asyncio.run(main())
    """)
    assert out["events"] == [], "the reload changed something in the kernel"
    assert out["transactions"] == 0 and out["same"] is True


POD_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toEndpoints: [{matchLabels: {app: server}}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    - toFQDNs: [{matchName: learned.example}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""

# The backend alone, in the node namespace: each line in is the server endpoint's addresses
# (JSON), each line out what it did. A learned IP for the toFQDNs rule is programmed at start.
BACKEND_DRIVER = """
import asyncio, json, sys, time
from fqdnguard import Endpoints, Policy
from fqdnguard.backends.nftables import Nftables
POLICY, POD, LEARNED = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
loop = asyncio.new_event_loop()
b = Nftables()
b._names_for = lambda ip, ep: ["learned.example."]
for line in sys.stdin:
    eps = Endpoints.from_yaml(
        "endpoints:\\n"
        f"  - {{name: pod, namespace: default, ips: {json.dumps(POD)}, labels: {{app: pod}}}}\\n"
        f"  - {{name: server, namespace: default, ips: {line.strip()}, labels: {{app: server}}}}\\n"
    )
    before = b.transactions
    b.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.77.1.1", 53)])
    if not before:
        loop.run_until_complete(b.start())
        pod = eps.by_ip(POD[0]).id
        loop.run_until_complete(b.apply([(pod, LEARNED, time.time() + 300)]))
    print(json.dumps({"transactions": b.transactions - before}), flush=True)
"""


@needs_netns
def test_a_peer_address_change_is_an_element_update_and_traffic_follows() -> None:
    """A pod the policy's toEndpoints selects moves to a new address (a kube-dns pod restarted):
    no chain, rule or set is re-created (same kernel handles, the drop counter keeps its
    count), the learned IPs stay, a connection made before lives on; from the pod namespace the
    new address is reachable on the rule's port and the old one is not."""
    topo = Topology(f"fps{os.getpid() % 100000}").create()
    driver = None
    try:
        topo.start_echo_servers(sys.executable)
        driver = topo.spawn(
            topo.node, sys.executable, "-c", BACKEND_DRIVER, POD_POLICY,
            json.dumps([POD4, POD6]), WORLD4[2],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert driver.stdin is not None and driver.stdout is not None

        def server_at(*ips: str) -> int:
            driver.stdin.write(json.dumps(list(ips)) + "\n")  # type: ignore[union-attr]
            driver.stdin.flush()  # type: ignore[union-attr]
            line = driver.stdout.readline()  # type: ignore[union-attr]
            assert line, "the backend driver died"
            return int(json.loads(line)["transactions"])

        def reaches(ip: str, port: int = 443, timeout: float = 0.5) -> bool:
            s = topo.connect(topo.pod, ip, port, timeout)
            if s is None:
                return False
            s.close()
            return True

        def kernel() -> tuple[list[list[object]], int]:
            text = subprocess.run(
                ["ip", "netns", "exec", topo.node, "nft", "-j", "list", "table", "inet",
                 "fqdnguard"], capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            found: list[list[object]] = []
            dropped = 0
            for item in json.loads(text)["nftables"]:
                for kind, obj in item.items():
                    if kind in ("chain", "set", "map"):
                        found.append([kind, obj["name"], obj["handle"]])
                    elif kind == "rule":
                        found.append([kind, obj["chain"], obj["handle"]])
                        for e in obj["expr"]:
                            if "counter" in e and obj["chain"].startswith("ep_"):
                                dropped += e["counter"]["packets"]
            return sorted(found), dropped

        server_at(WORLD4[0], WORLD6[0])
        # Neighbour discovery done beforehand (the node itself is not restricted), so that a
        # first connection does not wait for it past the timeout.
        for ip in (*WORLD4[:3], *WORLD6[:2]):
            warm = topo.connect(topo.node, ip, 443, timeout=3)
            assert warm is not None, f"the node cannot reach {ip}"
            warm.close()
        for ip in (NODE_POD4, NODE_POD6):  # the pod's link: a closed port answers at once
            assert topo.connect(topo.pod, ip, 9, timeout=3) is None
        assert reaches(WORLD4[0]) and reaches(WORLD6[0]) and reaches(WORLD4[2], 8080)
        assert not reaches(WORLD4[1]) and not reaches(WORLD6[1])
        live = topo.connect(topo.pod, WORLD4[0], 443)
        assert live is not None and echo_ok(live)
        objects, dropped = kernel()
        assert dropped > 0

        assert server_at(WORLD4[1], WORLD6[1]) == 1  # one element transaction
        after, dropped_after = kernel()
        assert after == objects, "a chain, rule or set was re-created"
        assert dropped_after >= dropped, "the drop rule's counter was reset"
        assert reaches(WORLD4[1]) and reaches(WORLD6[1])
        assert not reaches(WORLD4[0]) and not reaches(WORLD6[0])
        assert not reaches(WORLD4[1], 8080), "the rule's ports still apply"
        assert reaches(WORLD4[2], 8080), "the learned IP's set was touched"
        assert echo_ok(live), "the established connection was cut"
        live.close()
    finally:
        if driver is not None and driver.stdin is not None:
            driver.stdin.close()
        topo.close()


@needs_netns
def test_a_chain_change_with_element_changes_is_one_transaction() -> None:
    """New ports for one rule (its chain is rewritten) while pods move and an except changes:
    one nft transaction, in which the peer sets get element changes (not re-created)."""
    out = run_in_netns(f"""
        def load(dns, db, text={TWO_PEERS_POLICY!r}):
            e = Endpoints.from_yaml(ENDPOINTS.replace("10.96.0.10", dns)
                                    + "  - {{name: db, namespace: default, ips: [" + db
                                    + "], labels: {{app: db}}}}\\n")
            return Policy.from_yaml(text, endpoints=e), e
        async def main():
            b = Nftables(); b.set_policy(*load("10.96.0.10", "10.1.0.5"), listen=[("10.0.0.1", 53)])
            await b.start()
            await b.apply([C("added", "1.1.1.1", 300)])
            sets = [h for h in handles() if h[0] == "set"]
            learned, transactions = flat(b), b.transactions
            text = {TWO_PEERS_POLICY!r}.replace('"6432"', '"6433"').replace(
                "192.168.1.0/24", "192.168.3.0/25")
            b.set_policy(*load("10.96.0.11", "10.1.0.6", text))
            out["transactions"] = b.transactions - transactions
            out["sets_kept"] = [h for h in handles() if h[0] == "set"] == sets
            out["learned"] = flat(b) == learned
            out["peers"] = sorted(json.dumps(v) for v in peer_elements().values() if v)
            out["chain"] = b.ruleset().split("chain ep_")[1]
            b.remove_table(); await b.close()
        asyncio.run(main())
    """)
    assert out["transactions"] == 1 and out["sets_kept"] is True and out["learned"] is True
    assert out["peers"] == sorted(
        json.dumps(v)
        for v in (
            ["10.96.0.11"],
            ["10.1.0.6"],
            [
                {"range": ["192.168.0.0", "192.168.2.255"]},
                {"range": ["192.168.3.128", "192.168.255.255"]},
            ],
        )
    )
    assert "tcp . 6433" in str(out["chain"]) and "tcp . 6432" not in str(out["chain"])
