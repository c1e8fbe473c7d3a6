"""matchName / matchPattern semantics through the public Python API (Cilium 1.19+)."""

import fqdnguard
import pytest
from fqdnguard import FqdnGuardError, PatternError, PatternSet, validate_name, validate_pattern

MATCHES = [
    # (pattern, name, matches)
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "WWW.Example.COM.", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*example.com", "example.com", True),
    ("*example.com", "evil-example.com", True),
    ("*example.com", "x.example.com", False),
    ("sub*.example.com", "sub.example.com", True),
    ("sub*.example.com", "subway.example.com", True),
    ("sub*.example.com", "xsub.example.com", False),
    ("api-*-prod.x", "api-eu-prod.x", True),
    ("api-*-prod.x", "api-prod.x", False),
    ("**.cilium.io", "a.cilium.io", True),
    ("**.cilium.io", "a.b.cilium.io", True),
    ("**.cilium.io", "cilium.io", False),
    ("***.cilium.io", "x.y.z.cilium.io", True),
    ("x.**.io", "x.y.io", True),
    ("x.**.io", "x.y.z.io", False),
    ("a**b.io", "axyzb.io", True),
    ("*", "anything.example.org", True),
    ("**", "a.b.c", True),
    ("*.", "a.b", True),
    ("**.", "z", True),
    ("*", ".", True),
    ("Example.COM.", "example.com", True),
    ("example.com", "example.com.", True),
    ("example.com", "www.example.com", False),
    ("under_score.io", "UNDER_SCORE.io", True),
    # Labels are labels: an escaped dot or a NUL byte inside a label is never a boundary.
    ("a.b.example.com", "a\\.b.example.com", False),
    ("*.example.com", "a\\.b.example.com", False),
    ("**.example.com", "a\\.b.example.com", False),
    ("**.example.com", "x.a\\.b.example.com", False),
    ("a*.example.com", "a\\000.example.com", False),
    ("*", "a\\.b.example.com", True),
]


@pytest.mark.parametrize(("pattern", "name", "want"), MATCHES)
def test_match_semantics(pattern: str, name: str, want: bool) -> None:
    ps = PatternSet()
    ps.add(pattern, 1)
    assert ps.matches(name) is want
    assert ps.matches(name.encode()) is want
    assert ps.matching(name) == ([1] if want else [])


def test_match_name_is_exact() -> None:
    ps = PatternSet()
    ps.add_name("api.github.com", 9)
    assert ps.matching("API.GitHub.com.") == [9]
    assert ps.matching("x.api.github.com") == []
    assert ps.matching("github.com") == []


def test_issue_example() -> None:
    ps = PatternSet()
    ps.add("*.example.com", 7)
    ps.add_name("api.github.com", 9)
    assert ps.matches("WWW.Example.com.") is True
    assert ps.matching("www.example.com") == [7]
    assert len(ps) == 2
    assert validate_pattern("*.Example.com") == "*.example.com."
    assert validate_name("api.github.com") == "api.github.com."


def test_constructor_assigns_ids_in_order() -> None:
    ps = PatternSet(["*.example.com", "api.github.com", "**.example.com"])
    assert len(ps) == 3
    assert ps.matching("www.example.com") == [0, 2]
    assert ps.matching("a.b.example.com") == [2]
    assert ps.matching("api.github.com") == [1]


def test_ids_sorted_unique_across_entries() -> None:
    ps = PatternSet()
    for pattern, rule_id in [
        ("*.a.io", 5),
        ("x.a.io", 5),
        ("**.a.io", 2),
        ("*", 9),
        ("x*.a.io", 1),
    ]:
        ps.add(pattern, rule_id)
    assert ps.matching("x.a.io") == [1, 2, 5, 9]
    assert ps.matching("other.org") == [9]
    assert len(ps) == 5


def test_empty_set() -> None:
    ps = PatternSet()
    assert len(ps) == 0
    assert ps.matches("example.com") is False
    assert ps.matching(".") == []


@pytest.mark.parametrize(
    ("pattern", "normal"),
    [
        ("*.Example.com", "*.example.com."),
        ("example.com.", "example.com."),
        ("*", "*"),
        ("**", "**."),
        ("*.", "*."),
        ("**.cilium.io", "**.cilium.io."),
    ],
)
def test_normal_form(pattern: str, normal: str) -> None:
    assert validate_pattern(pattern) == normal


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "it is empty"),
        (".", "empty label at position 0"),
        (".example.com", "empty label at position 0"),
        ("a..b", "empty label at position 2"),
        ("example.com..", "empty label at position 12"),
        ("exa mple.com", "character ' ' at position 3 is not allowed"),
        ("a/b.com", "character '/' at position 1 is not allowed"),
        ("[a].com", "character '[' at position 0 is not allowed"),
        ("a" * 256, "256 characters, more than the 255 allowed"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match="invalid matchPattern") as info:
        validate_pattern(pattern)
    assert message in str(info.value)
    with pytest.raises(PatternError):
        PatternSet().add(pattern, 0)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("*.example.com", "'*' at position 0 is not allowed in a matchName"),
        ("api.*", "'*' at position 4"),
        ("a..b", "empty label at position 2"),
        ("", "it is empty"),
        ("a b", "character ' ' at position 1"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    with pytest.raises(PatternError, match="invalid matchName") as info:
        validate_name(name)
    assert message in str(info.value)
    with pytest.raises(PatternError):
        PatternSet().add_name(name, 0)


def test_longest_allowed_pattern() -> None:
    text = ".".join(["a" * 63] * 4)
    assert len(text) == 255
    assert validate_name(text) == text + "."


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a..com", "empty label at position 2"),
        ("", "it is empty"),
        ("a" * 64 + ".com", "label at position 0 is 64 bytes long"),
        ("a\\", "bad escape at position 1"),
        ("a\\300", "bad escape"),
        (".".join(["a" * 63] * 4) + ".b", "more than 255"),
    ],
)
def test_malformed_names_to_match(name: str, message: str) -> None:
    ps = PatternSet(["*"])
    with pytest.raises(PatternError, match="invalid name") as info:
        ps.matches(name)
    assert message in str(info.value)


def test_wrong_types() -> None:
    ps = PatternSet(["*.example.com"])
    with pytest.raises(TypeError, match="str or bytes, not int"):
        ps.matches(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ps.add(b"*.example.com", 1)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        ps.add("x.com", -1)
    with pytest.raises(OverflowError):
        ps.add("x.com", 2**32)


def test_exception_hierarchy() -> None:
    assert issubclass(PatternError, FqdnGuardError)
    assert issubclass(PatternError, ValueError)
    assert issubclass(FqdnGuardError, Exception)
    assert PatternError.__module__ == "fqdnguard"
    with pytest.raises(ValueError):
        validate_pattern("bad pattern")


def test_public_api() -> None:
    assert set(fqdnguard.__all__) <= set(dir(fqdnguard))
    assert fqdnguard.__version__
    assert repr(PatternSet(["a.com"])) == "PatternSet(<1 entries>)"
