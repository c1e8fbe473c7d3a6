"""The proxy's qps with the nftables backend versus the log backend, in the same run.

Runs inside a network namespace it creates (so the nftables table never touches the host): Knot
on 127.0.0.53 (pinned to CPU 0 with dnsperf), `fqdnguard run` pinned to CPU 1 with the policy of
benches/proxy/run.py (1,000 patterns over 250 endpoints) plus a `toFQDNs` rule with toPorts per
group, so every restricted endpoint has address sets, and one rule for the `dyn-*` names below.
The endpoint dnsperf speaks from is a local process: the nftables backend filters its packets in
the output hook (conntrack, the source map, its chain) as it would a pod's in the forward hook.

Two workloads, each against both backends, alternating, `--repeat` times, medians reported:
  steady   the 100-name mix of run.py (~10% denied): after the first second every answer's IP is
           known, so the backend sees only the (rare) refreshes; this is the cost of the filter
           chain and the proxy's bookkeeping.
  new-ips  every query a name never asked before (Knot's synthrecord module answers
           dyn-10-128-X-Y.example.com with A 10.128.X.Y), so every answer adds an IP and is held
           until the backend has applied it: the worst case for the backend.

Usage: sudo python benches/proxy/nft_vs_log.py [--quick] [--seconds S] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "python"))

import run as proxy_bench  # noqa: E402
from fqdnguard.testing import KnotServer, free_port  # noqa: E402

NETNS = f"fgbench{os.getpid() % 100000}"
NAMES_PER_RUN = 400_000

FQDN_RULE = """    - toFQDNs: [{matchPattern: "**.example.com"}, {matchPattern: "*.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


class SynthKnot(KnotServer):
    """Knot with mod-synthrecord: dyn-A-B-C-D.example.com -> A A.B.C.D inside 10.128.0.0/10."""

    def _config(self, root: Path) -> str:
        text = super()._config(root)
        module = (
            "mod-synthrecord:\n  - id: fwd\n    type: forward\n    prefix: dyn-\n"
            "    ttl: 300\n    network: 10.128.0.0/10\n"
        )
        text = text.replace("zone:\n", module + "zone:\n", 1)
        return text.replace(
            "  - domain: example.com.\n",
            "  - domain: example.com.\n    module: mod-synthrecord/fwd\n",
        )


def write_inputs(d: Path) -> dict[str, Path]:
    files = proxy_bench.write_inputs(d)
    for f in sorted(files["policies"].iterdir()):
        text = f.read_text()
        f.write_text(text + '              - matchPattern: "dyn-*.example.com"\n' + FQDN_RULE)
    return files


def new_names(d: Path, run: int) -> Path:
    """A query file of NAMES_PER_RUN names no other run asks."""
    path = d / f"new{run}.txt"
    base = run * NAMES_PER_RUN
    with open(path, "w") as f:
        for i in range(base, base + NAMES_PER_RUN):
            f.write(f"dyn-10-{128 + (i >> 16)}-{(i >> 8) & 255}-{i & 255}.example.com A\n")
    return path


def fqdnguard_cmd(files: dict[str, Path], upstream: str, port: int, backend: str) -> list[str]:
    return [sys.executable, "-m", "fqdnguard.cli", "run", "--policy", str(files["policies"]),
            "--endpoints", str(files["endpoints"]), "--upstream", upstream,
            "--listen", f"127.0.0.1:{port}", "--backend", backend, "--log-queries", "none",
            "--log-level", "warning"]  # fmt: skip


def inside(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="fqdnguard-bench-nft-"))
    files = write_inputs(tmp)
    upstream_port = free_port(proxy_bench.UPSTREAM)
    upstream = f"{proxy_bench.UPSTREAM}:{upstream_port}"
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    zone = files["zone"].read_text()
    with SynthKnot(
        {"example.com": zone}, host=proxy_bench.UPSTREAM, port=upstream_port, workers=2
    ) as knot:
        if knot._proc is not None:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(knot._proc.pid)],
                           capture_output=True, check=False)  # fmt: skip
        n_run = 0
        for rep in range(args.repeat):
            for workload in ("steady", "new-ips"):
                for backend in ("log", "nftables"):
                    subprocess.run(["nft", "delete", "table", "inet", "fqdnguard"],
                                   capture_output=True, check=False)  # fmt: skip
                    port = free_port()
                    cmd = fqdnguard_cmd(files, upstream, port, backend)
                    with proxy_bench.Target(f"{workload} {backend}", cmd, port):
                        if workload == "steady":
                            queries = files["queries"]
                            proxy_bench.dnsperf(port, queries, 1.0)  # warm up: learn the IPs
                        else:
                            n_run += 1
                            queries = new_names(tmp, n_run)
                        r = proxy_bench.dnsperf(port, queries, args.seconds)
                    runs.setdefault((workload, backend), []).append(r)
                    line = f"  run {rep + 1} {workload:<8} {backend:<9} {r['qps']:>9.0f} qps"
                    line += f"  avg {r['avg_ms']:.3f} ms  lost {r.get('lost', 0):.0f}"
                    print(line, flush=True)
    report(runs, args)
    return 0


def report(runs: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"\n{'workload':<10}{'backend':<10}{'qps':>10}{'avg ms':>9}{'lost':>7}   runs (qps)")
    med: dict[tuple[str, str], float] = {}
    for (workload, backend), rs in runs.items():
        qps = statistics.median(r["qps"] for r in rs)
        med[(workload, backend)] = qps
        avg = statistics.median(r["avg_ms"] for r in rs)
        lost = statistics.median(r.get("lost", 0) for r in rs)
        each = ", ".join(f"{r['qps']:.0f}" for r in rs)
        print(f"{workload:<10}{backend:<10}{qps:>10.0f}{avg:>9.3f}{lost:>7.0f}   {each}")
    print()
    for workload in ("steady", "new-ips"):
        ratio = med[(workload, "nftables")] / med[(workload, "log")]
        print(f"  {workload}: nftables / log = {ratio:.2f}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "nft_vs_log.json").write_text(
        json.dumps({f"{w} {b}": rs for (w, b), rs in runs.items()}, indent=2)
    )
    print(f"\nwrote {out / 'nft_vs_log.json'}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 s per run, 1 repeat (what CI runs)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat = 2.0, 1
    if args.inside:
        return inside(args)
    if os.geteuid() != 0:
        print("needs root: it runs in a network namespace of its own (nftables)", file=sys.stderr)
        return 2
    for tool in ("dnsperf", "nft", "ip"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            print(f"{tool} is not installed (make system-deps)", file=sys.stderr)
            return 2
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inside", "--seconds",
               str(args.seconds), "--repeat", str(args.repeat), "--out", str(args.out)]  # fmt: skip
        return subprocess.run(["ip", "netns", "exec", NETNS, *cmd], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
