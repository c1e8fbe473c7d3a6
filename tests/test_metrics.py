"""The metrics endpoint and the control socket under idle and half-sent connections: served on
the event loop (no thread per connection), a read deadline and a cap that idle connections
cannot hold against a real scraper; DNS answered meanwhile. A real Knot upstream."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.message
import dns.rcode
from fqdnguard import _http, control, metrics
from fqdnguard.config import ProxyConfig
from fqdnguard.control import request
from fqdnguard.daemons.run import CONTROL_SOCKET, Runner
from fqdnguard.metrics import MetricsServer
from fqdnguard.testing import KnotServer, free_port
from prometheus_client import CollectorRegistry, Counter

from tests.proxy_fixtures import ENDPOINTS, POLICY, UPSTREAM_IP, run, tcp_ask, udp_ask
from tests.split_helpers import QueryStream, fqdnguard_cmd, spawn, status, stop, wait_for

IDLE = 1000
#: The connection caps of the metrics endpoint and of the control socket.
CAP = 64


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _server_ends(port: int) -> int:
    """Established TCP connections whose local port is ``port``: those the server keeps open
    (the clients' ends have it as their remote port)."""
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                held += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return held


def _unix_server_ends(directory: Path) -> int:
    """Connected Unix sockets bound in ``directory``: the accepted ends the server keeps open
    (they show the name the listener was bound to, before it was renamed into place)."""
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    inside = f"{directory}/"
    return sum(1 for r in rows if len(r) == 8 and r[5] == "03" and r[7].startswith(inside))


async def _scrape(host: str, port: int, path: str = "/metrics") -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def _open_idle(
    opener: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    count: int,
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections, every other one with half a request line sent."""

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            try:
                return await opener()
            except BlockingIOError:  # a Unix socket's backlog is full: let the server accept
                await asyncio.sleep(0.01)

    conns = []
    for start in range(0, count, 50):  # in steps, the server accepting in between
        conns.extend(await asyncio.gather(*(one() for _ in range(start, min(count, start + 50)))))
        await asyncio.sleep(0.01)
    for i, (_, writer) in enumerate(conns):
        if i % 2:
            writer.write(b"GET /metr")
    await asyncio.sleep(0.3)  # let the server take the last ones in
    return conns


async def _closed_by_server(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
    async def eof(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 0.05) == b""
        except ConnectionError:  # reset: closed with our half request unread
            return True
        except TimeoutError:
            return False

    return sum(await asyncio.gather(*(eof(r) for r, _ in conns)))


def _config(tmp_path: Path, knot: KnotServer, metrics_port: int) -> ProxyConfig:
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(ENDPOINTS)
    return ProxyConfig(
        listen=[("127.0.0.1", free_port())],
        upstreams=[(UPSTREAM_IP, knot.port)],
        policy=[str(tmp_path / "policy.yaml")],
        endpoints=str(tmp_path / "endpoints.yaml"),
        state_dir=str(tmp_path / "state"),
        metrics=("127.0.0.1", metrics_port),
        log_queries="none",
    )


def test_idle_metrics_connections_cost_no_thread_and_lock_no_scraper_out(
    knot: KnotServer, tmp_path: Path
) -> None:
    """1,000 idle or half-sent connections to the metrics port: no thread more, at most the cap
    of them held open, a scrape still answered, DNS still answered (UDP and TCP)."""
    port = free_port()
    config = _config(tmp_path, knot, port)
    listen = config.listen[0]

    async def scenario() -> None:
        runner = Runner(config)
        await runner.start()
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            threads = _threads()
            conns = await _open_idle(lambda: asyncio.open_connection("127.0.0.1", port), IDLE)
            assert _threads() <= threads, "a thread per metrics connection"
            assert CAP - 2 <= _server_ends(port) <= CAP
            assert await _closed_by_server(conns) >= IDLE - CAP
            status, text = await _scrape("127.0.0.1", port)
            assert status == 200
            assert 'fqdnguard_queries_total{verdict="allowed"}' in text
            query = dns.message.make_query("www.example.com", "A")
            answer = dns.message.from_wire(await udp_ask(listen, query.to_wire()))
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer
            (wire,) = await tcp_ask(listen, [query.to_wire()])
            assert dns.message.from_wire(wire).rcode() == dns.rcode.NOERROR
            status, text = await _scrape("127.0.0.1", port)
            assert 'fqdnguard_queries_total{verdict="allowed"} 2.0' in text
            assert (await _scrape("127.0.0.1", port, "/"))[0] == 404
            assert _threads() <= threads
        finally:
            for _, writer in conns:
                writer.close()
            await runner.stop()

    run(scenario)


def test_idle_control_connections_are_capped_and_lock_no_client_out(
    knot: KnotServer, tmp_path: Path
) -> None:
    """The control socket: 1,000 idle or half-sent connections; the server keeps at most its
    cap of them, and a request is still answered."""
    config = _config(tmp_path, knot, free_port())
    sock = tmp_path / "state" / CONTROL_SOCKET

    async def scenario() -> None:
        runner = Runner(config)
        await runner.start()
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            conns = await _open_idle(lambda: asyncio.open_unix_connection(str(sock)), IDLE)
            assert CAP - 2 <= _unix_server_ends(sock.parent) <= CAP
            assert await _closed_by_server(conns) >= IDLE - CAP
            status, body = await request(sock, "GET", "/v1/stats")
            assert status == 200 and "engine" in body
        finally:
            for _, writer in conns:
                writer.close()
            await runner.stop()

    run(scenario)


def test_metrics_server_reads_under_a_deadline_and_names_bad_requests() -> None:
    assert metrics.MAX_CONNECTIONS == control.MAX_CONNECTIONS == CAP
    registry = CollectorRegistry()
    Counter("probe", "a probe", registry=registry).inc()

    async def scenario() -> None:
        server = MetricsServer(registry, "127.0.0.1", 0, max_connections=4, read_timeout=0.2)
        await server.start()
        host, port = server.address
        try:
            # A connection that never finishes its request is closed at the deadline.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            status, text = await _scrape(host, port)
            assert (status, "probe_total 1.0" in text) == (200, True)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"BREW /metrics\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 3)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 400 ")
            assert b"not an HTTP/1.x request line: 'BREW /metrics'" in raw
            assert len(server.connections) == 0
        finally:
            await server.close()

    run(scenario)


def test_connection_cap_closes_the_oldest_still_reading() -> None:
    async def scenario() -> None:
        cap = _http.ConnectionCap(2)
        accepted: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        while len(accepted) < 4:
            await asyncio.sleep(0.01)
        first, second, third, fourth = accepted
        assert cap.admit(first) and cap.admit(second)
        cap.request_read(second)  # being answered: not closed for room
        assert cap.admit(third)  # closes the first
        assert first.transport.is_closing() and not second.transport.is_closing()
        cap.request_read(third)
        assert not cap.admit(fourth)  # both being answered: refused
        assert (len(cap), cap.evicted, cap.refused) == (2, 1, 1)
        cap.release(second)
        assert len(cap) == 1
        for w in [*accepted, *(c for _, c in clients)]:
            w.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # the transports' connection_lost

    run(scenario)


def test_a_proxy_taking_over_binds_the_metrics_port_beside_its_predecessor(
    knot: KnotServer, tmp_path: Path
) -> None:
    """Hot restart with metrics on: the successor (``fqdnguard proxy`` on the same state
    directory and metrics port) starts while its predecessor still serves the port, takes over,
    and scrapes are answered throughout and after the predecessor's exit."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(ENDPOINTS)
    state, log, port = tmp_path / "state", tmp_path / "fqdnguard.log", free_port()
    cmd = fqdnguard_cmd(
        "proxy", "--state-dir", str(state), "--backend", "log",
        "--listen", f"127.0.0.1:{free_port()}", "--upstream", f"{knot.host}:{knot.port}",
        "--metrics", f"127.0.0.1:{port}", "--log-queries", "none",
    )  # fmt: skip

    def scrape() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
                return int(r.status)
        except OSError:
            return 0

    old = spawn(cmd, log)
    new = None
    try:
        wait_for(lambda: (status(state) or {}).get("pid") == old.pid, "the first proxy", log=log)
        wait_for(lambda: scrape() == 200, "the first proxy's metrics", log=log)
        new = spawn(cmd, log)
        wait_for(lambda: (status(state) or {}).get("pid") == new.pid, "the successor", log=log)
        assert new.poll() is None, log.read_text()
        assert [scrape() for _ in range(10)] == [200] * 10
        assert stop(old) == 0
        assert [scrape() for _ in range(10)] == [200] * 10  # the successor's alone
        assert new.poll() is None
    finally:
        for proc in (new, old):
            if proc is not None:
                stop(proc)


def test_a_successor_that_cannot_bind_the_metrics_port_leaves_its_predecessor_serving(
    knot: KnotServer, tmp_path: Path
) -> None:
    """Another program holds the metrics port the new proxy is given: the new proxy fails to
    start before it says it serves, so the old one keeps (or takes back) the sockets it handed
    over and the control socket; no query is lost."""
    state, log, listen, port = tmp_path / "state", tmp_path / "log", free_port(), free_port()
    cmd = fqdnguard_cmd(
        "proxy", "--state-dir", str(state), "--backend", "log",
        "--listen", f"127.0.0.1:{listen}", "--upstream", f"{knot.host}:{knot.port}",
        "--log-queries", "none",
    )  # fmt: skip
    old = spawn(cmd, log)
    holder = socket.socket()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    stream = QueryStream(client, ("127.0.0.1", listen), ["www.example.com"], 200)
    try:
        wait_for(lambda: (status(state) or {}).get("pid") == old.pid, "the first proxy", log=log)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        stream.start()
        new = spawn([*cmd, "--metrics", f"127.0.0.1:{port}"], log)
        assert new.wait(30) != 0, "the new proxy started without its metrics port"
        answered = len(stream.answered)
        wait_for(lambda: len(stream.answered) > answered + 200, "answers after its exit", log=log)
        stream.stop()
        assert stream.lost() == [], stream.summary()
        assert old.poll() is None and (status(state) or {}).get("pid") == old.pid
    finally:
        holder.close()
        stop(old)
