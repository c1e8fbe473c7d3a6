"""Upstream UDP retransmission against a real Knot upstream behind a lossy relay, over both UDP
paths: a query whose first copy is lost is answered after ``upstream_retransmit``, not SERVFAIL
at the timeout; two answers (one per copy) make one reply; forged answers stay dropped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.metrics import registry_for
from fqdnguard.proxy import Proxy
from fqdnguard.testing import KnotServer, free_port
from prometheus_client import generate_latest

from tests.proxy_fixtures import POD_IP, SECOND_UPSTREAM_IP, run
from tests.test_proxy import Recorder, running

TIMEOUT = 1.5
RETRANSMIT = TIMEOUT / 4  # the default


class LossyRelay(asyncio.DatagramProtocol):
    """Stands between the proxy and Knot. Each distinct datagram's copies are numbered; what
    happens to copy 1 depends on ``mode``:

    - ``drop``: lost (never reaches Knot); later copies go through;
    - ``late``: goes through, but its answer is held until the next copy's answer has been
      relayed, then relayed too (two answers for one query);
    - ``spoof``: lost, and forged answers come back instead: from the relay's address with
      the id off by one, and with the right id from another port of the same address.
    """

    def __init__(self, knot: tuple[str, int], mode: str) -> None:
        self.knot = knot
        self.mode = mode
        self.copies: dict[bytes, int] = {}
        self.held: list[tuple[bytes, Any]] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        n = self.copies[data] = self.copies.get(data, 0) + 1
        if n == 1 and self.mode in ("drop", "spoof"):
            if self.mode == "spoof":
                asyncio.get_running_loop().create_task(self._forge(data, addr))
            return
        asyncio.get_running_loop().create_task(self._forward(data, addr, held=n == 1))

    async def _forward(self, data: bytes, to: Any, held: bool) -> None:
        answer = await _exchange(self.knot, data)
        assert self.transport is not None
        if held:
            self.held.append((answer, to))
            return
        self.transport.sendto(answer, to)
        for late, late_to in self.held:
            self.transport.sendto(late, late_to)
        self.held.clear()

    async def _forge(self, data: bytes, to: Any) -> None:
        query = dns.message.from_wire(data)
        forged = dns.message.make_response(query)
        forged.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "6.6.6.6"))
        wire = bytearray(forged.to_wire())
        right = bytes(wire)
        wire[0:2] = ((query.id + 1) & 0xFFFF).to_bytes(2, "big")
        assert self.transport is not None
        self.transport.sendto(bytes(wire), to)  # right address and port, wrong id
        loop = asyncio.get_running_loop()
        other, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(SECOND_UPSTREAM_IP, 0)
        )
        other.sendto(right, to)  # right id, wrong source port
        other.close()


async def _exchange(server: tuple[str, int], data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class One(asyncio.DatagramProtocol):
        def datagram_received(self, answer: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(answer)

    transport, _ = await loop.create_datagram_endpoint(One, remote_addr=server)
    try:
        transport.sendto(data)
        return await asyncio.wait_for(got, 3.0)
    finally:
        transport.close()


async def ask_all(port: int, name: str, wait: float) -> tuple[list[bytes], float]:
    """Sends one query from POD_IP; every datagram back within ``wait`` seconds, and how long
    the first took."""
    loop = asyncio.get_running_loop()
    got: list[tuple[float, bytes]] = []

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.append((time.monotonic(), data))

    transport, _ = await loop.create_datagram_endpoint(
        Client, local_addr=(POD_IP, 0), remote_addr=("127.0.0.1", port)
    )
    start = time.monotonic()
    transport.sendto(dns.message.make_query(name, "A").to_wire())
    await asyncio.sleep(wait)
    transport.close()
    return [d for _, d in got], (got[0][0] - start if got else float("inf"))


@pytest.fixture(params=["rust", "asyncio"])
def udp_io(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def relayed_proxy(
    policy: Policy, endpoints: Endpoints, relay_port: int, udp_io: str, **cfg: Any
) -> Proxy:
    port = free_port("127.0.0.1")
    config = ProxyConfig(
        listen=[("127.0.0.1", port)],
        udp_io=udp_io,
        log_queries="none",
        upstream_timeout=TIMEOUT,
        **cfg,
    )
    return Proxy(
        policy,
        endpoints,
        upstreams=[f"{SECOND_UPSTREAM_IP}:{relay_port}"],
        listen=[f"127.0.0.1:{port}"],
        backend=Recorder(),
        config=config,
    )


@contextlib.asynccontextmanager
async def lossy_relay(mode: str, knot: KnotServer) -> AsyncIterator[int]:
    """A :class:`LossyRelay` to ``knot`` on SECOND_UPSTREAM_IP; its port."""
    port = free_port(SECOND_UPSTREAM_IP)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: LossyRelay(knot.address, mode), local_addr=(SECOND_UPSTREAM_IP, port)
    )
    try:
        yield port
    finally:
        transport.close()


def _addresses(wire: bytes) -> list[str]:
    msg = dns.message.from_wire(wire)
    return sorted(rd.address for rrset in msg.answer for rd in rrset)


def test_a_lost_query_is_answered_after_the_retransmit_interval(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with lossy_relay("drop", knot) as relay_port:
            proxy = relayed_proxy(proxy_policy, proxy_endpoints, relay_port, udp_io)
            async with running(proxy):
                replies, took = await ask_all(proxy.config.listen[0][1], "www.example.com", 0.9)
                assert len(replies) == 1
                assert dns.message.from_wire(replies[0]).rcode() == dns.rcode.NOERROR
                assert _addresses(replies[0]) == ["192.0.2.10", "192.0.2.11"]
                # After the retransmit interval, well before the timeout.
                assert RETRANSMIT <= took < TIMEOUT, took
                stats = proxy.engine.stats()
                assert (stats["retransmits"], stats["timeouts"]) == (1, 0)
                text = generate_latest(registry_for(proxy)).decode()
                assert "fqdnguard_upstream_retransmits_total 1.0" in text

    run(scenario)


def test_with_retransmission_off_a_lost_query_fails_at_the_timeout(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with lossy_relay("drop", knot) as relay_port:
            proxy = relayed_proxy(
                proxy_policy, proxy_endpoints, relay_port, udp_io, upstream_retransmit=0
            )
            async with running(proxy):
                replies, took = await ask_all(proxy.config.listen[0][1], "www.example.com", 2.0)
                assert len(replies) == 1
                assert dns.message.from_wire(replies[0]).rcode() == dns.rcode.SERVFAIL
                assert took >= TIMEOUT - 0.05, took
                stats = proxy.engine.stats()
                assert (stats["retransmits"], stats["timeouts"]) == (0, 1)

    run(scenario)


def test_answers_to_both_copies_make_one_reply(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with lossy_relay("late", knot) as relay_port:
            proxy = relayed_proxy(proxy_policy, proxy_endpoints, relay_port, udp_io)
            async with running(proxy):
                replies, _ = await ask_all(proxy.config.listen[0][1], "www.example.com", 1.0)
                assert len(replies) == 1, replies
                assert _addresses(replies[0]) == ["192.0.2.10", "192.0.2.11"]
                stats = proxy.engine.stats()
                # The late answer to the first copy came and matched nothing.
                assert (stats["retransmits"], stats["dropped_unmatched"]) == (1, 1)

    run(scenario)


def test_forged_answers_are_still_dropped_while_a_copy_is_owed(
    knot: KnotServer, proxy_policy: Policy, proxy_endpoints: Endpoints, udp_io: str
) -> None:
    async def scenario() -> None:
        async with lossy_relay("spoof", knot) as relay_port:
            proxy = relayed_proxy(proxy_policy, proxy_endpoints, relay_port, udp_io)
            async with running(proxy):
                replies, _ = await ask_all(proxy.config.listen[0][1], "www.example.com", 0.9)
                assert len(replies) == 1
                assert _addresses(replies[0]) == ["192.0.2.10", "192.0.2.11"]
                assert proxy.cache.names_for("6.6.6.6") == []
                stats = proxy.engine.stats()
                assert (stats["retransmits"], stats["dropped_unmatched"]) == (1, 1)
                unexpected = (
                    proxy._io.stats()["unexpected_source"]
                    if proxy._io is not None
                    else proxy.stats.unexpected_source
                )
                assert unexpected == 1

    run(scenario)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"upstream_retransmit": 2.0}, "upstream_retransmit: 2.0: must be below upstream_timeout"),
        ({"upstream_retransmit": 0.01}, "upstream_retransmit: 0.01: must be 0 (off) or"),
        ({"upstream_retransmit": -1}, "upstream_retransmit: -1: must be 0 (off) or"),
        ({"upstream_retries": -1}, "upstream_retries: -1: must be a whole number from 0 to 10"),
        ({"upstream_retries": 11}, "upstream_retries: 11: must be a whole number from 0 to 10"),
    ],
)
def test_retransmit_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProxyConfig(upstream_timeout=2.0, **options)


def test_retransmit_defaults_to_a_quarter_of_the_timeout() -> None:
    assert ProxyConfig().retransmit_after() == 0.5
    assert ProxyConfig(upstream_timeout=0.1).retransmit_after() == 0.05
    assert ProxyConfig(upstream_timeout=0.05).retransmit_after() == 0.0
    assert ProxyConfig(upstream_retransmit=0).retransmit_after() == 0.0
    assert ProxyConfig(upstream_retries=0).retransmit_after() == 0.0
    config = ProxyConfig.from_mapping({"upstream-retransmit": "0.25", "upstream-retries": "2"})
    assert (config.retransmit_after(), config.upstream_retries) == (0.25, 2)
