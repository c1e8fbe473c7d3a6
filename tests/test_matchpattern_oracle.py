"""Cilium's own code as the oracle of toFQDNs matching.

``tools/cilium/matchpattern`` is a small Go program built against Cilium v1.19.0's
``pkg/fqdn/matchpattern`` and ``pkg/policy/api``: for a matchName or matchPattern selector and a
queried name it answers what Cilium does (the CRD schema and the agent's validation of the
selector; the DNS proxy's verdict on the name as it reads it from the wire). Hypothesis generates
selectors (wildcards, ``**.``, case, trailing dots, characters Cilium refuses) and names (escaped
labels, decimal escapes, case, trailing dots) and compares fqdnguard with it twice: the Rust
suffix trie (``PatternSet``) and the policy's DNS-rule verdict (``Policy.dns_verdict``).

docs/policy.md ("Checked against Cilium's own code") says what is compared; a difference kept on
purpose would be written down there, with its reason, and excepted here by name.

The Go program is built once per machine into the cache (``make go-build``); where Go is missing
the tests skip, saying so, except under CI (CI set), where that fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from fqdnguard import (
    Endpoint,
    Endpoints,
    PatternError,
    PatternSet,
    Policy,
    validate_name,
    validate_pattern,
)
from hypothesis import example, given
from hypothesis import strategies as st

from tests.test_pattern_property import presentation
from tools import gobuild

PROGRAM = "cilium-matchpattern"
SERVER = "10.0.0.53"
WEB = Endpoint.create(
    id=1, name="web", namespace="default", ips=["10.1.0.1"], labels={"app": "web"}
)
ENDPOINTS = Endpoints([WEB])


class Oracle:
    """The Go program as a child process: a batch of requests in, as many answers out."""

    def __init__(self, binary: str) -> None:
        self.proc = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1 << 16
        )

    def ask(self, requests: list[tuple[str, str, str]]) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        for kind, selector, name in requests:
            assert "\t" not in selector + name and "\n" not in selector + name
            self.proc.stdin.write(f"{kind}\t{selector}\t{name}\n")
        self.proc.stdin.flush()
        answers = [self.proc.stdout.readline().rstrip("\n") for _ in requests]
        assert all(answers), f"the oracle stopped answering (exit {self.proc.poll()})"
        return answers

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def oracle_binary() -> str:
    """The cached build, built here when Go is installed; a skip (a failure under CI) without Go."""
    if gobuild.is_built(PROGRAM):
        return str(gobuild.binary_path(PROGRAM))
    if gobuild.go_binary() is None:
        reason = (
            "Go is not installed: the oracle (tools/cilium/matchpattern, Cilium's own "
            "pkg/fqdn/matchpattern) is built from the Go module proxy with it (make go-build)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(gobuild.build(PROGRAM))


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    o = Oracle(oracle_binary())
    yield o
    o.close()


def fqdnguard_valid(kind: str, selector: str) -> bool:
    try:
        (validate_pattern if kind == "pattern" else validate_name)(selector)
    except PatternError:
        return False
    return True


def trie_allows(kind: str, selector: str, name: str) -> bool | None:
    """The suffix trie's verdict; None when fqdnguard refuses the name itself."""
    ps = PatternSet()
    (ps.add if kind == "pattern" else ps.add_name)(selector, 0)
    try:
        return ps.matches(name)
    except ValueError:
        return None


def policy_for(kind: str, selector: str) -> Policy:
    key = "matchPattern" if kind == "pattern" else "matchName"
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "oracle", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "web"}},
            "egress": [
                {
                    "toCIDR": [f"{SERVER}/32"],
                    "toPorts": [
                        {
                            "ports": [{"port": "53", "protocol": "ANY"}],
                            "rules": {"dns": [{key: selector}]},
                        }
                    ],
                }
            ],
        },
    }
    # JSON is YAML: the selector's text reaches the policy reader exactly.
    return Policy.from_yaml(json.dumps(doc), endpoints=ENDPOINTS)


def policy_allows(policy: Policy, name: str) -> bool | None:
    try:
        return policy.dns_verdict(WEB, SERVER, 53, "UDP", name).allowed
    except ValueError:
        return None


# --- what hypothesis generates ---------------------------------------------------------------

PIECES = ["a", "b", "ab", "x-", "_", "0", "A", "Zz", "-", "api", "*", "**", "***"]
ODD = ["é", " ", "\\", "$", "/"]
label = st.lists(
    st.one_of(st.sampled_from(PIECES), st.sampled_from(ODD)),
    min_size=1,
    max_size=4,
).map("".join)
plain_label = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join)
selector_text = st.one_of(
    st.builds(
        lambda prefix, labels, dot: prefix + ".".join(labels) + dot,
        st.sampled_from(["", "", "", "**.", "***.", "*.", "."]),
        st.lists(st.one_of(plain_label, plain_label, label, st.just("")), min_size=1, max_size=4),
        st.sampled_from(["", "", ".", ".."]),
    ),
    st.sampled_from(["*", "**", "*.", "**.", "***", ".", "", "a" * 64 + ".com", "a." * 127]),
)

