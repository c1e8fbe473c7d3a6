"""Deterministic pattern corpora shared by the benchmarks."""

from __future__ import annotations

import random
import re


def pattern_mix(n: int) -> list[tuple[str, bool]]:
    """A realistic policy mix: (text, is_match_name). Exact names, `*.`, `**.`, mid-label `*`."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append((f"api{i}.service{i % 97}.example{i % 13}.com", True))
        elif kind == 1:
            out.append((f"*.cdn{i}.example{i % 11}.net", False))
        elif kind == 2:
            out.append((f"**.tenant{i}.cloud{i % 7}.io", False))
        else:
            out.append((f"api-*-prod{i}.region{i % 5}.example.org", False))
    return out


def lookup_names(n: int, count: int = 256, seed: int = 7) -> list[str]:
    """Names to look up against pattern_mix(n): three in four match some entry, one in four none."""
    rng = random.Random(seed)
    names = []
    for j in range(count):
        i = rng.randrange(n)
        kind = i % 4
        if j % 4 == 3:
            names.append(f"www{j}.unrelated{i}.example.com")
        elif kind == 0:
            names.append(f"api{i}.service{i % 97}.example{i % 13}.com")
        elif kind == 1:
            names.append(f"www{j}.cdn{i}.example{i % 11}.net")
        elif kind == 2:
            names.append(f"a.b{j}.tenant{i}.cloud{i % 7}.io")
        else:
            names.append(f"api-eu{j}-prod{i}.region{i % 5}.example.org")
    return names


def cilium_regex(pattern: str) -> str:
    """A matchPattern as Cilium compiles it to a regex (unanchored; `.*` for match-all), the way
    the benchmarks' Python peers match names: `*` -> `[-a-z0-9_]*`, a leading `**.` -> one or
    more whole labels."""
    p = pattern.lower()
    if re.fullmatch(r"\*+\.?", p):
        return ".*"
    if not p.endswith("."):
        p += "."
    out = ""
    multi = re.match(r"\*{2,}\.", p)
    if multi:
        out = "(?:[-a-z0-9_]+[.])+"
        p = p[multi.end() :]
    return out + "".join(
        "[-a-z0-9_]*" if part.startswith("*") else part.replace(".", "[.]")
        for part in re.split(r"(\*+)", p)
    )
