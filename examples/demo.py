"""The demo behind the README's first command (`make demo`): fqdnguard's main job on this machine.

Starts a real resolver (Knot DNS serving examples/zones/example.com.zone on 127.0.0.53), starts
`fqdnguard run` with the demo policy and endpoints (workloads on loopback addresses), sends allowed
and denied queries from those addresses over UDP and TCP, and shows the verdicts, the cache
(`fqdnguard cache list`) and the metrics. Everything stays on loopback.
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
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
from fqdnguard.testing import KnotServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"

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


def main() -> int:
    zone = (ROOT / "examples" / "zones" / "example.com.zone").read_text()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-demo-"))
    port, metrics_port = free_port(), free_port()
    print("== upstream: Knot DNS serving example.com on 127.0.0.53:5300")
    with KnotServer({"example.com": zone}, host="127.0.0.53", port=5300):
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
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
