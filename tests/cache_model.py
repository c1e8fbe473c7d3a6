"""A plain-Python model of DnsCache: the semantics in the fewest lines, with no care for speed.

Entries are (endpoint, name, ip) -> (expires_at, stamp). A pair (endpoint, ip) is present while
some entry holds it; its expiry is the latest of theirs. Ordering for both caps and expiry is
(expires_at, stamp), the stamp being a counter taken each time an entry's expiry is set. The
changes of a call are the net difference of each touched pair, in first-touch order.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Change = tuple[str, int, str, float]


def norm_name(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."


def norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def ip_key(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip)
    return (a.version, int(a))


class CacheModel:
    def __init__(self, min_ttl: int = 0, max_ips_per_name: int = 1000, max_entries: int = 10**6):
        self.min_ttl = min_ttl
        self.max_ips = max_ips_per_name
        self.max_entries = max_entries
        self.entries: dict[tuple[int, str, str], tuple[float, int]] = {}
        self.stamp = 0
        self.evictions = 0
        self.name_evictions = 0

    def _stamp(self) -> int:
        self.stamp += 1
        return self.stamp

    def pair(self, ep: int, ip: str) -> float | None:
        exps = [v[0] for (e, _, i), v in self.entries.items() if e == ep and i == ip]
        return max(exps) if exps else None

    def _touch(self, touches: dict[tuple[int, str], float | None], ep: int, ip: str) -> None:
        if (ep, ip) not in touches:
            touches[(ep, ip)] = self.pair(ep, ip)

    def _finish(
        self, touches: dict[tuple[int, str], float | None], renamed: set[tuple[int, str]]
    ) -> list[Change]:
        out: list[Change] = []
        for (ep, ip), before in touches.items():
            after = self.pair(ep, ip)
            if after is not None and (before is None or (ep, ip) in renamed):
                out.append(("added", ep, ip, after))
            elif before is not None and after is not None and after > before:
                out.append(("extended", ep, ip, after))
            elif before is not None and after is None:
                out.append(("removed", ep, ip, before))
        return out

    def _record(
        self, ep: int, name: str, addrs: Any, now: float, *, touches: Any, renamed: Any
    ) -> None:
        name = norm_name(name)
        for raw_ip, ttl in addrs:
            ip = norm_ip(raw_ip)
            exp = now + max(ttl, self.min_ttl)
            self._touch(touches, ep, ip)
            key = (ep, name, ip)
            if key in self.entries:
                if exp > self.entries[key][0]:
                    self.entries[key] = (exp, self._stamp())
                continue
            if self.pair(ep, ip) is not None:  # the address gains a name: programmed as new
                renamed.add((ep, ip))
            self.entries[key] = (exp, self._stamp())
            group = [k for k in self.entries if k[0] == ep and k[1] == name]
            if len(group) > self.max_ips:
                victim = min(group, key=self.entries.__getitem__)
                self._touch(touches, victim[0], victim[2])
                del self.entries[victim]
                self.name_evictions += 1
            while len(self.entries) > self.max_entries:
                victim = min(self.entries, key=self.entries.__getitem__)
                self._touch(touches, victim[0], victim[2])
                del self.entries[victim]
                self.evictions += 1

    def record(self, ep: int, name: str, addrs: Any, now: float) -> list[Change]:
        touches: dict[tuple[int, str], float | None] = {}
        renamed: set[tuple[int, str]] = set()
        self._record(ep, name, addrs, now, touches=touches, renamed=renamed)
        return self._finish(touches, renamed)

    def record_many(self, ep: int, answers: Any, now: float) -> list[Change]:
        touches: dict[tuple[int, str], float | None] = {}
        renamed: set[tuple[int, str]] = set()
        for name, addrs in answers:
            self._record(ep, name, addrs, now, touches=touches, renamed=renamed)
        return self._finish(touches, renamed)

    def expire(self, now: float) -> list[Change]:
        touches: dict[tuple[int, str], float | None] = {}
        for key in sorted(self.entries, key=self.entries.__getitem__):
            if self.entries[key][0] > now:
                break
            self._touch(touches, key[0], key[2])
            del self.entries[key]
        return self._finish(touches, set())

    def drop_expired(self, now: float) -> None:
        """What a snapshot restore at `now` keeps."""
        self.entries = {k: v for k, v in self.entries.items() if v[0] > now}

    def allowed(self, ep: int, ip: str, now: float) -> bool:
        p = self.pair(ep, norm_ip(ip))
        return p is not None and p > now

    def lookup(self, name: str, ep: int | None) -> list[tuple[str, float]]:
        name = norm_name(name)
        best: dict[str, float] = {}
        for (e, n, ip), (exp, _) in self.entries.items():
            if n == name and (ep is None or e == ep):
                best[ip] = max(exp, best.get(ip, exp))
        return sorted(best.items(), key=lambda t: ip_key(t[0]))

    def names_for(self, ip: str, ep: int | None) -> list[str]:
        ip = norm_ip(ip)
        return sorted({n for (e, n, i) in self.entries if i == ip and (ep is None or e == ep)})

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.entries),
            "names": len({n for _, n, _ in self.entries}),
            "groups": len({(e, n) for e, n, _ in self.entries}),
            "pairs": len({(e, i) for e, _, i in self.entries}),
            "endpoints": len({e for e, _, _ in self.entries}),
            "evictions": self.evictions,
            "name_evictions": self.name_evictions,
        }
