"""``fqdnguard agent --kubernetes`` relaying objects to ``fqdnguard proxy`` (``POST
/v1/objects``): resets and numbered batches, a proxy that restarts and serves the saved objects
at once, gaps, and version skew. The source is scripted here (the test feeds the agent the
changes a source would); the source itself runs against a real API server in
tests/test_kube_source.py and tests/test_e2e_kube.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fqdnguard.config import ProxyConfig
from fqdnguard.control import request
from fqdnguard.daemons.agent import KubernetesAgent
from fqdnguard.daemons.proxy import KUBE_PROTOCOL, ProxyDaemon, kube_digest
from fqdnguard.sources.base import Change
from fqdnguard.state import read_journal
from fqdnguard.testing import free_port

from tests.test_kube_model import NODE, cnp, dns_policy, pod


class ScriptedSource:
    """Stands where the Kubernetes source stands; the test calls the sink itself."""

    instances: list[ScriptedSource] = []  # noqa: RUF012

    def __init__(self, sink: Any, node: str, kubeconfig: str | None = None) -> None:
        self.sink, self.node = sink, node
        self.selectors: list[tuple[str | None, str]] = []
        self.events: list[tuple[dict[str, Any], str, str]] = []
        self._stop = asyncio.Event()
        ScriptedSource.instances.append(self)

    async def run(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()

    def set_pod_selectors(self, selectors: list[tuple[str | None, str]]) -> None:
        self.selectors = list(selectors)

    async def post_event(self, ref: dict[str, Any], reason: str, message: str) -> None:
        self.events.append((ref, reason, message))


def daemon(state: Path) -> ProxyDaemon:
    config = ProxyConfig(
        listen=[("127.0.0.1", free_port("127.0.0.1"))],
        upstreams=[("127.0.0.1", 9)],
        state_dir=str(state),
        log_queries="none",
    )
    return ProxyDaemon(config)


def allowed(d: ProxyDaemon, ip: str, name: str) -> bool | None:
    """The running proxy's DNS verdict for the source ``ip``; None: an unknown source."""
    assert d.proxy is not None
    ep = d.proxy.endpoints.by_ip(ip)
    if ep is None:
        return None
    return bool(d.proxy.policy.dns_verdict(ep, None, 53, "UDP", name).allowed)


async def until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def start_agent(state: Path) -> tuple[KubernetesAgent, asyncio.Task[None]]:
    agent = KubernetesAgent(
        NODE, state / "control.sock", interval=0.1, source_factory=ScriptedSource
    )
    task = asyncio.ensure_future(agent.run())
    await until("the agent's source", lambda: agent.source)
    return agent, task


def test_objects_reach_the_proxy_as_a_reset_then_numbered_batches(tmp_path: Path) -> None:
    async def test() -> None:
        d = daemon(tmp_path / "state")
        await d.start()
        agent, task = await start_agent(tmp_path / "state")
        try:
            agent.changes("Pod", [pod("web", "10.0.1.5", labels={"app": "web"})])
            agent.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
            agent.synced("Pod")
            await until("the reset", lambda: allowed(d, "10.0.1.5", "a.example.com"))
            assert d.kube is not None and d.kube.session == agent.session
            first = d.kube.seq
            agent.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.org"))])
            await until("a batch", lambda: allowed(d, "10.0.1.5", "a.example.org"))
            assert allowed(d, "10.0.1.5", "a.example.com") is False
            assert d.kube.seq > first, "numbered batches after the reset"
            agent.changes("Pod", [Change("Pod", "default/web", None)])
            await until("the delete", lambda: allowed(d, "10.0.1.5", "a.example.org") is None)
        finally:
            agent.request_stop()
            await task
            await d.stop()

    run(test)


