"""Do cache saves and listings stall the data path? dnsperf at a steady rate through
`fqdnguard run` (Rust UDP path, a real Knot upstream) with a cache of a million entries, in
three phases on the same kind of proxy:

  quiet    no save, no listing: the reference p99
  saving   the proxy saves its cache every --save-interval seconds (the periodic saver)
  listing  `GET /v1/cache` read back to back over the control socket by a client process

For each: the p50/p99 of the steady stream (dnsperf's first SETTLE_S seconds left out, as in
run.py), queries lost, and the proxy's peak RSS sampled every 5 ms against its RSS before the
phase. Targets: p99 within 1 ms of quiet's, nothing lost, the peak RSS under twice the RSS
before. `--pythonpath DIR` runs the proxy from another checkout (an older build, for a
before/after).

dnsperf has CPU 0 (with the listing client, at nice 19 so that it does not delay dnsperf's own
clock), the proxy and Knot share CPU 1, as in run.py. The machine's other load shows as
outliers in single runs: read the medians.

Usage: python benches/proxy/save_stall.py [--entries N] [--rate QPS] [--seconds S] [--repeat N]
                                          [--pythonpath DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "python"))

from fqdnguard import DnsCache  # noqa: E402
from fqdnguard.testing import KnotServer, free_port  # noqa: E402
from run import LOAD_CPU, SERVER_CPU, UPSTREAM, dnsperf, wait_ready, write_inputs  # noqa: E402

# Reads the control socket's answer to the end and throws it away: the cost on the proxy's
# side is the whole listing, the client's is a recv loop (it shares CPU 0 with dnsperf).
LIST_CLIENT = """
import socket, sys, time
while True:
    t = time.monotonic()
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sys.argv[1])
        except OSError:  # not there yet
            time.sleep(0.1)
            continue
        s.sendall(b"GET /v1/cache HTTP/1.1\\r\\nConnection: close\\r\\n\\r\\n")
        n = 0
        while chunk := s.recv(1 << 20):
            n += len(chunk)
    print(f"{time.monotonic() - t:.3f} {n}", flush=True)
