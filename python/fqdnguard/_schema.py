"""Reading YAML as Kubernetes does, keeping line numbers: typed field access over the nodes of
``fqdnguard._core.compose_yaml`` (a Rust composer resolving tags as PyYAML does, YAML 1.1).

Every problem becomes a :class:`PolicyError` naming the file, the line, the field path
(``spec.egress[0].toFQDNs[1].matchPattern``) and the reason; every valid feature fqdnguard does
not enforce becomes a :class:`PolicyWarning`. A :class:`Reader` collects both, so a lint run
lists every problem at once.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fqdnguard._core import FqdnGuardError, YamlNode, compose_yaml

SCALAR, SEQUENCE, MAPPING = 0, 1, 2
STR = "tag:yaml.org,2002:str"
NULL = "tag:yaml.org,2002:null"

_TAGS = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a timestamp",
}


class PolicyError(FqdnGuardError, ValueError):
    """A policy or endpoints file is invalid: ``file``, ``line``, ``path`` and ``reason`` say
    where and why. When a load found several problems, ``errors`` lists them all (this one
    first)."""

    file: str
    line: int
    path: str
    reason: str
    errors: list[PolicyError]

    def __init__(self, file: str, line: int, path: str, reason: str) -> None:
        self.file, self.line, self.path, self.reason = file, line, path, reason
        self.errors = [self]
        super().__init__(self.location())

    def location(self) -> str:
        """``file:line: path: reason``; a problem of the whole file (missing, unreadable) has
        no line (0) and reads ``file: reason``."""
        where = f"{self.path}: " if self.path else ""
        line = f":{self.line}" if self.line else ""
        return f"{self.file}{line}: {where}{self.reason}"

    def __str__(self) -> str:
        more = len(self.errors) - 1
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
        return self.location() + tail

    @classmethod
    def of(cls, errors: list[PolicyError]) -> PolicyError:
        """The first error, carrying the whole list."""
        first = errors[0]
        first.errors = list(errors)
        return first


@dataclass(frozen=True)
class PolicyWarning:
    """A valid feature that fqdnguard loads but does not enforce."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: not enforced by fqdnguard: {self.message}"


def read_problem(e: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, in words rather than an errno."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start})"
    if isinstance(e, FileNotFoundError):
        return "no such file or directory"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read: {e.strerror or e}"


def kind_of(node: YamlNode) -> str:
    if node.kind == MAPPING:
        return "an object"
    if node.kind == SEQUENCE:
        return "a list"
    return _TAGS.get(node.tag, f"a value tagged {node.tag}")


def line_of(node: YamlNode) -> int:
    return node.line


def is_null(node: YamlNode | None) -> bool:
    return node is None or (node.kind == SCALAR and node.tag == NULL)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Loading allocates hundreds of thousands of containers and frees none, which makes the
    cyclic GC rescan the growing heap over and over (more than half the load time); loading
    creates no reference cycles, so the collector is paused around it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_TRUE = frozenset({"yes", "true", "on"})
_FALSE = frozenset({"no", "false", "off"})


class Reader:
    """Typed access to the nodes of one file; problems are collected, not raised."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[PolicyError] = []
        self.warnings: list[PolicyWarning] = []
        #: (is_pattern, text) selectors already validated: each text is checked once.
        self.valid_names: set[tuple[bool, str]] = set()

    @staticmethod
    def line(node: YamlNode) -> int:
        # A field's problems are reported at its key's line (a block list starts on the next).
        return node.key_line or node.line

    def error(self, node: YamlNode | int, path: str, reason: str) -> None:
        line = node if isinstance(node, int) else node.key_line or node.line
        self.errors.append(PolicyError(self.file, line, path, reason))

    def warn(self, node: YamlNode, path: str, message: str) -> None:
        self.warnings.append(PolicyWarning(self.file, self.line(node), path, message))

    def documents(self, text: str) -> Iterator[YamlNode]:
        """The documents, then a syntax error (if any) reported after the ones before it."""
        docs, err = compose_yaml(text)
        yield from docs
        if err is not None:
            self.error(err[0], "", f"invalid YAML: {err[1]}")

    def mapping(
        self, node: YamlNode, path: str, fields: frozenset[str] | None
    ) -> dict[str, YamlNode] | None:
        """The fields of an object (None fields: any key), or None after reporting why not.
        An unknown, repeated or non-string key is reported, and the known fields are still
        returned so that their own problems are reported too (the errors make the load fail).
        The dict is the node's own when every key is fine: callers read it, never change it."""
        if node.kind != MAPPING:
            self.error(node, path, f"must be an object, not {kind_of(node)}")
            return None
        out: dict[str, YamlNode] = node.value
        pairs = node.pairs
        if pairs is None:
            if fields is None or out.keys() <= fields:
                return out
            # Some field is unknown: report each, in order, at its key's line.
            known = ", ".join(sorted(fields))
            for name, value in out.items():
                if name not in fields:
                    sub = f"{path}.{name}" if path else name
                    self.error(
                        value.key_line, sub, f"unknown field {name!r} (known fields: {known})"
                    )
            return {k: v for k, v in out.items() if k in fields}
        seen: set[str] = set()
        for key, _ in pairs:
            if not (key.kind == SCALAR and key.tag == STR):
                self.error(key, path, f"field names must be strings, not {kind_of(key)}")
                continue
            name = key.value
            sub = f"{path}.{name}" if path else name
            if name in seen:
                self.error(key, sub, "duplicate field")
            elif fields is not None and name not in fields:
                known = ", ".join(sorted(fields))
                self.error(key, sub, f"unknown field {name!r} (known fields: {known})")
            seen.add(name)
        return {k: v for k, v in out.items() if fields is None or k in fields}

    def sequence(self, node: YamlNode, path: str) -> list[YamlNode] | None:
        """The items of a list (null reads as empty), or None after reporting. The list is the
        node's own: callers read it, never change it."""
        if node.kind == SEQUENCE:
            items: list[YamlNode] = node.value
            return items
        if node.kind == SCALAR and node.tag == NULL:
            return []
        self.error(node, path, f"must be a list, not {kind_of(node)}")
        return None

    def string(self, node: YamlNode, path: str) -> str | None:
        if node.tag == STR and node.kind == SCALAR:
            value: str = node.value
            return value
        hint = " (quote it)" if node.kind == SCALAR else ""
        self.error(node, path, f"must be a string, not {kind_of(node)}{hint}")
        return None

    def integer(self, node: YamlNode, path: str) -> int | None:
        if node.kind == SCALAR and node.tag == "tag:yaml.org,2002:int":
            try:
                return int(node.value.replace("_", ""), 0)
            except ValueError:
                pass
        self.error(node, path, f"must be an integer, not {kind_of(node)}")
        return None

    def boolean(self, node: YamlNode, path: str) -> bool | None:
        if node.kind == SCALAR and node.tag == "tag:yaml.org,2002:bool":
            text = node.value.lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
        self.error(node, path, f"must be a boolean, not {kind_of(node)}")
        return None

    def strings(self, node: YamlNode, path: str) -> list[str] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        out = [self.string(n, f"{path}[{i}]") for i, n in enumerate(items)]
        return None if any(s is None for s in out) else [s for s in out if s is not None]

    def string_map(self, node: YamlNode, path: str) -> dict[str, str] | None:
        fields = self.mapping(node, path, None)
        if fields is None:
            return None
        out = {k: self.string(v, f"{path}.{k}") for k, v in fields.items()}
        return (
            None
            if any(v is None for v in out.values())
            else {k: v for k, v in out.items() if v is not None}
        )
