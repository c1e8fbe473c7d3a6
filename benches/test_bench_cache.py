"""DnsCache against the plain-Python reference (cache_reference.py) with the same semantics.

Timings (pytest-benchmark, one round = the whole workload): N `record` calls one at a time, the
same N answers through `record_many` (batches of 1000), N `allowed` checks against a plain dict
lookup, and `expire` of 10% of N entries. Memory (in a fresh subprocess each, RSS delta / entries,
printed in the terminal summary): bytes per entry for three workloads, and RSS while 10N unique
names stream through a cache capped at N. N is 1M (100k with FQDNGUARD_BENCH_QUICK=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fqdnguard import DnsCache

sys.path.insert(0, str(Path(__file__).parent))
from cache_reference import ReferenceCache

QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"
N = 100_000 if QUICK else 1_000_000
ROUNDS = 1 if QUICK else 3
BATCH = 1000
NOW = 1_700_000_000.0

TARGETS = [
    (
        "record one at a time: reference / DnsCache >= 3",
        "test_record_reference",
        "test_record_dnscache",
        ">=",
        3.0,
    ),
    (
        "record_many: reference / DnsCache >= 20",
        "test_record_many_reference",
        "test_record_many_dnscache",
        ">=",
        20.0,
    ),
    (
        "allowed: DnsCache / plain dict lookup <= 2",
        "test_allowed_dnscache",
        "test_allowed_plain_dict",
        "<=",
        2.0,
    ),
    (
        "expire 10%: reference / DnsCache",
        "test_expire_reference",
        "test_expire_dnscache",
        ">=",
        1.0,
    ),
]

# Lines for the terminal summary (benches/conftest.py prints every module's EXTRA_SUMMARY).
EXTRA_SUMMARY: list[str] = []


def _answers(n: int, offset: int = 0) -> list[tuple[str, list[tuple[str, int]]]]:
    out = []
    for i in range(offset, offset + n):
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        out.append((f"host{i}.svc{i % 100}.example.com", [(ip, 60 + i % 300)]))
    return out


ANSWERS = _answers(N)


def _fill(cache: Any, answers: list[Any] = ANSWERS) -> Any:
    for i in range(0, len(answers), BATCH):
        cache.record_many(1, answers[i : i + BATCH], NOW)
    return cache


def _one_at_a_time(cache: Any) -> None:
    record = cache.record
    for name, addrs in ANSWERS:
        record(1, name, addrs, NOW)


def _batched(cache: Any) -> None:
    _fill(cache)


def _bench(benchmark: Any, fn: Any, make: Any) -> None:
    benchmark.pedantic(fn, setup=lambda: ((make(),), {}), rounds=ROUNDS, iterations=1)


@pytest.mark.benchmark(group=f"cache: {N} record calls, one answer each")
def test_record_dnscache(benchmark: Any) -> None:
    _bench(benchmark, _one_at_a_time, DnsCache)


@pytest.mark.benchmark(group=f"cache: {N} record calls, one answer each")
def test_record_reference(benchmark: Any) -> None:
    _bench(benchmark, _one_at_a_time, ReferenceCache)


@pytest.mark.benchmark(group=f"cache: {N} answers through record_many, {BATCH} per call")
def test_record_many_dnscache(benchmark: Any) -> None:
    _bench(benchmark, _batched, DnsCache)


@pytest.mark.benchmark(group=f"cache: {N} answers through record_many, {BATCH} per call")
def test_record_many_reference(benchmark: Any) -> None:
    _bench(benchmark, _batched, ReferenceCache)


@pytest.fixture(scope="module")
def filled() -> tuple[DnsCache, ReferenceCache, list[str]]:
    cache, ref = _fill(DnsCache()), _fill(ReferenceCache())
    ips = [addrs[0][0] for _, addrs in ANSWERS]
    return cache, ref, ips


@pytest.mark.benchmark(group=f"cache: {N} allowed checks")
def test_allowed_dnscache(benchmark: Any, filled: Any) -> None:
    cache, _, ips = filled

    def run() -> None:
        allowed = cache.allowed
        for ip in ips:
            allowed(1, ip, NOW)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    assert all(cache.allowed(1, ip, NOW) for ip in ips[:1000])


@pytest.mark.benchmark(group=f"cache: {N} allowed checks")
def test_allowed_plain_dict(benchmark: Any, filled: Any) -> None:
    _, _, ips = filled
    d = {(1, ip): NOW + 60 for ip in ips}

    def run() -> None:
        get = d.get
        for ip in ips:
            get((1, ip), 0.0) > NOW  # noqa: B015 - the comparison is part of the check

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)


@pytest.mark.benchmark(group=f"cache: {N} allowed checks")
def test_allowed_reference(benchmark: Any, filled: Any) -> None:
    _, ref, ips = filled

    def run() -> None:
        allowed = ref.allowed
        for ip in ips:
            allowed(1, ip, NOW)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)


# TTLs are 60..359 by i % 300: expiring at NOW + 89 removes 30 in 300, 10%.
EXPIRE_AT = NOW + 89
EXPIRED = sum(1 for i in range(N) if 60 + i % 300 <= 89)


@pytest.mark.benchmark(group=f"cache: expire 10% of {N} entries")
def test_expire_dnscache(benchmark: Any) -> None:
    out: list[int] = []
    benchmark.pedantic(
        lambda c: out.append(len(c.expire(EXPIRE_AT))),
        setup=lambda: ((_fill(DnsCache()),), {}),
        rounds=ROUNDS,
        iterations=1,
    )
    assert out[0] == EXPIRED


@pytest.mark.benchmark(group=f"cache: expire 10% of {N} entries")
def test_expire_reference(benchmark: Any) -> None:
    out: list[int] = []
    benchmark.pedantic(
        lambda c: out.append(len(c.expire(EXPIRE_AT))),
        setup=lambda: ((_fill(ReferenceCache()),), {}),
        rounds=ROUNDS,
        iterations=1,
    )
    assert out[0] == EXPIRED


# ---- memory: each measurement in a fresh interpreter -------------------------------------------

_MEMORY_SCRIPT = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from fqdnguard import DnsCache
from cache_reference import ReferenceCache
kind, workload, n, cap = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
NOW = 1_700_000_000.0

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def answers(start, count):
    out = []
    for i in range(start, start + count):
        if workload == "v4":
            addrs = [(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 60 + i % 300)]
        elif workload == "v6":
            addrs = [(f"2001:db8::{(i >> 16) & 0xffff:x}:{i & 0xffff:x}", 60 + i % 300)]
        else:  # 4 IPs per name, 1/4 as many names
            addrs = [(f"10.{(i >> 14) & 255}.{(i >> 6) & 255}.{((i & 63) << 2) | k}", 60 + i % 300)
                     for k in range(4)]
        out.append((f"host{i}.svc{i % 100}.example.com", addrs))
    return out

per = 4 if workload == "4ips" else 1
cache = DnsCache(max_entries=cap) if kind == "dnscache" else ReferenceCache(max_entries=cap)
answers(0, 1000)
gc.collect()
base = rss()
samples = []
step = 1000
done = 0
while done * per < n:
    cache.record_many(1, answers(done, step), NOW)
    done += step
    if (done * per) % cap == 0:
        gc.collect()
        samples.append(rss() - base)
gc.collect()
print(json.dumps({"entries": len(cache), "rss": rss() - base, "samples": samples,
                  "estimate": cache.stats()["memory_bytes"] if kind == "dnscache" else 0}))
"""


