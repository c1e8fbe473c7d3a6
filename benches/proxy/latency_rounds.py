"""Latency at a fixed rate, the targets interleaved: for a loaded machine, where load drifts.

Each round runs every target (a, b, c, c2, d of run.py, same CPU layout) for --seconds at --rate
with per-query latencies; after --rounds rounds it prints the median p50 and p99 of each and the
p99 added over (a). Percentiles leave out each run's first run.SETTLE_S seconds, as run.py
does. Interleaving gives every target the same share of whatever else the machine is doing,
which back-to-back runs of run.py do not.

Usage: python benches/proxy/latency_rounds.py [--rate QPS] [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import run as bench  # benches/proxy/run.py, beside this file
from fqdnguard.testing import KnotServer, free_port

NAMES = bench.AT_RATE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=float, default=38500.0, help="queries per second")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    files = bench.write_inputs(Path(tempfile.mkdtemp(prefix="fqdnguard-rounds-")))
    port = free_port(bench.UPSTREAM)
    got: dict[str, list[tuple[float, float]]] = {}
    zone = {"example.com": files["zone"].read_text()}
    with KnotServer(zone, host=bench.UPSTREAM, port=port, workers=2) as knot:
        if knot._proc is not None:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", bench.SERVER_CPU, str(knot._proc.pid)],
                capture_output=True,
                check=False,
            )
        targets = [t for t in bench.targets(files, port, files["zone"].parent) if t[0] in NAMES]
        for i in range(args.rounds):
            for name, cmd, target_port in targets:
                host = bench.UPSTREAM if cmd is None else "127.0.0.1"
                with bench.Target(name, cmd, target_port):
                    bench.dnsperf(target_port, files["queries"], 1.0, host)
                    r = bench.dnsperf(
                        target_port, files["queries"], args.seconds, host, rate=args.rate
                    )
                p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
                got.setdefault(name, []).append((p50, p99))
                print(f"round {i + 1} {name:<12} p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
    base = statistics.median(p99 for _, p99 in got["a upstream"])
    print(f"\nmedians over {args.rounds} rounds at {args.rate:.0f} qps:")
    for name, values in got.items():
        p50 = statistics.median(v[0] for v in values)
        p99 = statistics.median(v[1] for v in values)
        print(f"  {name:<12} p50 {p50:.3f} ms  p99 {p99:.3f} ms  p99 added {p99 - base:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
