"""What an off-path forger and one noisy pod can do to the proxy (issue: hardening, items 1-2).

Forged answers: an attacker who saw the source port of one of the proxy's queries (it asked a
name of its own, whose server it runs) floods answers for a victim's pending query at that port,
every id. Noisy pods: one endpoint asking names nobody answers, holding idle TCP connections, or
pipelining queries it never reads; another endpoint must still get >= 99% of its answers.

The upstream is a scripted one: it must never answer some names, which no real server here does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest
from fqdnguard import Endpoints, Policy, Proxy
from fqdnguard.config import ProxyConfig
from fqdnguard.metrics import registry_for
from fqdnguard.testing import free_port
from prometheus_client import generate_latest

from tests.proxy_fixtures import FREE_IP, POD_IP, SECOND_UPSTREAM_IP, run, tcp_ask, udp_ask

FORGED = "6.6.6.6"


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every name with 192.0.2.77 after ``delay`` (the question repeated exactly as
    asked, as real servers do), except names with ``silent`` in them: never answered. Records
    where each query came from, by name as asked."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen: list[tuple[str, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def answer(self, data: bytes, addr: Any) -> bytes | None:
        query = dns.message.from_wire(data)
        name = query.question[0].name
        self.seen.append((name.to_text(), addr))
        if "silent" in name.to_text().lower():
            return None
        answer = dns.message.make_response(query)
        answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.77"))
        return answer.to_wire()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        wire = self.answer(data, addr)
        if wire is None:
            return
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, wire, addr)
        else:
            self.transport.sendto(wire, addr)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = self.answer(
                    await reader.readexactly(size), writer.get_extra_info("peername")
                )
                if wire is not None:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
        writer.close()


@contextlib.asynccontextmanager
async def setup(
    policy: Policy, endpoints: Endpoints, udp_io: str, delay: float = 0.0, **cfg: Any
) -> AsyncIterator[tuple[Proxy, FakeUpstream]]:
    loop = asyncio.get_running_loop()
    up_port = free_port(SECOND_UPSTREAM_IP)
    transport, upstream = await loop.create_datagram_endpoint(
        lambda: FakeUpstream(delay), local_addr=(SECOND_UPSTREAM_IP, up_port)
    )
    tcp = await asyncio.start_server(upstream.serve_tcp, SECOND_UPSTREAM_IP, up_port)
    port = free_port("127.0.0.1")
    cfg.setdefault("upstream_timeout", 3.0)
    config = ProxyConfig(listen=[("127.0.0.1", port)], log_queries="none", udp_io=udp_io, **cfg)
    proxy = Proxy(policy, endpoints, upstreams=[f"{SECOND_UPSTREAM_IP}:{up_port}"], config=config)
    await proxy.start()
    try:
        yield proxy, upstream
    finally:
        await proxy.stop(timeout=0.2)
        transport.close()
        tcp.close()


def server(proxy: Proxy) -> tuple[str, int]:
    return ("127.0.0.1", proxy.config.listen[0][1])


def forged_answer(name: str, qid: int) -> bytes:
    msg = dns.message.make_response(dns.message.make_query(name, "A"))
    msg.id = qid
    msg.answer.append(dns.rrset.from_text(name + ".", 86400, "IN", "A", FORGED))
    return msg.to_wire()


async def forge_at_observed_port(
    proxy: Proxy, upstream: FakeUpstream, seen: str = "probe."
) -> None:
    """The attack: learn one query's source port (the attacker's own probe, or with ``seen``
    "silent." the victim query's itself), leave a victim query pending, flood that port with
    answers for it under every id, from the upstream's own address and port."""
    probe = await udp_ask(server(proxy), dns.message.make_query("probe.example.com", "A").to_wire())
    assert dns.message.from_wire(probe).rcode() == dns.rcode.NOERROR
    victim = asyncio.ensure_future(
        udp_ask(
            server(proxy),
            dns.message.make_query("silent.example.com", "A").to_wire(),
            source=FREE_IP,
            timeout=5,
        )
    )
    await asyncio.sleep(0.05)  # the victim's query is on its way upstream
    port = next(addr[1] for name, addr in upstream.seen if name.lower().startswith(seen))
    wire = bytearray(forged_answer("silent.example.com", 0))
    for qid in range(65536):
        wire[0:2] = qid.to_bytes(2, "big")
        upstream.transport.sendto(bytes(wire), ("127.0.0.1", port))
        if qid % 256 == 255:  # paced so that the proxy's socket buffer never overflows
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)
    victim.cancel()
    with contextlib.suppress(BaseException):
        await victim


