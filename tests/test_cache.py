"""DnsCache: a test per rule of the issue, bad input, snapshots and their corruption, threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from fqdnguard import CacheError, Change, ChangeList, DnsCache, FqdnGuardError, PatternError


def kinds(changes: Sequence[Change]) -> list[tuple[str, int, str, float]]:
    return [(c.kind, c.endpoint, c.ip, c.expires_at) for c in changes]


def test_record_expiry_is_now_plus_max_of_ttl_and_min_ttl() -> None:
    c = DnsCache(min_ttl=30)
    got = c.record(
        endpoint=3, name="api.example.com", addrs=[("1.2.3.4", 10), ("1.2.3.5", 60)], now=100.0
    )
    assert kinds(got) == [("added", 3, "1.2.3.4", 130.0), ("added", 3, "1.2.3.5", 160.0)]
    assert c.allowed(3, "1.2.3.4", now=129.5)
    assert not c.allowed(3, "1.2.3.4", now=130.0)
    assert not c.allowed(4, "1.2.3.4", now=100.0)
    assert len(c) == 2


def test_now_defaults_to_time_time() -> None:
    c = DnsCache()
    before = time.time()
    (ch,) = c.record(1, "a.com", [("1.1.1.1", 60)])
    assert before + 60 <= ch.expires_at <= time.time() + 60
    assert c.allowed(1, "1.1.1.1")
    assert c.expire() == []


def test_extends_never_shortens() -> None:
    c = DnsCache()
    c.record(1, "a.com", [("1.1.1.1", 60)], now=0.0)
    assert c.record(1, "a.com", [("1.1.1.1", 10)], now=10.0) == []
    assert c.lookup("a.com") == [("1.1.1.1", 60.0)]
    assert kinds(c.record(1, "a.com", [("1.1.1.1", 60)], now=10.0)) == [
        ("extended", 1, "1.1.1.1", 70.0)
    ]


def test_names_normalised_lower_case_absolute() -> None:
    c = DnsCache()
    c.record(1, "API.Example.COM", [("1.1.1.1", 60)], now=0.0)
    assert c.record(1, b"api.example.com.", [("1.1.1.1", 60)], now=0.0) == []
    assert c.names_for("1.1.1.1") == ["api.example.com."]
    assert c.lookup("api.EXAMPLE.com.", endpoint=1) == [("1.1.1.1", 60.0)]
    # Odd bytes are kept exactly and come back escaped (RFC 1035 presentation form).
    c.record(1, "a\\.b\\000.example.com", [("1.1.1.2", 60)], now=0.0)
    assert c.names_for("1.1.1.2") == ["a\\.b\\000.example.com."]
    assert c.lookup("a\\046b\\000.EXAMPLE.com") == [("1.1.1.2", 60.0)]


def test_ipv4_and_ipv6_canonical_and_sorted() -> None:
    c = DnsCache()
    got = c.record(1, "dual.com", [("2001:DB8:0::1", 60), ("192.0.2.1", 60)], now=0.0)
    assert [x.ip for x in got] == ["2001:db8::1", "192.0.2.1"]
    assert c.lookup("dual.com") == [("192.0.2.1", 60.0), ("2001:db8::1", 60.0)]
    assert c.allowed(1, "2001:db8::1", now=1.0)


def test_ip_under_two_names_removed_only_when_no_name_holds_it() -> None:
    c = DnsCache()
    c.record(1, "a.com", [("9.9.9.9", 100)], now=0.0)
    # A new name for the address: added again (it may belong in more of a firewall's sets).
    assert kinds(c.record(1, "b.com", [("9.9.9.9", 50)], now=0.0)) == [
        ("added", 1, "9.9.9.9", 100.0)
    ]
    assert c.record(1, "b.com", [("9.9.9.9", 50)], now=0.0) == []
    assert kinds(c.record(1, "b.com", [("9.9.9.9", 200)], now=0.0)) == [
        ("extended", 1, "9.9.9.9", 200.0)
    ]
    assert c.names_for("9.9.9.9", endpoint=1) == ["a.com.", "b.com."]
    assert c.expire(now=100.0) == []
    assert c.names_for("9.9.9.9") == ["b.com."]
    assert kinds(c.expire(now=200.0)) == [("removed", 1, "9.9.9.9", 200.0)]
    assert len(c) == 0


def test_per_name_cap_evicts_soonest_expiring() -> None:
    c = DnsCache(max_ips_per_name=3)
    c.record(1, "s3.com", [("10.0.0.1", 30), ("10.0.0.2", 10), ("10.0.0.3", 20)], now=0.0)
    got = c.record(1, "s3.com", [("10.0.0.4", 40)], now=0.0)
    assert kinds(got) == [("added", 1, "10.0.0.4", 40.0), ("removed", 1, "10.0.0.2", 10.0)]
    assert c.stats()["name_evictions"] == 1
    assert [ip for ip, _ in c.lookup("s3.com")] == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
    # Thousands of IPs in one answer (S3-like): capped at the limit.
    c2 = DnsCache(max_ips_per_name=1000)
    c2.record(1, "bucket.s3.com", [(f"10.{i >> 8}.{i & 255}.1", 60 + i) for i in range(3000)], 0.0)
    assert len(c2) == 1000
    assert min(e for _, e in c2.lookup("bucket.s3.com")) == 60.0 + 2000


def test_global_cap_evicts_soonest_first_and_counts() -> None:
    c = DnsCache(max_entries=3)
    c.record(1, "a.com", [("1.0.0.1", 50)], now=0.0)
    c.record(1, "b.com", [("1.0.0.2", 20)], now=0.0)
    c.record(2, "c.com", [("1.0.0.3", 20)], now=0.0)
    got = c.record(1, "d.com", [("1.0.0.4", 90)], now=0.0)
    assert kinds(got) == [("added", 1, "1.0.0.4", 90.0), ("removed", 1, "1.0.0.2", 20.0)]
    assert c.stats()["evictions"] == 1
    assert len(c) == 3


def test_expire_removes_what_expired() -> None:
    c = DnsCache()
    c.record(1, "a.com", [("1.0.0.1", 10), ("1.0.0.2", 20)], now=0.0)
    c.record(2, "a.com", [("1.0.0.1", 30)], now=0.0)
    assert c.expire(now=9.0) == []
    assert kinds(c.expire(now=25.0)) == [
        ("removed", 1, "1.0.0.1", 10.0),
        ("removed", 1, "1.0.0.2", 20.0),
    ]
    assert c.lookup("a.com") == [("1.0.0.1", 30.0)]
    assert c.names_for("1.0.0.1") == ["a.com."]


def test_record_many_reports_net_changes() -> None:
    c = DnsCache()
    got = c.record_many(
        5,
        [("a.com", [("1.1.1.1", 10)]), ("b.com", [("1.1.1.1", 20), ("::2", 5)]), ("c.com", [])],
        now=0.0,
    )
    assert kinds(got) == [("added", 5, "1.1.1.1", 20.0), ("added", 5, "::2", 5.0)]
    assert c.stats()["names"] == 2
    assert c.record_many(5, iter([("a.com", iter([("1.1.1.1", 1)]))]), now=0.0) == []


def test_change_is_a_small_frozen_value() -> None:
    (ch,) = DnsCache().record(3, "a.com", [("1.2.3.4", 60)], now=0.0)
    assert ch == Change("added", 3, "1.2.3.4", 60.0)
    assert hash(ch) == hash(Change("added", 3, "1.2.3.4", 60.0))
    assert ch != Change("removed", 3, "1.2.3.4", 60.0)
    assert repr(ch) == "Change(kind='added', endpoint=3, ip='1.2.3.4', expires_at=60.0)"
    with pytest.raises(AttributeError):
        ch.kind = "removed"  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind must be"):
        Change("gone", 1, "1.1.1.1", 0.0)  # type: ignore[arg-type]


def test_changes_come_as_a_lazy_immutable_sequence() -> None:
    c = DnsCache()
    got = c.record(1, "a.com", [("1.1.1.1", 10), ("1.1.1.2", 20), ("1.1.1.3", 30)], now=0.0)
    a, b, d = (Change("added", 1, f"1.1.1.{i}", 10.0 * i) for i in (1, 2, 3))
    assert type(got) is ChangeList
    assert isinstance(got, Sequence)
    assert len(got) == 3
    assert got == [a, b, d]
    assert [a, b, d] == got
    assert got != [a, b]
    assert got != [a, b, "not a change"]
    assert got != (a, b, d), "like a list, never equal to a tuple"
    assert (got[0], got[-1], got[1]) == (a, d, b)
    assert got[::-1] == [d, b, a]
    assert type(got[1:]) is ChangeList
    assert got[1:] == [b, d]
    assert got[5:] == []
    assert list(got) == [a, b, d]
    assert list(reversed(got)) == [d, b, a]
    assert b in got
    assert Change("removed", 1, "1.1.1.2", 20.0) not in got
    assert (got.count(b), got.index(d), got.index(d, 1, 3)) == (1, 2, 2)
    with pytest.raises(ValueError, match="not in ChangeList"):
        got.index(d, 0, 2)
    with pytest.raises(IndexError, match="out of range"):
        got[3]
    with pytest.raises(IndexError, match="out of range"):
        got[-4]
    with pytest.raises(TypeError, match="integers or slices"):
        got["0"]  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        got[0] = a  # type: ignore[index]
    with pytest.raises(TypeError, match="unhashable"):
        hash(got)
    assert repr(got[:1]) == (
        "ChangeList([Change(kind='added', endpoint=1, ip='1.1.1.1', expires_at=10.0)])"
    )
    # Nothing changed: an empty sequence that is falsy and equal to [].
    none = c.record(1, "a.com", [("1.1.1.1", 5)], now=0.0)
    assert not none
    assert none == []
    assert (none != []) is False
    assert repr(none) == "ChangeList([])"
    assert type(c.expire(now=0.0)) is ChangeList
    assert type(c.record_many(1, [], now=0.0)) is ChangeList


def test_ips_may_be_given_packed() -> None:
    c = DnsCache()
    got = c.record(
        1,
        "a.com",
        [(bytes([192, 0, 2, 1]), 10), (bytes.fromhex("20010db8" + "00" * 11 + "01"), 20)],
        now=0.0,
    )
    assert kinds(got) == [("added", 1, "192.0.2.1", 10.0), ("added", 1, "2001:db8::1", 20.0)]
    # Another name for the same address: added again (see test_ip_under_two_names_...).
    assert kinds(c.record_many(1, [("b.com", [(b"\xc0\x00\x02\x01", 10)])], now=0.0)) == [
        ("added", 1, "192.0.2.1", 10.0)
    ]
    assert c.allowed(1, b"\xc0\x00\x02\x01", now=5.0)
    assert c.names_for(b"\xc0\x00\x02\x01") == ["a.com.", "b.com."]
    assert Change("added", 1, b"\x01\x02\x03\x04", 1.0).ip == "1.2.3.4"
    for bad in (b"", b"\x01\x02\x03", bytes(5), bytes(15), bytes(17)):
        with pytest.raises(CacheError, match=rf"4 \(IPv4\) or 16 \(IPv6\) bytes, not {len(bad)}"):
            c.record(1, "c.com", [(bad, 10)], now=0.0)
    assert len(c) == 3


def test_stats_and_repr() -> None:
    c = DnsCache(min_ttl=1, max_ips_per_name=7, max_entries=99)
    c.record(1, "a.com", [("1.1.1.1", 60), ("1.1.1.2", 60)], now=0.0)
    c.record(2, "a.com", [("1.1.1.1", 60)], now=0.0)
    s = c.stats()
    assert {k: s[k] for k in ("entries", "names", "groups", "pairs", "endpoints")} == {
        "entries": 3,
        "names": 1,
        "groups": 2,
        "pairs": 3,
        "endpoints": 2,
    }
    assert s["memory_bytes"] > 0
    assert (c.min_ttl, c.max_ips_per_name, c.max_entries) == (1, 7, 99)
    assert "3 entries" in repr(c)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda c: c.record(1, "a.com", [("1.2.3", 5)], 0.0), CacheError, "not an IPv4 or IPv6"),
        (lambda c: c.record(1, "a.com", [("1.2.3.4", -1)], 0.0), CacheError, "ttl -1"),
        (lambda c: c.record(1, "a.com", [("1.2.3.4", 2**32)], 0.0), CacheError, "out of range"),
        (lambda c: c.record(1, "a..com", [("1.2.3.4", 5)], 0.0), PatternError, "empty label"),
        (lambda c: c.record(1, "a" * 64 + ".com", [("1.2.3.4", 5)], 0.0), PatternError, None),
        (lambda c: c.record(1, ".".join(["a" * 63] * 4), [], 0.0), PatternError, None),
        (lambda c: c.record(1, "", [], 0.0), PatternError, None),
        (lambda c: c.record(1, 7, [], 0.0), TypeError, "str or bytes"),
        (lambda c: c.record(1, "a.com", [(b"\x01", 5)], 0.0), CacheError, "packed IP"),
        (lambda c: c.record(1, "a.com", [("1.2.3.4", 5)], float("nan")), CacheError, "finite"),
        (lambda c: c.record(1, "a.com", ["1.2.3.4"], 0.0), TypeError, r"\(ip, ttl\)"),
        (lambda c: c.record(1, "a.com", [(1234, 5)], 0.0), TypeError, "must be str"),
        (lambda c: c.record(-1, "a.com", [], 0.0), OverflowError, None),
        (lambda c: c.record_many(1, [("a.com",)], 0.0), ValueError, "got 1 items"),
        (lambda c: c.allowed(1, "nope"), CacheError, "not an IPv4"),
        (lambda c: c.expire(float("inf")), CacheError, "finite"),
    ],
)
def test_bad_input_is_refused_and_nothing_recorded(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    c = DnsCache()
    c.record(1, "keep.com", [("9.9.9.9", 60)], now=0.0)
    with pytest.raises(exc, match=match):
        call(c)
    assert len(c) == 1
    # A batch with one bad answer late in it records nothing at all.
    with pytest.raises(CacheError):
        c.record_many(1, [("a.com", [("1.1.1.1", 5)]), ("b.com", [("x", 5)])], now=0.0)
    assert len(c) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"max_ips_per_name": 0}, {"max_entries": 0}, {"min_ttl": 2**32}, {"max_entries": 2**31}],
)
def test_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(CacheError, match="out of range"):
        DnsCache(**kwargs)
    assert issubclass(CacheError, FqdnGuardError)
    assert issubclass(CacheError, ValueError)


# ---- snapshots -----------------------------------------------------------------------------


def _filled() -> DnsCache:
    c = DnsCache(min_ttl=5, max_ips_per_name=50, max_entries=500)
    c.record(1, "a.com", [("1.1.1.1", 10), ("2001:db8::1", 100)], now=0.0)
    c.record(2, "b\\000.com", [("1.1.1.2", 50)], now=0.0)
    c.record(2, "a.com", [("1.1.1.1", 70)], now=0.0)
    return c


def test_snapshot_round_trip_drops_expired(tmp_path: Path) -> None:
    c = _filled()
    path = tmp_path / "state" / "cache.snap"
    path.parent.mkdir()
    c.save(path)
    assert sorted(os.listdir(path.parent)) == ["cache.snap"], "no temporary file left behind"
    d = DnsCache.load(path, now=20.0)
    assert (d.min_ttl, d.max_ips_per_name, d.max_entries) == (5, 50, 500)
    assert len(d) == 3
    assert d.lookup("a.com", endpoint=1) == [("2001:db8::1", 100.0)]
    assert d.lookup("a.com") == [("1.1.1.1", 70.0), ("2001:db8::1", 100.0)]
    assert d.names_for("1.1.1.2") == ["b\\000.com."]
    assert len(DnsCache.load(str(path), now=0.0)) == 4
    assert len(DnsCache.load(path, now=1000.0)) == 0
    # Saving again over the old file replaces it atomically.
    d.save(path)
    assert len(DnsCache.load(path, now=0.0)) == 3


def test_snapshot_corruption_gives_cache_error_and_loads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cache.snap"
    _filled().save(path)
    good = path.read_bytes()
    bad = tmp_path / "bad.snap"
    cases: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "bad magic"),
        "not ours": (b"hello world, not a snapshot at all" * 3, "bad magic"),
        "header only": (good[:30], "truncated"),
        "truncated": (good[: len(good) // 2], "truncated or corrupt"),
        "last byte cut": (good[:-1], "truncated or corrupt"),
        "flipped byte": (good[:60] + bytes([good[60] ^ 0x01]) + good[61:], "checksum mismatch"),
        "flipped crc": (good[:-1] + bytes([good[-1] ^ 0x80]), "checksum mismatch"),
        "wrong version": (good[:8] + (2).to_bytes(4, "little") + good[12:], "version 2"),
        "trailing junk": (good + b"\0", "truncated or corrupt"),
    }
    for label, (data, match) in cases.items():
        bad.write_bytes(data)
        with pytest.raises(CacheError, match=match) as info:
            DnsCache.load(bad, now=0.0)
        assert str(bad) in str(info.value), label
    # Every single flipped bit anywhere is caught.
    for i in range(len(good)):
        bad.write_bytes(good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1 :])
        with pytest.raises(CacheError):
            DnsCache.load(bad, now=0.0)


def test_snapshot_io_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="cannot read"):
        DnsCache.load(tmp_path / "missing.snap")
    with pytest.raises(CacheError, match="cannot write"):
        DnsCache().save(tmp_path / "no" / "such" / "dir" / "x.snap")


# ---- threads ---------------------------------------------------------------------------------


def test_threads_share_one_cache() -> None:
    c = DnsCache(max_entries=100_000)
    errors: list[BaseException] = []

    def worker(ep: int) -> None:
        try:
            for i in range(200):
                c.record_many(
                    ep, [(f"n{i}-{j}.com", [(f"10.{ep}.{i}.{j}", 60)]) for j in range(5)], 0.0
                )
                assert c.allowed(ep, f"10.{ep}.{i}.0", 1.0)
                c.expire(now=0.5)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ep,)) for ep in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(c) == 4 * 200 * 5
    assert c.stats()["endpoints"] == 4


def test_entries_lists_every_live_entry_soonest_first() -> None:
    c = DnsCache()
    c.record(2, "WWW.Example.com", [("192.0.2.1", 60), ("2001:db8::1", 30)], now=1000.0)
    c.record(1, "a.example.org.", [("192.0.2.9", 10)], now=1000.0)
    assert c.entries() == [
        (1, "a.example.org.", "192.0.2.9", 1010.0),
        (2, "www.example.com.", "2001:db8::1", 1030.0),
        (2, "www.example.com.", "192.0.2.1", 1060.0),
    ]
    c.expire(now=1015.0)
    assert [e[2] for e in c.entries()] == ["2001:db8::1", "192.0.2.1"]
    assert DnsCache().entries() == []


SAVE_PEAK = """
import sys
from fqdnguard import DnsCache

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

c = DnsCache(max_entries=1_000_000)
for block in range(40):
    c.record_many(
        block % 4,
        [
            (f"host{block}-{i}.example{i % 97}.com", [(f"10.{block}.{i >> 8}.{i & 255}", 300 + i)])
            for i in range(10_000)
        ],
        now=1000.0,
    )
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS starts again from the RSS now
before = peak_kb()
c.save(sys.argv[1])
print(before, peak_kb(), c.stats()["memory_bytes"] // 1024)
"""


def test_saving_never_doubles_the_memory(tmp_path: Path) -> None:
    """A snapshot is streamed to its file: the save's peak memory is a fraction of the cache's
    (it was more than the cache again: the whole file and a sorted copy of every entry)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    path = tmp_path / "cache.snapshot"
    out = subprocess.run(
        [sys.executable, "-c", SAVE_PEAK, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    before, peak, cache_kb = map(int, out.split())
    assert peak - before < cache_kb * 0.5, (before, peak, cache_kb)
    loaded = DnsCache.load(path, now=1000.0)
    assert len(loaded) == 400_000
    assert loaded.lookup("host7-9.example9.com") == [("10.7.0.9", 1309.0)]
