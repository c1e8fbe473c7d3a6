"""The Rust YAML composer against PyYAML's compose (the reference): tags, values, structure and
lines over generated documents and a corpus of tricky scalars."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from fqdnguard._core import YamlNode, compose_yaml
from hypothesis import given
from hypothesis import strategies as st

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STR = "tag:yaml.org,2002:str"


def ref(node: Any) -> Any:
    """PyYAML's node as plain data: (kind, tag, value or children, line)."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        return ("scalar", node.tag, node.value, line)
    if isinstance(node, yaml.SequenceNode):
        return ("seq", node.tag, [ref(c) for c in node.value], line)
    return ("map", node.tag, [(ref(k), ref(v), k.start_mark.line + 1) for k, v in node.value], line)


def ours(node: YamlNode) -> Any:
    if node.kind == 0:
        return ("scalar", node.tag, node.value, node.line)
    if node.kind == 1:
        return ("seq", node.tag, [ours(c) for c in node.value], node.line)
    if node.pairs is not None:
        pairs = [(ours(k), ours(v), k.line) for k, v in node.pairs]
    else:
        # String keys only, none repeated: the key's line is on the value.
        pairs = [
            (("scalar", STR, k, v.key_line), ours(v), v.key_line) for k, v in node.value.items()
        ]
    return ("map", node.tag, pairs, node.line)


def same(text: str) -> None:
    try:
        want = [ref(d) for d in yaml.compose_all(text, Loader=_Loader)]
    except yaml.YAMLError:
        want = None
    docs, err = compose_yaml(text)
    if err is not None:
        assert isinstance(err[0], int) and err[0] >= 1 and err[1]
    if want is None:
        # The parser follows YAML 1.2's syntax, which accepts a few documents PyYAML's 1.1
        # scanner refuses (`:` inside a flow plain scalar, a redefined anchor, ...).
        return
    assert err is None, f"we reject {text!r}: {err}"
    assert [ours(d) for d in docs] == want


TRICKY = [
    "",
    "~",
    "null",
    "Null",
    "NULL",
    "nULL",
    "yes",
    "Yes",
    "YES",
    "yEs",
    "no",
    "No",
    "NO",
    "true",
    "True",
    "TRUE",
    "false",
    "on",
    "On",
    "ON",
    "off",
    "Off",
    "OFF",
    "y",
    "n",
    "Y",
    "0",
    "-0",
    "+0",
    "00",
    "017",
    "0_17",
    "08",
    "0b1010",
    "0b",
    "-0b1_0",
    "0x1F",
    "0xg",
    "0X1F",
    "0o17",
    "1_000",
    "1__0",
    "1:30",
    "-1:30",
    "190:20:30",
    "0:30",
    "1:60",
    "1:5",
    "1:05:",
    "1.5",
    "1.",
    ".5",
    "-.5",
    "1e5",
    "1.0e+5",
    "1.0E-5",
    "1.0e5",
    "1_0.0_1",
    "190:20:30.15",
    ".inf",
    "-.Inf",
    "+.INF",
    ".nan",
    ".NaN",
    "+.nan",
    "inf",
    "nan",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 -5",
    "2001-1-4 1:59:43",
    "2001-12-14 21:59:43 ",
    "2001-12-14 21:59",
    "2001-12-14T21:59:43Z",
    "2001-12-14 21:59:43 +1:00",
    "<<",
    "=",
    "53",
    "443",
    "53/udp",
    "api.github.com",
    "*.example.com",
    "**.cdn.net",
    "k8s:io.kubernetes.pod.namespace",
    "10.96.0.10",
    "fd00::1",
    "10.0.0.0/8",
    "-",
    "a b",
    "é",
]


@pytest.mark.parametrize("scalar", TRICKY)
def test_tricky_scalar(scalar: str) -> None:
    quoted = json.dumps(scalar)
    single = "'" + scalar.replace("'", "''") + "'"
    texts = [
        f"k: {scalar}\n",
        f"- {scalar}\n",
        f"k: {quoted}\n",
        f"k: {single}\n",
        f"k: ! {quoted}\n",
        f"k: !!str {scalar}\n",
    ]
    if scalar != "-":  # YAML 1.2 (saphyr) refuses `[-]`, which PyYAML reads as "-"
        texts.append(f"[{scalar}]\n")
    for text in texts:
        same(text)


