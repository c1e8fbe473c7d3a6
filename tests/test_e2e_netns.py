"""End to end in network namespaces: a pod routed through a node running ``fqdnguard run
--backend nftables``, a real Knot upstream and TCP servers in a "world" (see tests/netns.py).

Needs root, iproute2, knotd and libnftables; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from fqdnguard.testing import KnotServer

from tests.netns import (
    NODE_POD4,
    NODE_POD6,
    POD4,
    POD6,
    UPSTREAM4,
    Topology,
    echo_ok,
    netns_unavailable,
)
from tests.proxy_fixtures import require_knot

ZONE = """$ORIGIN e2e.test.
$TTL 300
@               SOA ns admin 1 3600 600 86400 60
@               NS  ns
ns              A   10.77.2.53
web.allowed     A   10.77.2.10
web.allowed     AAAA fd77:2::10
other.allowed   A   10.77.2.11
other.allowed   AAAA fd77:2::11
denied.blocked  A   10.77.2.12
short.allowed   2 A 10.77.2.13
short6.allowed  2 AAAA fd77:2::13
alt.allowed     A   10.77.2.14
""" + "".join(f"burst-{i}.allowed A 10.77.3.{i}\n" for i in range(1, 61))

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toCIDR: [10.77.2.53/32]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*.allowed.e2e.test"}]}
    - toFQDNs: [{matchPattern: "*.allowed.e2e.test"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    - toFQDNs: [{matchName: "alt.allowed.e2e.test"}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""

ENDPOINTS = f"""
endpoints:
  - name: pod
    namespace: default
    ips: [{POD4}, "{POD6}"]
    labels: {{app: pod}}
"""


def _skip_reason() -> str | None:
    reason = netns_unavailable()
    if reason is None and not Path("/usr/lib/x86_64-linux-gnu/libnftables.so.1").exists():
        import ctypes.util  # noqa: PLC0415

        if ctypes.util.find_library("nftables") is None:
            reason = "needs libnftables (Debian package libnftables1)"
    return reason


pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)


@dataclass
class Env:
    topo: Topology
    state: Path
    proxy: subprocess.Popen[bytes]

    def resolve(
        self, name: str, rdtype: str = "A", server: str = NODE_POD4
    ) -> tuple[int, list[str]]:
        """Asks the node's proxy from the pod: (rcode, addresses)."""
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        s = self.topo.open_socket(self.topo.pod, family, socket.SOCK_DGRAM)
        with s:
            s.settimeout(2)
            q = dns.message.make_query(name, rdtype)
            s.sendto(q.to_wire(), (server, 53))
            answer = dns.message.from_wire(s.recv(65535))
        addrs = [rd.address for rrset in answer.answer for rd in rrset if rrset.rdtype in (1, 28)]
        return answer.rcode(), addrs

    def reaches(self, ip: str, port: int, source: str | None = None) -> bool:
        s = self.topo.connect(source or self.topo.pod, ip, port)
        if s is None:
            return False
        ok = echo_ok(s)
        s.close()
        return ok


def _start_proxy(
    topo: Topology, state: Path, policy: Path, endpoints: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables",
        "--listen", f"{NODE_POD4}:53", "--listen", f"[{NODE_POD6}]:53",
        "--upstream", f"{UPSTREAM4}:53", "--policy", str(policy), "--endpoints", str(endpoints),
        "--state-dir", str(state / "run"), "--log-queries", "none", "--log-level", "warning",
    ]  # fmt: skip
    with open(state / "proxy.log", "ab") as log:
        return topo.spawn(topo.node, *cmd, stdout=log, stderr=log, cwd=os.getcwd())


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_knot()
    topo = Topology().create()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-e2e-"))
    try:
        topo.start_echo_servers(sys.executable)
        (state / "policy.yaml").write_text(POLICY)
        (state / "endpoints.yaml").write_text(ENDPOINTS)
        with KnotServer({"e2e.test": ZONE}, host=UPSTREAM4, port=53, netns=topo.world):
            proxy = _start_proxy(topo, state, state / "policy.yaml", state / "endpoints.yaml")
            e = Env(topo, state, proxy)
            _wait_serving(e)
            yield e
    finally:
        topo.close()
        log = state / "proxy.log"
        if log.exists() and log.read_text().strip():
            print(f"--- fqdnguard log\n{log.read_text()}", file=sys.stderr)


