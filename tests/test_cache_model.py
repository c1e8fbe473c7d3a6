"""Stateful differential test: DnsCache against the plain-Python model in cache_model.py, under
random record / record_many / expire / evict (small caps) / snapshot sequences, comparing the
change lists of every call and every query afterwards."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from fqdnguard import Change, DnsCache
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.cache_model import CacheModel
from tests.cache_model import Change as ModelChange

NAMES = ["a.com", "A.com.", "b.example.org", "B.EXAMPLE.ORG.", "c.net", "d.io", "x_y.d.io"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "192.0.2.7", "2001:db8::1", "2001:db8::2", "::1"]
EPS = st.integers(min_value=0, max_value=2)
ADDRS = st.lists(st.tuples(st.sampled_from(IPS), st.integers(0, 40)), max_size=5)


def as_tuples(changes: list[Change]) -> list[ModelChange]:
    return [(c.kind, c.endpoint, c.ip, c.expires_at) for c in changes]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.tmp = Path(tempfile.mkdtemp(prefix="fqdnguard-cache-"))

    @initialize(
        min_ttl=st.integers(0, 10),
        max_ips=st.integers(1, 4),
        max_entries=st.integers(1, 12),
    )
    def setup(self, min_ttl: int, max_ips: int, max_entries: int) -> None:
        self.cache = DnsCache(min_ttl=min_ttl, max_ips_per_name=max_ips, max_entries=max_entries)
        self.model = CacheModel(min_ttl, max_ips, max_entries)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(ep=EPS, name=st.sampled_from(NAMES), addrs=ADDRS)
    def record(self, ep: int, name: str, addrs: list[tuple[str, int]]) -> None:
        got = as_tuples(self.cache.record(ep, name, addrs, now=self.now))
        assert got == self.model.record(ep, name, addrs, self.now)

    @rule(
        ep=EPS,
        answers=st.lists(st.tuples(st.sampled_from(NAMES), ADDRS), max_size=4),
    )
    def record_many(self, ep: int, answers: list[tuple[str, list[tuple[str, int]]]]) -> None:
        got = as_tuples(self.cache.record_many(ep, answers, now=self.now))
        assert got == self.model.record_many(ep, answers, self.now)

    @rule(back=st.sampled_from([0.0, 5.0, 20.0]))
    def expire(self, back: float) -> None:
        # Expire at, or a little before, the current time (expiry need not be monotone).
        at = self.now - back
        assert as_tuples(self.cache.expire(now=at)) == self.model.expire(at)

    @rule()
    def snapshot_round_trip(self) -> None:
        path = self.tmp / "cache.snap"
        self.cache.save(path)
        self.cache = DnsCache.load(path, now=self.now)
        self.model.drop_expired(self.now)

    @invariant()
    def queries_agree(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert len(self.cache) == len(self.model.entries)
        stats = self.cache.stats()
        for key, value in self.model.stats().items():
            assert stats[key] == value, key
        for name in NAMES:
            for ep in (None, 0, 1, 2):
                assert self.cache.lookup(name, ep) == self.model.lookup(name, ep)
        for ip in IPS:
            for ep in (None, 0, 1, 2):
                assert self.cache.names_for(ip, ep) == self.model.names_for(ip, ep)
            for ep in (0, 1, 2):
                for t in (self.now - 1, self.now, self.now + 15):
                    assert self.cache.allowed(ep, ip, t) == self.model.allowed(ep, ip, t)


TestCacheModel = CacheMachine.TestCase


# ---- the benchmark's pure-Python reference must have the same semantics ----------------------

_spec = importlib.util.spec_from_file_location(
    "cache_reference", Path(__file__).parent.parent / "benches" / "cache_reference.py"
)
assert _spec is not None and _spec.loader is not None
_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reference)

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), EPS, st.sampled_from(NAMES), ADDRS),
        st.tuples(
            st.just("many"), EPS, st.lists(st.tuples(st.sampled_from(NAMES), ADDRS), max_size=3)
        ),
        st.tuples(st.just("expire"), st.sampled_from([0.0, 5.0, 20.0])),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 10.0])),
    ),
    max_size=40,
)


@given(
    ops=OPS, max_ips=st.integers(1, 4), max_entries=st.integers(1, 12), min_ttl=st.integers(0, 9)
)
def test_benchmark_reference_matches_dns_cache(
    ops: list[tuple[Any, ...]], max_ips: int, max_entries: int, min_ttl: int
) -> None:
    cache = DnsCache(min_ttl=min_ttl, max_ips_per_name=max_ips, max_entries=max_entries)
    ref = _reference.ReferenceCache(min_ttl, max_ips, max_entries)
    now = 100.0
    for op in ops:
        if op[0] == "record":
            got = as_tuples(cache.record(op[1], op[2], op[3], now=now))
            assert got == ref.record(op[1], op[2], op[3], now=now)
        elif op[0] == "many":
            got = as_tuples(cache.record_many(op[1], op[2], now=now))
            assert got == ref.record_many(op[1], op[2], now=now)
        elif op[0] == "expire":
            assert as_tuples(cache.expire(now=now - op[1])) == ref.expire(now=now - op[1])
        else:
            now += op[1]
        assert len(cache) == len(ref)
        for ip in IPS:
            for ep in (0, 1, 2):
                assert cache.allowed(ep, ip, now) == ref.allowed(ep, ip, now)
    stats = cache.stats()
    assert (stats["evictions"], stats["name_evictions"]) == (ref.evictions, ref.name_evictions)
