"""Typed stubs of the compiled module; checked against it with mypy.stubtest."""

from typing import Any, TypeAlias, final

__all__ = [
    "CompiledPolicy",
    "Edns",
    "FqdnGuardError",
    "Message",
    "PatternError",
    "PatternSet",
    "Question",
    "Record",
    "Verdict",
    "WireError",
    "__version__",
    "make_error_response",
    "parse_message",
    "resolve_answer",
    "validate_name",
    "validate_pattern",
]

__version__: str

class FqdnGuardError(Exception):
    """Base class of every error fqdnguard raises."""

class PatternError(FqdnGuardError, ValueError):
    """A matchName, matchPattern or DNS name is malformed; the message says what and where."""

class WireError(FqdnGuardError, ValueError):
    """A DNS message is malformed or cannot be answered as asked; the message says what, where."""

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
class Question:
    """One question of a message."""

    @property
    def name(self) -> str: ...
    @property
    def qtype(self) -> int: ...
    @property
    def qclass(self) -> int: ...

_RData: TypeAlias = (
    str
    | tuple[int, str]
    | tuple[int, int, int, str]
    | tuple[str, str, int, int, int, int, int]
    | list[bytes]
    | bytes
)

@final
class Record:
    """One resource record; `rdata` is decoded for the common types (see `parse_message`)."""

    @property
    def name(self) -> str: ...
    @property
    def rtype(self) -> int: ...
    @property
    def rclass(self) -> int: ...
    @property
    def ttl(self) -> int: ...
    @property
    def rdata(self) -> _RData: ...

@final
class Edns:
    """The EDNS0 OPT pseudo-record of a message."""

    @property
    def udp_size(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def dnssec_ok(self) -> bool: ...
    @property
    def ext_rcode(self) -> int: ...
    @property
    def options(self) -> list[tuple[int, bytes]]: ...

@final
class Message:
    """A parsed DNS message. Immutable; the section lists are fresh copies on each access."""

    @property
    def id(self) -> int: ...
    @property
    def opcode(self) -> int: ...
    @property
    def rcode(self) -> int: ...
    @property
    def qr(self) -> bool: ...
    @property
    def aa(self) -> bool: ...
    @property
    def tc(self) -> bool: ...
    @property
    def rd(self) -> bool: ...
    @property
    def ra(self) -> bool: ...
    @property
    def ad(self) -> bool: ...
    @property
    def cd(self) -> bool: ...
    @property
    def questions(self) -> list[Question]: ...
    @property
    def answers(self) -> list[Record]: ...
    @property
    def authority(self) -> list[Record]: ...
    @property
    def additional(self) -> list[Record]: ...
    @property
    def edns(self) -> Edns | None: ...

def parse_message(data: bytes) -> Message: ...
def make_error_response(query: bytes, rcode: int) -> bytes: ...
def resolve_answer(data: bytes) -> tuple[str, list[tuple[str, int]], list[str]]: ...
