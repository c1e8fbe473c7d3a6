"""Property tests: the suffix trie against a straightforward regex reference.

The reference builds one anchored regex per pattern the way Cilium's matchpattern package does
(`*` -> `[-a-zA-Z0-9_]*`, a leading `**.` -> one or more whole labels, patterns made only of stars
match everything) and matches it against the lower-cased presentation form of the name, which is
what Cilium's DNS proxy does. It lives here only; the product never uses regexes.
"""

from __future__ import annotations

import re

from fqdnguard import PatternSet
from hypothesis import given
from hypothesis import strategies as st

CLASS = "[-a-z0-9_]"


def reference_regex(pattern: str) -> re.Pattern[str] | None:
    """None means match-all."""
    p = pattern.lower()
    if re.fullmatch(r"\*+\.?", p):
        return None
    if not p.endswith("."):
        p += "."
    out = ""
    multi = re.match(r"\*{2,}\.", p)
    if multi:
        out += f"(?:{CLASS}+[.])+"
        p = p[multi.end() :]
    for part in re.split(r"(\*+)", p):
        if part.startswith("*"):
            out += CLASS + "*"
        else:
            out += part.replace(".", "[.]")
    return re.compile("^" + out + "$")


def presentation(labels: list[bytes]) -> str:
    """Name in presentation form, escaping like RFC 1035 5.1 (and dnspython)."""
    if not labels:
        return "."
    text = []
    for label in labels:
        chunk = ""
        for b in label:
            c = chr(b)
            if c in '."\\()@;$ ':
                chunk += "\\" + c
            elif 0x21 <= b <= 0x7E:
                chunk += c
            else:
                chunk += f"\\{b:03d}"
        text.append(chunk)
    return ".".join(text) + "."


def reference_matches(pattern: str, name_labels: list[bytes]) -> bool:
    rx = reference_regex(pattern)
    if rx is None:
        return True
    return rx.match(presentation(name_labels).lower()) is not None


LITERAL = st.sampled_from(["a", "b", "ab", "x-", "_", "0", "A", "B", "api", "-"])
label_pattern = st.lists(
    st.one_of(LITERAL, st.just("*"), st.just("**")), min_size=1, max_size=4
).map("".join)
pattern_strategy = st.one_of(
    st.builds(
        lambda prefix, labels, dot: prefix + ".".join(labels) + dot,
        st.sampled_from(["", "", "", "**.", "***."]),
        st.lists(label_pattern, min_size=1, max_size=4),
        st.sampled_from(["", "."]),
    ),
    st.sampled_from(["*", "**", "*.", "**."]),
)
name_byte_label = st.lists(
    st.sampled_from(
        [b"a", b"b", b"ab", b"x-", b"_", b"0", b"A", b"API", b"-", b".", b"\\", b"\x00", b"!"]
    ),
    min_size=1,
    max_size=4,
).map(b"".join)
name_strategy = st.lists(name_byte_label, min_size=0, max_size=6)


def concretize(pattern: str, draw_fill: list[str]) -> list[bytes]:
    """A name built from a pattern by filling its wildcards, so matches are common."""
    fills = iter(draw_fill)
    p = pattern
    if re.fullmatch(r"\*+\.?", p):
        return [b"any", b"thing"]
    if p.endswith("."):
        p = p[:-1]
    m = re.match(r"\*{2,}\.", p)
    labels: list[bytes] = []
    if m:
        labels += [b"deep", next(fills, "x").encode() or b"y"]
        p = p[m.end() :]
    for label in p.split("."):
        out = re.sub(r"\*+", lambda _: next(fills, ""), label)
        labels.append(out.encode() or b"z")
    return labels


@given(pattern_strategy, name_strategy)
def test_single_pattern_matches_reference(pattern: str, name: list[bytes]) -> None:
    ps = PatternSet([pattern])
    assert ps.matches(presentation(name)) is reference_matches(pattern, name), (pattern, name)


@given(
    pattern_strategy, st.lists(st.sampled_from(["", "a", "b-", "_0", "AB", "x.y", "é"]), max_size=6)
)
def test_filled_pattern_matches_reference(pattern: str, fills: list[str]) -> None:
    name = concretize(pattern, fills)
    ps = PatternSet([pattern])
    assert ps.matches(presentation(name)) is reference_matches(pattern, name), (pattern, name)


@given(
    st.lists(st.tuples(pattern_strategy, st.integers(0, 20), st.booleans()), max_size=12),
    st.lists(name_strategy, min_size=1, max_size=8),
)
def test_pattern_sets_with_ids_match_reference(
    entries: list[tuple[str, int, bool]], names: list[list[bytes]]
) -> None:
    ps = PatternSet()
    for pattern, rule_id, as_name in entries:
        if as_name and "*" not in pattern:
            ps.add_name(pattern, rule_id)
        else:
            ps.add(pattern, rule_id)
    assert len(ps) == len(entries)
    for name in names:
        want = sorted(
            {rule_id for pattern, rule_id, _ in entries if reference_matches(pattern, name)}
        )
        text = presentation(name)
        assert ps.matching(text) == want, (entries, name)
        assert ps.matches(text) is bool(want)
