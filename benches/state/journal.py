"""What keeping learning through a crash costs: a journal append per batch, beside the nftables
transaction the batch already waits for, and what each way costs at the next start.

    sudo taskset -c 1 python benches/state/journal.py
    FQDNGUARD_BENCH_QUICK=1 sudo python benches/state/journal.py      # fewer rounds

Runs in a network namespace it creates (and deletes), on a state directory under /tmp. Per
batch size (1, 10, 100 new (endpoint, ip) pairs, as answers bring them), the median of:

- ``apply``: the nftables backend's transaction for the batch (what held answers wait for now);
- ``journal``: finding the batch's entries in the cache (names and expiries) and appending them
  to the journal, one ``write`` (what the proxy adds before releasing the answers);
- ``journal+fdatasync``: the same made durable through a power loss, for reference.

Then, for 10,000 learned pairs, the start-up side: replaying them from the journal (names kept)
beside listing them from the kernel's sets (``Nftables.elements``, what adopting the live
elements would read: addresses and time left, no names).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"
ROUNDS = 30 if QUICK else 200
SIZES = (1, 10, 100)
START_PAIRS = 10_000

ENDPOINTS = """
endpoints:
  - {name: pod, namespace: default, ips: [10.0.0.2], labels: {app: pod}}
"""
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


def ip_of(n: int) -> str:
    return f"{10 + (n >> 16) % 200}.{(n >> 8) & 255}.{n & 255}.{1 + n % 7}"


def median_us(samples: list[float]) -> float:
    return round(1e6 * statistics.median(samples), 1)


async def bench() -> dict[str, object]:
    from fqdnguard import DnsCache, Endpoints, Policy  # noqa: PLC0415
    from fqdnguard.backends.nftables import Nftables  # noqa: PLC0415
    from fqdnguard.state import Journal, StateDir, journal_entries  # noqa: PLC0415

    eps = Endpoints.from_yaml(ENDPOINTS)
    ep = eps.by_ip("10.0.0.2")
    assert ep is not None
    backend = Nftables()
    backend.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
    await backend.start()
    cache = DnsCache()
    results: dict[str, object] = {"rounds": ROUNDS}
    n = 0
    with tempfile.TemporaryDirectory(prefix="fqdnguard-bench-state-") as d:
        journal = Journal(Path(d), None)
        for size in SIZES:
            apply_t: list[float] = []
            journal_t: list[float] = []
            synced_t: list[float] = []
            for _ in range(ROUNDS):
                changes = []
                for _ in range(size):
                    changes += cache.record(ep.id, f"n{n}.example.com", [(ip_of(n), 300)])
                    n += 1
                t0 = time.perf_counter()
                await backend.apply(changes)
                t1 = time.perf_counter()
                journal.append(journal_entries(cache, changes))
                t2 = time.perf_counter()
                journal.append(journal_entries(cache, changes))
                os.fdatasync(journal._fd)
                t3 = time.perf_counter()
                apply_t.append(t1 - t0)
                journal_t.append(t2 - t1)
                synced_t.append(t3 - t2)
            results[f"batch_{size}"] = {
                "apply_us": median_us(apply_t),
                "journal_us": median_us(journal_t),
                "journal_fdatasync_us": median_us(synced_t),
            }
        journal.close()

    # The start-up side, for START_PAIRS learned pairs.
    backend.remove_table()
    await backend.close()
    backend = Nftables()
    backend.set_policy(Policy.from_yaml(POLICY, endpoints=eps), eps, listen=[("10.0.0.1", 53)])
    await backend.start()
    cache = DnsCache()
    changes = []
    for i in range(START_PAIRS):
        changes += cache.record(ep.id, f"s{i}.example.com", [(ip_of(1_000_000 + i), 300)])
    await backend.apply(changes)
    with tempfile.TemporaryDirectory(prefix="fqdnguard-bench-state-") as d:
        journal = Journal(Path(d), None)
        journal.append(journal_entries(cache, changes))
        journal.close()
        replay_t, list_t = [], []
        for _ in range(5):
            restored = DnsCache()
            state = StateDir(d)
            state.open()
            t0 = time.perf_counter()
            got = state.replay(restored, None)
            t1 = time.perf_counter()
            listed = sum(len(v) for v in backend.elements().values())
            t2 = time.perf_counter()
            assert got == START_PAIRS and len(restored) == START_PAIRS, (got, len(restored))
            assert listed == START_PAIRS, listed
            replay_t.append(t1 - t0)
            list_t.append(t2 - t1)
    results["start"] = {
        "pairs": START_PAIRS,
        "journal_replay_ms": round(1000 * statistics.median(replay_t), 1),
        "kernel_listing_ms": round(1000 * statistics.median(list_t), 1),
    }
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
    ns = f"fgjbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = dict(os.environ, FQDNGUARD_BENCH_IN_NETNS="1")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__],
            env=env, check=True, capture_output=True, text=True, cwd=ROOT,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    r = json.loads(out.strip().splitlines()[-1])
    print(f"per batch, median of {r['rounds']} (us)")
    print(
        f"{'pairs':>6} {'nft apply':>10} {'journal':>9} {'ratio':>7} "
        f"{'+fdatasync':>11} {'ratio':>7}"
    )
    for size in SIZES:
        b = r[f"batch_{size}"]
        print(
            f"{size:>6} {b['apply_us']:>10} {b['journal_us']:>9} "
            f"{b['journal_us'] / b['apply_us']:>7.2f} {b['journal_fdatasync_us']:>11} "
            f"{b['journal_fdatasync_us'] / b['apply_us']:>7.2f}"
        )
    s = r["start"]
    print(
        f"start, {s['pairs']} pairs: journal replay {s['journal_replay_ms']} ms (names kept), "
        f"kernel listing {s['kernel_listing_ms']} ms (no names), "
        f"ratio {s['journal_replay_ms'] / s['kernel_listing_ms']:.2f}"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
