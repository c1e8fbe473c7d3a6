"""The proxy benchmark: dnsperf against five DNS paths in one run, side by side.

  (a) upstream   Knot DNS directly (the floor for latency, the ceiling for everything)
  (b) relay      a bare uvloop UDP relay that parses nothing (the ceiling for a Python proxy)
  (c) fqdnguard  `fqdnguard run` with a 1,000-pattern policy over 250 endpoints, as shipped (UDP
                 served by a Rust thread: recvmmsg/sendmmsg)
  (c1) one socket the same with one upstream socket and query names sent as written (as before
                 the RFC 5452 pool of 1,024 random-port sockets and 0x20): what they cost
  (c2) asyncio   the same with `--udp-io asyncio`: UDP sockets on the Python event loop
  (d) dnsdist    dnsdist forwarding, no cache (the C++ peer)
  (e) pyproxy    the same job in plain Python with dnspython and `re` (the Python peer)

and, as root, the intercepted mode beside the direct one over network namespaces (see
intercepted.py): (f) routed to the cluster-DNS address, (g) fqdnguard asked directly, (h) the
same fqdnguard with the cluster-DNS address asked and the query intercepted (TPROXY), then
(g2)/(h2) the same two with `--udp-io asyncio`.

dnsperf has CPU 0 to itself; the server under test and Knot share CPU 1 (`--upstream-cpu 0`
puts Knot beside dnsperf instead, the layout of earlier runs). dnsperf needs about half a core
whatever the rate (it polls), so beside Knot it saturated CPU 0 near 80k qps with no proxy at all,
and a latency measured by a starved load generator is its own queueing, not the server's.
Every target runs `--repeat` times for `--seconds` and the medians are reported; then (a), (b),
(c), (c2) and (d) run `--repeat` times more at half of (c)'s best rate with per-query latencies,
for the p50/p99 added by fqdnguard (medians of the runs, each run's first SETTLE_S seconds
left out: dnsperf's start-up burst; the whole-run p99 is printed beside it).
Prints the table and the ratios, writes results.json and results.png into --out.

Usage: python benches/proxy/run.py [--quick] [--seconds S] [--repeat N] [--out DIR]
                                   [--upstream-cpu CPU]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "python"))

from fqdnguard.testing import KnotServer, free_port  # noqa: E402

UPSTREAM = "127.0.0.53"
CLIENT = "127.0.1.1"  # endpoint pod-0, group 0
GROUPS, ENDPOINTS, PATTERNS_PER_GROUP = 10, 250, 100
LOAD_CPU, SERVER_CPU = "0", "1"  # dnsperf; each server under test
# Latency percentiles at a fixed rate leave out each dnsperf run's first SETTLE_S seconds of
# answers (dnsperf's lines come in completion order). A dnsperf run opens with a burst; with
# Knot and a proxy sharing one core at ~80% busy, the burst takes 30-60 ms to drain, at 2-4 ms
# per query, for fqdnguard and dnsdist alike (Knot alone: ~0.5 ms for ~1000 queries). That
# start-up transient alone is about 1% of a 4 s run, so the whole-run p99 measured how dnsperf
# starts, not the steady added latency. Both are printed; the target reads the steady one.
SETTLE_S = 0.5


def pattern(g: int, k: int) -> tuple[str, str]:
    """(kind, text) of pattern k of group g: exact names, `*.`, `**.` and mid-label wildcards."""
    return [
        ("matchName", f"svc{g}-{k}.bench.example.com"),
        ("matchPattern", f"*.cdn{g}-{k}.example.com"),
        ("matchPattern", f"**.t{g}-{k}.example.com"),
        ("matchPattern", f"api-*-{g}-{k}.example.com"),
    ][k % 4]


def allowed_name(g: int, k: int) -> str:
    return [
        f"svc{g}-{k}.bench.example.com",
        f"www.cdn{g}-{k}.example.com",
        f"a.b.t{g}-{k}.example.com",
        f"api-eu-{g}-{k}.example.com",
    ][k % 4]


def write_inputs(d: Path) -> dict[str, Path]:
    pol = d / "policies"
    pol.mkdir()
    for g in range(GROUPS):
        rules = "\n".join(
            f'              - {kind}: "{text}"'
            for kind, text in map(lambda k: pattern(g, k), range(PATTERNS_PER_GROUP))
        )
        (pol / f"group{g}.yaml").write_text(
            f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: group{g}, namespace: bench}}
spec:
  endpointSelector: {{matchLabels: {{group: g{g}}}}}
  egress:
    - toEndpoints:
        - matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}
      toPorts:
        - ports: [{{port: "53", protocol: ANY}}]
          rules:
            dns:
{rules}
"""
        )
    dns = (
        f"{{name: kube-dns, namespace: kube-system, ips: [{UPSTREAM}], "
        "labels: {k8s-app: kube-dns}}"
    )
    eps = ["endpoints:", f"  - {dns}"]
    for i in range(ENDPOINTS):
        labels = f"{{group: g{i % GROUPS}}}"
        eps.append(
            f"  - {{name: pod-{i}, namespace: bench, ips: [127.0.1.{i + 1}], labels: {labels}}}"
        )
    (d / "endpoints.yaml").write_text("\n".join(eps) + "\n")
    (d / "policy.json").write_text(
        json.dumps(
            {
                "endpoints": {f"127.0.1.{i + 1}": i for i in range(ENDPOINTS)},
                "patterns": {
                    str(i): [pattern(i % GROUPS, k)[1] for k in range(PATTERNS_PER_GROUP)]
                    for i in range(ENDPOINTS)
                },
            }
        )
    )
    zone = [
        "$ORIGIN example.com.",
        "$TTL 300",
        "@ SOA ns admin 1 3600 600 86400 60",
        "@ NS ns",
        f"ns A {UPSTREAM}",
    ]
    queries = []
    for k in range(PATTERNS_PER_GROUP):
        name = allowed_name(0, k)
        zone.append(f"{name}. A 192.0.2.{k % 250 + 1}")
        queries.append(f"{name} A")
    queries += [f"evil{k}.example.org A" for k in range(PATTERNS_PER_GROUP // 9)]  # ~10% denied
    (d / "example.com.zone").write_text("\n".join(zone) + "\n")
    (d / "queries.txt").write_text("\n".join(queries) + "\n")
    return {
        "policies": pol,
        "endpoints": d / "endpoints.yaml",
        "policy_json": d / "policy.json",
        "zone": d / "example.com.zone",
        "queries": d / "queries.txt",
    }


def wait_ready(port: int, timeout: float = 20.0) -> None:
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03svc\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((CLIENT, 0))
            s.settimeout(0.2)
            try:
                s.sendto(query, ("127.0.0.1", port))
                s.recv(512)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def dnsperf(
    port: int,
    queries: Path,
    seconds: float,
    host: str = "127.0.0.1",
    rate: float | None = None,
    *,
    client: str = CLIENT,
    prefix: list[str] | None = None,
) -> dict[str, float]:
    cmd = [
        *(prefix or []),
        "taskset",
        "-c",
        LOAD_CPU,
        "dnsperf",
        "-s",
        host,
        "-p",
        str(port),
        "-a",
        client,
        "-d",
        str(queries),
        "-l",
        str(seconds),
        "-c",
        "8",
        "-q",
        "256",
        "-t",
        "2",
    ]
    if rate is not None:
        cmd += ["-Q", str(int(rate)), "-v"]
    # dnsperf's per-query lines go to a file, not a pipe: reading ~100k lines/s from a pipe took
    # a fifth of a core from whichever CPU this runner landed on (often the server's).
    with tempfile.TemporaryFile("w+") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, check=True)
        f.seek(0)
        out = f.read()
    result: dict[str, float] = {}
    latencies = []
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Queries per second:"):
            result["qps"] = float(line.split(":")[1])
        elif line.startswith("Average Latency (s):"):
            result["avg_ms"] = float(line.split(":")[1].split()[0]) * 1000
        elif line.startswith("Queries lost:"):
            result["lost"] = float(line.split(":")[1].split()[0])
        elif line.startswith(">") and rate is not None:
            # "> NOERROR name type 0.000123"; a query that timed out has no latency field.
            try:
                latencies.append(float(line.split()[-1]) * 1000)
            except ValueError:
                result["timeouts_at_rate"] = result.get("timeouts_at_rate", 0) + 1
    if latencies and rate is not None:
        # Percentiles of the steady part: dnsperf opens with a burst that takes any server
        # sharing a busy core tens of ms to drain (see SETTLE_S). The whole run's p99 is kept
        # beside it (p99_all_ms) and reported too.
        skip = int(rate * SETTLE_S)
        steady = sorted(latencies[skip:] if len(latencies) > 2 * skip else latencies)
        result["p50_ms"] = percentile(steady, 0.50)
        result["p99_ms"] = percentile(steady, 0.99)
        result["p99_all_ms"] = percentile(sorted(latencies), 0.99)
    return result


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Target:
    def __init__(self, name: str, cmd: list[str] | None, port: int) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Target:
        if self.cmd is not None:
            self.proc = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, *self.cmd],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            wait_ready(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def targets(
    files: dict[str, Path], upstream_port: int, tmp: Path
) -> list[tuple[str, list[str] | None, int]]:
    py = sys.executable
    up = f"{UPSTREAM}:{upstream_port}"
    out: list[tuple[str, list[str] | None, int]] = [("a upstream", None, upstream_port)]
    p = free_port()
    out.append(
        (
            "b relay",
            [py, str(HERE / "relay.py"), "127.0.0.1", str(p), UPSTREAM, str(upstream_port)],
            p,
        )
    )
    # (c1): as before the RFC 5452 pool, one upstream socket and names sent as written.
    one_socket = tmp / "one-socket.yaml"
    one_socket.write_text("upstream_sockets: 1\ndns0x20: false\n")
    for name, udp_io, extra in (
        ("c fqdnguard", "rust", []),
        ("c1 one socket", "rust", ["--config", str(one_socket)]),
        ("c2 asyncio", "asyncio", []),
    ):
        p = free_port()
        out.append(
            (
                name,
                [
                    py,
                    "-m",
                    "fqdnguard.cli",
                    "run",
                    "--policy",
                    str(files["policies"]),
                    "--endpoints",
                    str(files["endpoints"]),
                    "--upstream",
                    up,
                    "--listen",
                    f"127.0.0.1:{p}",
                    "--backend",
                    "log",
                    "--log-queries",
                    "none",
                    "--log-level",
                    "warning",
                    "--udp-io",
                    udp_io,
                    *extra,
                ],
                p,
            )
        )
    if shutil.which("dnsdist"):
        p = free_port()
        conf = tmp / "dnsdist.conf"
        conf.write_text(
            f'setLocal("127.0.0.1:{p}")\nnewServer({{address="{up}"}})\nsetSecurityPollSuffix("")\n'
            "setMaxUDPOutstanding(65535)\n"
        )
        out.append(
            ("d dnsdist", ["dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)], p)
        )
    p = free_port()
    out.append(
        (
            "e pyproxy",
            [
                py,
                str(HERE / "pyproxy.py"),
                "127.0.0.1",
                str(p),
                UPSTREAM,
                str(upstream_port),
                str(files["policy_json"]),
            ],
            p,
        )
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 s per run, 1 repeat (what CI runs)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--intercepted-only", action="store_true", help="only (f)-(h2), the namespace paths"
    )
    ap.add_argument(
        "--upstream-cpu",
        default=SERVER_CPU,
        help=f"CPU for Knot (default {SERVER_CPU}, beside the server under test; "
        f"{LOAD_CPU} puts it beside dnsperf)",
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat = 2.0, 1
    if shutil.which("dnsperf") is None:
        print("dnsperf is not installed (apt-get install dnsperf)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fqdnguard-bench-"))
    files = write_inputs(tmp)
    if args.intercepted_only:
        return intercepted_mode(files, args)
    upstream_port = free_port(UPSTREAM)
    results: dict[str, dict[str, float]] = {}
    with KnotServer(
        {"example.com": files["zone"].read_text()}, host=UPSTREAM, port=upstream_port, workers=2
    ) as knot:
        if knot._proc is not None:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", args.upstream_cpu, str(knot._proc.pid)],
                capture_output=True,
                check=False,
            )
        print(
            f"dnsperf on CPU {LOAD_CPU}, servers on CPU {SERVER_CPU}, Knot on CPU "
            f"{args.upstream_cpu}",
            flush=True,
        )
        for name, cmd, port in targets(files, upstream_port, tmp):
            host = UPSTREAM if cmd is None else "127.0.0.1"
            runs = []
            with Target(name, cmd, port):
                dnsperf(port, files["queries"], 1.0, host)  # warm up (fills caches, JITs nothing)
                for _ in range(args.repeat):
                    runs.append(dnsperf(port, files["queries"], args.seconds, host))
            results[name] = {
                "qps": statistics.median(r["qps"] for r in runs),
                "avg_ms": statistics.median(r["avg_ms"] for r in runs),
                "lost": statistics.median(r.get("lost", 0) for r in runs),
                "runs": len(runs),
            }
            r = results[name]
            print(f"  {name:<12} {r['qps']:>10.0f} qps  avg {r['avg_ms']:.3f} ms", flush=True)
        rate = results["c fqdnguard"]["qps"] / 2
        at_rate(
            results,
            targets(files, upstream_port, tmp),
            names=AT_RATE,
            queries=files["queries"],
            rate=rate,
            seconds=max(2.0, args.seconds / 2),
            repeat=args.repeat,
        )
    report(results, rate, args.out, args.upstream_cpu)
    return intercepted_mode(files, args)


AT_RATE = ("a upstream", "b relay", "c fqdnguard", "c1 one socket", "c2 asyncio", "d dnsdist")


def at_rate(
    results: dict[str, dict[str, float]],
    paths: list[tuple[str, list[str] | None, int]],
    *,
    names: tuple[str, ...],
    queries: Path,
    rate: float,
    seconds: float,
    repeat: int,
) -> None:
    """Median p50/p99 over `repeat` runs of `names` at a fixed `rate`, into results as
    p50_ms_at_half etc.; a target that does not come up is reported and left out (nan), not the
    end of the run."""
    print(f"latency at {rate:.0f} qps:", flush=True)
    for name, cmd, port in paths:
        if name not in names:
            continue
        host = UPSTREAM if cmd is None else "127.0.0.1"
        runs: list[dict[str, float]] = []
        try:
            with Target(name, cmd, port):
                dnsperf(port, queries, 1.0, host)
                runs = [dnsperf(port, queries, seconds, host, rate=rate) for _ in range(repeat)]
        except RuntimeError as e:
            print(f"  {name}: left out at {rate:.0f} qps: {e}", flush=True)
        nan = float("nan")
        for key in ("p50_ms", "p99_ms", "p99_all_ms"):
            got = [r.get(key, nan) for r in runs] or [nan]
            results[name][f"{key}_at_half"] = statistics.median(got)
            results[name][f"{key}_at_half_runs"] = got  # type: ignore[assignment]
        p99s = " ".join(f"{x:.3f}" for x in results[name]["p99_ms_at_half_runs"])  # type: ignore[union-attr]
        alls = " ".join(f"{x:.3f}" for x in results[name]["p99_all_ms_at_half_runs"])  # type: ignore[union-attr]
        print(f"  {name:<12} p99 per run: {p99s} ms (whole runs: {alls})", flush=True)


def intercepted_mode(files: dict[str, Path], args: argparse.Namespace) -> int:
    """(f)-(h) over network namespaces, added to results.json (skipped, with why, unless root)."""
    from intercepted import available, run_intercepted  # noqa: PLC0415
    from intercepted import report as report_intercepted  # noqa: PLC0415

    why = available()
    if why is not None:
        print(f"\nintercepted mode skipped: {why}")
        return 0
    print("\nintercepted mode (network namespaces):", flush=True)
    netns = run_intercepted(files, args.seconds, args.repeat, dnsperf)
    report_intercepted(netns)
    path = args.out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved["intercepted"] = netns
    path.write_text(json.dumps(saved, indent=2))
    return 0


def report(results: dict[str, dict[str, float]], rate: float, out: Path, knot_cpu: str) -> None:
    c = results["c fqdnguard"]
    print(f"\n{'target':<14}{'qps':>10}{'avg ms':>9}   ratio of (c) to it")
    for name, r in results.items():
        print(f"{name:<14}{r['qps']:>10.0f}{r['avg_ms']:>9.3f}   {c['qps'] / r['qps']:.2f}")
    a = results["a upstream"]
    nan = float("nan")
    added = c.get("p99_ms_at_half", nan) - a.get("p99_ms_at_half", nan)
    added_all = c.get("p99_all_ms_at_half", nan) - a.get("p99_all_ms_at_half", nan)
    print(
        f"\nlatency at {rate:.0f} qps (half of (c)'s maximum), medians; after each run's first "
        f"{SETTLE_S} s (whole run in brackets):"
    )
    for key in AT_RATE:
        r = results.get(key, {})
        if "p99_ms_at_half" in r:
            p50, p99 = r["p50_ms_at_half"], r["p99_ms_at_half"]
            p99_all = r.get("p99_all_ms_at_half", nan)
            print(f"  {key:<15} p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({p99_all:.3f})")
    checks = [
        ("(c) >= 0.8 x (b) relay", c["qps"] / results["b relay"]["qps"], ">=", 0.8),
        ("(c) >= 10 x (e) pyproxy", c["qps"] / results["e pyproxy"]["qps"], ">=", 10),
        ("p99 added over (a) at half (c)'s rate, ms (< 1)", added, "<", 1.0),
        (
            "the same over whole runs, dnsperf's start-up burst included, ms (no target)",
            added_all,
            "",
            0,
        ),
    ]
    if "c1 one socket" in results:
        checks.append(
            (
                "(c) / (c1) one upstream socket: the cost of random ports and 0x20 (no target)",
                c["qps"] / results["c1 one socket"]["qps"],
                "",
                0,
            )
        )
    if "c2 asyncio" in results:
        checks.append(
            ("(c) / (c2) asyncio (no target)", c["qps"] / results["c2 asyncio"]["qps"], "", 0)
        )
    if "d dnsdist" in results:
        d = results["d dnsdist"]
        checks.append(("(c) / (d) dnsdist (no target)", c["qps"] / d["qps"], "", 0))
        checks.append(
            (
                "(d) dnsdist p99 added at the same rate, ms (no target)",
                d.get("p99_ms_at_half", nan) - a.get("p99_ms_at_half", nan),
                "",
                0,
            )
        )
    print()
    for label, got, op, want in checks:
        ok = (got >= want) if op == ">=" else (got < want) if op == "<" else True
        print(f"  {'OK  ' if ok else 'MISS'}  {label}: {got:.2f}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "layout": {"dnsperf": LOAD_CPU, "servers": SERVER_CPU, "knot": knot_cpu},
                "rate_at_half": rate,
                "results": results,
                "p99_added_ms": added,
                "p99_added_whole_runs_ms": added_all,
                "settle_s": SETTLE_S,
            },
            indent=2,
        )
    )
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        names = list(results)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(
            names,
            [results[n]["qps"] for n in names],
            color=["#888", "#aaa", "#2a7", "#1c5", "#57a", "#c55"][: len(names)],
        )
        ax.set_ylabel("queries per second (median)")
        ax.set_title("dnsperf over UDP on CPU 0; each server under test and Knot on CPU 1")
        for i, n in enumerate(names):
            ax.text(i, results[n]["qps"], f"{results[n]['qps']:.0f}", ha="center", va="bottom")
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=100)
        print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    except ImportError:
        print(f"\nwrote {out / 'results.json'} (install matplotlib for the plot)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
