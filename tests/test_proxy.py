"""The proxy against a real upstream (Knot DNS on loopback): UDP, TCP, verdicts, cache, holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from fqdnguard import DnsCache, Endpoints, Policy
from fqdnguard.backends import Backend, Callback
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.metrics import registry_for
from fqdnguard.proxy import Proxy
from fqdnguard.testing import KnotServer, free_port
from prometheus_client import generate_latest

from tests.proxy_fixtures import (
    FREE_IP,
    POD_IP,
    SECOND_UPSTREAM_IP,
    STRANGER_IP,
    UPSTREAM_IP,
    run,
    tcp_ask,
    tcp_ask_half_closed,
    udp_ask,
)


class Recorder(Backend):
    """A backend that records when each batch finished applying."""

    name = "recorder"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[tuple[float, list[Any]]] = []

    async def apply(self, changes: Sequence[Any]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.batches.append((time.monotonic(), list(changes)))

    def ips(self) -> set[str]:
        return {c.ip for _, batch in self.batches for c in batch if c.kind != "removed"}


# Every test here runs over both UDP paths: the Rust I/O thread and asyncio's transports.
UDP_IO = ["rust"]


@pytest.fixture(autouse=True, params=["rust", "asyncio"])
def udp_io(request: pytest.FixtureRequest) -> str:
    UDP_IO[0] = request.param
    return str(request.param)


def make_proxy(
    knot: KnotServer,
    policy: Policy,
    endpoints: Endpoints,
    backend: Backend | None = None,
    **cfg: Any,
) -> Proxy:
    port = free_port("127.0.0.1")
    listen = [f"127.0.0.1:{port}", f"[::1]:{port}"]
    upstreams = cfg.pop("upstreams", [f"{UPSTREAM_IP}:{knot.port}"])
    cfg.setdefault("udp_io", UDP_IO[0])
    cfg.setdefault("log_queries", "none")
    config = ProxyConfig(listen=[("127.0.0.1", port)], **cfg)
    return Proxy(
        policy,
        endpoints,
        upstreams=upstreams,
        listen=listen,
        backend=backend or Recorder(),
        config=config,
    )


@contextlib.asynccontextmanager
async def running(proxy: Proxy) -> AsyncIterator[Proxy]:
    """The proxy started, and stopped however the block ends."""
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def q(name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def ask(proxy: Proxy, msg: dns.message.Message, source: str = POD_IP, family: int = 4) -> Any:
    host = "127.0.0.1" if family == 4 else "::1"
    return udp_ask((host, proxy.config.listen[0][1]), msg.to_wire(), source=source)


def test_allowed_query_is_answered_and_its_ips_applied_first(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        backend = Recorder()
        async with running(make_proxy(knot, policy, endpoints, backend)) as proxy:
            query = q("www.Example.com")
            wire = await ask(proxy, query)
            received = time.monotonic()
            answer = dns.message.from_wire(wire)
            assert answer.id == query.id
            assert answer.rcode() == dns.rcode.NOERROR
            assert sorted(rd.address for rd in answer.answer[0]) == ["192.0.2.10", "192.0.2.11"]
            assert backend.ips() == {"192.0.2.10", "192.0.2.11"}
            assert backend.batches[0][0] <= received, (
                "the answer left before the firewall had the IPs"
            )
            assert {c.endpoint for _, b in backend.batches for c in b} == {
                endpoints.by_ip(POD_IP).id
            }
            assert [ip for ip, _ in proxy.cache.lookup("www.example.com")] != []
            stats = proxy.engine.stats()
            assert (stats["allowed"], stats["denied"], stats["inflight"]) == (1, 0, 0)

    run(scenario)


def test_denied_refused_nxdomain_and_search_domains(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        for cfg, name, want in [
            ({}, "evil.org", dns.rcode.REFUSED),
            ({"reject": "nxdomain"}, "evil.org", dns.rcode.NXDOMAIN),
            (
                {"search_domains": ["svc.cluster.local"]},
                "www.example.com.svc.cluster.local",
                dns.rcode.NXDOMAIN,
            ),
            ({"search_domains": ["svc.cluster.local"]}, "evil.org", dns.rcode.REFUSED),
        ]:
            backend = Recorder()
            async with running(make_proxy(knot, policy, endpoints, backend, **cfg)) as proxy:
                query = q(name)
                answer = dns.message.from_wire(await ask(proxy, query))
                assert (answer.id, answer.rcode()) == (query.id, want), (cfg, name)
                assert answer.question == query.question
                assert backend.batches == []
                assert proxy.engine.stats()["denied"] == 1

    run(scenario)


def test_upstream_nxdomain_relayed_and_cname_chain_cached(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        backend = Recorder()
        async with running(make_proxy(knot, policy, endpoints, backend)) as proxy:
            missing = dns.message.from_wire(await ask(proxy, q("missing.example.com")))
            assert missing.rcode() == dns.rcode.NXDOMAIN
            chained = dns.message.from_wire(await ask(proxy, q("chain1.example.com")))
            assert chained.rcode() == dns.rcode.NOERROR
            names = proxy.cache.names_for("192.0.2.10")
            assert "chain1.example.com." in names
            # A CNAME leaving the zone carries no address: nothing is learned for it.
            outside = dns.message.from_wire(await ask(proxy, q("outside.example.com")))
            assert outside.rcode() == dns.rcode.NOERROR
            assert proxy.cache.lookup("outside.example.com") == []
            assert backend.ips() == {"192.0.2.10", "192.0.2.11"}

    run(scenario)


def test_tcp_pipelined_and_truncation_fallback(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        async with running(make_proxy(knot, policy, endpoints)) as proxy:
            port = proxy.config.listen[0][1]
            queries = [q("www.example.com"), q("evil.org"), q("alias.example.com", "AAAA")]
            wires = await tcp_ask(("127.0.0.1", port), [m.to_wire() for m in queries])
            answers = {dns.message.from_wire(w).id: dns.message.from_wire(w) for w in wires}
            assert answers[queries[0].id].rcode() == dns.rcode.NOERROR
            assert answers[queries[1].id].rcode() == dns.rcode.REFUSED
            assert answers[queries[2].id].answer[-1][0].address == "2001:db8::10"
            # UDP without EDNS: the big TXT answer is truncated and relayed so; TCP gets it whole.
            udp = dns.message.from_wire(await ask(proxy, q("big.example.com", "TXT")))
            assert udp.flags & dns.flags.TC
            (whole,) = await tcp_ask(("127.0.0.1", port), [q("big.example.com", "TXT").to_wire()])
            full = dns.message.from_wire(whole)
            assert not full.flags & dns.flags.TC
            assert len(full.answer[0][0].strings) == 4
            text = generate_latest(registry_for(proxy)).decode()
            assert 'fqdnguard_tcp_connections_total{outcome="accepted"} 2.0' in text
            assert 'fqdnguard_tcp_connections_total{outcome="refused"} 0.0' in text

    run(scenario)


def test_tcp_queries_sent_before_a_half_close_are_all_answered(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    """A client that shuts its write side after its queries (``nc -q``, some stub resolvers)
    gets every answer, those held for the backend included, then the proxy closes at once (the
    idle timeout is far longer than the wait allowed here)."""
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        backend = Recorder(delay=0.02)  # answers with new addresses wait for it
        proxy = make_proxy(knot, policy, endpoints, backend, tcp_idle_timeout=60.0)
        async with running(proxy):
            server = ("127.0.0.1", proxy.config.listen[0][1])
            names = ["www.example.com", "evil.org", "alias.example.com", "short.example.com"]

            async def one_connection(i: int) -> None:
                queries = [q(n, "AAAA" if i % 2 else "A") for n in names]
                for k, m in enumerate(queries):  # distinct ids: answers are told apart by id
                    m.id = i * len(names) + k
                wires = await tcp_ask_half_closed(server, [m.to_wire() for m in queries])
                got = {dns.message.from_wire(w).id: dns.message.from_wire(w) for w in wires}
                assert sorted(got) == sorted(m.id for m in queries), f"connection {i}"
                assert got[queries[1].id].rcode() == dns.rcode.REFUSED
                assert got[queries[0].id].rcode() == dns.rcode.NOERROR

            for start in range(0, 60, 10):  # 60 connections, 10 at a time
                await asyncio.gather(*(one_connection(i) for i in range(start, start + 10)))
            # Nothing sent at all before the FIN: closed at once too.
            assert await tcp_ask_half_closed(server, []) == []
            assert proxy.stats.held >= 1
            assert not proxy._tcp_clients

    run(scenario)


def test_edns_passes_through(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        async with running(make_proxy(knot, policy, endpoints)) as proxy:
            query = q("www.example.com", use_edns=0, payload=1232, want_dnssec=True)
            answer = dns.message.from_wire(await ask(proxy, query))
            assert answer.edns == 0 and answer.payload >= 512
            assert answer.ednsflags & dns.flags.DO
            refused = dns.message.from_wire(await ask(proxy, q("evil.org", use_edns=0)))
            assert refused.rcode() == dns.rcode.REFUSED and refused.edns == 0

    run(scenario)


def test_ipv6_listener(knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        async with running(make_proxy(knot, policy, endpoints)) as proxy:
            answer = dns.message.from_wire(
                await ask(proxy, q("www.example.com"), source="::1", family=6)
            )
            assert answer.rcode() == dns.rcode.NOERROR
            denied = dns.message.from_wire(await ask(proxy, q("evil.org"), source="::1", family=6))
            assert denied.rcode() == dns.rcode.REFUSED

    run(scenario)


def test_unknown_and_unrestricted_sources(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        async with running(make_proxy(knot, policy, endpoints)) as proxy:
            stranger = dns.message.from_wire(
                await ask(proxy, q("www.example.com"), source=STRANGER_IP)
            )
            assert stranger.rcode() == dns.rcode.REFUSED
            free = dns.message.from_wire(await ask(proxy, q("example.com", "SOA"), source=FREE_IP))
            assert free.rcode() == dns.rcode.NOERROR
            assert proxy.engine.stats()["unknown_source"] == 1
        async with running(
            make_proxy(knot, policy, endpoints, unknown_endpoint="default/pod")
        ) as proxy:
            stranger = dns.message.from_wire(
                await ask(proxy, q("www.example.com"), source=STRANGER_IP)
            )
            assert stranger.rcode() == dns.rcode.NOERROR
            denied = dns.message.from_wire(await ask(proxy, q("evil.org"), source=STRANGER_IP))
            assert denied.rcode() == dns.rcode.REFUSED

    run(scenario)


def _raw_query(labels: list[bytes], qdcount: int = 1) -> bytes:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    header = (0x7777).to_bytes(2, "big") + b"\x01\x00" + qdcount.to_bytes(2, "big") + b"\x00" * 6
    return header + name + b"\x00\x01\x00\x01"


def test_malformed_and_odd_names_are_never_forwarded(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        backend = Recorder()
        async with running(make_proxy(knot, policy, endpoints, backend)) as proxy:
            port = proxy.config.listen[0][1]
            formerr = await udp_ask(
                ("127.0.0.1", port), _raw_query([b"www", b"example", b"com"], qdcount=2)
            )
            assert (formerr[:2], formerr[3] & 0x0F) == (b"\x77\x77", dns.rcode.FORMERR)
            odd = [
                [b"www.evil", b"example", b"com"],  # a dot inside a label is no boundary
                [b"a\x00", b"example", b"com"],
                [b"a", b"b", b"example", b"com"],  # two labels under *.example.com
            ]
            for labels in odd:
                reply = await udp_ask(("127.0.0.1", port), _raw_query(labels))
                assert reply[3] & 0x0F == dns.rcode.REFUSED, labels
            stats = proxy.engine.stats()
            assert (stats["allowed"], stats["denied"], stats["malformed"]) == (0, 3, 1)
            # A response sent to the listener gets nothing back.
            response = bytearray(_raw_query([b"www", b"example", b"com"]))
            response[2] |= 0x80
            with pytest.raises(TimeoutError):
                await udp_ask(("127.0.0.1", port), bytes(response), timeout=0.3)

    run(scenario)


def test_timeout_servfail_and_failover(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        dead = f"{SECOND_UPSTREAM_IP}:{free_port(SECOND_UPSTREAM_IP)}"
        async with running(
            make_proxy(
                knot,
                policy,
                endpoints,
                upstreams=[dead, f"{UPSTREAM_IP}:{knot.port}"],
                upstream_timeout=0.3,
            )
        ) as proxy:
            rcodes = []
            for _ in range(4):
                rcodes.append(dns.message.from_wire(await ask(proxy, q("www.example.com"))).rcode())
            assert rcodes == [dns.rcode.SERVFAIL] * 3 + [dns.rcode.NOERROR]
            assert proxy.stats.upstream_failovers == 1
            assert proxy.engine.stats()["timeouts"] == 3
            text = generate_latest(registry_for(proxy)).decode()
            assert "fqdnguard_upstream_failovers_total 1.0" in text

    run(scenario)


def test_hold_waits_for_backend_up_to_hold_max(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        slow = Recorder(delay=0.05)
        async with running(make_proxy(knot, policy, endpoints, slow)) as proxy:
            wire = await ask(proxy, q("www.example.com"))
            assert slow.batches and slow.batches[0][0] <= time.monotonic()
            assert dns.message.from_wire(wire).rcode() == dns.rcode.NOERROR
            assert proxy.stats.held == 1 and proxy.stats.hold_timeouts == 0
        stuck = Recorder(delay=2.0)
        proxy = make_proxy(knot, policy, endpoints, stuck, hold_max=0.1)
        await proxy.start()
        try:
            started = time.monotonic()
            wire = await ask(proxy, q("www.example.com"))
            waited = time.monotonic() - started
            assert 0.08 <= waited < 1.5, waited
            assert proxy.stats.hold_timeouts == 1
        finally:
            await proxy.stop(timeout=0.1)

    run(scenario)


class ScriptedUpstream(asyncio.DatagramProtocol):
    """An upstream that first answers with a wrong id, then the wrong question, then right."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        good = dns.message.make_response(query)
        good.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.99"))
        wrong_id = dns.message.make_response(query)
        wrong_id.id = (query.id + 1) & 0xFFFF
        wrong_id.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "6.6.6.6")
        )
        other = dns.message.make_query("evil.example.com", "A")
        other.id = query.id
        wrong_q = dns.message.make_response(other)
        wrong_q.answer.append(dns.rrset.from_text("evil.example.com.", 60, "IN", "A", "6.6.6.7"))
        for msg in (wrong_id, wrong_q, good):
            self.transport.sendto(msg.to_wire(), addr)  # type: ignore[attr-defined]


