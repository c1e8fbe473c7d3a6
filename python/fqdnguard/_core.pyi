"""Typed stubs of the compiled module; checked against it with mypy.stubtest."""

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal, SupportsIndex, TypeAlias, final, overload

__all__ = [
    "CacheError",
    "Change",
    "ChangeList",
    "CompiledPolicy",
    "DnsCache",
    "Edns",
    "Engine",
    "FqdnGuardError",
    "Message",
    "PatternError",
    "PatternSet",
    "Question",
    "Record",
    "Verdict",
    "WireError",
    "YamlNode",
    "__version__",
    "compose_yaml",
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

    def __new__(
        cls,
        specs: list[Any],
        endpoints: list[Any] = ...,
        selects: Callable[[Any], list[int]] | None = None,
    ) -> CompiledPolicy: ...
    def identity(self, specs: list[int]) -> int: ...
    def identity_of(self, endpoint: Any) -> int: ...
    def is_restricted(self, identity: int) -> bool: ...
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
    def endpoint_dns_verdict(
        self,
        endpoint: Any | None,
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

class CacheError(FqdnGuardError, ValueError):
    """A cache operation was refused: a bad argument, or a snapshot that cannot be read/written."""

@final
class Change:
    """A change for the enforcement backend: `kind` is "added", "extended" or "removed"."""

    def __new__(
        cls,
        kind: Literal["added", "extended", "removed"],
        endpoint: int,
        ip: str | bytes,
        expires_at: float,
    ) -> Change: ...
    @property
    def kind(self) -> Literal["added", "extended", "removed"]: ...
    @property
    def endpoint(self) -> int: ...
    @property
    def ip(self) -> str: ...
    @property
    def expires_at(self) -> float: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class ChangeList(Sequence[Change]):
    """An immutable sequence of `Change`, kept packed in Rust; a `Change` object is made only when
    an item is read. Equal to a list of the same changes; empty (and falsy) when nothing changed."""

    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: SupportsIndex, /) -> Change: ...
    @overload
    def __getitem__(self, index: slice, /) -> ChangeList: ...
    def __iter__(self) -> Iterator[Change]: ...
    def __reversed__(self) -> Iterator[Change]: ...
    def __contains__(self, item: object, /) -> bool: ...
    def count(self, value: object, /) -> int: ...
    def index(self, value: object, start: int = 0, stop: int = ..., /) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...

@final
class DnsCache:
    """The FQDN -> IP TTL cache, safe to share between threads."""

    def __new__(
        cls, min_ttl: int = 0, max_ips_per_name: int = 1000, max_entries: int = 1_000_000
    ) -> DnsCache: ...
    @property
    def min_ttl(self) -> int: ...
    @property
    def max_ips_per_name(self) -> int: ...
    @property
    def max_entries(self) -> int: ...
    def record(
        self,
        endpoint: int,
        name: str | bytes,
        addrs: Iterable[tuple[str | bytes, int]],
        now: float | None = None,
    ) -> ChangeList: ...
    def record_many(
        self,
        endpoint: int,
        answers: Iterable[tuple[str | bytes, Iterable[tuple[str | bytes, int]]]],
        now: float | None = None,
    ) -> ChangeList: ...
    def lookup(self, name: str | bytes, endpoint: int | None = None) -> list[tuple[str, float]]: ...
    def names_for(self, ip: str | bytes, endpoint: int | None = None) -> list[str]: ...
    def allowed(self, endpoint: int, ip: str | bytes, now: float | None = None) -> bool: ...
    def expire(self, now: float | None = None) -> ChangeList: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | os.PathLike[str], now: float | None = None) -> DnsCache: ...
    def entries(self) -> list[tuple[int, str, str, float]]: ...
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, int]: ...

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

_LogRecord: TypeAlias = tuple[
    float, int | None, str, int, str, int, float | None, list[str]
]  # time, endpoint, qname, qtype, verdict, rcode, upstream_ms, answers

@final
class Engine:
    """The proxy's data path: one call per query, one per answer (see ``fqdnguard.proxy``)."""

    def __new__(
        cls,
        cache: DnsCache,
        *,
        reject: str = "refused",
        search_domains: list[str] = ...,
        max_inflight: int = 10000,
        timeout: float = 2.0,
        log_queries: str = "sampled",
        log_sample: float = 0.01,
    ) -> Engine: ...
    def set_policy(
        self,
        policy: CompiledPolicy,
        endpoints: dict[str, tuple[int, int | None]],
        unknown: tuple[int, int | None] | None = None,
    ) -> None: ...
    def query(
        self,
        src: str,
        server: str,
        port: int,
        tcp: bool,
        data: bytes,
        channel: int,
        now: float | None,
    ) -> tuple[int, bytes, int, _LogRecord | None]: ...
    def response(
        self, channel: int, data: bytes, now: float | None
    ) -> tuple[int, bytes, ChangeList, bool, bool, _LogRecord | None] | None: ...
    def sweep(self, now: float) -> list[tuple[int, bytes, int, _LogRecord | None]]: ...
    def expire(self, now: float) -> ChangeList: ...
    def programmed_state(self, now: float) -> ChangeList: ...
    def cancel(self, token: int) -> bool: ...
    def stats(self) -> dict[str, Any]: ...
