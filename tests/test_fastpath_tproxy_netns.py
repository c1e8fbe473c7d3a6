"""The Rust UDP path in transparent mode, in network namespaces: a pod asks DNS servers by their
own addresses, the node sends those packets to fqdnguard's socket with nftables TPROXY, and

- the engine's DNS verdict sees the server the pod asked (toEndpoints admits kube-dns only),
- every answer reaches the pod from the address it asked (a transparent socket bound there),
  SERVFAIL at the timeout too,
- allowed queries go to the configured upstream, or with ``forward_to_original`` to the server
  the pod asked; over IPv4 and IPv6.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
from fqdnguard import DnsCache, Endpoints, Policy
from fqdnguard._core import Engine, UdpIo
from fqdnguard.proxy import engine_table

from tests.netns import (
    CLONE_NEWNET,
    POD4,
    POD6,
    UPSTREAM4,
    Topology,
    _libc,
    netns_unavailable,
)

pytestmark = pytest.mark.skipif(
    (_reason := netns_unavailable()) is not None, reason=_reason or "available"
)

KUBE_DNS4, KUBE_DNS6 = UPSTREAM4, "fd77:2::53"
OTHER4, OTHER6 = "10.77.2.99", "fd77:2::99"
OVERRIDE4 = "10.77.2.54"  # the configured upstream (e.g. node-local DNS)
PORT = 5353
KUBE_DNS_ANSWER, OVERRIDE_ANSWER = "10.77.2.10", "10.77.2.11"

ENDPOINTS = f"""
endpoints:
  - {{name: kube-dns, namespace: kube-system, ips: [{KUBE_DNS4}, "{KUBE_DNS6}"],
     labels: {{k8s-app: kube-dns}}}}
  - {{name: pod, namespace: default, ips: [{POD4}, "{POD6}"], labels: {{app: pod}}}}
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*.allowed.test"}]}
"""

TPROXY = f"""
table ip fgtproxy {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "fgn0" udp dport 53 meta mark set 1 tproxy to :{PORT}
  }}
}}
table ip6 fgtproxy {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "fgn0" udp dport 53 meta mark set 1 tproxy to :{PORT}
  }}
}}
"""


def _fake_upstream(sock: socket.socket, stop: threading.Event, answer_ip: str) -> None:
    """Answers every A query with `answer_ip` (TTL 60): who answered shows where it went.
    Names starting with "silent." get no answer (the query times out)."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        query = dns.message.from_wire(data)
        if query.question[0].name.to_text().lower().startswith("silent."):  # 0x20: any case
            continue
        answer = dns.message.make_response(query)
        name = query.question[0].name
        answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", answer_ip))
        sock.sendto(answer.to_wire(), peer)


def _releaser(io: UdpIo, stop: threading.Event, netns: str) -> None:
    """Stands in for the proxy's backend and sweeper: releases held answers at once, answers
    timed-out queries. It runs in the node's namespace, like every thread of a real proxy:
    reply sockets are made by the sending thread."""
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError("setns into the node namespace failed")
    finally:
        os.close(fd)
    while not stop.is_set():
        held, _changes, seq, _logs = io.drain()
        if held:
            io.release(held)
        if seq:
            io.adds_applied(seq)
        io.sweep(time.time())
        time.sleep(0.005)


@pytest.fixture(scope="module", params=[False, True], ids=["to-upstream", "to-asked-server"])
def net(request: pytest.FixtureRequest) -> Iterator[Topology]:
    forward = bool(request.param)
    topo = Topology(f"fgtp{os.getpid() % 10000}").create()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    io: UdpIo | None = None
    servers: list[socket.socket] = []
    try:
        topo.ns(topo.world, "ip", "addr", "add", f"{KUBE_DNS6}/64", "dev", "fgw0", "nodad")
        topo.ns(topo.world, "ip", "addr", "add", f"{OVERRIDE4}/24", "dev", "fgw0")
        subprocess.run(
            ["ip", "netns", "exec", topo.node, "nft", "-f", "-"],
            input=TPROXY,
            text=True,
            check=True,
            capture_output=True,
        )
        for v in ("-4", "-6"):
            topo.ns(topo.node, "ip", v, "rule", "add", "fwmark", "1", "lookup", "100")
            default = "0.0.0.0/0" if v == "-4" else "::/0"
            topo.ns(
                topo.node, "ip", v, "route", "add", "local", default, "dev", "lo", "table", "100"
            )
        for addr, answer in (
            (KUBE_DNS4, KUBE_DNS_ANSWER),
            (KUBE_DNS6, KUBE_DNS_ANSWER),
            (OVERRIDE4, OVERRIDE_ANSWER),
        ):
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            server = topo.open_socket(topo.world, family, socket.SOCK_DGRAM)
            servers.append(server)
            server.bind((addr, 53))
            threads.append(
                threading.Thread(target=_fake_upstream, args=(server, stop, answer), daemon=True)
            )
        endpoints = Endpoints.from_yaml(ENDPOINTS)
        engine = Engine(DnsCache(), log_queries="none", timeout=1.0)
        engine.set_policy(
            *engine_table(Policy.from_yaml(POLICY, endpoints=endpoints), endpoints, None)
        )
        with topo.inside(topo.node):  # the sockets are made in the node's namespace
            io = UdpIo(
                engine,
                [("0.0.0.0", PORT), ("::", PORT)],
                [(OVERRIDE4, 53)],
                transparent=True,
                forward_to_original=forward,
                mark=2,
            )
            io.start()  # the I/O thread is born in the node's namespace too
        threads.append(threading.Thread(target=_releaser, args=(io, stop, topo.node), daemon=True))
        for t in threads:
            t.start()
        topo.io = io  # type: ignore[attr-defined]
        topo.expected = KUBE_DNS_ANSWER if forward else OVERRIDE_ANSWER  # type: ignore[attr-defined]
        yield topo
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join()
        if io is not None:
            io.stop()
        for server in servers:
            server.close()
        topo.close()


def ask(topo: Topology, server: str, name: str) -> tuple[int, list[str], tuple[str, int]]:
    """Asks `server`:53 from the pod: (rcode, addresses, the answer's source)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with topo.open_socket(topo.pod, family, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(dns.message.make_query(name, "A").to_wire(), (server, 53))
        data, source = s.recvfrom(65535)
    answer = dns.message.from_wire(data)
    addrs = [rd.address for rrset in answer.answer for rd in rrset]
    return answer.rcode(), addrs, (source[0], source[1])


@pytest.mark.parametrize("kube_dns,other", [(KUBE_DNS4, OTHER4), (KUBE_DNS6, OTHER6)])
def test_intercepted_queries_see_and_answer_from_the_server_asked(
    net: Topology, kube_dns: str, other: str
) -> None:
    assert ask(net, kube_dns, "www.allowed.test") == (
        dns.rcode.NOERROR,
        [net.expected],  # type: ignore[attr-defined]
        (kube_dns, 53),
    )
    # The same name asked of a server toEndpoints does not admit: refused, from that server.
    assert ask(net, other, "www.allowed.test") == (dns.rcode.REFUSED, [], (other, 53))
    assert ask(net, kube_dns, "evil.test") == (dns.rcode.REFUSED, [], (kube_dns, 53))
    # Allowed, but the server never answers: SERVFAIL at the timeout, from the address asked.
    assert ask(net, kube_dns, "silent.allowed.test") == (dns.rcode.SERVFAIL, [], (kube_dns, 53))
    stats = net.io.stats()  # type: ignore[attr-defined]
    assert (stats["send_errors"], stats["reply_errors"], stats["not_intercepted"]) == (0, 0, 0)
