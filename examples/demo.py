"""The demo behind the README's first command (`make demo`): fqdnguard's main job on this machine.

Starts a real resolver (Knot DNS serving examples/zones/example.com.zone on 127.0.0.53), starts
`fqdnguard run` with the demo policy and endpoints (workloads on loopback addresses), sends allowed
and denied queries from those addresses over UDP and TCP, and shows the verdicts (with the reason
of each refusal), the cache (`fqdnguard cache list`) and the metrics. Everything stays on loopback.

Run as root, it then shows enforcement: in network namespaces the demo makes (a pod, a node
running `fqdnguard run --backend nftables`, a world with Knot and TCP servers), the pod connects
to the IP its allowed name resolved to (through) and to another IP (dropped). Without root that
part is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
from fqdnguard import Endpoints, Policy
from fqdnguard.testing import KnotServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
UPSTREAM = ("127.0.0.53", 5300)
SEARCH_DOMAIN = "svc.cluster.local"

QUERIES = [
    # (who, source address, name, type, transport)
    ("web", "127.0.0.10", "www.example.com", "A", "udp"),
    ("web", "127.0.0.10", "api.example.com", "A", "tcp"),
    ("web", "127.0.0.10", "cdn.example.com", "A", "udp"),
    ("web", "127.0.0.10", "evil.example.org", "A", "udp"),
    ("web", "127.0.0.10", "a.b.deep.example.com", "A", "udp"),
    ("web", "127.0.0.10", "www.example.com.svc.cluster.local", "A", "udp"),
    ("batch", "127.0.0.11", "a.b.deep.example.com", "A", "udp"),
    ("batch", "127.0.0.11", "example.com", "SOA", "udp"),
    ("unknown", "127.0.0.99", "www.example.com", "A", "udp"),
]


def wait_for_dns(port: int, deadline: float) -> None:
    probe = dns.message.make_query("www.example.com", "A")
    while time.monotonic() < deadline:
        try:
            dns.query.udp(probe, "127.0.0.1", port=port, timeout=0.2, source="127.0.0.10")
            return
        except (OSError, dns.exception.Timeout):
            time.sleep(0.1)
    raise SystemExit("fqdnguard did not start; see its log above")


def refusal_reasons() -> Callable[[str, str, str], str]:
    """The verdict's reason for a query, from the same policy and endpoints the proxy runs with.
    Without --intercept the proxy decides as if each query went to its upstream on port 53."""
    endpoints = Endpoints.load(DEMO / "endpoints.yaml")
    policy = Policy.load([DEMO / "policies"], endpoints=endpoints)

    def why(src: str, name: str, via: str) -> str:
        verdict = policy.dns_verdict(endpoints.by_ip(src), UPSTREAM[0], 53, via.upper(), name)
        reason = verdict.reason
        if name.rstrip(".").endswith("." + SEARCH_DOMAIN):
            reason += (
                f" (NXDOMAIN, not REFUSED: the name is under the search domain {SEARCH_DOMAIN})"
            )
        return reason

    return why


def main() -> int:
    zone = (ROOT / "examples" / "zones" / "example.com.zone").read_text()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-demo-"))
    port, metrics_port = free_port(), free_port()
    print("== upstream: Knot DNS serving example.com on 127.0.0.53:5300")
    with KnotServer({"example.com": zone}, host=UPSTREAM[0], port=UPSTREAM[1]):
        cmd = [
            sys.executable, "-m", "fqdnguard.cli", "run",
            "--config", str(DEMO / "fqdnguard.yaml"),
            "--listen", f"127.0.0.1:{port}", "--listen", f"[::1]:{port}",
            "--metrics", f"127.0.0.1:{metrics_port}",
            "--state-dir", str(state),
        ]  # fmt: skip
        print(f"== fqdnguard run --config examples/demo/fqdnguard.yaml (listening on port {port})")
        log_path = state / "fqdnguard.log"
        with open(log_path, "w") as log:
            proxy = subprocess.Popen(cmd, cwd=ROOT, stderr=log, stdout=log)
        try:
            wait_for_dns(port, time.monotonic() + 20)
            why = refusal_reasons()
            print(f"\n{'who':<8}{'from':<13}{'query':<40}{'via':<5}result")
            for who, src, name, rdtype, via in QUERIES:
                q = dns.message.make_query(name, rdtype)
                send = dns.query.tcp if via == "tcp" else dns.query.udp
                r = send(q, "127.0.0.1", port=port, timeout=3, source=src)
                addrs = [
                    rd.to_text() for rrset in r.answer for rd in rrset if rrset.rdtype in (1, 28)
                ]
                result = dns.rcode.to_text(r.rcode()) + (" " + ", ".join(addrs) if addrs else "")
                print(f"{who:<8}{src:<13}{name + ' ' + rdtype:<40}{via:<5}{result}")
                if r.rcode() in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN) and not addrs:
                    print(f"{'':<8}why: {why(src, name, via)}")
            print("\n== fqdnguard cache list")
            subprocess.run(
                [sys.executable, "-m", "fqdnguard.cli", "cache", "list", "--state-dir", str(state)],
                check=True,
            )
            print("\n== metrics (excerpt)")
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as m:
                for line in m.read().decode().splitlines():
                    if line.startswith(("fqdnguard_queries_total", "fqdnguard_cache_entries")):
                        print("  " + line)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=10)
        lines = log_path.read_text().splitlines()
        print("\n== query log (JSON lines, first 4) and backend changes")
        for line in [ln for ln in lines if '"qname"' in ln][:4]:
            print("  " + line.split(": ", 1)[-1])
        for line in [ln for ln in lines if '"change"' in ln][:3]:
            print("  " + line)
        saved = state / "cache.snapshot"
        size = saved.stat().st_size if saved.exists() else 0
        print(f"\n== stopped with SIGTERM; cache snapshot saved: {saved.exists()} ({size} bytes)")
    return enforcement()


# The enforcement part: names and addresses inside the namespaces it makes (tests/netns.py).
ENFORCED_ZONE = """$ORIGIN example.com.
$TTL 300
@    SOA ns admin 1 3600 600 86400 60
@    NS  ns
ns   A   10.77.2.53
www  A   10.77.2.10
api  A   10.77.2.11
"""


def enforcement() -> int:
    """As root: the nftables backend lets the pod reach what its allowed name resolved to, and
    nothing else."""
    sys.path.insert(0, str(ROOT))
    # The namespaces the end-to-end tests use (the repository's tests/netns.py).
    from tests.netns import (  # noqa: PLC0415
        NODE_POD4,
        POD4,
        UPSTREAM4,
        Topology,
        echo_ok,
        netns_unavailable,
    )

    why = netns_unavailable()
    if why is not None:
        print(f"\n== enforcement: skipped ({why}); run as root to see it")
        return 0
    print("\n== enforcement (root): network namespaces pod (web, 10.77.1.2), node (fqdnguard run "
          "--backend nftables), world (Knot, TCP servers)")  # fmt: skip
    topo = Topology(prefix=f"fgdemo{os.getpid() % 100000}").create()
    work = Path(tempfile.mkdtemp(prefix="fqdnguard-demo-nft-"))
    try:
        topo.start_echo_servers(sys.executable)
        # The demo's policies; the endpoints at the namespaces' addresses.
        (work / "endpoints.yaml").write_text(
            "endpoints:\n"
            f"  - {{name: kube-dns, namespace: kube-system, ips: [{UPSTREAM4}], "
            "labels: {k8s-app: kube-dns}}\n"
            f"  - {{name: web, namespace: default, ips: [{POD4}], labels: {{app: web}}}}\n"
        )
        with KnotServer({"example.com": ENFORCED_ZONE}, host=UPSTREAM4, port=53, netns=topo.world):
            cmd = [
                sys.executable, "-m", "fqdnguard.cli", "run", "--backend", "nftables",
                "--listen", f"{NODE_POD4}:53", "--upstream", f"{UPSTREAM4}:53",
                "--policy", str(DEMO / "policies"), "--endpoints", str(work / "endpoints.yaml"),
                "--state-dir", str(work / "state"), "--log-queries", "none",
            ]  # fmt: skip
            with open(work / "fqdnguard.log", "wb") as log:
                topo.spawn(topo.node, *cmd, stdout=log, stderr=log, cwd=ROOT)

            def resolve(name: str) -> tuple[str, list[str]]:
                s = topo.open_socket(topo.pod, socket.AF_INET, socket.SOCK_DGRAM)
                with s:
                    s.settimeout(2)
                    s.sendto(dns.message.make_query(name, "A").to_wire(), (NODE_POD4, 53))
                    r = dns.message.from_wire(s.recv(65535))
                addrs = [rd.address for rrset in r.answer for rd in rrset if rrset.rdtype == 1]
                return dns.rcode.to_text(r.rcode()), addrs

            def connect(ip: str, port: int) -> str:
                s = topo.connect(topo.pod, ip, port, timeout=1.0)
                ok = s is not None and echo_ok(s)
                if s is not None:
                    s.close()
                return "connected" if ok else "no connection (dropped by nftables)"

            deadline = time.monotonic() + 20
            while True:
                try:
                    resolve("ns.example.com")  # refused, but answered: it serves
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print((work / "fqdnguard.log").read_text())
                        raise SystemExit("fqdnguard did not start in the node namespace") from None
                    time.sleep(0.2)
            print(
                f"  pod -> 10.77.2.10:443 before resolving anything: {connect('10.77.2.10', 443)}"
            )
            rcode, addrs = resolve("www.example.com")
            print(f"  pod resolves www.example.com (allowed): {rcode} {', '.join(addrs)}")
            print(f"  pod -> 10.77.2.10:443 (the resolved IP): {connect('10.77.2.10', 443)}")
            print(f"  pod -> 10.77.2.11:443 (another IP): {connect('10.77.2.11', 443)}")
            print(f"  pod -> 10.77.2.10:8080 (a port the rule does not allow): "
                  f"{connect('10.77.2.10', 8080)}")  # fmt: skip
            print("\n== fqdnguard check --to 10.77.2.11:443 (why the other IP is dropped)")
            subprocess.run(
                [sys.executable, "-m", "fqdnguard.cli", "check", "--policy", str(DEMO / "policies"),
                 "--endpoints", str(work / "endpoints.yaml"), "--ip", POD4,
                 "--to", "10.77.2.11:443", "--state-dir", str(work / "state")],
                check=False,
            )  # fmt: skip
    finally:
        topo.close()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
