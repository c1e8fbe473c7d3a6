"""PatternSet.matches against a Python `re` alternation (how Cilium compiles a selector) and a
plain `set` membership test of the exact name (the floor), at 100, 10k and 100k patterns.

Each round looks up the same 256 names (three in four match), so per-name time is the round's
median / 256 and ratios between contenders are per-name ratios.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from corpus import cilium_regex, lookup_names, pattern_mix
from fqdnguard import PatternSet

SIZES = [100, 10_000, 100_000]
# The re alternation of 100k patterns takes minutes to compile; 10k is where the target is set.
RE_SIZES = [100, 10_000]

TARGETS = [
    (
        "10k patterns: re alternation / trie (>= 100x)",
        "test_re_alternation[10000]",
        "test_trie[10000]",
        ">=",
        100,
    ),
    (
        "100k patterns: trie / set membership (<= 5x)",
        "test_trie[100000]",
        "test_set_membership[100000]",
        "<=",
        5,
    ),
    ("trie at 100k / trie at 100 (<= 2x)", "test_trie[100000]", "test_trie[100]", "<=", 2),
    ("compile 100k patterns, seconds (< 1)", "test_compile_100k", None, "<=", 1.0),
]


def build_set(n: int) -> PatternSet:
    ps = PatternSet()
    for i, (text, is_name) in enumerate(pattern_mix(n)):
        (ps.add_name if is_name else ps.add)(text, i)
    return ps


@pytest.mark.parametrize("n", SIZES)
def test_trie(benchmark: Any, n: int) -> None:
    benchmark.group = f"matches, {n} patterns"
    ps = build_set(n)
    names = lookup_names(n)
    matches = ps.matches

    def run() -> int:
        return sum(1 for name in names if matches(name))

    hits = benchmark(run)
    assert hits == 192  # three in four of the 256 names match


@pytest.mark.parametrize("n", RE_SIZES)
def test_re_alternation(benchmark: Any, n: int) -> None:
    benchmark.group = f"matches, {n} patterns"
    rx = re.compile("^(?:" + "|".join(cilium_regex(t) for t, _ in pattern_mix(n)) + ")$")
    names = [name.lower() + "." for name in lookup_names(n)]
    match = rx.match

    def run() -> int:
        return sum(1 for name in names if match(name))

    hits = benchmark.pedantic(run, rounds=5 if n > 1000 else 50, iterations=1)
    assert hits == 192


@pytest.mark.parametrize("n", SIZES)
def test_set_membership(benchmark: Any, n: int) -> None:
    benchmark.group = f"matches, {n} patterns"
    exact = {t for t, _ in pattern_mix(n)}
    names = lookup_names(n)

    def run() -> int:
        return sum(1 for name in names if name in exact)

    benchmark(run)


def test_compile_100k(benchmark: Any) -> None:
    benchmark.group = "compile"
    corpus = pattern_mix(100_000)

    def run() -> PatternSet:
        ps = PatternSet()
        add, add_name = ps.add, ps.add_name
        for i, (text, is_name) in enumerate(corpus):
            (add_name if is_name else add)(text, i)
        return ps

    ps = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(ps) == 100_000
