"""The nftables backend: the ruleset it derives from a policy (anywhere), and its kernel behaviour
(in a network namespace of its own, as root: policy swaps, timeouts, restart, reconcile)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fqdnguard
import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard.backends import BackendError
from fqdnguard.backends.nftables import Nftables, NftError, _element, _key, _port_expr

from tests.netns import netns_unavailable

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