def test_a_restarted_proxy_serves_the_saved_objects_then_gets_a_reset(tmp_path: Path) -> None:
    async def test() -> None:
        state = tmp_path / "state"
        d = daemon(state)
        await d.start()
        agent, task = await start_agent(state)
        try:
            agent.changes("Pod", [pod("web", "10.0.1.5", labels={"app": "web"})])
            agent.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
            await until("the reset", lambda: allowed(d, "10.0.1.5", "a.example.com"))
            ids = {ep.name: ep.id for ep in d.proxy.endpoints}  # type: ignore[union-attr]
            await d.stop()  # saves the objects

            again = daemon(state)
            await again.start()
            try:
                # At once, before the agent relays anything: the saved objects, the same ids.
                assert allowed(again, "10.0.1.5", "a.example.com") is True
                assert {ep.name: ep.id for ep in again.proxy.endpoints} == ids  # type: ignore[union-attr]
                assert again.kube is not None and again.kube.session is None
                # What it learns from now on is journalled under the relayed objects' state, so
                # that a crash replays it (under no digest a restart would ignore it).
                assert again.state.journal is not None
                header, _ = read_journal(again.state.journal.path)
                assert header["digest"] == kube_digest(NODE)
                await until("the agent's reset", lambda: again.kube and again.kube.session)
                assert again.kube.session == agent.session
                agent.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.x.com"))])
                await until("a batch", lambda: allowed(again, "10.0.1.5", "a.x.com"))
            finally:
                await again.stop()
        finally:
            agent.request_stop()
            await task

    run(test)


def test_a_gap_or_a_newer_protocol_is_refused_and_the_policy_stays(tmp_path: Path) -> None:
    async def test() -> None:
        state = tmp_path / "state"
        d = daemon(state)
        await d.start()
        sock = state / "control.sock"
        try:
            body: dict[str, Any] = {
                "protocol": KUBE_PROTOCOL, "node": NODE, "session": "s1", "seq": 1,
                "reset": True, "synced": ["Pod"],
                "changes": [{"kind": c.kind, "key": c.key, "obj": c.obj} for c in (
                    pod("web", "10.0.1.5", labels={"app": "web"}),
                    cnp("p", dns_policy("web", "*.example.com")),
                )],
            }  # fmt: skip
            assert (await request(sock, "POST", "/v1/objects", body))[0] == 200
            gap = {**body, "reset": False, "seq": 3, "changes": []}
            status, answer = await request(sock, "POST", "/v1/objects", gap)
            assert (status, answer["need"]) == (409, "reset")
            newer = {**body, "protocol": KUBE_PROTOCOL + 1}
            status, answer = await request(sock, "POST", "/v1/objects", newer)
            assert status == 400 and "upgrade the proxy first" in answer["error"]
            bad = {**body, "changes": [{"kind": "Secret", "key": "x", "obj": {}}]}
            status, answer = await request(sock, "POST", "/v1/objects", bad)
            assert status == 400 and "changes[0].kind" in answer["error"]
            assert allowed(d, "10.0.1.5", "a.example.com") is True, "the policy stayed"
        finally:
            await d.stop()

    run(test)


def test_an_older_proxy_gets_nothing_and_keeps_its_policy(tmp_path: Path) -> None:
    async def test() -> None:
        state = tmp_path / "state"
        d = daemon(state)
        del d.control.routes[("POST", "/v1/objects")]  # what a release before the protocol has
        await d.start()
        agent = KubernetesAgent(NODE, state / "control.sock", source_factory=ScriptedSource)
        try:
            agent.changes("Pod", [pod("web", "10.0.1.5", labels={"app": "web"})])
            assert await agent.sync() == "unsupported"
            assert len(d.proxy.endpoints) == 0, "nothing pushed"  # type: ignore[union-attr]
        finally:
            await d.stop()

    run(test)


def test_an_invalid_policy_is_reported_by_the_agent_and_listed_by_the_proxy(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        state = tmp_path / "state"
        d = daemon(state)
        await d.start()
        agent, task = await start_agent(state)
        try:
            bad = dns_policy("web", "*.example.com")
            bad["egress"][1]["toFQDNs"] = [{"matchName": "*.example.com"}]
            agent.changes("Pod", [pod("web", "10.0.1.5", labels={"app": "web"})])
            agent.changes("CiliumNetworkPolicy", [cnp("p", bad)])
            await until("the reset", lambda: d.kube is not None and d.kube.session)
            await until("the event", lambda: ScriptedSource.instances[-1].events)
            ref, reason, message = ScriptedSource.instances[-1].events[0]
            assert (ref["kind"], ref["name"], reason) == (
                "CiliumNetworkPolicy",
                "p",
                "InvalidPolicy",
            )
            assert "toFQDNs[0].matchName" in message
            assert allowed(d, "10.0.1.5", "a.example.com") is False, "default deny"
            _, status = await request(state / "control.sock", "GET", "/v1/policy")
            assert [i["policy"] for i in status["invalid"]] == ["default/p"]
        finally:
            agent.request_stop()
            await task
            await d.stop()

    run(test)
