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
from fqdnguard.policy import PolicyError, _files, _read_text
from fqdnguard.proxyd import compile_policy

__all__ = ["Agent", "run_agent"]

log = logging.getLogger("fqdnguard.agentd")


class Agent:
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

    def _set_reachable(self, ok: bool, why: str = "") -> None:
        if ok != self._reachable:
            if ok:
                log.info("proxy reachable at %s", self.socket_path)
            else:
                log.warning("proxy not reachable (%s); retrying every %.1fs", why, self.interval)
        self._reachable = ok

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
