"""Prints each benchmark group side by side (medians and ratios) and checks declared targets.

A bench module may declare ``TARGETS``: tuples ``(label, test_a, test_b, op, ratio)`` meaning
"median(test_a) / median(test_b) op ratio", with op one of "<=" or ">="; with test_b None, the
median of test_a in seconds is compared. Targets are reported,
not asserted: these machines are shared and noisy, so a miss is a number to look at, not a
failed build. Set FQDNGUARD_BENCH_QUICK=1 for the short mode CI runs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"


def _fmt(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:9.3f} {unit}"
    return f"{seconds / 1e-9:9.1f} ns"


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    medians: dict[str, float] = {}
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for bench in session.benchmarks:
        if not bench.stats or bench.stats.rounds == 0:
            continue
        median = bench.stats.median
        medians[bench.name] = median
        groups[bench.group or "(no group)"].append((bench.name, median))
    tr = terminalreporter
    tr.section("fqdnguard side-by-side (median per call, ratio to the fastest)")
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda r: r[1])
        best = rows[0][1]
        tr.write_line(f"[{group}]")
        for name, median in rows:
            tr.write_line(f"  {name:<58} {_fmt(median)}  {median / best:8.2f}x")
    targets: list[tuple[str, str, str | None, str, float]] = []
    for mod in list(getattr(config, "_fqdnguard_target_modules", [])):
        targets.extend(getattr(mod, "TARGETS", []))
    extra = [
        line
        for m in getattr(config, "_fqdnguard_target_modules", [])
        for line in getattr(m, "EXTRA_SUMMARY", [])
    ]
    if extra:
        tr.section("fqdnguard figures that are not timings")
        for line in extra:
            tr.write_line(line)
    if not targets:
        return
    tr.section("fqdnguard targets")
    seen = set()
    for label, a, b, op, ratio in targets:
        if (label, a, b) in seen:
            continue
        seen.add((label, a, b))
        if a not in medians or (b is not None and b not in medians):
            tr.write_line(f"  SKIP  {label}: {a} or {b} did not run")
            continue
        got = medians[a] / medians[b] if b is not None else medians[a]
        ok = got <= ratio if op == "<=" else got >= ratio
        tr.write_line(f"  {'OK  ' if ok else 'MISS'}  {label}: {got:.2f} (target {op} {ratio})")


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    mods = {item.module for item in items if hasattr(item, "module")}
    config._fqdnguard_target_modules = [
        m for m in mods if hasattr(m, "TARGETS") or hasattr(m, "EXTRA_SUMMARY")
    ]
