"""Typed stubs of the compiled module; checked against it with mypy.stubtest."""

from typing import Any, final

__all__ = [
    "CompiledPolicy",
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "Verdict",
    "YamlNode",
    "__version__",
    "compose_yaml",
    "validate_name",
    "validate_pattern",
]

__version__: str

class FqdnGuardError(Exception):
    """Base class of every error fqdnguard raises."""

class PatternError(FqdnGuardError, ValueError):
    """A matchName, matchPattern or DNS name is malformed; the message says what and where."""

@final
class PatternSet:
    """matchName / matchPattern entries compiled into a suffix trie, each with a rule id."""

    def __new__(cls, patterns: list[str] | None = None) -> PatternSet: ...
    def add(self, pattern: str, id: int) -> None: ...
    def add_name(self, name: str, id: int) -> None: ...
    def matches(self, name: str | bytes) -> bool: ...
    def matching(self, name: str | bytes) -> list[int]: ...
    def __len__(self) -> int: ...

def validate_pattern(pattern: str) -> str: ...
def validate_name(name: str) -> str: ...

@final
class CompiledPolicy:
    """Egress rules compiled for verdicts; ``fqdnguard.Policy`` is the public face."""

    def __new__(cls, specs: list[Any]) -> CompiledPolicy: ...
    def identity(self, specs: list[int]) -> int: ...
    @property
    def identity_count(self) -> int: ...
    def dns_verdict(
        self,
        identity: int | None,
        server: str | None,
        port: int,
        protocol: str,
        qname: str | bytes,
    ) -> Verdict: ...
    def egress_verdict(
        self,
        identity: int | None,
        ip: str,
        port: int,
        protocol: str,
        names: list[str] | list[bytes] | list[str | bytes],
    ) -> Verdict: ...
    def __len__(self) -> int: ...

@final
class Verdict:
    """A DNS or egress decision that can explain itself."""

    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def rule_index(self) -> int | None: ...
    @property
    def selector(self) -> str | None: ...
    @property
    def kind(self) -> str: ...
    def __bool__(self) -> bool: ...

@final
class YamlNode:
    """One YAML node: ``kind`` 0 scalar, 1 sequence, 2 mapping; ``tag`` as PyYAML resolves it;
    ``value`` the scalar's text, the sequence's items (a list) or the mapping's string-keyed
    fields (a dict); ``line`` (1-based) where it starts; ``key_line`` the line of its key when it
    is a mapping value (else 0); ``pairs`` the mapping's (key, value) nodes in order when a key is
    not a string or is repeated (``value`` then holds the first of each string key), else None."""

    @property
    def kind(self) -> int: ...
    @property
    def tag(self) -> str: ...
    @property
    def value(self) -> Any: ...
    @property
    def line(self) -> int: ...
    @property
    def key_line(self) -> int: ...
    @property
    def pairs(self) -> list[tuple[YamlNode, YamlNode]] | None: ...

def compose_yaml(text: str) -> tuple[list[YamlNode], tuple[int, str] | None]: ...
