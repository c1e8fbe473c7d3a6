"""Reading YAML as Kubernetes does, keeping line numbers: typed field access over PyYAML nodes.

Every problem becomes a :class:`PolicyError` naming the file, the line, the field path
(``spec.egress[0].toFQDNs[1].matchPattern``) and the reason; every valid feature fqdnguard does
not enforce becomes a :class:`PolicyWarning`. A :class:`Reader` collects both, so a lint run
lists every problem at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from fqdnguard._core import FqdnGuardError

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.reason}"

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


def kind_of(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "an object"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _TAGS.get(node.tag, f"a value tagged {node.tag}")


def line_of(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def is_null(node: yaml.Node | None) -> bool:
    return node is None or (
        isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
    )


class Reader:
    """Typed access to the nodes of one file; problems are collected, not raised."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[PolicyError] = []
        self.warnings: list[PolicyWarning] = []
        # A field's problems are reported at its key's line (a block list starts on the next).
        self._key_line: dict[int, int] = {}

    def line(self, node: yaml.Node) -> int:
        return self._key_line.get(id(node)) or line_of(node)

    def error(self, node: yaml.Node | int, path: str, reason: str) -> None:
        line = node if isinstance(node, int) else self.line(node)
        self.errors.append(PolicyError(self.file, line, path, reason))

    def warn(self, node: yaml.Node, path: str, message: str) -> None:
        self.warnings.append(PolicyWarning(self.file, self.line(node), path, message))

    def documents(self, text: str) -> Iterator[yaml.Node]:
        try:
            yield from yaml.compose_all(text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = int(mark.line) + 1 if mark is not None else 1
            self.error(line, "", f"invalid YAML: {e.problem or e.context}")
        except yaml.YAMLError as e:
            self.error(1, "", f"invalid YAML: {e}")

    def mapping(
        self, node: yaml.Node, path: str, fields: frozenset[str] | None
    ) -> dict[str, yaml.Node] | None:
        """The fields of an object (None fields: any key), or None after reporting why not."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"must be an object, not {kind_of(node)}")
            return None
        out: dict[str, yaml.Node] = {}
        ok = True
        for key, value in node.value:
            if not (isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                self.error(key, path, f"field names must be strings, not {kind_of(key)}")
                ok = False
                continue
            name = key.value
            sub = f"{path}.{name}" if path else name
            if name in out:
                self.error(key, sub, "duplicate field")
                ok = False
            elif fields is not None and name not in fields:
                known = ", ".join(sorted(fields))
                self.error(key, sub, f"unknown field {name!r} (known fields: {known})")
                ok = False
            out[name] = value
            self._key_line[id(value)] = line_of(key)
        return out if ok else None

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        """The items of a list (null reads as empty), or None after reporting."""
        if is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, f"must be a list, not {kind_of(node)}")
            return None
        return list(node.value)

    def string(self, node: yaml.Node, path: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return str(node.value)
        hint = " (quote it)" if isinstance(node, yaml.ScalarNode) else ""
        self.error(node, path, f"must be a string, not {kind_of(node)}{hint}")
        return None

    def integer(self, node: yaml.Node, path: str) -> int | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            try:
                return int(node.value.replace("_", ""), 0)
            except ValueError:
                pass
        self.error(node, path, f"must be an integer, not {kind_of(node)}")
        return None

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
            return bool(yaml.safe_load(node.value))
        self.error(node, path, f"must be a boolean, not {kind_of(node)}")
        return None

    def strings(self, node: yaml.Node, path: str) -> list[str] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        out = [self.string(n, f"{path}[{i}]") for i, n in enumerate(items)]
        return None if any(s is None for s in out) else [s for s in out if s is not None]

    def string_map(self, node: yaml.Node, path: str) -> dict[str, str] | None:
        fields = self.mapping(node, path, None)
        if fields is None:
            return None
        out = {k: self.string(v, f"{path}.{k}") for k, v in fields.items()}
        return (
            None
            if any(v is None for v in out.values())
            else {k: v for k, v in out.items() if v is not None}
        )