NAME_BYTES = [b"a", b"b", b"ab", b"x-", b"_", b"0", b"A", b"API", b"-", b".", b"\\", b"\x00", b"*"]
wire_label = st.lists(st.sampled_from(NAME_BYTES), min_size=1, max_size=4).map(b"".join)


def decimal_escapes(text: str, which: list[bool]) -> str:
    """The same name with some letters and digits written as RFC 1035 \\DDD escapes."""
    out, flags = [], iter(which)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":  # keep existing escapes whole
            j = i + (4 if text[i + 1 : i + 2].isdigit() else 2)
            out.append(text[i:j])
            i = j
            continue
        out.append(f"\\{ord(c):03d}" if c.isalnum() and next(flags, False) else c)
        i += 1
    return "".join(out)


def filled(selector: str, fills: list[str]) -> list[bytes]:
    """A name made from the selector by filling its wildcards, so that matches are common."""
    fill = iter(fills)
    labels = []
    for part in selector.strip(".").split("."):
        if part.startswith("**") and not labels:
            labels += [next(fill, "x").encode() or b"deep", b"sub"]
            continue
        text = "".join(next(fill, "") if c == "*" else c for c in part)
        labels.append(text.encode("utf-8", "replace") or b"z")
    return labels


@st.composite
def names_for(draw: st.DrawFn, selector: str) -> list[str]:
    """Names to ask about: some made from the selector, some at random, in several spellings."""
    made = [
        filled(selector, draw(st.lists(st.sampled_from(["", "a", "b-", "_0", "Q", "x.y"]))))
        for _ in range(draw(st.integers(1, 3)))
    ]
    made += draw(st.lists(st.lists(wire_label, min_size=0, max_size=5), max_size=3))
    out = []
    for labels in made:
        text = presentation(labels)
        if draw(st.booleans()):
            text = text.upper() if draw(st.booleans()) else text.swapcase()
        if draw(st.booleans()) and text != ".":
            text = text[:-1]  # no trailing dot
        if draw(st.booleans()):
            text = decimal_escapes(text, draw(st.lists(st.booleans(), max_size=12)))
        out.append(text)
    return out


# matchName selectors are mostly drawn without stars, which Cilium refuses in them.
selector = st.one_of(
    st.tuples(st.just("pattern"), selector_text),
    st.tuples(
        st.just("name"),
        st.one_of(selector_text.map(lambda s: s.replace("*", "")), selector_text),
    ),
)
cases = selector.flatmap(lambda ks: st.tuples(st.just(ks[0]), st.just(ks[1]), names_for(ks[1])))


def compare(oracle: Oracle, kind: str, selector: str, names: list[str]) -> None:
    answers = oracle.ask([(kind, selector, name) for name in names])
    cilium_valid = not answers[0].startswith("invalid")
    valid = fqdnguard_valid(kind, selector)
    assert valid == cilium_valid, (
        f"{kind} {selector!r}: Cilium {'accepts' if cilium_valid else 'refuses'} it "
        f"({answers[0]}), fqdnguard {'accepts' if valid else 'refuses'} it"
    )
    if not valid:
        return
    policy = policy_for(kind, selector)
    for name, answer in zip(names, answers, strict=True):
        trie, verdict = trie_allows(kind, selector, name), policy_allows(policy, name)
        assert trie == verdict or (trie is None and verdict is False), (kind, selector, name)
        if answer.startswith("badname"):
            # No such query reaches Cilium's proxy; fqdnguard must not admit it either.
            assert not verdict, (kind, selector, name, answer)
            continue
        want = answer == "allow"
        assert bool(verdict) == want, (
            f"{kind} {selector!r} on {name!r}: Cilium says {answer}, fqdnguard "
            f"{'allows' if verdict else 'denies'} (trie {trie})"
        )


@given(cases)
@example(("pattern", "*.example.com", ["a.example.com", "A.EXAMPLE.COM.", "example.com"]))
@example(("pattern", "**.example.com", ["example.com", "a.b.example.com", "\\097.example.com"]))
@example(("name", "example.com.", ["EXAMPLE.com", "example.com.", "\\.example.com"]))
@example(("pattern", "*", [".", "a.b", "a\\.b.c"]))
@example(("pattern", "a*b.c", ["ab.c", "a-b.c", "a.b.c", "a\\.b.c", "a\\000b.c"]))
@example(("pattern", "**.", ["a.", "."]))
def test_fqdnguard_agrees_with_cilium(oracle: Oracle, case: tuple[str, str, list[str]]) -> None:
    compare(oracle, *case)