def _wait_serving(e: Env, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if e.proxy.poll() is not None:
            raise RuntimeError(f"fqdnguard exited: {(e.state / 'proxy.log').read_text()}")
        try:
            e.resolve("ns.e2e.test")  # denied by the DNS rules, but answered: it serves
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fqdnguard did not serve: {(e.state / 'proxy.log').read_text()}")


def test_resolved_allowed_ip_is_reachable_and_nothing_else(env: Env) -> None:
    assert not env.reaches("10.77.2.10", 443), "reachable before its name was resolved"
    rcode, addrs = env.resolve("web.allowed.e2e.test")
    assert (rcode, addrs) == (dns.rcode.NOERROR, ["10.77.2.10"])
    assert env.reaches("10.77.2.10", 443)
    # Allowed by the policy but never resolved: its address stays closed.
    assert not env.reaches("10.77.2.11", 443)
    # Denied name: refused, and its address closed.
    assert env.resolve("denied.blocked.e2e.test") == (dns.rcode.REFUSED, [])
    assert not env.reaches("10.77.2.12", 443)
    # The node's own traffic (no policy selects it) is untouched.
    assert env.reaches("10.77.2.11", 443, source=env.topo.node)


def test_port_outside_to_ports_is_blocked(env: Env) -> None:
    assert env.resolve("web.allowed.e2e.test")[1] == ["10.77.2.10"]
    assert env.reaches("10.77.2.10", 443)
    assert not env.reaches("10.77.2.10", 8080)
    # alt.allowed matches both toFQDNs rules: both rules' ports.
    assert env.resolve("alt.allowed.e2e.test")[1] == ["10.77.2.14"]
    assert env.reaches("10.77.2.14", 8080)
    assert env.reaches("10.77.2.14", 443)


def test_after_ttl_new_connections_fail_established_ones_live(env: Env) -> None:
    _after_ttl("short.allowed.e2e.test", "A", "10.77.2.13", env)


def test_ipv6_the_same(env: Env) -> None:
    rcode, addrs = env.resolve("web.allowed.e2e.test", "AAAA", server=NODE_POD6)
    assert (rcode, addrs) == (dns.rcode.NOERROR, ["fd77:2::10"])
    assert env.reaches("fd77:2::10", 443)
    assert not env.reaches("fd77:2::10", 8080)
    assert not env.reaches("fd77:2::11", 443)
    assert env.reaches("fd77:2::11", 443, source=env.topo.node)
    _after_ttl("short6.allowed.e2e.test", "AAAA", "fd77:2::13", env)


def _after_ttl(name: str, rdtype: str, ip: str, env: Env) -> None:
    resolved = time.monotonic()
    assert env.resolve(name, rdtype)[1] == [ip]
    live = env.topo.connect(env.topo.pod, ip, 443)
    assert live is not None and echo_ok(live)
    try:
        # The name's TTL is 2 s; the proxy expires its cache every second: the element goes.
        deadline = resolved + 6
        while env.reaches(ip, 443):
            assert time.monotonic() < deadline, "still reachable long after the TTL"
            time.sleep(0.2)
        assert time.monotonic() - resolved >= 1.5, "closed before the TTL ran out"
        assert echo_ok(live, b"still here"), "the established connection was cut"
    finally:
        live.close()


def test_ruleset_is_the_dry_run(env: Env) -> None:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            env.topo.node,
            "nft",
            "list",
            "chain",
            "inet",
            "fqdnguard",
            "egress",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ct state established,related accept" in out
    assert "ip saddr vmap @src4" in out
