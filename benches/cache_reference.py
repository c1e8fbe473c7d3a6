"""A plain-Python FQDN -> IP cache with DnsCache's semantics, written to be fast in Python.

Dict of dicts: endpoint -> name -> ip -> [expires_at, stamp], plus (endpoint, ip) -> {name: expiry}
for the per-pair state the firewall needs, and a heapq with lazy deletion for expiry order
(soonest expiry, then earliest set). Changes are the net effect per (endpoint, ip) of a call, as
(kind, endpoint, ip, expires_at) tuples. It normalises names the simple way (lower case, trailing
dot) and keys IPs by the string given, which favours it: DnsCache parses and canonicalises both.
"""

from __future__ import annotations

import heapq
import time
from typing import Any

Touches = dict[tuple[int, str], "float | None"]


class ReferenceCache:
    def __init__(
        self, min_ttl: int = 0, max_ips_per_name: int = 1000, max_entries: int = 1_000_000
    ) -> None:
        self.min_ttl = min_ttl
        self.max_ips = max_ips_per_name
        self.max_entries = max_entries
        self.eps: dict[int, dict[str, dict[str, list[Any]]]] = {}
        self.pairs: dict[tuple[int, str], dict[str, float]] = {}
        self.heap: list[tuple[float, int, int, str, str]] = []
        self.n = 0
        self.stamp = 0
        self.evictions = 0
        self.name_evictions = 0
        #: Pairs that gained a name in the current call: reported as added (as DnsCache does).
        self._renamed: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _norm(name: str) -> str:
        name = name.lower()
        return name if name.endswith(".") else name + "."

    def _remove(self, ep: int, name: str, ip: str, touches: Touches) -> None:
        key = (ep, ip)
        holders = self.pairs[key]
        if key not in touches:
            touches[key] = max(holders.values())
        names = self.eps[ep]
        ips = names[name]
        del ips[ip]
        if not ips:
            del names[name]
            if not names:
                del self.eps[ep]
        del holders[name]
        if not holders:
            del self.pairs[key]
        self.n -= 1

    def _pop_live(self) -> tuple[float, int, str, str] | None:
        heap = self.heap
        while heap:
            exp, stamp, ep, name, ip = heap[0]
            ent = self.eps.get(ep, {}).get(name, {}).get(ip)
            if ent is not None and ent[1] == stamp:
                return exp, ep, name, ip
            heapq.heappop(heap)
        return None

    def _record(self, ep: int, name: str, addrs: Any, now: float, touches: Touches) -> None:
        name = self._norm(name)
        names = self.eps.get(ep)
        if names is None:
            names = self.eps[ep] = {}
        ips = names.get(name)
        if ips is None:
            ips = names[name] = {}
        min_ttl = self.min_ttl
        for ip, ttl in addrs:
            exp = now + (ttl if ttl > min_ttl else min_ttl)
            key = (ep, ip)
            holders = self.pairs.get(key)
            if key not in touches:
                touches[key] = max(holders.values()) if holders else None
            ent = ips.get(ip)
            self.stamp += 1
            if ent is not None:
                if exp > ent[0]:
                    ent[0] = exp
                    ent[1] = self.stamp
                    holders[name] = exp  # type: ignore[index]
                    heapq.heappush(self.heap, (exp, self.stamp, ep, name, ip))
                continue
            ips[ip] = [exp, self.stamp]
            if holders is None:
                holders = self.pairs[key] = {}
            elif holders:
                self._renamed.add(key)
            holders[name] = exp
            heapq.heappush(self.heap, (exp, self.stamp, ep, name, ip))
            self.n += 1
            if len(ips) > self.max_ips:
                victim = min(ips, key=lambda i: ips[i])
                self._remove(ep, name, victim, touches)
                self.name_evictions += 1
            if self.n > self.max_entries:
                while self.n > self.max_entries:
                    top = self._pop_live()
                    if top is None:
                        break
                    self._remove(top[1], top[2], top[3], touches)
                    self.evictions += 1
                # The eviction may have emptied and dropped this very group: re-fetch it.
                names = self.eps.get(ep)
                if names is None:
                    names = self.eps[ep] = {}
                ips = names.get(name)
                if ips is None:
                    ips = names[name] = {}
        if not ips:
            del names[name]
            if not names:
                del self.eps[ep]

    def _finish(self, touches: Touches) -> list[tuple[str, int, str, float]]:
        out = []
        pairs = self.pairs
        for key, before in touches.items():
            holders = pairs.get(key)
            after = max(holders.values()) if holders else None
            if before is None:
                if after is not None:
                    out.append(("added", key[0], key[1], after))
            elif after is None:
                out.append(("removed", key[0], key[1], before))
            elif key in self._renamed:
                out.append(("added", key[0], key[1], after))
            elif after > before:
                out.append(("extended", key[0], key[1], after))
        self._renamed.clear()
        return out

    def record(self, endpoint: int, name: str, addrs: Any, now: float | None = None) -> list[Any]:
        touches: Touches = {}
        self._record(endpoint, name, addrs, time.time() if now is None else now, touches)
        return self._finish(touches)

    def record_many(self, endpoint: int, answers: Any, now: float | None = None) -> list[Any]:
        touches: Touches = {}
        now = time.time() if now is None else now
        for name, addrs in answers:
            self._record(endpoint, name, addrs, now, touches)
        return self._finish(touches)

    def expire(self, now: float | None = None) -> list[Any]:
        now = time.time() if now is None else now
        touches: Touches = {}
        while True:
            top = self._pop_live()
            if top is None or top[0] > now:
                break
            heapq.heappop(self.heap)
            self._remove(top[1], top[2], top[3], touches)
        return self._finish(touches)

    def allowed(self, endpoint: int, ip: str, now: float | None = None) -> bool:
        holders = self.pairs.get((endpoint, ip))
        return bool(holders) and max(holders.values()) > (time.time() if now is None else now)  # type: ignore[union-attr]