DOCS = [
    "a:\n",
    "a: ~\n",
    "- \n- x\n",
    "a: &x\n  b: 1\n",
    "a: |\n  x\n  y\n",
    "a: >-\n  x\n\n  y\n",
    "a: !!null\n",
    "- !!str\n- !!map {}\n",
    "--- !!set\n? a\n",
    "{a: 1, b}\n",
    "[~, ]\n",
    "a: # c\n  &x # d\n  # e\n  b: 1\n",
    "é: # ü\n  !!str x\n",
    "- [a, &x b, !!str c, ~]\n",
    "- {? &k a : ~, b: }\n",
    "a: |  # comment\n  x\n",
    "- ? a\n  : b\n",
    "a:\n  - &x\n    - 1\n",
    "? [1]\n: 2\n",
    "a: 1\na: 2\n",
    "a: !foo x\n",
    "a: !<tag:x> y\n",
    "a: ! 12\n",
    "%TAG !e! tag:e.com,2000:\n---\na: !e!x y\n",
    "a: 'it''s'\n",
    'a: "\\x41\\u263a"\n',
    "---\n",
    "",
    "--- 1\n--- 2\n",
    "a: [1, {b: c}]\n",
    "a: b\n  c\n",
    "<<: {a: 1}\n",
    "a: [1\n",
    "a: 'x\n",
    "a: *y\n",
    "a: b: c\n",
    "- - - a\n",
    "a: @x\n",
    "a:\n- 1\n- 2\n",
    "key: value # c\n",
    'a: "x\n  y"\n',
    "a: \x07\n",
    "x: 1\n--- {y: [2\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_documents(text: str) -> None:
    same(text)


def test_aliases_share_the_anchored_node() -> None:
    (doc,), err = compose_yaml("a: &x [1]\nb: *x\n")
    assert err is None
    assert doc.value["a"] is doc.value["b"]


def test_recursive_alias_and_deep_nesting_are_errors_not_crashes() -> None:
    _, err = compose_yaml("a: &x [*x]\n")
    assert err is not None and err[0] == 1
    _, err = compose_yaml("[" * 600 + "]" * 600)
    assert err is not None
    _, err = compose_yaml("- " * 600 + "x\n")
    assert err is not None


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: [1\n", 2),
        ("a: 'x\n", 1),
        ("a: *y\n", 1),
        ("a: b: c\n", 1),
        ("a: \x07\n", 1),
        ("x: 1\ny: @\n", 2),
    ],
)
def test_syntax_errors_name_a_line(text: str, line: int) -> None:
    docs, err = compose_yaml(text)
    assert docs == [] and err is not None
    assert err[0] == line, err


def test_error_keeps_the_documents_before_it() -> None:
    docs, err = compose_yaml("a: 1\n---\nb: [\n")
    assert [d.value["a"].value for d in docs] == ["1"]
    assert err is not None and err[0] >= 3


# YAML 1.1 (PyYAML) also breaks lines at NEL, LS and PS; YAML 1.2 (saphyr) does not.
texts = st.text(st.characters(exclude_characters="\x85\u2028\u2029"), max_size=8)
scalars = st.one_of(
    st.sampled_from(TRICKY),
    st.text(alphabet="0123456789abcxyzeEoO-+._:~ <=!&*#'\"\\\n\t", max_size=12),
    texts,
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts | scalars, inner, max_size=4),
    max_leaves=12,
)


@given(
    values,
    st.sampled_from([None, True, False]),
    st.booleans(),
    st.integers(min_value=2, max_value=6),
    st.sampled_from([None, "'", '"', "|", ">"]),
)
def test_generated_documents(
    value: Any, flow: bool | None, start: bool, indent: int, style: str | None
) -> None:
    try:
        text = yaml.safe_dump(
            value,
            default_flow_style=flow,
            explicit_start=start,
            indent=indent,
            default_style=style,
            allow_unicode=True,
        )
    except yaml.YAMLError:
        return
    same(text)
    same(text + "---\n" + text)


@given(st.text(alphabet="0123456789abefnotuxyENOTY-+._: <=~\t", max_size=14))
def test_implicit_resolution_of_any_text(s: str) -> None:
    # `!` on a quoted scalar makes PyYAML resolve it like a plain one: any text, no syntax limits.
    same(f"k: ! {json.dumps(s)}\n")
