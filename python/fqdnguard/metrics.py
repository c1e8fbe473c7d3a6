"""Prometheus metrics, read from the engine and the proxy at scrape time.

The per-query counters live in the Rust engine (no Python work per query); a custom collector
turns them into metric families when Prometheus scrapes, so observability costs nothing on the
data path. They are served on the event loop (:class:`MetricsServer`), not a thread per
connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from fqdnguard._http import BadRequest, ConnectionCap, read_request, respond

if TYPE_CHECKING:
    from fqdnguard.proxy import Proxy

__all__ = ["MetricsServer", "ProxyCollector", "registry_for", "serve_metrics"]

RCODES = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "DSOTYPENI", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
    "OTHER",
]  # fmt: skip
VERDICTS = ["allowed", "denied", "unknown_source", "malformed", "overloaded"]
DROPS = ["dropped_unmatched", "dropped_mismatch", "dropped_malformed", "dropped_case"]
# (label, ProxyStats counter): queries that reached a transparent listener without being
# intercepted (a loop), answers that could not leave from the address the client asked, and
# queries whose server asked got no upstream socket (they time out into SERVFAIL).
INTERCEPTION_DROPS = [
    ("not_intercepted", "not_intercepted"),
    ("reply_error", "reply_errors"),
    ("upstream_refused", "orig_upstream_refused"),
]
HOLD_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class ProxyCollector(Collector):
    """Everything a proxy counts, as Prometheus metric families."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Any]:
        s = self.proxy.engine.stats()
        queries = CounterMetricFamily(
            "fqdnguard_queries", "DNS queries by verdict", labels=["verdict"]
        )
        for v in VERDICTS:
            queries.add_metric([v], s[v])
        yield queries
        rcodes = CounterMetricFamily(
            "fqdnguard_upstream_answers",
            "Answers relayed from upstreams (and SERVFAIL for timeouts) by rcode",
            labels=["rcode"],
        )
        for name, count in zip(RCODES, s["rcodes"], strict=True):
            if count:
                rcodes.add_metric([name], count)
        yield rcodes
        drops = CounterMetricFamily(
            "fqdnguard_answers_dropped", "Upstream answers dropped, by reason", labels=["reason"]
        )
        for d in DROPS:
            drops.add_metric([d.removeprefix("dropped_")], s[d])
        counts = self.proxy.counters()
        drops.add_metric(["unexpected_source"], counts["unexpected_source"])
        yield drops
        yield CounterMetricFamily(
            "fqdnguard_queries_merged",
            "Queries that joined an identical one in flight instead of going upstream",
            value=s["merged"],
        )
        limited = CounterMetricFamily(
            "fqdnguard_queries_limited",
            "Queries turned away (SERVFAIL) by a limit: the client's own share of in-flight "
            "slots, or all slots taken; and queries evicted to give a slot to a client holding "
            "fewer",
            labels=["limit"],
        )
        limited.add_metric(["client"], s["overloaded_client"])
        limited.add_metric(["global"], s["overloaded"] - s["overloaded_client"])
        limited.add_metric(["evicted"], s["evicted"])
        yield limited
        yield CounterMetricFamily(
            "fqdnguard_dns0x20_fallbacks",
            "Upstreams (channels) on which 0x20 was turned off: they do not keep the name's case",
            value=s["case_fallbacks"],
        )
        yield GaugeMetricFamily(
            "fqdnguard_upstream_sockets",
            "UDP sockets per address family queries leave from, each on a random port",
            value=self.proxy.upstream_sockets(),
        )
        yield CounterMetricFamily(
            "fqdnguard_upstream_timeouts", "Queries answered SERVFAIL after the upstream timeout",
            value=s["timeouts"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "fqdnguard_upstream_retransmits",
            "UDP queries sent upstream again (the same bytes) for want of an answer",
            value=s["retransmits"],
        )
        yield GaugeMetricFamily("fqdnguard_inflight", "Queries waiting for upstream", s["inflight"])
        buckets, running = [], 0
        for bound, count in zip(
            [*s["latency_buckets"], float("inf")], s["latency_counts"], strict=True
        ):
            running += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
        yield HistogramMetricFamily(
            "fqdnguard_upstream_latency_seconds",
            "Time from forwarding a query to its answer",
            buckets=buckets,
            sum_value=s["latency_sum"],
        )
        st = self.proxy.stats
        holds = sorted(st.hold_seconds)
        hold_buckets, i = [], 0
        for bound in HOLD_BUCKETS:
            while i < len(holds) and holds[i] <= bound:
                i += 1
            hold_buckets.append((str(bound), i))
        hold_buckets.append(("+Inf", len(holds)))
        yield HistogramMetricFamily(
            "fqdnguard_hold_seconds",
            "Time answers with new IPs were held for the backend (recent batches)",
            buckets=hold_buckets,
            sum_value=sum(holds),
        )
        yield CounterMetricFamily(
            "fqdnguard_hold_timeouts", "Batches released at hold_max before the backend finished",
            value=st.hold_timeouts,
        )  # fmt: skip
        yield CounterMetricFamily(
            "fqdnguard_backend_errors", "Backend batches that failed", value=st.backend_errors
        )
        tcp = CounterMetricFamily(
            "fqdnguard_tcp_connections", "TCP client connections, by outcome", labels=["outcome"]
        )
        tcp.add_metric(["accepted"], counts["tcp_connections"])
        tcp.add_metric(["refused"], counts["tcp_refused"])
        tcp.add_metric(["evicted"], counts["tcp_evicted"])
        yield tcp
        yield CounterMetricFamily(
            "fqdnguard_upstream_failovers", "Switches to the next upstream after failures",
            value=counts["upstream_failovers"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "fqdnguard_upstream_unreachable",
            "Route checks that found an upstream unreachable (its queries get SERVFAIL)",
            value=counts["upstream_unreachable"],
        )
        yield CounterMetricFamily(
            "fqdnguard_upstream_send_errors",
            "UDP queries the asyncio path could not send upstream (no route, no socket)",
            value=counts["upstream_send_errors"],
        )
        intercepted = CounterMetricFamily(
            "fqdnguard_interception_dropped",
            "Intercepted (transparent) traffic dropped, by reason",
            labels=["reason"],
        )
        for reason, key in INTERCEPTION_DROPS:
            intercepted.add_metric([reason], counts[key])
        yield intercepted
        if "udp_send_errors" in counts:  # the Rust UDP path's own counters (udp_io: rust)
            yield CounterMetricFamily(
                "fqdnguard_udp_send_errors", "UDP datagrams the proxy could not send",
                value=counts["udp_send_errors"],
            )  # fmt: skip
            yield CounterMetricFamily(
                "fqdnguard_udp_answers_client_gone", "Upstream answers whose UDP client was gone",
                value=counts["udp_client_gone"],
            )  # fmt: skip
        cache = self.proxy.cache.stats()
        yield GaugeMetricFamily("fqdnguard_cache_entries", "Cache entries", cache["entries"])
        yield GaugeMetricFamily("fqdnguard_cache_names", "Names in the cache", cache["names"])
        yield CounterMetricFamily(
            "fqdnguard_cache_evictions", "Cache entries evicted by the caps",
            value=cache["evictions"],
        )  # fmt: skip


def registry_for(proxy: Proxy, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """The proxy's metrics, and those of ``extra`` collectors (e.g. the policy status)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    for collector in extra:
        registry.register(collector)
    return registry


#: Seconds a scraper has to send its request, and to take the answer.
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
#: Connections open at once; at the cap, the oldest one still sending its request is closed.
MAX_CONNECTIONS = 64
PATH = "/metrics"


class MetricsServer:
    """``GET /metrics`` on the event loop: the registry's text exposition, 404 for any other
    path. No thread per connection; each request must arrive within ``read_timeout`` and at
    most ``max_connections`` are open at once (see ``fqdnguard._http.ConnectionCap``), so idle
    or half-sent connections cost neither threads nor a scraper its answer.

    ``reuse_port``: the listener takes SO_REUSEPORT, so that a proxy starting beside its
    predecessor (hot restart) binds the same port while the predecessor still serves it. The
    kernel shares the port only between sockets of the same user that both set it; meanwhile
    each scrape is answered by one of the two processes, and after the predecessor's exit by the
    successor alone. Off where nothing is handed over (a second ``fqdnguard run`` on the same
    port should fail to start, not share it)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        reuse_port: bool = False,
    ) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self.reuse_port = reuse_port
        self.read_timeout = read_timeout
        self.connections = ConnectionCap(max_connections)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_port=self.reuse_port
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (with the real port when 0 was asked)."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.connections.abort_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connections.admit(writer):
            writer.transport.abort()
            return
        try:
            try:
                method, target, _headers, _body = await asyncio.wait_for(
                    read_request(reader, max_body=0), self.read_timeout
                )
            except BadRequest as e:
                await respond(writer, e.status, "text/plain", f"{e}\n".encode(), WRITE_TIMEOUT)
                return
            finally:
                self.connections.request_read(writer)
            path = target.split("?", 1)[0]
            if path != PATH:
                status, ctype, body = 404, "text/plain", f"no {path}; try {PATH}\n".encode()
            elif method != "GET":
                status, ctype, body = 405, "text/plain", f"{method} {PATH}: GET only\n".encode()
            else:
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
            await respond(writer, status, ctype, body, WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.release(writer)
            writer.close()


async def serve_metrics(
    proxy: Proxy,
    host: str,
    port: int,
    extra: Iterable[Collector] = (),
    *,
    reuse_port: bool = False,
) -> MetricsServer:
    """Serves the proxy's metrics (and ``extra`` collectors') at http://host:port/metrics on
    the running loop (``reuse_port``: see :class:`MetricsServer`)."""
    server = MetricsServer(registry_for(proxy, extra), host, port, reuse_port=reuse_port)
    await server.start()
    return server
