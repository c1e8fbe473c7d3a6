"""``fqdnguard run``: the proxy, its policy, state and observability in one process.

One owner of the lifecycle: load policy and endpoints, restore the cache from the state
directory, start the backend and the proxy, serve metrics and the local control socket, then
wait for SIGTERM/SIGINT (stop accepting, finish in-flight queries, save the cache) or SIGHUP
(reload the policy; a bad set keeps the one in force).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fqdnguard._core import CacheError, DnsCache
from fqdnguard.backends import Backend, BackendError, make_backend
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.control import ControlServer, Stream
from fqdnguard.endpoints import Endpoints, load_with_cluster
from fqdnguard.policy import Policy, PolicyError
from fqdnguard.proxy import Proxy
from fqdnguard.reloads import PolicyStatus
from fqdnguard.sources.feed import KubernetesFeed
from fqdnguard.sources.model import Built
from fqdnguard.state import StateDir, StateError

__all__ = [
    "CACHE_FILE",
    "CONTROL_SOCKET",
    "Runner",
    "cache_entries",
    "cache_listing",
    "endpoint_names",
    "run",
]

log = logging.getLogger("fqdnguard.daemons.run")

CACHE_FILE = "cache.snapshot"
CONTROL_SOCKET = "control.sock"


def load_policy(config: ProxyConfig) -> tuple[Policy, Endpoints]:
    if not config.policy:
        raise ConfigError("policy: at least one policy file or directory is required")
    endpoints, cluster = (
        load_with_cluster(config.endpoints) if config.endpoints else (Endpoints(), None)
    )
    policy = Policy.load(
        config.policy,
        endpoints=endpoints,
        allow_empty=config.allow_empty_policy,
        unenforced_l7=config.unenforced_l7,
        cluster=cluster,
    )
    return policy, endpoints


def cache_entries(cache: DnsCache) -> list[dict[str, Any]]:
    """Every live cache entry as a JSON-able dict (endpoint, name, ip, expires_at)."""
    return [
        {"endpoint": ep, "name": name, "ip": ip, "expires_at": round(expires, 3)}
        for ep, name, ip, expires in cache.entries()
    ]


def endpoint_names(endpoints: Endpoints) -> dict[str, Any]:
    """``GET /v1/endpoints``: each endpoint's ``namespace/name`` by its id (the number the cache
    lists), so that ``cache list`` can show names."""
    return {"endpoints": {str(ep.id): ep.display for ep in endpoints}}


#: One thread for the periodic saves and the listings: work that reads the whole cache and that
#: nobody waits for, kept off the executor that policy compiles and hand-overs use. It runs at
#: the data path's priority on purpose: it takes the cache's lock (briefly, a chunk at a time),
#: and a thread of lower priority preempted while holding it would make the packet path wait
#: for whatever else the node runs (a SCHED_IDLE or nice thread measured no better anyway).
BACKGROUND = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="fqdnguard-background"
)

#: Entries read per call into the cache while a listing streams (each call takes the cache's
#: lock a few hundred entries at a time, off the event loop, without the GIL).
LISTING_BUDGET = 8192
#: Seconds the event loop rests between two pieces of a listing: sending ~0.8 MB a piece is
#: work on the thread that serves TCP and shares a core with the Rust UDP thread. A million
#: entries then take about a second instead of 0.4 s, and the data path keeps its p99.
LISTING_PAUSE = 0.004


def cache_listing(cache: DnsCache, config: ProxyConfig, query: Any) -> tuple[int, Any]:
    """``GET /v1/cache``: the cache as NDJSON, streamed (see :mod:`fqdnguard.control`). The
    first line says when it was taken and the TTL limits in force (``max_ttl``: no entry's TTL
    goes above it); the entries follow in the cache's order, each read off the event loop."""
    params = query if isinstance(query, dict) else {}
    endpoint: int | None = None
    if params.get("endpoint") is not None:
        text = str(params["endpoint"])
        if not text.isdigit():
            return 400, {"error": f"endpoint: {text!r} is not an endpoint id"}
        endpoint = int(text)
    name = params.get("name")
    if name is not None:
        try:
            cache.listing(0, name=str(name), budget=0)  # checks the name, reads nothing
        except ValueError as e:
            return 400, {"error": f"name: {e}"}
    header = {
        "now": time.time(),
        "max_ttl": config.max_ttl,
        "min_ttl": cache.min_ttl,
        "entries": len(cache),
    }

    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps(header).encode() + b"\n"
        loop = asyncio.get_running_loop()
        cursor: int | None = 0
        read = functools.partial(cache.listing, endpoint=endpoint, name=name, budget=LISTING_BUDGET)
        while cursor is not None:
            data, cursor = await loop.run_in_executor(BACKGROUND, read, cursor)
            yield data
            await asyncio.sleep(LISTING_PAUSE)

    return 200, Stream(chunks())


