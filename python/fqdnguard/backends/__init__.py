"""Enforcement backends: where the cache's changes (allowed endpoint→IP pairs with expiries) go.

A backend receives batches of changes and returns once they are in force; the proxy releases a
DNS answer carrying new IPs only after that, so a pod never learns an IP its firewall does not yet
allow. ``Callback`` is for embedding fqdnguard in another agent, ``Log`` for observing, and
``nftables`` (its own module) for enforcing on a Linux node.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

__all__ = ["Backend", "BackendError", "Callback", "Log", "make_backend"]

log = logging.getLogger("fqdnguard.backend")


class BackendError(Exception):
    """A backend could not start or could not apply a batch."""


class Backend:
    """Base class. ``apply`` is awaited with each batch; it should be idempotent."""

    name = "backend"

    async def start(self) -> None:
        """Called once before the first batch (set up tables, reconcile state)."""

    async def apply(self, changes: Sequence[Any]) -> None:
        raise NotImplementedError

    async def reconcile(self, current: Sequence[Any], *, prune: bool = True) -> None:
        """Brings the enforced state to ``current`` (all live entries, as "added"): exactly
        with ``prune``; without it (taking over from a proxy that still serves) entries it does
        not list are left in force. Backends that keep no state of their own just apply what
        is live."""
        if current:
            await self.apply(current)

    async def close(self) -> None:
        """Called once at shutdown."""


class Callback(Backend):
    """Hands each batch to a function (plain or async) of the embedding program."""

    name = "callback"

    def __init__(self, fn: Callable[[Sequence[Any]], Awaitable[None] | None]) -> None:
        if not callable(fn):
            raise TypeError("Callback needs a callable taking a list of changes")
        self.fn = fn

    async def apply(self, changes: Sequence[Any]) -> None:
        result = self.fn(changes)
        if inspect.isawaitable(result):
            await result


_KINDS = frozenset({"added", "extended", "removed"})
#: An address as the core writes it: nothing JSON would escape.
_PLAIN_IP = re.compile(r"[0-9a-fA-F.:]+")


class Log(Backend):
    """Writes each change as a JSON line (to stderr by default); enforces nothing."""

    name = "log"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    async def apply(self, changes: Sequence[Any]) -> None:
        out = self.stream or sys.stderr
        out.write("".join(map(self.line, changes)))
        out.flush()

    @staticmethod
    def line(c: Any) -> str:
        """One change as its JSON line, formatted directly (a learning proxy writes one per new
        name): a `Change` holds a kind of three words, an address in its text form and a finite
        expiry (the core checks all three), none of which JSON escapes, so this is exactly what
        ``json.dumps`` writes for the same object at half its cost. Anything else goes through
        ``json.dumps``."""
        kind, ip, expires = c.kind, c.ip, c.expires_at
        if kind in _KINDS and _PLAIN_IP.fullmatch(ip) and isinstance(expires, float):
            return (
                f'{{"change": "{kind}", "endpoint": {int(c.endpoint)}, "ip": "{ip}", '
                f'"expires_at": {round(expires, 3)!r}}}\n'
            )
        record = {"change": kind, "endpoint": c.endpoint, "ip": ip}
        record["expires_at"] = round(expires, 3) if expires is not None else None
        return json.dumps(record) + "\n"


def make_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name`` (callback needs ``fn=``)."""
    if name == "log":  # enforces nothing: reverse_path_check has nothing to apply to
        return Log(options.get("stream"))
    if name == "callback":
        fn = options.get("fn")
        if fn is None:
            raise BackendError("the callback backend is for embedding: pass fn=your_function")
        return Callback(fn)
    if name == "nftables":
        from fqdnguard.backends.nftables import Nftables  # noqa: PLC0415

        return Nftables(**{k: v for k, v in options.items() if k not in ("fn", "stream")})
    raise BackendError(f"unknown backend {name!r}: choose callback, log or nftables")
