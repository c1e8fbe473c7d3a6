"""Typed stubs of the compiled module; checked against it with mypy.stubtest."""

from typing import final

__all__ = [
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "__version__",
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