def test_spoofed_and_mismatched_answers_are_dropped(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        port = free_port(SECOND_UPSTREAM_IP)
        transport, _ = await loop.create_datagram_endpoint(
            ScriptedUpstream, local_addr=(SECOND_UPSTREAM_IP, port)
        )
        backend = Recorder()
        async with running(
            make_proxy(knot, policy, endpoints, backend, upstreams=[f"{SECOND_UPSTREAM_IP}:{port}"])
        ) as proxy:
            answer = dns.message.from_wire(await ask(proxy, q("www.example.com")))
            assert [rd.address for rd in answer.answer[0]] == ["192.0.2.99"]
            await asyncio.sleep(0.05)
            stats = proxy.engine.stats()
            assert (stats["dropped_unmatched"], stats["dropped_mismatch"]) == (1, 1)
            assert backend.ips() == {"192.0.2.99"}
            assert DnsCache  # the cache never heard of 6.6.6.6
            assert proxy.cache.names_for("6.6.6.6") == [] and proxy.cache.names_for("6.6.6.7") == []
            transport.close()

    run(scenario)


def test_callback_backend_for_embedding(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints
    seen: list[Any] = []

    async def scenario() -> None:
        proxy = Proxy(
            policy,
            endpoints,
            upstreams=[f"{UPSTREAM_IP}:{knot.port}"],
            listen=[f"127.0.0.1:{free_port()}"],
            backend=Callback(seen.extend),
        )
        await proxy.start()
        try:
            await ask(proxy, q("short.example.com"))
        finally:
            await proxy.stop()

    run(scenario)
    assert [(c.kind, c.ip) for c in seen] == [("added", "192.0.2.30")]
    # The firewall element lapses at twice the TTL on its own; the cache removes it at the TTL.
    assert 59 <= seen[0].expires_at - time.time() <= 61


def test_an_empty_cache_given_is_the_cache_used(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    cache = DnsCache()
    proxy = make_proxy(knot, proxy_policy, proxy_endpoints)
    shared = Proxy(
        proxy_policy,
        proxy_endpoints,
        upstreams=[f"{UPSTREAM_IP}:{knot.port}"],
        listen=proxy.config.listen,
        cache=cache,
    )
    assert shared.cache is cache

    async def scenario() -> None:
        await shared.start()
        try:
            await ask(shared, q("www.example.com"))
        finally:
            await shared.stop()

    run(scenario)
    assert sorted(ip for ip, _ in cache.lookup("www.example.com")) == ["192.0.2.10", "192.0.2.11"]


def test_run_serves_its_cache_on_the_control_socket_and_saves_it(
    knot: KnotServer, tmp_path: Any
) -> None:
    from fqdnguard.control import request  # noqa: PLC0415
    from fqdnguard.daemons.run import CACHE_FILE, CONTROL_SOCKET, Runner  # noqa: PLC0415

    from tests.proxy_fixtures import files_config  # noqa: PLC0415

    config = files_config(tmp_path, knot.port)
    state, port = tmp_path / "state", config.listen[0][1]

    async def scenario() -> None:
        runner = Runner(config)
        await runner.start()
        try:
            await udp_ask(("127.0.0.1", port), q("www.example.com").to_wire())
            status, body = await request(state / CONTROL_SOCKET, "GET", "/v1/cache")
            assert status == 200
            assert sorted(e["ip"] for e in body[1:]) == ["192.0.2.10", "192.0.2.11"]
            assert (await request(state / CONTROL_SOCKET, "GET", "/v1/nope"))[0] == 404
        finally:
            await runner.stop()

    run(scenario)
    assert not (state / CONTROL_SOCKET).exists()
    restored = DnsCache.load(state / CACHE_FILE)
    assert sorted(ip for ip, _ in restored.lookup("www.example.com")) == [
        "192.0.2.10",
        "192.0.2.11",
    ]


def test_query_log_records_and_metrics_come_through_either_udp_path(
    knot: KnotServer,
    proxy_policy: Policy,
    proxy_endpoints: Endpoints,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        async with running(make_proxy(knot, policy, endpoints, log_queries="all")) as proxy:
            with caplog.at_level(logging.INFO, logger="fqdnguard.query"):
                await ask(proxy, q("www.example.com"))
                await ask(proxy, q("evil.org"))
                await ask(proxy, q("a.example.com"), source=STRANGER_IP)
                await asyncio.sleep(0.05)  # the records of the Rust path come in a batch
            lines = [json.loads(r.getMessage()) for r in caplog.records]
            verdicts = sorted((x["qname"], x["verdict"]) for x in lines)
            assert verdicts == [
                ("a.example.com.", "unknown_source"),
                ("evil.org.", "denied"),
                ("www.example.com.", "allowed"),
            ]
            allowed = next(x for x in lines if x["verdict"] == "allowed")
            assert sorted(allowed["answers"]) == ["192.0.2.10", "192.0.2.11"]
            text = generate_latest(registry_for(proxy)).decode()
            assert 'fqdnguard_queries_total{verdict="allowed"} 1.0' in text
            assert 'fqdnguard_queries_total{verdict="denied"} 1.0' in text
            # One spelling for each verdict: the log's is the metric's label value.
            for v in {x["verdict"] for x in lines}:
                assert f'fqdnguard_queries_total{{verdict="{v}"}} 1.0' in text, v
            rust_only = "fqdnguard_udp_send_errors_total 0.0"
            assert (rust_only in text) == (proxy.config.udp_io == "rust")

    run(scenario)


def test_graceful_stop_delivers_answers_in_flight(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        # The backend takes 0.2 s: the answer is still held when stop() begins.
        proxy = make_proxy(knot, policy, endpoints, Recorder(delay=0.2), hold_max=1.0)
        await proxy.start()
        pending = asyncio.ensure_future(ask(proxy, q("alias.example.com")))
        await asyncio.sleep(0.05)
        await proxy.stop()
        answer = dns.message.from_wire(await pending)
        assert answer.rcode() == dns.rcode.NOERROR
        assert proxy.stats.held == 1

    run(scenario)


def test_udp_io_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="udp_io: 'kernel': choose rust or asyncio"):
        ProxyConfig(udp_io="kernel")
    with pytest.raises(ConfigError, match="udp_io: the rust UDP path reads the system clock"):
        Proxy(None, None, upstreams=["127.0.0.1:53"], clock=lambda: 0.0)


def test_huge_ttls_are_capped_for_the_client_and_the_cache(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints
) -> None:
    """The zone gives forever.example.com (a CNAME) and its target TTL 2^31-1: 68 years."""
    policy, endpoints = proxy_policy, proxy_endpoints

    async def scenario() -> None:
        for cfg, cap in [({}, 86_400), ({"max_ttl": 600, "min_ttl": 600}, 600)]:
            backend = Recorder()
            async with running(make_proxy(knot, policy, endpoints, backend, **cfg)) as proxy:
                port = proxy.config.listen[0][1]
                query = q("forever.example.com", use_edns=0, want_dnssec=True)
                for transport in ("udp", "tcp"):
                    before = time.time()
                    if transport == "udp":
                        wire = await ask(proxy, query)
                    else:
                        (wire,) = await tcp_ask(("127.0.0.1", port), [query.to_wire()])
                    answer = dns.message.from_wire(wire)
                    assert answer.rcode() == dns.rcode.NOERROR, transport
                    assert [(r.rdtype, r.ttl) for r in answer.answer] == [
                        (dns.rdatatype.CNAME, cap),
                        (dns.rdatatype.A, cap),
                    ], (cfg, transport)
                    # The OPT record's TTL field (EDNS version and flags) is not a TTL.
                    assert answer.edns == 0 and answer.ednsflags & dns.flags.DO, transport
                    ((ip, expires),) = proxy.cache.lookup("forever.example.com")
                    assert ip == "192.0.2.40"
                    assert before + cap - 1 <= expires <= time.time() + cap, (cfg, transport)
                assert backend.ips() == {"192.0.2.40"}

    run(scenario)


def test_max_ttl_option_is_checked() -> None:
    assert ProxyConfig().max_ttl == 86_400
    assert ProxyConfig.from_mapping({"max-ttl": "3600"}).max_ttl == 3600
    for bad, message in [
        ({"max_ttl": 0}, "max_ttl: 0: must be a whole number of seconds from 1 to 2147483647"),
        ({"max_ttl": 2**31}, "max_ttl: 2147483648: must be a whole number"),
        ({"min_ttl": 601, "max_ttl": 600}, "min_ttl 601 is above max_ttl 600"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ProxyConfig(**bad)
    with pytest.raises(ConfigError, match="config: max_ttl: 'a day' is not a whole number"):
        ProxyConfig.from_mapping({"max_ttl": "a day"})


def test_cache_listing_is_streamed_filtered_and_printed_as_it_arrives(
    knot: KnotServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """GET /v1/cache is NDJSON in chunks (a header line with the TTL limits, then one entry per
    line), filtered by the proxy; ``fqdnguard cache list`` prints it, or the last snapshot."""
    from fqdnguard.cli import main  # noqa: PLC0415
    from fqdnguard.control import ControlError, stream_sync  # noqa: PLC0415
    from fqdnguard.daemons.run import CACHE_FILE, CONTROL_SOCKET, Runner  # noqa: PLC0415

    from tests.proxy_fixtures import files_config  # noqa: PLC0415

    config = files_config(tmp_path, knot.port, max_ttl=3600)
    state, port = Path(str(config.state_dir)), config.listen[0][1]
    sock = state / CONTROL_SOCKET

    def raw_get(url: str) -> bytes:
        import socket  # noqa: PLC0415

        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(f"GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            return b"".join(iter(lambda: s.recv(65536), b""))

    async def scenario() -> None:
        runner = Runner(config)
        await runner.start()
        loop = asyncio.get_running_loop()
        try:
            for name in ("www.example.com", "short.example.com", "forever.example.com"):
                await udp_ask(("127.0.0.1", port), q(name).to_wire())
            raw = await loop.run_in_executor(None, raw_get, "/v1/cache")
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            assert b"Content-Type: application/x-ndjson" in head
            assert body.endswith(b"\r\n0\r\n\r\n")
            lines = await loop.run_in_executor(
                None, lambda: list(stream_sync(sock, "GET", "/v1/cache"))
            )
            header, entries = lines[0], lines[1:]
            assert header["max_ttl"] == 3600 and header["entries"] == 4
            assert sorted((e["name"], e["ip"]) for e in entries) == [
                ("forever.example.com.", "192.0.2.40"),
                ("short.example.com.", "192.0.2.30"),
                ("www.example.com.", "192.0.2.10"),
                ("www.example.com.", "192.0.2.11"),
            ]
            assert all(e["expires_at"] <= header["now"] + 3600 for e in entries)
            only = await loop.run_in_executor(
                None, lambda: list(stream_sync(sock, "GET", "/v1/cache?name=WWW.example.com"))
            )
            assert sorted(e["ip"] for e in only[1:]) == ["192.0.2.10", "192.0.2.11"]
            other = await loop.run_in_executor(
                None, lambda: list(stream_sync(sock, "GET", "/v1/cache?endpoint=999"))
            )
            assert other[1:] == []
            for bad, message in [("endpoint=x", "endpoint: 'x'"), ("name=a..b", "name: ")]:
                with pytest.raises(ControlError, match=f"400: .*{message}"):
                    await loop.run_in_executor(
                        None, lambda b=bad: list(stream_sync(sock, "GET", f"/v1/cache?{b}"))
                    )
            capsys.readouterr()
            args = ["cache", "list", "--state-dir", str(state), "--name", "forever.example.com"]
            assert await loop.run_in_executor(None, main, args) == 0
            out, err = capsys.readouterr()
            assert "TTLs are capped at max_ttl 3600 s" in err and "1 entries (live)" in err
            (row,) = out.splitlines()[1:]
            assert row.split()[1] == "forever.example.com." and row.split()[-1] == "192.0.2.40"
            assert 3590 <= int(row.split()[2]) <= 3600
        finally:
            await runner.stop()

    run(scenario)
    assert (state / CACHE_FILE).exists() and not sock.exists()
    assert main(["cache", "list", "--state-dir", str(state), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "4 entries (saved)" in err
    assert sorted(json.loads(line)["ip"] for line in out.splitlines()) == [
        "192.0.2.10",
        "192.0.2.11",
        "192.0.2.30",
        "192.0.2.40",
    ]