@pytest.mark.parametrize("udp_io", ["rust", "asyncio"])
def test_forged_answers_at_an_observed_port_are_never_accepted(
    proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with setup(proxy_policy, proxy_endpoints, udp_io) as (proxy, upstream):
            await forge_at_observed_port(proxy, upstream)
            assert proxy.cache.names_for(FORGED) == []
            stats = proxy.engine.stats()
            # The flood reached the proxy (the probe's socket is still read while it is
            # re-drawn), and was dropped: no pending query on that socket, or the name's case.
            assert stats["dropped_unmatched"] + stats["dropped_case"] > 1000

    run(scenario)


@pytest.mark.parametrize("udp_io", ["rust", "asyncio"])
def test_the_same_flood_succeeds_with_one_socket_and_no_0x20(
    proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    """What the test above guards against: with a single upstream socket (as before) and the
    name's case not checked, the flood plants its address in the cache. (Even one socket is
    re-drawn on a new port every 50 ms, so the attacker here floods the port the victim's query
    left from: with one socket that is every query's port until the next re-draw.)"""

    async def scenario() -> None:
        async with setup(
            proxy_policy, proxy_endpoints, udp_io, upstream_sockets=1, dns0x20=False
        ) as (proxy, upstream):
            await forge_at_observed_port(proxy, upstream, seen="silent.")
            assert proxy.cache.names_for(FORGED) != []

    run(scenario)


def test_identical_questions_in_flight_go_upstream_once(
    proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    async def scenario() -> None:
        async with setup(proxy_policy, proxy_endpoints, "rust", delay=0.2) as (proxy, upstream):
            names = ["merged.example.com", "MERGED.example.com", "Merged.Example.Com"] * 10
            queries = [dns.message.make_query(n, "A") for n in names]
            got = await asyncio.gather(
                *(udp_ask(server(proxy), m.to_wire(), source=POD_IP) for m in queries)
            )
            answers = [dns.message.from_wire(g) for g in got]
            for m, a in zip(queries, answers, strict=True):
                assert a.id == m.id and a.rcode() == dns.rcode.NOERROR
                # Each client gets its own spelling of the question back.
                assert a.question[0].name.to_text() == m.question[0].name.to_text()
                assert [rd.address for rd in a.answer[0]] == ["192.0.2.77"]
            upstream_asked = [n for n, _ in upstream.seen if n.lower() == "merged.example.com."]
            assert len(upstream_asked) == 1
            assert proxy.engine.stats()["merged"] == 29
            text = generate_latest(registry_for(proxy)).decode()
            assert "fqdnguard_queries_merged_total 29.0" in text
            assert "fqdnguard_upstream_sockets 1024.0" in text

    run(scenario)


FLOOD = textwrap.dedent(
    """
    import socket, sys, time
    host, source = sys.argv[1], sys.argv[3]
    port, count, rate = int(sys.argv[2]), int(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setblocking(False)
    start = time.monotonic()
    for i in range(count):
        name = b"silent-%d" % i
        q = (i & 0xFFFF).to_bytes(2, "big") + bytes([1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
        q += bytes([len(name)]) + name + b"\\x07example\\x03com\\x00\\x00\\x01\\x00\\x01"
        try:
            s.sendto(q, (host, port))
        except BlockingIOError:
            pass
        if i % 100 == 99:
            while time.monotonic() - start < (i + 1) / rate:
                time.sleep(0.001)
    """
)


async def victim_rate(proxy: Proxy, n: int = 300, tcp: bool = False) -> float:
    """The share of ``n`` queries from FREE_IP answered NOERROR (20 at a time)."""
    ok = 0
    for start in range(0, n, 20):
        batch = [dns.message.make_query(f"v{i}.example.com", "A") for i in range(start, start + 20)]
        if tcp:
            got = await asyncio.gather(
                *(tcp_ask(server(proxy), [m.to_wire()], source=FREE_IP) for m in batch),
                return_exceptions=True,
            )
            got = [g[0] if isinstance(g, list) else g for g in got]
        else:
            got = await asyncio.gather(
                *(udp_ask(server(proxy), m.to_wire(), source=FREE_IP, timeout=2) for m in batch),
                return_exceptions=True,
            )
        ok += sum(
            1
            for g in got
            if isinstance(g, bytes) and dns.message.from_wire(g).rcode() == dns.rcode.NOERROR
        )
    return ok / n


LIMITS = {"max_inflight": 2_000, "max_inflight_per_client": 200, "upstream_timeout": 2.0}


@pytest.mark.parametrize("udp_io", ["rust", "asyncio"])
def test_one_pod_asking_names_nobody_answers_leaves_the_others_their_answers(
    proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with setup(proxy_policy, proxy_endpoints, udp_io, **LIMITS) as (proxy, _):
            host, port = server(proxy)
            flood = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOOD, host, str(port), POD_IP, "20000", "5000"
            )
            try:
                await asyncio.sleep(1.0)  # the flood holds its share of the slots by now
                assert await victim_rate(proxy) >= 0.99
                stats = proxy.engine.stats()
                assert stats["overloaded_client"] > 0, stats
            finally:
                with contextlib.suppress(ProcessLookupError):
                    flood.kill()
                await flood.wait()

    run(scenario)


def test_idle_tcp_connections_of_one_pod_leave_room_for_the_others(
    proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    async def scenario() -> None:
        cfg = {"max_tcp_connections": 200, "max_tcp_per_client": 20, "tcp_idle_timeout": 30.0}
        async with setup(proxy_policy, proxy_endpoints, "rust", **cfg) as (proxy, _):
            host, port = server(proxy)
            idle = []
            for _ in range(200):  # every connection the proxy may hold, from one pod
                with contextlib.suppress(OSError):
                    idle.append(await asyncio.open_connection(host, port, local_addr=(POD_IP, 0)))
            await asyncio.sleep(0.1)
            try:
                assert await victim_rate(proxy, n=70, tcp=True) >= 0.99
                assert proxy.counters()["tcp_refused"] >= 180
            finally:
                for _, writer in idle:
                    writer.close()

    run(scenario)


def test_pipelined_queries_never_read_leave_the_others_their_answers(
    proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    async def scenario() -> None:
        async with setup(proxy_policy, proxy_endpoints, "rust", **LIMITS) as (proxy, _):
            host, port = server(proxy)
            writers = []
            for c in range(5):
                _, writer = await asyncio.open_connection(host, port, local_addr=(POD_IP, 0))
                wires = [
                    dns.message.make_query(f"silent-{c}-{i}.example.com", "A").to_wire()
                    for i in range(2_000)
                ]
                writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
                writers.append(writer)
            await asyncio.sleep(0.5)
            try:
                assert await victim_rate(proxy) >= 0.99
                assert await victim_rate(proxy, n=60, tcp=True) >= 0.99
                stats = proxy.engine.stats()
                assert stats["overloaded_client"] > 0 and stats["denied"] == 0, stats
                text = generate_latest(registry_for(proxy)).decode()
                limited = 'fqdnguard_queries_limited_total{limit="client"} '
                assert float(text.split(limited)[1].split()[0]) == stats["overloaded_client"]
            finally:
                for writer in writers:
                    writer.close()

    run(scenario)
