"""Idle connections to the metrics port: the proxy's threads and DNS answer rate, side by side
for prometheus_client's thread-per-connection server (what served metrics before) and
MetricsServer on the event loop (what serves them now).

Each mode runs a proxy (``udp_io: rust``, a Knot upstream) with its metrics server in a child
process on CPU 1, Knot on CPU 1 too; dnsperf runs on CPU 0. Per round and mode: dnsperf for
``--seconds`` with no idle connection; then 1,000 connections to the metrics port, every other
one with half a request line sent, a few at a time; the child's threads counted 1 s after;
dnsperf again with the connections open; one scrape timed; the threads counted again 10 s after
the connections were opened (past MetricsServer's 5 s read deadline). Medians of ``--repeat``
rounds.

    taskset -c 0 python benches/metrics_idle.py [--repeat 3] [--seconds 3]

Needs knotd and dnsperf.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LOAD_CPU, SERVER_CPU = "0", "1"
IDLE = 1000
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the zone, policy and endpoints of the proxy tests

from tests.proxy_fixtures import ENDPOINTS, POLICY, UPSTREAM_IP, ZONE  # noqa: E402
from tests.proxy_fixtures import POD_IP as CLIENT  # noqa: E402


def serve(mode: str, listen: int, metrics: int, upstream: int) -> None:
    """The child: a proxy and its metrics server (``threads`` or ``loop``) until killed."""
    import asyncio  # noqa: PLC0415

    import uvloop  # noqa: PLC0415
    from fqdnguard import Endpoints, Policy  # noqa: PLC0415
    from fqdnguard.config import ProxyConfig  # noqa: PLC0415
    from fqdnguard.metrics import MetricsServer, registry_for  # noqa: PLC0415
    from fqdnguard.proxy import Proxy  # noqa: PLC0415

    async def main() -> None:
        endpoints = Endpoints.from_yaml(ENDPOINTS)
        policy = Policy.from_yaml(POLICY, endpoints=endpoints)
        config = ProxyConfig(
            listen=[("127.0.0.1", listen)], upstreams=[(UPSTREAM_IP, upstream)], log_queries="none"
        )
        proxy = Proxy(policy, endpoints, config=config)
        await proxy.start()
        if mode == "threads":
            from prometheus_client import start_http_server  # noqa: PLC0415

            start_http_server(metrics, addr="127.0.0.1", registry=registry_for(proxy))
        else:
            await MetricsServer(registry_for(proxy), "127.0.0.1", metrics).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dnsperf(port: int, queries: Path, seconds: float) -> float:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", CLIENT,
         "-d", str(queries), "-l", str(seconds), "-c", "8", "-q", "256", "-t", "2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.strip().startswith("Queries per second:"):
            return float(line.split(":")[1])
    raise RuntimeError(f"no rate in dnsperf's output: {out}")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def open_idle(port: int, timeout: float = 10.0) -> tuple[list[socket.socket], int]:
    """IDLE connections, every other one with half a request line sent. Opened a few at a
    time with a pause between: prometheus_client's server listens with a backlog of 5, and
    connections beyond it that the kernel completed with SYN cookies, and that then send
    nothing, would never reach the server at all (they would not measure it)."""
    conns: list[socket.socket] = []
    failed = 0
    with selectors.DefaultSelector() as sel:
        for start in range(0, IDLE, 4):
            batch = []
            for _ in range(start, min(IDLE, start + 4)):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_WRITE)
                batch.append(s)
            deadline = time.monotonic() + timeout
            while len(sel.get_map()) and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    s = key.fileobj  # type: ignore[assignment]
                    sel.unregister(s)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        if len(conns) % 2:
                            s.send(b"GET /metr")
                        conns.append(s)
                    else:
                        failed += 1
                        s.close()
            for key in list(sel.get_map().values()):
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                failed += 1
            time.sleep(0.01)
    return conns, failed


def scrape(port: int) -> tuple[bool, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            ok = r.status == 200 and b"fqdnguard_queries_total" in r.read()
    except OSError:
        ok = False
    return ok, (time.monotonic() - started) * 1000


def one_round(mode: str, upstream: int, queries: Path, seconds: float) -> dict[str, float]:
    listen, metrics = free_port(), free_port()
    child = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, sys.executable, __file__, "--serve", mode,
         str(listen), str(metrics), str(upstream)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the {mode} proxy did not start")
        dnsperf(listen, queries, 1.0)  # warm up
        base_qps = dnsperf(listen, queries, seconds)
        base_threads = threads(child.pid)
        opened = time.monotonic()
        conns, failed = open_idle(metrics)
        opened_s = time.monotonic() - opened
        time.sleep(1.0)
        threads_1s = threads(child.pid)
        idle_qps = dnsperf(listen, queries, seconds)
        ok, scrape_ms = scrape(metrics)
        time.sleep(max(0.0, opened + opened_s + 10.0 - time.monotonic()))
        threads_10s = threads(child.pid)
        for s in conns:
            s.close()
        return {
            "threads_before": base_threads,
            "threads_1s": threads_1s,
            "threads_10s": threads_10s,
            "connect_failed": failed,
            "open_s": opened_s,
            "qps_before": base_qps,
            "qps_idle": idle_qps,
            "scrape_ok": float(ok),
            "scrape_ms": scrape_ms,
        }
    finally:
        child.kill()
        child.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    from fqdnguard.testing import KnotServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        queries = Path(d) / "queries"
        queries.write_text("www.example.com A\n" * 100)
        with KnotServer({"example.com": ZONE}, host=UPSTREAM_IP) as knot:
            assert knot._proc is not None
            subprocess.run(["taskset", "-a", "-p", "-c", SERVER_CPU, str(knot._proc.pid)],
                           capture_output=True, check=True)  # fmt: skip
            rounds: dict[str, list[dict[str, float]]] = {"threads": [], "loop": []}
            for _ in range(args.repeat):
                for mode, done in rounds.items():  # interleaved: drift hits both alike
                    done.append(one_round(mode, knot.port, queries, args.seconds))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rounds.items()}
    print(f"\n{IDLE} idle/half-sent metrics connections; medians of {args.repeat} rounds")
    print(f"{'':24}{'thread per conn':>18}{'event loop':>14}{'loop/threads':>14}")
    for key in med["threads"]:
        a, b = med["threads"][key], med["loop"][key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"{key:24}{a:>18.1f}{b:>14.1f}{ratio:>14}")
    for mode, done in rounds.items():
        print(f"{mode}: qps_idle per round {[round(r['qps_idle']) for r in done]}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
