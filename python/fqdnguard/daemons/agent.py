"""``fqdnguard agent``: the control plane alone; it keeps a proxy's policy up to date.

It reads the policy files and the endpoints file, compiles them (so a bad set is reported here,
with file:line, and never pushed: the proxy keeps the last good one), and pushes the texts to the
proxy's control socket (``PUT /v1/policy``, see :mod:`fqdnguard.control`) whenever the proxy's
digest differs from its own: after a change of the files, after the proxy restarted from an
older state, or when the agent itself comes back. Nothing about serving depends on it: killing
the agent leaves the proxy answering and enforcing the last policy it received.

Every ``interval`` seconds it checks the files (size and mtime) and asks the proxy for its status;
SIGHUP checks at once. A resync is one ``GET /v1/status`` when nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from fqdnguard.control import ControlError, policy_digest, request
from fqdnguard.daemons.proxy import compile_policy
from fqdnguard.policy import PolicyError, _files, _read_text

__all__ = ["Agent", "KubernetesAgent", "run_agent"]

log = logging.getLogger("fqdnguard.daemons.agent")


class _ProxyLink:
    """What both agents say about reaching the proxy: once when it changes, not every round."""

    socket_path: Path
    interval: float
    _reachable: bool | None

    def _set_reachable(self, ok: bool, why: str = "") -> None:
        if ok != self._reachable:
            if ok:
                log.info("proxy reachable at %s", self.socket_path)
            else:
                log.warning("proxy not reachable (%s); retrying every %.1fs", why, self.interval)
        self._reachable = ok


class Agent(_ProxyLink):
    """Pushes the policy under ``policy_paths`` (+ ``endpoints_path``) to the proxy at
    ``socket_path``; ``await agent.run()`` until SIGTERM/SIGINT."""

    def __init__(
        self,
        policy_paths: list[str],
        endpoints_path: str | None,
        socket_path: str | os.PathLike[str],
        interval: float = 1.0,
        *,
        allow_empty: bool = False,
    ) -> None:
        if not policy_paths:
            raise ValueError("policy: at least one policy file or directory is required")
        if interval <= 0:
            raise ValueError(f"interval: {interval!r} must be a positive number of seconds")
        self.policy_paths = list(policy_paths)
        self.endpoints_path = endpoints_path
        self.socket_path = Path(socket_path)
        self.interval = interval
        #: Push a set with an empty file or directory (by default it is refused here, and by
        #: the proxy, so the policy in force stays).
        self.allow_empty = allow_empty
        #: The last set that compiled: (sources, endpoints text, digest).
        self.good: tuple[list[tuple[str, str]], str | None, str] | None = None
        self.pushes = 0
        self._fingerprint: Any = None
        self._reachable: bool | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def _stat_fingerprint(self) -> Any:
        paths = _files(self.policy_paths)
        if self.endpoints_path:
            paths.append(self.endpoints_path)
        out: list[tuple[str, int | None, int | None, int | None]] = []
        for p in paths:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((p, None, None, None))
        return out

    def read(self) -> bool:
        """Re-reads the files when they changed; True when a new good set was taken."""
        try:
            fingerprint = self._stat_fingerprint()
        except PolicyError as e:  # a policy path vanished
            log.error("policy: %s", e)
            return False
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        try:
            sources: list[tuple[str, str]] = []
            for f in _files(self.policy_paths, allow_empty=self.allow_empty):
                text = _read_text(f)
                if isinstance(text, PolicyError):
                    raise text
                sources.append((f, text))
            endpoints_text = None
            if self.endpoints_path:
                with open(self.endpoints_path, encoding="utf-8") as fh:
                    endpoints_text = fh.read()
            compile_policy(sources, endpoints_text, allow_empty=self.allow_empty)
        except PolicyError as e:
            for err in e.errors:
                log.error("policy not pushed: %s", err.location())
            return False
        except (OSError, ValueError) as e:
            log.error("policy not pushed: %s", e)
            return False
        digest = policy_digest(sources, endpoints_text)
        if self.good is not None and self.good[2] == digest:
            return False
        self.good = (sources, endpoints_text, digest)
        log.info("policy read: %d files (digest %s)", len(sources), digest[:12])
        return True

    async def sync(self) -> str:
        """One round: read the files, compare digests, push when they differ. Returns what
        happened: "pushed", "in-sync", "no-policy", "unreachable" or "rejected"."""
        self.read()
        if self.good is None:
            return "no-policy"
        sources, endpoints_text, digest = self.good
        try:
            status, body = await request(self.socket_path, "GET", "/v1/status", timeout=5)
            if status != 200:
                raise ControlError(f"status answered {status}: {body}")
            if body.get("policy", {}).get("digest") == digest:
                self._set_reachable(True)
                return "in-sync"
            status, body = await request(
                self.socket_path,
                "PUT",
                "/v1/policy",
                {
                    "sources": [list(s) for s in sources],
                    "endpoints": endpoints_text,
                    "allow_empty": self.allow_empty,
                },
                timeout=30,
            )
        except ControlError as e:
            self._set_reachable(False, str(e))
            return "unreachable"
        self._set_reachable(True)
        if status != 200:
            log.error("the proxy refused the policy (%d): %s", status, body)
            for line in (body or {}).get("errors", []):
                log.error("  %s", line)
            return "rejected"
        self.pushes += 1
        log.info("pushed the policy to the proxy (digest %s)", digest[:12])
        gone = (body or {}).get("unrestricted") or []
        if gone:
            log.warning(
                "the push lifted every egress restriction from %d endpoint(s): %s",
                len(gone),
                ", ".join(gone),
            )
        return "pushed"

    def wake(self) -> None:
        """Checks files and proxy now (SIGHUP)."""
        self._fingerprint = None
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.wake)
        while not self._stop.is_set():
            await self.sync()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
        log.info("stopped")


def run_agent(agent: Agent) -> None:
    """Runs the agent until SIGTERM/SIGINT."""
    import uvloop  # noqa: PLC0415

    uvloop.run(agent.run())


class KubernetesAgent(_ProxyLink):
    """``fqdnguard agent --kubernetes``: relays the Kubernetes objects of this node's view to a
    proxy (``POST /v1/objects``), as batches of changes; the proxy compiles them. The agent
    reads the policy objects too, to post an Event for an invalid one and to narrow its watch
    of other nodes' pods to what the policies select.

    A session starts with a reset (every object held) and goes on with numbered batches; a
    proxy that restarted, or missed a batch, answers 409 and gets a reset. A proxy older than
    the protocol answers 404: the agent says so and pushes nothing (the proxy keeps its policy;
    upgrade proxies before agents, docs/split.md)."""

    def __init__(
        self,
        node: str,
        socket_path: str | os.PathLike[str],
        *,
        kubeconfig: str | None = None,
        interval: float = 1.0,
        unenforced_l7: str = "deny",
        source_factory: Any = None,
        coalesce: float = 0.05,
    ) -> None:
        import uuid  # noqa: PLC0415

        from fqdnguard.sources.model import ClusterModel  # noqa: PLC0415

        if interval <= 0:
            raise ValueError(f"interval: {interval!r} must be a positive number of seconds")
        self.node = node
        self.socket_path = Path(socket_path)
        self.interval = interval
        self.coalesce = coalesce
        self.kubeconfig = kubeconfig
        self.model = ClusterModel(node, unenforced_l7=unenforced_l7, report=self._report)
        self.session = uuid.uuid4().hex
        self.seq = 0
        self.need_reset = True
        self.pushes = 0
        self._pending: list[Any] = []
        self._pending_synced: list[str] = []
        self._selectors: tuple[tuple[str | None, str], ...] | None = None
        self._factory = source_factory
        self.source: Any = None
        self._reachable: bool | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    # -- the sink the source feeds ---------------------------------------------------------

    def changes(self, kind: str, batch: list[Any]) -> None:
        self.model.changes(kind, batch)
        self._pending.extend(batch)
        self._wake.set()

    def synced(self, kind: str) -> None:
        self.model.synced(kind)
        self._pending_synced.append(kind)
        self._wake.set()

    def _report(self, kind: str, obj: dict[str, Any], reason: str, message: str) -> None:
        from fqdnguard.sources.feed import report_to  # noqa: PLC0415

        report_to(self.source, kind, obj, reason, message)

    # -- relaying ---------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        from fqdnguard.daemons.proxy import KUBE_PROTOCOL  # noqa: PLC0415

        if self.need_reset:
            changes = [
                {"kind": kind, "key": key, "obj": obj}
                for kind, store in self.model.stores.items()
                for key, obj in store.items()
            ]
            synced = self.model.synced_kinds()
            seq = 1
        else:
            changes = [{"kind": c.kind, "key": c.key, "obj": c.obj} for c in self._pending]
            synced = list(self._pending_synced)
            seq = self.seq + 1
        return {
            "protocol": KUBE_PROTOCOL,
            "node": self.node,
            "session": self.session,
            "seq": seq,
            "reset": self.need_reset,
            "changes": changes,
            "synced": synced,
        }

    async def sync(self) -> str:
        """One round: relay what changed (or everything, when the proxy needs a reset).
        Returns "pushed", "in-sync", "unreachable", "unsupported" or "rejected"."""
        if not self.need_reset and await self._proxy_lost_session():
            self.need_reset = True
        if not self.need_reset and not self._pending and not self._pending_synced:
            return "in-sync"
        body = self._body()
        self._pending, self._pending_synced = [], []
        try:
            status, answer = await request(
                self.socket_path, "POST", "/v1/objects", body, timeout=30
            )
        except ControlError as e:
            self._set_reachable(False, str(e))
            self.need_reset = True
            return "unreachable"
        self._set_reachable(True)
        if status == 404:
            log.error(
                "the proxy at %s does not take Kubernetes objects (an older release): upgrade "
                "the proxy first; it keeps serving the policy it has",
                self.socket_path,
            )
            self.need_reset = True
            return "unsupported"
        if status == 409 and isinstance(answer, dict) and answer.get("need") == "reset":
            self.need_reset = True
            return await self.sync() if not body["reset"] else "rejected"
        if status != 200:
            log.error("the proxy refused the objects (%d): %s", status, answer)
            self.need_reset = True
            return "rejected"
        if body["reset"]:
            log.info("relayed every object to the proxy (%d)", len(body["changes"]))
        self.seq, self.need_reset = body["seq"], False
        self.pushes += 1
        self._push_selectors()
        return "pushed"

    async def _proxy_lost_session(self) -> bool:
        """True when the proxy no longer follows this session (it restarted)."""
        try:
            status, body = await request(self.socket_path, "GET", "/v1/status", timeout=5)
        except ControlError:
            return True
        kube = body.get("kubernetes") if status == 200 and isinstance(body, dict) else None
        return not isinstance(kube, dict) or kube.get("session") != self.session

    def _push_selectors(self) -> None:
        selectors = self.model.pod_selectors()
        if self.source is not None and selectors != self._selectors:
            self._selectors = selectors
            setter = getattr(self.source, "set_pod_selectors", None)
            if setter is not None:
                setter(list(selectors))

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        factory = self._factory
        if factory is None:
            from fqdnguard.sources.kubernetes import KubernetesSource  # noqa: PLC0415

            factory = KubernetesSource
        self.source = factory(self, self.node, kubeconfig=self.kubeconfig)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        watching = asyncio.ensure_future(self.source.run())
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                if self._stop.is_set():
                    break
                await asyncio.sleep(self.coalesce)
                self._wake.clear()
                await self.sync()
        finally:
            with contextlib.suppress(Exception):
                await self.source.stop()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching
        log.info("stopped")