class Runner:
    """Runs one proxy with everything around it; ``await runner.run()`` until a signal."""

    def __init__(self, config: ProxyConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.status = PolicyStatus()
        self.feed: KubernetesFeed | None = None
        if config.kubernetes:
            self.policy, self.endpoints = self._kubernetes_start()
        else:
            self.policy, self.endpoints = load_policy(config)
            self.status.applied(None, self.policy, source="files", origin=list(config.policy))
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self.state = StateDir(self.state_dir) if self.state_dir is not None else None
        self.cache = self._restore_cache()
        self.backend = (
            backend
            if backend is not None
            else make_backend(config.backend, reverse_path_check=config.reverse_path_check)
        )
        self.proxy = Proxy(
            self.policy, self.endpoints, backend=self.backend, cache=self.cache, config=config
        )
        self._stop = asyncio.Event()
        self._control: ControlServer | None = None
        self._metrics: Any = None

    def _kubernetes_start(self) -> tuple[Policy, Endpoints]:
        """The policy to serve before the API server answers: the state directory's, else
        none with no endpoint (every source unknown: refused until the first listing)."""
        config = self.config
        assert config.node_name is not None
        self.feed = KubernetesFeed(
            config.node_name,
            self._apply_built,
            kubeconfig=config.kubeconfig,
            state_dir=config.state_dir,
            unenforced_l7=config.unenforced_l7,
        )
        built = self.feed.restore()
        origin = [f"node {config.node_name}"]
        if built is None:
            endpoints = Endpoints()
            policy = Policy.empty(endpoints)
            self.status.applied(None, policy, source="kubernetes", origin=origin, trigger="start")
            return policy, endpoints
        self.status.applied(None, built.policy, source="state", origin=origin)
        return built.policy, built.endpoints

    def _apply_built(self, built: Built) -> None:
        """Puts a build of the cluster model in force (raises when the backend refuses it:
        the policy in force stays)."""
        old = self.policy
        self.proxy.set_policy(built.policy, built.endpoints)
        self.policy, self.endpoints = built.policy, built.endpoints
        if built.gone:
            self.proxy.forget_endpoints(built.gone)
        assert self.feed is not None
        origin = [f"node {self.feed.node}"]
        self.status.applied(old, built.policy, source="kubernetes", origin=origin, trigger="watch")
        self._feed_status()

    def _feed_status(self) -> None:
        if self.feed is not None:
            self.status.invalid = self.feed.model.invalid()
            self.status.invalid_total = self.feed.model.invalid_total
            self.status.feed = self.feed.status()

    def _restore_cache(self) -> DnsCache:
        cache = DnsCache(min_ttl=self.config.min_ttl)
        if self.state_dir is None or self.state is None:
            return cache
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.state.open():
            return cache
        path = self.state_dir / CACHE_FILE
        if path.exists():
            try:
                cache = DnsCache.load(path)
                log.info("restored %d cache entries from %s", len(cache), path)
            except CacheError as e:
                log.error("cannot restore the cache (%s); starting empty", e)
        self.state.replay(cache, None)
        return cache

    def save_cache(self) -> None:
        """Saves the cache as the state directory's next sequence (StateError when the
        directory is a newer release's, or another process has written it since)."""
        if self.state_dir is not None and self.state is not None:
            path = self.state_dir / CACHE_FILE
            self.state.commit(lambda: self.cache.save(path))

    def reload(self) -> bool:
        """Reloads policy and endpoints; the old set stays in force when the new one is bad.
        With the Kubernetes source: builds the objects held again."""
        if self.feed is not None:
            return self.feed.rebuild() is not None
        try:
            policy, endpoints = load_policy(self.config)
            self.proxy.set_policy(policy, endpoints)
        except (PolicyError, ConfigError, OSError, BackendError) as e:
            errors = e.errors if isinstance(e, PolicyError) else [e]
            log.error(
                "policy reload failed, keeping the policy in force: %s",
                "; ".join(err.location() if isinstance(err, PolicyError) else str(err)
                          for err in errors),
            )  # fmt: skip
            self.status.rejected("SIGHUP", str(e))
            return False
        old, self.policy, self.endpoints = self.policy, policy, endpoints
        self.status.applied(
            old, policy, source="files", origin=list(self.config.policy), trigger="SIGHUP"
        )
        log.info("policy reloaded: %d policies", len(policy))
        return True

    async def start(self) -> None:
        await self.proxy.start()
        if self.state is not None and self.state.writable:
            try:
                self.state.claim()
                self.proxy.journal = self.state.start_journal(None)
            except (StateError, OSError) as e:
                log.error("cannot claim the state directory: %s", e)
        if self.feed is not None:
            await self.feed.start()
        # A long-running server with few cyclic objects: move what start-up built out of the
        # collector's sight and collect young objects less often (fewer pauses on the data path).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        if self.config.metrics is not None:
            from fqdnguard.metrics import serve_metrics  # noqa: PLC0415

            host, port = self.config.metrics
            self._metrics = await serve_metrics(self.proxy, host, port, [self.status.collector()])
            log.info("metrics on http://%s:%d/metrics", host, port)
        if self.state_dir is not None:
            self._control = ControlServer(
                self.state_dir / CONTROL_SOCKET,
                {
                    ("GET", "/v1/cache"): self._get_cache,
                    ("GET", "/v1/stats"): self._get_stats,
                    ("GET", "/v1/policy"): self._get_policy,
                    ("GET", "/v1/endpoints"): self._get_endpoints,
                },
            )
            await self._control.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def run(self) -> None:
        await self.start()
        saver = asyncio.ensure_future(self._save_periodically())
        try:
            await self._stop.wait()
        finally:
            saver.cancel()
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()
        if self._control is not None:
            await self._control.close()
        await self.proxy.stop()
        if self._metrics is not None:
            await self._metrics.close()
        try:
            self.save_cache()
        except (StateError, CacheError, OSError) as e:
            log.error("saving the cache failed: %s", e)
        if self.state is not None and self.state.journal is not None:
            self.state.journal.close()
        log.info("stopped")

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.cache_save_interval)
            try:
                await asyncio.get_running_loop().run_in_executor(BACKGROUND, self.save_cache)
            except (CacheError, OSError, StateError) as e:
                log.error("saving the cache failed: %s", e)

    async def _get_cache(self, query: Any) -> tuple[int, Any]:
        return cache_listing(self.cache, self.config, query)

    async def _get_policy(self, _body: Any) -> tuple[int, Any]:
        self._feed_status()
        return 200, self.status.to_json()

    async def _get_endpoints(self, _body: Any) -> tuple[int, Any]:
        return 200, endpoint_names(self.proxy.endpoints)

    async def _get_stats(self, _body: Any) -> tuple[int, Any]:
        return 200, {
            "engine": self.proxy.engine.stats(),
            "cache": self.cache.stats(),
            "proxy": self.proxy.counters(),
        }


def run(config: ProxyConfig) -> None:
    """Runs until SIGTERM/SIGINT on uvloop."""
    import uvloop  # noqa: PLC0415

    async def main() -> None:
        runner = Runner(config)
        await runner.run()

    uvloop.run(main())