def _measure(kind: str, workload: str, n: int, cap: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            str(Path(__file__).parent),
            kind,
            workload,
            str(n),
            str(cap),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.benchmark(group="cache: memory (figures in the summary)")
def test_memory_per_entry(benchmark: Any) -> None:
    rows = []

    def run() -> None:
        for workload in ("v4", "v6", "4ips"):
            for kind in ("dnscache", "reference"):
                m = _measure(kind, workload, N, N)
                rows.append(
                    (
                        kind,
                        workload,
                        m["entries"],
                        m["rss"] / m["entries"],
                        m["estimate"] / max(m["entries"], 1),
                    )
                )

    benchmark.pedantic(run, rounds=1, iterations=1)
    EXTRA_SUMMARY.append(
        f"memory per entry, {N} entries (RSS delta / entries; target DnsCache <= 150 B):"
    )
    for kind, workload, entries, per, est in rows:
        note = f"  (stats() estimate {est:.0f} B)" if kind == "dnscache" else ""
        verdict = "" if kind != "dnscache" else ("  OK" if per <= 150 else "  MISS")
        EXTRA_SUMMARY.append(
            f"  {kind:<10} {workload:<5} {entries:>9} entries {per:8.1f} B/entry{note}{verdict}"
        )
    assert all(r[2] == N for r in rows)


@pytest.mark.benchmark(group="cache: memory (figures in the summary)")
def test_memory_flat_under_unique_name_flood(benchmark: Any) -> None:
    result: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: result.update(_measure("dnscache", "v4", 10 * N, N)), rounds=1, iterations=1
    )
    samples = result["samples"]
    growth = samples[-1] / samples[0]
    spread = max(samples) / min(samples)
    EXTRA_SUMMARY.append(
        f"memory under a flood of {10 * N} unique names, max_entries={N}: RSS after each {N} names "
        f"(MiB) {[round(s / 2**20, 1) for s in samples]}"
    )
    EXTRA_SUMMARY.append(
        f"  last/first {growth:.3f}, max/min {spread:.3f} (target within 1.10)"
        f"  {'OK' if spread <= 1.10 else 'MISS'}"
    )
    assert result["entries"] == N
