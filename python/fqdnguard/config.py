"""Proxy configuration: a YAML file, overridden by command-line flags, checked up front.

Every error names the option that is wrong (``ConfigError``), so ``fqdnguard run`` can exit 2 with
a message a person can act on.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

# RETRANSMIT_FLOOR: the shortest wait before a UDP query is sent upstream again (below it a
# copy mostly adds load, it rarely replaces a lost packet); MAX_RETRIES: copies at most. The
# engine checks the same bounds.
from fqdnguard._core import MAX_RETRIES, RETRANSMIT_FLOOR, FqdnGuardError

__all__ = [
    "ConfigError",
    "ProxyConfig",
    "parse_hostport",
    "read_config_file",
    "resolv_conf_nameservers",
]


#: The largest TTL DNS has (RFC 2181 8: 2^31 - 1 seconds).
MAX_TTL = 2**31 - 1


class ConfigError(FqdnGuardError, ValueError):
    """A configuration value is invalid; the message names the option (and, for a file, the
    file and line). When several are, ``problems`` lists each one's message and the exception's
    text is all of them, one per line."""

    problems: list[str]

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems) if problems else [message]
        super().__init__(message)

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        return cls("\n".join(problems), problems)


def parse_hostport(text: str, option: str, default_port: int | None = None) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` (or a bare address when default_port is given)."""
    text = str(text).strip()
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{option}: {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{option}: {text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(f"{option}: {text!r}: write an IPv6 address as [ADDR]:PORT")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{option}: {text!r}: {host!r} is not an IP address") from None
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{option}: {text!r}: a port is required (ADDR:PORT)")
        return str(addr), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{option}: {text!r}: port must be a number from 1 to 65535")
    return str(addr), int(port_text)


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers of a resolv.conf, port 53 (zone ids of link-local IPv6 are dropped)."""
    out: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        out.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
                    except ValueError:
                        continue
    except OSError:
        return []
    return out


# Options that are true or false.
_FLAGS = ("intercept", "dns0x20", "allow_empty_policy", "reverse_path_check", "kubernetes")
# Options that are positive whole numbers.
_COUNTS = (
    "max_inflight",
    "max_inflight_per_client",
    "max_tcp_connections",
    "max_tcp_per_client",
    "upstream_sockets",
)


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the proxy needs; defaults are what a node would want."""

    listen: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 5353)])
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    policy: list[str] = field(default_factory=list)
    endpoints: str | None = None
    backend: str = "log"
    reject: str = "refused"
    search_domains: list[str] = field(default_factory=list)
    unknown_endpoint: str | None = None
    state_dir: str | None = None
    metrics: tuple[str, int] | None = None
    upstream_timeout: float = 2.0
    # A UDP query still unanswered after this many seconds is sent again (the same bytes, from
    # the same socket, to the same upstream), at most ``upstream_retries`` times; the SERVFAIL
    # still comes at ``upstream_timeout``. None: a quarter of the timeout, at least
    # RETRANSMIT_FLOOR; 0 turns it off. See docs/fastpath.md, "Retransmission".
    upstream_retransmit: float | None = None
    upstream_retries: int = 1
    max_inflight: int = 10_000
    # One client's share (an endpoint; a source no endpoint claims counts alone): one pod
    # cannot take every slot. When all are taken, the client holding most gives one up.
    max_inflight_per_client: int = 1_000
    hold_max: float = 0.100
    tcp_idle_timeout: float = 10.0
    max_tcp_connections: int = 1_000
    max_tcp_per_client: int = 64
    # RFC 5452: every UDP query leaves from one of this many sockets per address family, each
    # on a random port (26 bits with the id at 1,024), and its name in random case (0x20).
    upstream_sockets: int = 1_024
    dns0x20: bool = True
    expire_interval: float = 1.0
    min_ttl: int = 0
    # The longest TTL an answer keeps, in the cache and in what the client receives (see
    # docs/cache.md, "max_ttl", for why one day).
    max_ttl: int = 86_400
    log_queries: str = "sampled"
    log_sample: float = 0.01
    cache_save_interval: float = 60.0
    intercept: bool = False
    intercept_port: int = 10053
    # Who serves the UDP sockets: a Rust thread (recvmmsg/sendmmsg, no Python per packet) or
    # asyncio datagram transports. See docs/fastpath.md.
    udp_io: str = "rust"
    # A policy file with no policy document, or a policy directory with no file, is an error
    # (the policy in force stays) unless this says an empty policy is meant.
    allow_empty_policy: bool = False
    # What a port rule with L7 rules fqdnguard cannot enforce (HTTP, Kafka, serverNames) admits:
    # nothing ("deny") or the whole port at L4 ("allow-port"). See docs/policy.md.
    unenforced_l7: str = "deny"
    # Drop packets whose source address does not route back through the interface they came
    # in on (nftables backend, interception): a pod cannot borrow another's identity. Off only
    # where routing is asymmetric. See docs/nftables.md.
    reverse_path_check: bool = True
    # Policies and endpoints from the Kubernetes API server instead of files (docs/kubernetes.md):
    # in-cluster service-account configuration unless ``kubeconfig`` names a file; the node is
    # ``node_name``, or the NODE_NAME environment variable (the downward API).
    kubernetes: bool = False
    kubeconfig: str | None = None
    node_name: str | None = None

    OPTIONS: ClassVar[tuple[str, ...]] = (
        "listen",
        "upstreams",
        "policy",
        "endpoints",
        "backend",
        "reject",
        "search_domains",
        "unknown_endpoint",
        "state_dir",
        "metrics",
        "upstream_timeout",
        "upstream_retransmit",
        "upstream_retries",
        "max_inflight",
        "max_inflight_per_client",
        "hold_max",
        "tcp_idle_timeout",
        "max_tcp_connections",
        "max_tcp_per_client",
        "upstream_sockets",
        "dns0x20",
        "expire_interval",
        "min_ttl",
        "max_ttl",
        "log_queries",
        "log_sample",
        "cache_save_interval",
        "intercept",
        "intercept_port",
        "udp_io",
        "allow_empty_policy",
        "unenforced_l7",
        "reverse_path_check",
        "kubernetes",
        "kubeconfig",
        "node_name",
    )

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError.of(problems)

    def problems(self) -> list[str]:
        """Every invalid option, each message starting with the option's name."""
        out: list[str] = []
        bad = out.append
        if not self.listen:
            bad("listen: at least one ADDR:PORT is required")
        if self.backend not in ("callback", "log", "nftables"):
            bad(f"backend: {self.backend!r}: choose callback, log or nftables")
        if self.reject not in ("refused", "nxdomain"):
            bad(f"reject: {self.reject!r}: choose refused or nxdomain")
        if self.unenforced_l7 not in ("deny", "allow-port"):
            bad(f"unenforced_l7: {self.unenforced_l7!r}: choose deny or allow-port")
        if not isinstance(self.allow_empty_policy, bool):
            bad(f"allow_empty_policy: {self.allow_empty_policy!r}: must be true or false")
        if self.udp_io not in ("rust", "asyncio"):
            bad(f"udp_io: {self.udp_io!r}: choose rust or asyncio")
        if self.log_queries not in ("all", "sampled", "none"):
            bad(f"log_queries: {self.log_queries!r}: choose all, sampled or none")
        for name in ("upstream_timeout", "hold_max", "tcp_idle_timeout", "expire_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                bad(f"{name}: {value!r}: must be a positive number of seconds")
        for name in _COUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(f"{name}: {value!r}: must be a positive whole number")
        retransmit, timeout = self.upstream_retransmit, self.upstream_timeout
        if retransmit is not None and (
            isinstance(retransmit, bool)
            or not isinstance(retransmit, (int, float))
            or not (retransmit == 0 or retransmit >= RETRANSMIT_FLOOR)
        ):
            bad(
                f"upstream_retransmit: {retransmit!r}: must be 0 (off) or a number of seconds "
                f"from {RETRANSMIT_FLOOR}"
            )
        elif retransmit and isinstance(timeout, (int, float)) and retransmit >= timeout:
            bad(
                f"upstream_retransmit: {retransmit}: must be below upstream_timeout ({timeout}): "
                "a copy sent at the timeout could not be answered in time"
            )
        retries = self.upstream_retries
        if (
            isinstance(retries, bool)
            or not isinstance(retries, int)
            or not 0 <= retries <= MAX_RETRIES
        ):
            bad(f"upstream_retries: {retries!r}: must be a whole number from 0 to {MAX_RETRIES}")
        if isinstance(self.upstream_sockets, int) and self.upstream_sockets > 16_384:
            bad(f"upstream_sockets: {self.upstream_sockets}: at most 16384 (each is a descriptor)")
        if not isinstance(self.dns0x20, bool):
            bad(f"dns0x20: {self.dns0x20!r}: must be true or false")
        if not isinstance(self.min_ttl, int) or self.min_ttl < 0:
            bad(f"min_ttl: {self.min_ttl!r}: must be a whole number >= 0")
        if not isinstance(self.max_ttl, int) or not 1 <= self.max_ttl <= MAX_TTL:
            bad(f"max_ttl: {self.max_ttl!r}: must be a whole number of seconds from 1 to {MAX_TTL}")
        elif isinstance(self.min_ttl, int) and self.min_ttl > self.max_ttl:
            bad(
                f"min_ttl {self.min_ttl} is above max_ttl {self.max_ttl}: every entry would "
                "outlive the longest TTL allowed; lower min_ttl or raise max_ttl"
            )
        if not isinstance(self.kubernetes, bool):
            bad(f"kubernetes: {self.kubernetes!r}: must be true or false")
        elif self.kubernetes:
            if self.policy or self.endpoints:
                bad(
                    "kubernetes: policies and endpoints come from the API server; "
                    "drop policy and endpoints (files), or kubernetes"
                )
            if not self.node_name:
                bad("node_name: required with kubernetes (--node-name, or NODE_NAME)")
        elif self.kubeconfig or self.node_name:
            bad("kubeconfig and node_name need kubernetes (--kubernetes)")
        for name in ("intercept", "reverse_path_check"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name}: {getattr(self, name)!r}: must be true or false")
        if not isinstance(self.intercept_port, int) or not 0 < self.intercept_port < 65536:
            bad(f"intercept_port: {self.intercept_port!r}: must be a port from 1 to 65535")
        if not isinstance(self.log_sample, (int, float)) or not 0 <= self.log_sample <= 1:
            bad(f"log_sample: {self.log_sample!r}: must be between 0 and 1")
        for suffix in self.search_domains:
            if (
                not isinstance(suffix, str)
                or not suffix
                or suffix.startswith(".")
                or ".." in suffix
                or " " in suffix
            ):
                bad(f"search_domains: {suffix!r} is not a domain name")
        if (
            self.state_dir is not None
            and os.path.exists(self.state_dir)
            and not os.path.isdir(self.state_dir)
        ):
            bad(f"state_dir: {self.state_dir!r} exists and is not a directory")
        return out

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        source: str = "config",
        lines: Mapping[str, int] | None = None,
    ) -> ProxyConfig:
        """Builds from a mapping (a YAML file's contents), with hyphens or underscores in keys.
        Every problem is reported at once: a :class:`ConfigError` whose ``problems`` name
        ``source`` and, with ``lines`` (a key's line in the file), the line of each option."""
        lines = lines or {}
        kwargs: dict[str, Any] = {}
        found: list[tuple[int, str]] = []  # (line, message)
        at: dict[str, int] = {}  # option -> its key's line
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name == "upstream":
                name = "upstreams"
            line = lines.get(str(key), 0)
            if name not in cls.OPTIONS:
                found.append((line, f"unknown option {key!r} (known: {', '.join(cls.OPTIONS)})"))
                continue
            at[name] = line
            try:
                kwargs[name] = _convert(name, value, source)
            except ConfigError as e:
                found += [(line, _strip(p, source)) for p in e.problems]
        # Check the options that did convert too, so one run shows every problem.
        try:
            config = cls(**kwargs)
        except ConfigError as e:
            found += [(at.get(p.split(":", 1)[0], 0), p) for p in e.problems]
        if found:
            raise ConfigError.of(
                [f"{source}:{line}: {msg}" if line else f"{source}: {msg}" for line, msg in found]
            )
        return config

    def override(self, **changes: Any) -> ProxyConfig:
        """A copy with the given options replaced (None values are ignored)."""
        clean = {k: _convert(k, v, "flag") for k, v in changes.items() if v is not None}
        return replace(self, **clean)

    def retransmit_after(self) -> float:
        """Seconds after which an unanswered UDP query is sent again; 0: never."""
        if self.upstream_retries == 0:
            return 0.0
        if self.upstream_retransmit is not None:
            return float(self.upstream_retransmit)
        auto = max(self.upstream_timeout / 4, RETRANSMIT_FLOOR)
        return auto if auto < self.upstream_timeout else 0.0

    def resolved_upstreams(self) -> list[tuple[str, int]]:
        """The configured upstreams, or the nameservers of /etc/resolv.conf."""
        if self.upstreams:
            return list(self.upstreams)
        found = resolv_conf_nameservers()
        if not found:
            raise ConfigError("upstreams: none configured and /etc/resolv.conf lists no nameserver")
        return found


