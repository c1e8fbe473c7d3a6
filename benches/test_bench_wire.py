"""parse_message vs dns.message.from_wire on the same corpus of queries and answers.

The corpus is benches/data/wire_{queries,answers}.bin (made by make_wire_corpus.py; the criterion
bench benches/rust/wire.rs reads the same files). Each benchmark parses the whole corpus once per
round, so the ratio is the per-message ratio. FQDNGUARD_BENCH_QUICK=1 parses a quarter of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dns.message
import pytest
from fqdnguard import parse_message, resolve_answer

QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"
DATA = Path(__file__).parent / "data"


def _load(name: str) -> list[bytes]:
    raw = (DATA / name).read_bytes()
    out, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i : i + 2], "big")
        out.append(raw[i + 2 : i + 2 + n])
        i += 2 + n
    return out[: len(out) // 4] if QUICK else out


CORPUS = {"queries": _load("wire_queries.bin"), "answers": _load("wire_answers.bin")}

TARGETS = [
    (
        f"parse_message >= 50x dns.message.from_wire ({kind})",
        f"test_dnspython_from_wire[{kind}]",
        f"test_parse_message[{kind}]",
        ">=",
        50.0,
    )
    for kind in CORPUS
]


def _all(fn: Any, msgs: list[bytes]) -> None:
    for m in msgs:
        fn(m)


@pytest.mark.parametrize("kind", list(CORPUS))
def test_parse_message(benchmark: Any, kind: str) -> None:
    benchmark.group = f"wire parse: {kind} ({len(CORPUS[kind])} messages)"
    benchmark(_all, parse_message, CORPUS[kind])


@pytest.mark.parametrize("kind", list(CORPUS))
def test_dnspython_from_wire(benchmark: Any, kind: str) -> None:
    benchmark.group = f"wire parse: {kind} ({len(CORPUS[kind])} messages)"
    benchmark(_all, dns.message.from_wire, CORPUS[kind])


def test_resolve_answer(benchmark: Any) -> None:
    benchmark.group = f"wire parse: answers ({len(CORPUS['answers'])} messages)"
    benchmark(_all, resolve_answer, CORPUS["answers"])