"""


TTL = 7200


def fill_snapshot(path: Path, entries: int) -> None:
    """A snapshot of `entries` unique (endpoint, name, ip) entries that outlive the run."""
    cache = DnsCache(max_entries=max(entries, 1))
    now = time.time()
    batch = 10_000
    for start in range(0, entries, batch):
        answers = [
            (f"h{i}.bulk{i % 1000}.example.net", [(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", TTL)])  # noqa: E501
            for i in range(start, min(entries, start + batch))
        ]  # fmt: skip
        cache.record_many(start // batch % 250, answers, now=now)
    cache.save(path)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssPeak:
    """The highest RSS of `pid`, sampled every 5 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_proxy(
    files: dict[str, Path], upstream: str, state: Path, save_interval: float, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = state.parent / f"config-{port}.yaml"
    config.write_text(f"cache_save_interval: {save_interval}\n")
    cmd = [
        sys.executable, "-m", "fqdnguard.cli", "run", "--config", str(config),
        "--policy", str(files["policies"]), "--endpoints", str(files["endpoints"]),
        "--upstream", upstream, "--listen", f"127.0.0.1:{port}", "--backend", "log",
        "--log-queries", "none", "--log-level", "warning", "--state-dir", str(state),
    ]  # fmt: skip
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_ready(port, timeout=120)
    # Let the start-up (restore, reconcile, gc.freeze) settle before measuring.
    time.sleep(2)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def phase(  # noqa: PLR0917
    kind: str, files: dict[str, Path], upstream: str, state: Path, args: argparse.Namespace,
    env: dict[str, str],
) -> dict[str, float]:  # fmt: skip
    interval = args.save_interval if kind == "saving" else 3600.0
    proc, port = start_proxy(files, upstream, state, interval, env)
    snapshot = state / "cache.snapshot"
    saves_before = snapshot.stat().st_mtime_ns
    lister = None
    try:
        before = rss_kb(proc.pid)
        if kind == "listing":
            lister = subprocess.Popen(
                ["taskset", "-c", LOAD_CPU, "nice", "-n", "19", sys.executable, "-c",
                 LIST_CLIENT, str(state / "control.sock")],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        with RssPeak(proc.pid) as peak:
            result = dnsperf(port, files["queries"], args.seconds, rate=args.rate)
        result["rss_before_mb"] = before / 1024
        result["rss_peak_mb"] = peak.peak / 1024
        result["saved"] = float(snapshot.stat().st_mtime_ns != saves_before)
        if lister is not None:
            lister.terminate()
            out, _ = lister.communicate(timeout=30)
            times = [float(line.split()[0]) for line in out.splitlines() if line.strip()]
            sizes = [int(line.split()[1]) for line in out.splitlines() if line.strip()]
            result["listings"] = len(times)
            result["listing_s"] = statistics.median(times) if times else float("nan")
            result["listing_mb"] = (sizes[0] / 1e6) if sizes else float("nan")
        return result
    finally:
        if lister is not None and lister.poll() is None:
            lister.kill()
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=3000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save-interval", type=float, default=1.0)
    ap.add_argument("--pythonpath", help="run the proxy from this python/ directory")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    with tempfile.TemporaryDirectory(prefix="fqdnguard-stall-") as d:
        tmp = Path(d)
        files = write_inputs(tmp)
        state = tmp / "state"
        state.mkdir(mode=0o700)
        t = time.monotonic()
        fill_snapshot(state / "cache.snapshot", args.entries)
        print(f"{args.entries} entries in the snapshot ({time.monotonic() - t:.1f} s)", flush=True)
        port = free_port(UPSTREAM)
        with KnotServer(
            {"example.com": files["zone"].read_text()}, host=UPSTREAM, port=port, workers=2
        ) as knot:
            if knot._proc is not None:
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", SERVER_CPU, str(knot._proc.pid)],
                    capture_output=True,
                    check=False,
                )
            runs: dict[str, list[dict[str, float]]] = {"quiet": [], "saving": [], "listing": []}
            for r in range(args.repeat):
                for kind, results in runs.items():
                    res = phase(kind, files, f"{UPSTREAM}:{port}", state, args, env)
                    results.append(res)
                    print(f"run {r + 1} {kind:8} {json.dumps(res)}", flush=True)
    med = {
        kind: {k: statistics.median(x.get(k, 0.0) for x in rs) for k in set().union(*rs)}
        for kind, rs in runs.items()
    }
    q = med["quiet"]
    print(f"\n{args.entries} entries, {args.rate:.0f} q/s, medians of {args.repeat} runs")
    print(f"{'phase':<9}{'p50 ms':>8}{'p99 ms':>8}{'p99 all':>9}{'lost':>6}{'RSS MB':>8}"
          f"{'peak MB':>9}{'peak/RSS':>9}  vs quiet")  # fmt: skip
    ok = True
    for kind, m in med.items():
        ratio = m["rss_peak_mb"] / m["rss_before_mb"]
        line = (
            f"{kind:<9}{m['p50_ms']:>8.3f}{m['p99_ms']:>8.3f}{m['p99_all_ms']:>9.3f}"
            f"{m['lost']:>6.0f}{m['rss_before_mb']:>8.0f}{m['rss_peak_mb']:>9.0f}{ratio:>9.2f}"
        )
        if kind != "quiet":
            within = m["p99_ms"] - q["p99_ms"] <= 1.0
            verdict = within and m["lost"] == 0 and ratio < 2.0
            ok = ok and verdict
            line += f"  p99 {m['p99_ms'] - q['p99_ms']:+.3f} ms  {'OK' if verdict else 'MISS'}"
            if kind == "listing":
                line += f"  ({m['listing_s']:.2f} s, {m['listing_mb']:.0f} MB per listing)"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
