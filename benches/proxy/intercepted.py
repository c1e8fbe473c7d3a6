"""The proxy benchmark's intercepted mode: dnsperf in a pod namespace, through a node namespace
running ``fqdnguard run --intercept``, to Knot at a cluster-DNS address in a "dns" namespace.

    pod (10.80.1.2 policed, 10.80.1.3 not) --veth-- node (fqdnguard) --veth-- dns (10.96.0.10)

Paths over the same veths, in the same run, with the same policy (1,000 patterns, 250
endpoints; the pod is endpoint pod-0):

  (f) routed       the unpoliced address asks 10.96.0.10: the node only routes (the floor)
  (g) direct       the policed address asks fqdnguard's own address, 10.80.1.1:53
  (h) intercepted  the policed address asks 10.96.0.10: TPROXY hands it to the same fqdnguard
                   (UDP, direct and transparent listeners alike, on the Rust thread: the default)

then fqdnguard is restarted with ``--udp-io asyncio`` for

  (g2) direct      as (g), UDP on asyncio datagram transports
  (h2) intercepted as (h), the transparent listener read with recvmsg from the event loop

fqdnguard is pinned to CPU 1, dnsperf and Knot to CPU 0, as in run.py. Needs root (namespaces,
nftables); ``available()`` says why not otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

CLUSTER_DNS = "10.96.0.10"
POLICED, FREE, NODE = "10.80.1.2", "10.80.1.3", "10.80.1.1"
BENCH_UPSTREAM = "127.0.0.53"  # the address run.py's endpoints give kube-dns


def available() -> str | None:
    """None when the intercepted mode can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables TPROXY)"
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    return None


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Namespaces:
    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.pod, self.node, self.dns = f"fb{tag}-pod", f"fb{tag}-node", f"fb{tag}-dns"

    def ns(self, name: str, *cmd: str) -> None:
        _sh("ip", "netns", "exec", name, *cmd)

    def __enter__(self) -> Namespaces:
        try:
            self._create()
        except Exception:
            self.close()
            raise
        return self

    def _create(self) -> None:
        pod, node, dns = self.pod, self.node, self.dns
        for n in (pod, node, dns):
            _sh("ip", "netns", "add", n)
            self.ns(n, "ip", "link", "set", "lo", "up")
        _sh(
            "ip", "link", "add", "fbp0", "netns", pod, "type", "veth", "peer", "fbn0", "netns", node
        )
        _sh(
            "ip", "link", "add", "fbd0", "netns", dns, "type", "veth", "peer", "fbn1", "netns", node
        )
        for n, dev, addrs in (
            (pod, "fbp0", [f"{POLICED}/24", f"{FREE}/24"]),
            (node, "fbn0", [f"{NODE}/24"]),
            (node, "fbn1", ["10.80.2.1/24"]),
            (dns, "fbd0", ["10.80.2.2/24"]),
        ):
            for a in addrs:
                self.ns(n, "ip", "addr", "add", a, "dev", dev)
            self.ns(n, "ip", "link", "set", dev, "up")
        self.ns(dns, "ip", "addr", "add", f"{CLUSTER_DNS}/32", "dev", "lo")
        self.ns(pod, "ip", "route", "add", "default", "via", NODE)
        self.ns(dns, "ip", "route", "add", "default", "via", "10.80.2.1")
        self.ns(node, "ip", "route", "add", f"{CLUSTER_DNS}/32", "via", "10.80.2.2")
        self.ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The node's resolv.conf (ip netns exec mounts /etc/netns/NAME/resolv.conf).
        os.makedirs(f"/etc/netns/{node}", exist_ok=True)
        Path(f"/etc/netns/{node}/resolv.conf").write_text(f"nameserver {CLUSTER_DNS}\n")

    def close(self) -> None:
        for n in (self.pod, self.node, self.dns):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)
        shutil.rmtree(f"/etc/netns/{self.node}", ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_intercepted(
    files: dict[str, Path],
    seconds: float,
    repeat: int,
    dnsperf: Callable[..., dict[str, float]],
) -> dict[str, dict[str, Any]]:
    """Measures (f), (g), (h), then (g2), (h2); returns their medians and p50/p99 at half of
    (g)'s rate."""
    from fqdnguard.testing import KnotServer  # noqa: PLC0415

    tmp = files["endpoints"].parent
    endpoints = files["endpoints"].read_text()
    endpoints = endpoints.replace("ips: [127.0.1.1]", f"ips: [{POLICED}]")
    endpoints = endpoints.replace(f"ips: [{BENCH_UPSTREAM}]", f"ips: [{CLUSTER_DNS}]")
    assert POLICED in endpoints and CLUSTER_DNS in endpoints
    eps = tmp / "endpoints-netns.yaml"
    eps.write_text(endpoints)
    results: dict[str, dict[str, Any]] = {}
    with Namespaces() as ns:
        zone = files["zone"].read_text()
        with KnotServer({"example.com": zone}, host=CLUSTER_DNS, port=53, netns=ns.dns, workers=2):
            _pin_knot(ns.dns)
            pod = ["ip", "netns", "exec", ns.pod]
            sessions = {
                "rust": {
                    "f routed": (CLUSTER_DNS, FREE),
                    "g direct": (NODE, POLICED),
                    "h intercepted": (CLUSTER_DNS, POLICED),
                },
                "asyncio": {
                    "g2 direct asyncio": (NODE, POLICED),
                    "h2 intercepted asyncio": (CLUSTER_DNS, POLICED),
                },
            }
            for udp_io, paths in sessions.items():
                cmd = [
                    "ip", "netns", "exec", ns.node, "taskset", "-c", "1", sys.executable, "-m",
                    "fqdnguard.cli", "run", "--intercept", "--backend", "log",
                    "--policy", str(files["policies"]), "--endpoints", str(eps),
                    "--listen", f"{NODE}:53", "--log-queries", "none", "--log-level", "warning",
                    "--udp-io", udp_io,
                ]  # fmt: skip
                logpath = tmp / f"intercepted-{udp_io}.log"
                log = open(logpath, "wb")  # noqa: SIM115
                proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
                try:
                    _wait_serving(proc, dnsperf, pod, files, logpath)
                    for name, (server, client) in paths.items():
                        kw: dict[str, Any] = {"host": server, "client": client, "prefix": pod}
                        dnsperf(53, files["queries"], 1.0, **kw)  # warm up
                        runs = [dnsperf(53, files["queries"], seconds, **kw) for _ in range(repeat)]
                        results[name] = {
                            "qps": statistics.median(r["qps"] for r in runs),
                            "avg_ms": statistics.median(r["avg_ms"] for r in runs),
                            "lost": statistics.median(r.get("lost", 0) for r in runs),
                            "runs": len(runs),
                            "qps_runs": [r["qps"] for r in runs],
                        }
                        r = results[name]
                        print(
                            f"  {name:<24} {r['qps']:>10.0f} qps  avg {r['avg_ms']:.3f} ms",
                            flush=True,
                        )
                    rate = results["g direct"]["qps"] / 2
                    for name, (server, client) in paths.items():
                        kw = {"host": server, "client": client, "prefix": pod}
                        r = dnsperf(53, files["queries"], max(2.0, seconds / 2), rate=rate, **kw)
                        results[name]["p50_ms_at_half"] = r.get("p50_ms", float("nan"))
                        results[name]["p99_ms_at_half"] = r.get("p99_ms", float("nan"))
                        results[name]["rate_at_half"] = rate
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    log.close()
    return results


def _pin_knot(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    ).stdout
    for pid in out.split():
        subprocess.run(["taskset", "-a", "-p", "-c", "0", pid], capture_output=True, check=False)


#: Queries per second of the readiness check.
READY_RATE = 2000


def _wait_serving(
    proc: subprocess.Popen[bytes],
    dnsperf: Callable[..., dict[str, float]],
    prefix: list[str],
    files: dict[str, Path],
    log: Path,
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fqdnguard --intercept exited: {log.read_text()}")
        try:
            # At a modest fixed rate: a flood would also test whether Knot, sharing CPU 0 with
            # dnsperf, keeps up (on a quiet machine the Rust path outruns it and Knot drops a
            # few dozen queries per flood; the proxy's upstream timeouts count them).
            r = dnsperf(
                53,
                files["queries"],
                0.5,
                host=CLUSTER_DNS,
                client=POLICED,
                prefix=prefix,
                rate=READY_RATE,
            )
            if r.get("qps", 0) > 0 and not r.get("lost"):
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"fqdnguard --intercept did not serve: {log.read_text()}")


def report(results: dict[str, dict[str, Any]]) -> None:
    g, h = results["g direct"], results["h intercepted"]
    h2 = results.get("h2 intercepted asyncio")
    print("\nintercepted vs direct (pod namespace -> node -> dns namespace, over veths):")
    print(f"{'path':<24}{'qps':>10}{'avg ms':>9}{'p50 ms':>9}{'p99 ms':>9}   (at half of (g))")
    for name, r in results.items():
        print(
            f"{name:<24}{r['qps']:>10.0f}{r['avg_ms']:>9.3f}"
            f"{r.get('p50_ms_at_half', float('nan')):>9.3f}"
            f"{r.get('p99_ms_at_half', float('nan')):>9.3f}"
        )
    print(f"  (h) / (g) qps: {h['qps'] / g['qps']:.2f}")
    if h2 is not None:
        print(f"  (h2) / (g) qps: {h2['qps'] / g['qps']:.2f}")
        print(f"  (h) / (h2) qps: {h['qps'] / h2['qps']:.2f}")
