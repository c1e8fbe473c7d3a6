"""End to end: transparent interception (``fqdnguard run --intercept``) in network namespaces.

Two pods ask the cluster-DNS address (a real Knot in a "dns" namespace) as pods whose resolv.conf
names kube-dns do; a policy with DNS rules selects one of them. The node runs fqdnguard with the
nftables backend and ``--intercept``; a world holds TCP servers (see tests/netns.py,
``InterceptTopology``). Shows: the policed pod's allowed queries are answered (from the address
asked) and logged; its denied queries and its queries to a server no rule admits are refused; the
other pod's queries never pass through fqdnguard; the policed pod reaches only what it resolved;
UDP and TCP, IPv4 and IPv6; a SIGHUP reload moves the set of intercepted sources; restarts do not
duplicate the rules; SIGTERM and kill -9 leave them and ``intercept cleanup`` removes
them.

Needs root, iproute2, knotd, libnftables and the kernel's nft_tproxy; skipped with the reason
otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard.control import ControlError, request_sync
from fqdnguard.testing import KnotServer

from tests.netns import (
    CLUSTER_DNS4,
    CLUSTER_DNS6,
    FREE4,
    FREE6,
    NODE_POLICED4,
    OTHER_DNS4,
    OTHER_DNS6,
    POLICED4,
    POLICED6,
    InterceptTopology,
    echo_ok,
)
from tests.proxy_fixtures import require_knot
from tests.test_e2e_netns import _skip_reason

ZONE = """$ORIGIN e2e.test.
$TTL 300
@               SOA ns admin 1 3600 600 86400 60
@               NS  ns
ns              A   10.96.0.10
web.allowed     A   10.79.2.10
web.allowed     AAAA fd79:2::10
other.allowed   A   10.79.2.11
other.allowed   AAAA fd79:2::11
denied.blocked  A   10.79.2.12
denied.blocked  AAAA fd79:2::12
spoof.allowed   A   10.79.2.13
spoof.allowed   AAAA fd79:2::13
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: policed-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: policed}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}, {port: "5353", protocol: UDP}]
          rules: {dns: [{matchPattern: "*.allowed.e2e.test"}]}
    - toFQDNs: [{matchPattern: "*.allowed.e2e.test"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def endpoints_yaml(free_label: str = "free") -> str:
    return f"""
endpoints:
  - name: kube-dns
    namespace: kube-system
    ips: [{CLUSTER_DNS4}, "{CLUSTER_DNS6}"]
    labels: {{k8s-app: kube-dns}}
  - name: other-dns
    namespace: default
    ips: [{OTHER_DNS4}, "{OTHER_DNS6}"]
    labels: {{app: other-dns}}
  - name: policed
    namespace: default
    ips: [{POLICED4}, "{POLICED6}"]
    labels: {{app: policed}}
  - name: free
    namespace: default
    ips: [{FREE4}, "{FREE6}"]
    labels: {{app: {free_label}}}
"""


pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)


@dataclass
class Answer:
    rcode: int
    addrs: list[str]
    #: Where the answer came from (UDP: the datagram's source; TCP: the connection's peer).
    source: tuple[str, int]


@dataclass
class Env:
    topo: InterceptTopology
    state: Path
    #: The proxy's UDP I/O (``--udp-io``): the transparent UDP listeners are served by the
    #: Rust thread ("rust") or read with recvmsg from the event loop ("asyncio").
    udp_io: str = "rust"
    proxy: subprocess.Popen[bytes] | None = None
    log_offset: int = field(default=0)

    @property
    def log(self) -> Path:
        return self.state / "fqdnguard.log"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables", "--intercept",
            "--policy", str(self.state / "policy.yaml"),
            "--endpoints", str(self.state / "endpoints.yaml"),
            "--state-dir", str(self.state / "run"), "--log-queries", "all", "--log-level", "info",
            "--listen", f"{NODE_POLICED4}:53", "--udp-io", self.udp_io,
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proxy = self.topo.spawn(
                self.topo.node, *cmd, stdout=out, stderr=out, cwd=os.getcwd()
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proxy.poll() is None, f"fqdnguard exited: {self.log.read_text()}"
            try:
                if self.stats()["engine"]["queries"] >= 0 and self.status()["table"]:
                    return
            except (OSError, ValueError, KeyError, ControlError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"fqdnguard did not start: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proxy is not None
        self.proxy.send_signal(sig)
        self.proxy.wait(15)
        self.proxy = None

    def ask(
        self,
        ns: str,
        name: str,
        server: str,
        *,
        tcp: bool = False,
        rdtype: str = "A",
        port: int = 53,
    ) -> Answer:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        q = dns.message.make_query(name, rdtype)
        wire = q.to_wire()
        if tcp:
            s = self.topo.open_socket(ns, family, socket.SOCK_STREAM)
            with s:
                s.settimeout(3)
                s.connect((server, port))
                s.sendall(len(wire).to_bytes(2, "big") + wire)
                size = int.from_bytes(_recv_exact(s, 2), "big")
                data, source = _recv_exact(s, size), s.getpeername()[:2]
        else:
            s = self.topo.open_socket(ns, family, socket.SOCK_DGRAM)
            with s:
                s.settimeout(3)
                s.sendto(wire, (server, port))
                data, addr = s.recvfrom(65535)
                source = addr[:2]
        answer = dns.message.from_wire(data)
        assert answer.id == q.id
        addrs = [rd.address for rrset in answer.answer for rd in rrset if rrset.rdtype in (1, 28)]
        return Answer(answer.rcode(), addrs, source)

    def stats(self) -> dict[str, Any]:
        status, body = request_sync(str(self.state / "run" / "control.sock"), "GET", "/v1/stats")
        assert status == 200
        return body  # type: ignore[no-any-return]

    def queries(self) -> int:
        return int(self.stats()["engine"]["queries"])

    def cached_names(self) -> set[str]:
        status, body = request_sync(str(self.state / "run" / "control.sock"), "GET", "/v1/cache")
        assert status == 200
        return {e["name"] for e in body[1:]}  # NDJSON: a header line, then the entries

    def logged(self) -> list[dict[str, Any]]:
        """Query log lines written since the last call."""
        text = self.log.read_text()
        new, self.log_offset = text[self.log_offset :], len(text)
        out = []
        for line in new.splitlines():
            _, sep, rest = line.partition("fqdnguard.query: ")
            if sep:
                out.append(json.loads(rest))
        return out

    def node(self, *cmd: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.topo.node, *cmd],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            cwd=os.getcwd(),
        )

    def status(self) -> dict[str, Any]:
        r = self.node(sys.executable, "-m", "fqdnguard.cli", "intercept", "status")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def reaches(self, ip: str, port: int = 443) -> bool:
        s = self.topo.connect(self.topo.pod, ip, port)
        if s is None:
            return False
        ok = echo_ok(s)
        s.close()
        return ok


def _recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


@pytest.fixture(scope="module", params=["rust", "asyncio"], ids=["udp_io=rust", "udp_io=asyncio"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    require_knot()
    topo = InterceptTopology().create()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-intercept-"))
    e = Env(topo, state, udp_io=request.param)
    try:
        topo.start_echo_servers(sys.executable)
        (state / "policy.yaml").write_text(POLICY)
        (state / "endpoints.yaml").write_text(endpoints_yaml())
        extra = [(CLUSTER_DNS6, 53), (OTHER_DNS4, 53), (OTHER_DNS6, 53), (CLUSTER_DNS4, 5353)]
        with KnotServer(
            {"e2e.test": ZONE}, host=CLUSTER_DNS4, port=53, extra_listen=extra, netns=topo.dns
        ):
            e.start()
            yield e
            if e.proxy is not None:
                e.stop()
    finally:
        topo.close()
        cleanup = subprocess.run(  # the namespace is gone; nothing of ours is left on the host
            ["nft", "list", "table", "inet", "fqdnguard_intercept"],
            capture_output=True,
            check=False,
        )
        assert cleanup.returncode != 0, "interception rules leaked into the host namespace"
        if e.log.exists() and os.environ.get("FQDNGUARD_E2E_LOG"):
            print(f"--- fqdnguard log\n{e.log.read_text()}", file=sys.stderr)


CASES = [
    pytest.param(CLUSTER_DNS4, False, "A", "10.79.2.10", id="udp4"),
    pytest.param(CLUSTER_DNS4, True, "A", "10.79.2.10", id="tcp4"),
    pytest.param(CLUSTER_DNS6, False, "AAAA", "fd79:2::10", id="udp6"),
    pytest.param(CLUSTER_DNS6, True, "AAAA", "fd79:2::10", id="tcp6"),
]


@pytest.mark.parametrize(("server", "tcp", "rdtype", "ip"), CASES)
def test_policed_pod_allowed_answered_from_the_address_asked_and_logged(
    env: Env, server: str, tcp: bool, rdtype: str, ip: str
) -> None:
    env.logged()
    before = env.queries()
    got = env.ask(env.topo.pod, "web.allowed.e2e.test", server, tcp=tcp, rdtype=rdtype)
    assert (got.rcode, got.addrs) == (dns.rcode.NOERROR, [ip])
    assert got.source == (server, 53)
    assert env.queries() == before + 1
    logged = [r for r in env.logged() if r["qname"] == "web.allowed.e2e.test."]
    assert logged and logged[0]["verdict"] == "allowed"


@pytest.mark.parametrize(("server", "tcp", "rdtype", "ip"), CASES)
def test_policed_pod_denied_name_refused(
    env: Env, server: str, tcp: bool, rdtype: str, ip: str
) -> None:
    got = env.ask(env.topo.pod, "denied.blocked.e2e.test", server, tcp=tcp, rdtype=rdtype)
    assert (got.rcode, got.addrs, got.source) == (dns.rcode.REFUSED, [], (server, 53))


@pytest.mark.parametrize("server", [CLUSTER_DNS4, CLUSTER_DNS6])
def test_intercepted_tcp_queries_before_a_half_close_are_all_answered(
    env: Env, server: str
) -> None:
    """The policed pod sends pipelined queries over intercepted TCP, then shuts its write side
    (``nc -q``, some stub resolvers): every query is answered, then fqdnguard closes."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    # Only web.allowed: other tests check what other.allowed's addresses reach before and after.
    asked = [("web.allowed.e2e.test", "A"), ("denied.blocked.e2e.test", "A")]
    asked.append(("web.allowed.e2e.test", "AAAA"))
    for i in range(25):
        queries = [dns.message.make_query(n, t) for n, t in asked]
        s = env.topo.open_socket(env.topo.pod, family, socket.SOCK_STREAM)
        with s:
            s.settimeout(3)
            s.connect((server, 53))
            s.sendall(
                b"".join(len(w).to_bytes(2, "big") + w for w in (m.to_wire() for m in queries))
            )
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65535):  # until fqdnguard closes
                got += chunk
        answers = {}
        while got:
            size = int.from_bytes(got[:2], "big")
            answer = dns.message.from_wire(got[2 : 2 + size])
            answers[answer.id] = answer.rcode()
            got = got[2 + size :]
        assert answers == {
            queries[0].id: dns.rcode.NOERROR,
            queries[1].id: dns.rcode.REFUSED,
            queries[2].id: dns.rcode.NOERROR,
        }, f"connection {i}"


@pytest.mark.parametrize(
    ("server", "tcp"),
    [(OTHER_DNS4, False), (OTHER_DNS4, True), (OTHER_DNS6, False), (OTHER_DNS6, True)],
)
def test_policed_pod_asking_a_server_to_endpoints_does_not_admit_is_refused(
    env: Env, server: str, tcp: bool
) -> None:
    # The same name that kube-dns answers for it; this server answers the free pod (below).
    got = env.ask(env.topo.pod, "web.allowed.e2e.test", server, tcp=tcp)
    assert (got.rcode, got.addrs, got.source) == (dns.rcode.REFUSED, [], (server, 53))


@pytest.mark.parametrize(
    ("server", "tcp", "rdtype", "ip"),
    [
        (CLUSTER_DNS4, False, "A", "10.79.2.12"),
        (CLUSTER_DNS6, True, "AAAA", "fd79:2::12"),
        (OTHER_DNS4, True, "A", "10.79.2.12"),
        (OTHER_DNS6, False, "AAAA", "fd79:2::12"),
    ],
)
def test_unpoliced_pod_is_answered_without_fqdnguard(
    env: Env, server: str, tcp: bool, rdtype: str, ip: str
) -> None:
    env.logged()
    before = env.stats()["engine"]
    got = env.ask(env.topo.free, "denied.blocked.e2e.test", server, tcp=tcp, rdtype=rdtype)
    assert (got.rcode, got.addrs, got.source) == (dns.rcode.NOERROR, [ip], (server, 53))
    after = env.stats()["engine"]
    assert {k: after[k] for k in ("queries", "rcodes")} == {
        k: before[k] for k in ("queries", "rcodes")
    }
    assert env.logged() == []


def test_asking_fqdnguard_directly_still_works_and_is_not_intercepted(env: Env) -> None:
    # Its own listen address is left out of interception: no loop through TPROXY.
    for tcp in (False, True):
        got = env.ask(env.topo.pod, "web.allowed.e2e.test", NODE_POLICED4, tcp=tcp)
        assert (got.rcode, got.addrs, got.source) == (
            dns.rcode.NOERROR,
            ["10.79.2.10"],
            (NODE_POLICED4, 53),
        )
        got = env.ask(env.topo.pod, "denied.blocked.e2e.test", NODE_POLICED4, tcp=tcp)
        assert got.rcode == dns.rcode.REFUSED


def test_policed_pod_reaches_only_what_it_resolved(env: Env) -> None:
    assert not env.reaches("10.79.2.11"), "reachable before its name was resolved"
    assert not env.reaches("fd79:2::11")
    assert env.ask(env.topo.pod, "other.allowed.e2e.test", CLUSTER_DNS4).addrs == ["10.79.2.11"]
    assert env.reaches("10.79.2.11")
    assert not env.reaches("fd79:2::11"), "only the A record was asked"
    got = env.ask(env.topo.pod, "other.allowed.e2e.test", CLUSTER_DNS6, tcp=True, rdtype="AAAA")
    assert got.addrs == ["fd79:2::11"]
    assert env.reaches("fd79:2::11")
    # Denied: refused above, never reachable; the free pod's own answer opens nothing for it.
    assert not env.reaches("10.79.2.12")
    assert not env.reaches("10.79.2.11", 8080), "a port outside toPorts"


def test_dns_on_another_port_a_dns_rule_names_is_policed_too(env: Env) -> None:
    # The policy's DNS rule is on 5353 as well: Cilium sends DNS there to its proxy, so a pod
    # must not get kube-dns:5353 to answer what fqdnguard refuses on 53.
    got = env.ask(env.topo.pod, "denied.blocked.e2e.test", CLUSTER_DNS4, port=5353)
    assert (got.rcode, got.addrs, got.source) == (dns.rcode.REFUSED, [], (CLUSTER_DNS4, 5353))
    got = env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4, port=5353)
    assert (got.rcode, got.addrs, got.source) == (
        dns.rcode.NOERROR,
        ["10.79.2.10"],
        (CLUSTER_DNS4, 5353),
    )
    # The other pod's DNS on that port is none of fqdnguard's business.
    got = env.ask(env.topo.free, "denied.blocked.e2e.test", CLUSTER_DNS4, port=5353)
    assert got.rcode == dns.rcode.NOERROR


def test_a_table_deleted_by_another_tool_comes_back_on_reload(env: Env) -> None:
    assert env.node("nft", "delete", "table", "inet", "fqdnguard_intercept").returncode == 0
    assert env.status()["table"] is False
    assert env.proxy is not None
    env.proxy.send_signal(signal.SIGHUP)
    _wait(lambda: env.status()["table"], "the reload to put the table back")
    assert _installed(env.status()) == FULL
    got = env.ask(env.topo.pod, "denied.blocked.e2e.test", CLUSTER_DNS4)
    assert (got.rcode, got.source) == (dns.rcode.REFUSED, (CLUSTER_DNS4, 53))


NODE_LOCAL = "10.79.9.9"


def test_a_dns_server_local_to_the_node_keeps_its_queries(env: Env) -> None:
    """Node-local DNS: the address asked is the node's own and a server there holds port 53.
    fqdnguard cannot answer the policed pod from that address without sharing the server's
    socket address (and taking its queries): it drops that answer and counts it (fail
    closed); the server keeps answering everyone else."""
    assert env.node("ip", "addr", "add", f"{NODE_LOCAL}/32", "dev", "lo").returncode == 0
    try:
        # Nobody holds it yet: the refusal leaves from it, and fqdnguard keeps nothing bound
        # there (the server below could not start if it did).
        got = env.ask(env.topo.pod, "denied.blocked.e2e.test", NODE_LOCAL)
        assert (got.rcode, got.source) == (dns.rcode.REFUSED, (NODE_LOCAL, 53))
        with KnotServer({"e2e.test": ZONE}, host=NODE_LOCAL, port=53, netns=env.topo.node):
            before = env.stats()["proxy"]["reply_errors"]
            with pytest.raises(OSError):  # refused, but the refusal cannot leave
                env.ask(env.topo.pod, "denied.blocked.e2e.test", NODE_LOCAL)
            assert env.stats()["proxy"]["reply_errors"] == before + 1
            for _ in range(5):
                got = env.ask(env.topo.free, "web.allowed.e2e.test", NODE_LOCAL)
                assert (got.rcode, got.source) == (dns.rcode.NOERROR, (NODE_LOCAL, 53))
            # Over TCP the accepted connection is the answer's way back: it works.
            got = env.ask(env.topo.pod, "denied.blocked.e2e.test", NODE_LOCAL, tcp=True)
            assert (got.rcode, got.source) == (dns.rcode.REFUSED, (NODE_LOCAL, 53))
    finally:
        env.node("ip", "addr", "del", f"{NODE_LOCAL}/32", "dev", "lo")


def _bound_at(env: Env, address: str) -> list[str]:
    """The node's UDP sockets bound to address:53 (``ss``), one line each."""
    out = env.node("ss", "-H", "-uan", "src", f"{address}:53").stdout
    return [line for line in out.splitlines() if line.strip()]


def test_a_reply_socket_whose_address_becomes_the_nodes_is_released(env: Env) -> None:
    """The address asked is not the node's when the first answer leaves from it: fqdnguard
    keeps a reply socket there. Then node-local DNS adds the address and starts a server on
    it: the kept socket is closed (the addresses are checked every second), so the server
    gets every query and its port, and the policed pod's answers fail closed as above."""
    address = "10.79.9.10"
    got = env.ask(env.topo.pod, "denied.blocked.e2e.test", address)
    assert (got.rcode, got.source) == (dns.rcode.REFUSED, (address, 53))
    assert len(_bound_at(env, address)) == 1, "a reply socket is kept for a foreign address"
    assert env.node("ip", "addr", "add", f"{address}/32", "dev", "lo").returncode == 0
    try:
        _wait(lambda: _bound_at(env, address) == [], "the reply socket to be released")
        with KnotServer({"e2e.test": ZONE}, host=address, port=53, netns=env.topo.node):
            assert len(_bound_at(env, address)) == 1  # the server's alone
            for _ in range(5):
                got = env.ask(env.topo.free, "web.allowed.e2e.test", address)
                assert (got.rcode, got.source) == (dns.rcode.NOERROR, (address, 53))
            with pytest.raises(OSError):
                env.ask(env.topo.pod, "denied.blocked.e2e.test", address)
    finally:
        env.node("ip", "addr", "del", f"{address}/32", "dev", "lo")


def test_reload_moves_the_intercepted_sources(env: Env) -> None:
    # One element per policed address and port: 53, and 5353 of the DNS rule.
    assert env.status()["policed4"] == 2
    assert env.proxy is not None
    try:
        (env.state / "endpoints.yaml").write_text(endpoints_yaml(free_label="policed"))
        env.proxy.send_signal(signal.SIGHUP)
        _wait(lambda: env.status()["policed4"] == 4, "the reload to add the free pod")
        got = env.ask(env.topo.free, "denied.blocked.e2e.test", CLUSTER_DNS4)
        assert (got.rcode, got.source) == (dns.rcode.REFUSED, (CLUSTER_DNS4, 53))
    finally:
        (env.state / "endpoints.yaml").write_text(endpoints_yaml())
        env.proxy.send_signal(signal.SIGHUP)
        _wait(lambda: env.status()["policed4"] == 2, "the reload to drop the free pod")
    before = env.queries()
    got = env.ask(env.topo.free, "denied.blocked.e2e.test", CLUSTER_DNS4)
    assert got.rcode == dns.rcode.NOERROR
    assert env.queries() == before


def _installed(status: dict[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in NONE}


#: Rules: the mark, the listen address, two reverse path drops, two marks of a TCP connection's
#: later packets, two TPROXY, two drops; in the established chain, its accept and its drop.
FULL = {"table": True, "rules": 12, "ip_rules4": 1, "ip_rules6": 1, "routes4": 1, "routes6": 1}
NONE = {"table": False, "rules": 0, "ip_rules4": 0, "ip_rules6": 0, "routes4": 0, "routes6": 0}


def test_restart_keeps_dns_and_rules_are_not_duplicated(env: Env) -> None:
    assert _installed(env.status()) == FULL
    # Another tool's route in the same routing table is not fqdnguard's to remove.
    theirs = ["ip", "route", "add", "local", "10.250.0.0/24", "dev", "lo", "table", "153"]
    assert env.node(*theirs).returncode == 0
    env.stop()  # SIGTERM: the rules belong to the node and stay
    assert _installed(env.status()) == FULL
    kept = env.node("ip", "route", "show", "table", "153").stdout
    assert "10.250.0.0/24" in kept
    env.node("ip", "route", "del", *theirs[3:])
    # Meanwhile the policed pod's DNS is dropped, never answered around the policy.
    with pytest.raises(OSError):
        env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4)
    for _ in range(2):
        env.start()
        assert _installed(env.status()) == FULL
        env.logged()
        got = env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS6, tcp=True, rdtype="AAAA")
        assert (got.rcode, got.addrs) == (dns.rcode.NOERROR, ["fd79:2::10"])
        assert any(r["qname"] == "web.allowed.e2e.test." for r in env.logged())
        assert env.ask(env.topo.pod, "denied.blocked.e2e.test", CLUSTER_DNS4).rcode == (
            dns.rcode.REFUSED
        )
        env.stop()
        assert _installed(env.status()) == FULL
    env.start()


def test_kill_9_leaves_the_rules_and_cleanup_removes_them(env: Env) -> None:
    assert _installed(env.status()) == FULL
    env.stop(signal.SIGKILL)
    assert _installed(env.status()) == FULL, "a crash must leave interception in place"
    # Fail closed: the policed pod's DNS is still taken from it (nobody answers now).
    with pytest.raises(OSError):
        env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4)
    assert env.ask(env.topo.free, "web.allowed.e2e.test", CLUSTER_DNS4).rcode == 0
    # Started again over the leftovers: one of each, and serving.
    env.start()
    assert _installed(env.status()) == FULL
    assert env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4).addrs == ["10.79.2.10"]
    env.stop(signal.SIGKILL)
    # What a crash of the version before left: sets of addresses only. Starting over it
    # replaces the table whole.
    old = (
        "add table inet fqdnguard_intercept\ndelete table inet fqdnguard_intercept\n"
        "add table inet fqdnguard_intercept\n"
        "add set inet fqdnguard_intercept policed4 { type ipv4_addr; }\n"
    )
    assert env.node("nft", "-f", "-", input=old).returncode == 0
    env.start()
    assert _installed(env.status()) == FULL
    assert env.ask(env.topo.pod, "denied.blocked.e2e.test", CLUSTER_DNS4).rcode == (
        dns.rcode.REFUSED
    )
    env.stop(signal.SIGKILL)
    r = env.node(sys.executable, "-m", "fqdnguard.cli", "intercept", "cleanup")
    assert r.returncode == 0, r.stderr
    assert "removed: table yes" in r.stdout
    assert _installed(env.status()) == NONE
    assert env.ask(env.topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4).rcode == dns.rcode.NOERROR


def _wait(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_pod_sending_with_another_pods_or_the_servers_address_is_dropped(env: Env) -> None:
    """The free pod takes the policed pod's addresses (and the cluster DNS server's) on its own
    interface and asks with them, intercepted (to the server) and directly (to fqdnguard)."""
    if env.proxy is None:  # after the kill -9 test
        env.start()
    topo, dev = env.topo, "fif0"
    borrowed = [(POLICED4, "32"), (POLICED6, "128"), (CLUSTER_DNS4, "32")]
    for addr, bits in borrowed:
        extra = ["nodad"] if ":" in addr else []
        topo.ns(topo.free, "ip", "addr", "add", f"{addr}/{bits}", "dev", dev, *extra)
    try:
        before = env.queries()
        wire = dns.message.make_query("spoof.allowed.e2e.test", "A").to_wire()
        for source, server in (
            (POLICED4, CLUSTER_DNS4),
            (POLICED6, CLUSTER_DNS6),
            (POLICED4, NODE_POLICED4),
            (CLUSTER_DNS4, NODE_POLICED4),
        ):
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            with topo.open_socket(topo.free, family, socket.SOCK_DGRAM) as s:
                s.bind((source, 0))
                s.settimeout(0.5)
                s.sendto(wire, (server, 53))
                with pytest.raises(TimeoutError):
                    s.recvfrom(65535)
        time.sleep(0.2)
        assert env.queries() == before, "a spoofed query reached fqdnguard"
        assert "spoof.allowed.e2e.test." not in env.cached_names()
    finally:
        for addr, bits in borrowed:
            topo.ns(topo.free, "ip", "addr", "del", f"{addr}/{bits}", "dev", dev)
    # The honest pods are unaffected, each with its own address.
    assert env.ask(topo.pod, "web.allowed.e2e.test", CLUSTER_DNS4).rcode == dns.rcode.NOERROR
    assert env.ask(topo.pod, "web.allowed.e2e.test", NODE_POLICED4).rcode == dns.rcode.NOERROR
    got = env.ask(topo.free, "web.allowed.e2e.test", CLUSTER_DNS6, rdtype="AAAA")
    assert got.addrs == ["fd79:2::10"]
    assert env.reaches("10.79.2.10")
