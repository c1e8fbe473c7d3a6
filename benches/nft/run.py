"""Latency from new IPs to the kernel's nftables sets, through the nftables backend.

    sudo python benches/nft/run.py            # 1k and 10k new IPs per second, 5 s each
    FQDNGUARD_BENCH_QUICK=1 python benches/nft/run.py   # 1 s each
    sudo python benches/nft/run.py 250        # the same with 250 restricted endpoints installed

Runs in a network namespace it creates (and deletes). New (endpoint, IP) additions arrive at a
steady rate, as answers would; an applier like the proxy's takes everything pending, applies it as
one transaction and starts again. Per IP, the latency is from its arrival to the end of the
transaction that put it in the kernel (when the proxy would release the answer). It also times one
10,000-element transaction and, for reference, one ``nft`` process per element.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"
SECONDS = 1.0 if QUICK else 5.0
RATES = (1_000, 10_000)

#: Restricted endpoints in the ruleset (argv[1]; 1 by default); the IPs all go to the first.
N_ENDPOINTS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ENDPOINTS = "endpoints:\n" + "".join(
    f"  - {{name: pod{i}, namespace: default, ips: [10.0.{i >> 8}.{2 + (i & 255)}], "
    "labels: {app: pod}}\n"
    for i in range(N_ENDPOINTS)
)
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toFQDNs: [{matchPattern: "*.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


class Change:
    __slots__ = ("endpoint", "expires_at", "ip", "kind")

    def __init__(self, endpoint: int, ip: str, expires_at: float) -> None:
        self.kind, self.endpoint, self.ip, self.expires_at = "added", endpoint, ip, expires_at


def ip_of(n: int) -> str:
    return f"{10 + (n >> 16) % 200}.{(n >> 8) & 255}.{n & 255}.{1 + n % 7}"


async def steady(
    backend: object, endpoint: int, rate: int, seconds: float, base: int
) -> dict[str, float]:
    """IPs arrive at ``rate`` per second for ``seconds``; returns latency percentiles (ms)."""
    pending: list[tuple[float, Change]] = []
    latencies: list[float] = []
    batches: list[int] = []
    wake = asyncio.Event()
    done = False

    async def applier() -> None:
        while not done or pending:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            batch = pending[:]
            pending.clear()
            await backend.apply([c for _, c in batch])  # type: ignore[attr-defined]
            end = time.perf_counter()
            latencies.extend(end - t for t, _ in batch)
            batches.append(len(batch))

    task = asyncio.ensure_future(applier())
    start = time.perf_counter()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate))
        expires = time.time() + 300
        for n in range(sent, due):
            pending.append((start + n / rate, Change(endpoint, ip_of(base + n), expires)))
        sent = due
        wake.set()
        await asyncio.sleep(0.0005)
    done = True
    wake.set()
    await task
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {
        "rate": rate,
        "ips": len(latencies),
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(1000 * latencies[-1], 3),
        "batches": len(batches),
        "mean_batch": round(statistics.mean(batches), 1),
    }


async def bench() -> dict[str, object]:
    from fqdnguard import Endpoints, Policy  # noqa: PLC0415
    from fqdnguard.backends.nftables import Nftables  # noqa: PLC0415

    eps = Endpoints.from_yaml(ENDPOINTS)
    first = eps.by_ip("10.0.0.2")
    assert first is not None
    pod = first.id
    backend = Nftables()
    backend.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
    await backend.start()
    results: dict[str, object] = {}
    base = 0
    for rate in RATES:
        results[f"steady_{rate}"] = await steady(backend, pod, rate, SECONDS, base)
        base += int(rate * SECONDS)
    sizes = [sum(len(v) for v in backend.elements().values())]
    one = []
    for i in range(3):
        batch = [
            Change(pod, ip_of(5_000_000 + i * 10_000 + n), time.time() + 300) for n in range(10_000)
        ]
        t = time.perf_counter()
        await backend.apply(batch)
        one.append(1000 * (time.perf_counter() - t))
    results["one_transaction_10k_ms"] = round(statistics.median(one), 2)
    forks = []
    for n in range(20):
        set_name = backend.elements().__iter__().__next__()
        cmd = ["nft", "add", "element", "inet", "fqdnguard", set_name,
               f"{{ {ip_of(9_000_000 + n)} timeout 300s }}"]  # fmt: skip
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        forks.append(1000 * (time.perf_counter() - t))
    results["nft_process_per_element_ms"] = round(statistics.median(forks), 2)
    results["elements_after_steady"] = sizes[0]
    results["quick"] = QUICK
    results["endpoints"] = N_ENDPOINTS
    backend.remove_table()
    await backend.close()
    return results


def main() -> int:
    if os.environ.get("FQDNGUARD_BENCH_IN_NETNS") == "1":
        import uvloop  # noqa: PLC0415

        print(json.dumps(uvloop.run(bench())))
        return 0
    if os.geteuid() != 0:
        print("needs root: it creates a network namespace and nftables sets", file=sys.stderr)
        return 2
    ns = f"fgbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = dict(os.environ, FQDNGUARD_BENCH_IN_NETNS="1")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, str(N_ENDPOINTS)],
            env=env, check=True, capture_output=True, text=True, cwd=ROOT,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    results = json.loads(out.strip().splitlines()[-1])
    print(
        f"{'new IPs/s':>10} {'IPs':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'batches':>8} {'IPs/batch':>10}"
    )
    for rate in RATES:
        r = results[f"steady_{rate}"]
        print(
            f"{rate:>10} {r['ips']:>7} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} "
            f"{r['batches']:>8} {r['mean_batch']:>10}"
        )
    print(f"one 10,000-element transaction: {results['one_transaction_10k_ms']} ms (median of 3)")
    print(
        f"one nft process per element:    {results['nft_process_per_element_ms']} ms (median of 20)"
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