def _strip(message: str, source: str) -> str:
    """A conversion message without its ``source: `` prefix (the caller puts file:line)."""
    return message.removeprefix(f"{source}: ")


def _convert(name: str, value: Any, source: str) -> Any:
    option = f"{source}: {name}" if source != "flag" else f"--{name.replace('_', '-')}"
    if name in ("listen", "upstreams"):
        items = value if isinstance(value, (list, tuple)) else [value]
        default_port = 53 if name == "upstreams" else None
        return [
            item if isinstance(item, tuple) else parse_hostport(item, option, default_port)
            for item in items
        ]
    if name == "metrics":
        return value if isinstance(value, tuple) else parse_hostport(value, option)
    if name in ("policy", "search_domains"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [str(v).rstrip(".") if name == "search_domains" else str(v) for v in items]
    if name in (
        "upstream_timeout",
        "upstream_retransmit",
        "hold_max",
        "tcp_idle_timeout",
        "expire_interval",
        "log_sample",
        "cache_save_interval",
    ):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{option}: {value!r} is not a number") from None
    if name in (*_COUNTS, "upstream_retries", "min_ttl", "max_ttl", "intercept_port"):
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise ConfigError(f"{option}: {value!r} is not a whole number")
        return int(value)
    return _bool(value, option) if name in _FLAGS else value


def _bool(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        raise ConfigError(f"{option}: {value!r} is not true or false")
    return text in ("true", "yes", "on", "1")


def _plain(node: Any, source: str) -> Any:  # noqa: PLR0911
    """A YAML node (from the Rust composer) as plain Python values."""
    if node.kind == 2:
        return {k: _plain(v, source) for k, v in node.value.items()}
    if node.kind == 1:
        return [_plain(v, source) for v in node.value]
    tag = node.tag.rsplit(":", 1)[-1]
    text = node.value
    if tag == "null":
        return None
    if tag == "bool":
        return text.lower() in ("true", "yes", "on", "y")
    if tag == "int":
        try:
            return int(text.replace("_", ""), 0)
        except ValueError:
            raise ConfigError(f"{source}:{node.line}: {text!r} is not an integer") from None
    if tag == "float":
        return float(text.replace("_", ""))
    return text


def read_config_file(path: str) -> ProxyConfig:
    """Reads a YAML file of options (the same names as the flags, with - or _). Every problem
    is reported at once, each as ``path:line: option: reason``."""
    from fqdnguard._core import compose_yaml  # noqa: PLC0415
    from fqdnguard._schema import read_problem  # noqa: PLC0415

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {read_problem(e)}") from None
    docs, error = compose_yaml(text)
    if error is not None:
        raise ConfigError(f"{path}:{error[0]}: invalid YAML: {error[1]}")
    if not docs or (len(docs) == 1 and docs[0].kind == 0 and docs[0].tag.endswith(":null")):
        return ProxyConfig()
    if len(docs) > 1 or docs[0].kind != 2:
        line = docs[1].line if len(docs) > 1 else docs[0].line
        raise ConfigError(f"{path}:{line}: must be one mapping of options")
    top = docs[0]
    problems: list[str] = []
    if top.pairs is not None:  # a repeated key, or one that is not a string
        seen: set[str] = set()
        for key, _ in top.pairs:
            if key.kind != 0 or not key.tag.endswith(":str"):
                problems.append(f"{path}:{key.line}: option names must be strings")
            elif key.value in seen:
                problems.append(f"{path}:{key.line}: {key.value}: given twice")
            seen.add(key.value)
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, node in top.value.items():
        lines[key] = node.key_line or node.line
        try:
            data[key] = _plain(node, path)
        except ConfigError as e:
            problems.append(f"{e} ({key})")
    try:
        config = ProxyConfig.from_mapping(data, source=path, lines=lines)
    except ConfigError as e:
        problems += e.problems
    if problems:

        def line_of(problem: str) -> int:
            text = problem[len(path) + 1 :].split(":", 1)[0]
            return int(text) if text.isdigit() else 0

        raise ConfigError.of(sorted(problems, key=line_of))
    return config
