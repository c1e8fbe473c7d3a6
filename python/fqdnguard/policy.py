"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy YAML -> compiled policy.

Reading follows Cilium's CRD schema and its rule validation for the fields in scope
(``endpointSelector``, ``egress[].toFQDNs``, ``toPorts`` with ``rules.dns``, ``toEndpoints``,
``toCIDR``, ``toCIDRSet``); anything else Cilium accepts loads with a "not enforced by fqdnguard"
warning; anything Cilium rejects raises :class:`PolicyError` with file, line and field path.
A set of files compiles whole: :meth:`Policy.load` returns a new :class:`Policy` or raises, and a
``Policy`` never changes, so the one in force stays in force when a new set is bad.

Label selection runs here, once per distinct label set; the verdicts run in Rust
(``fqdnguard._core.CompiledPolicy``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from fqdnguard._core import (
    CompiledPolicy,
    PatternError,
    Verdict,
    YamlNode,
    validate_name,
    validate_pattern,
)
from fqdnguard._schema import (
    MAPPING,
    SCALAR,
    STR,
    PolicyError,
    PolicyWarning,
    Reader,
    gc_paused,
    is_null,
    line_of,
    read_problem,
)
from fqdnguard.cluster import Cluster, Service
from fqdnguard.endpoints import NAMESPACE_LABEL, OPERATORS, Endpoint, Endpoints, Selector
from fqdnguard.peers import CILIUM_ONLY, Resolved, Resolver, ServiceRef

__all__ = [
    "UNENFORCED_L7",
    "EgressPlan",
    "Policy",
    "PolicyError",
    "PolicyWarning",
    "lifted",
    "lint",
]

log = logging.getLogger("fqdnguard.policy")

API_VERSION = "cilium.io/v2"
CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
_LIST_KINDS = frozenset({"List", f"{CNP}List", f"{CCNP}List"})
_SUFFIXES = (".yaml", ".yml", ".json")

_TOP = frozenset({"apiVersion", "kind", "metadata", "spec", "specs", "status"})
_LIST = frozenset({"apiVersion", "kind", "items", "metadata"})
_META = frozenset(
    {
        "name",
        "namespace",
        "labels",
        "annotations",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "ownerReferences",
        "finalizers",
        "generateName",
        "selfLink",
    }
)
_RULE = frozenset(
    {
        "endpointSelector",
        "nodeSelector",
        "ingress",
        "ingressDeny",
        "egress",
        "egressDeny",
        "labels",
        "description",
        "enableDefaultDeny",
        "log",
    }
)
_L3 = (
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toFQDNs",
    "toEntities",
    "toServices",
    "toGroups",
    "toNodes",
)
_EGRESS = frozenset({*_L3, "toPorts", "toRequires", "icmps", "authentication"})
_PORT_RULE = frozenset(
    {"ports", "rules", "terminatingTLS", "originatingTLS", "serverNames", "listener"}
)
_PORT = frozenset({"port", "endPort", "protocol"})
_L7 = frozenset({"http", "kafka", "dns", "l7proto", "l7"})
_FQDN = frozenset({"matchName", "matchPattern"})
_SELECTOR = frozenset({"matchLabels", "matchExpressions"})
_EXPR = frozenset({"key", "operator", "values"})
_CIDR_RULE = frozenset({"cidr", "cidrGroupRef", "cidrGroupSelector", "except"})
_SERVICE = frozenset({"k8sService", "k8sServiceSelector"})
_SERVICE_NAME = frozenset({"serviceName", "namespace"})
_SERVICE_SELECTOR = frozenset({"selector", "namespace"})
_DEFAULT_DENY = frozenset({"ingress", "egress"})
_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
#: Valid in Cilium's CRD (its ``protocol`` enum) but not enforced: such a port allows nothing.
_OTHER_PROTOCOLS = ("VRRP", "IGMP")
#: The CRD's enum, in its order. ICMP is not a port protocol: ICMP rules go in ``icmps``.
_CRD_PROTOCOLS = ("TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY")
_L7_KINDS = ("http", "kafka", "dns", "l7proto")
#: ``serverNames`` items, as Cilium's CRD schema checks them.
_SERVER_NAME = re.compile(r"(\*?\*\.)?([-a-zA-Z0-9_]+\.?)+")
_ENTITIES = frozenset(
    {
        "all",
        "world",
        "world-ipv4",
        "world-ipv6",
        "cluster",
        "host",
        "remote-node",
        "kube-apiserver",
        "ingress",
        "init",
        "health",
        "unmanaged",
        "none",
    }
)
_MAX_PORTS = 40
#: What a port rule with L7 rules fqdnguard cannot enforce (``rules.http``, ``rules.kafka``,
#: ``rules.l7proto``, ``serverNames``, ``listener``) admits: nothing (``deny``, the default: Cilium
#: would restrict the port in its L7 proxy, which fqdnguard does not have), or the whole port at
#: L4 (``allow-port``).
UNENFORCED_L7 = ("deny", "allow-port")
_EMPTY_HINT = (
    "the policy in force stays; set allow_empty_policy (--allow-empty-policy) if that is meant"
)
_SVC_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-zA-Z])[a-zA-Z0-9](?:-?[a-zA-Z0-9])*")


class _Keep:
    """The default of :meth:`Policy.with_endpoints`'s ``cluster``: keep the policy's own."""


_KEEP = _Keep()


class NamesFor(Protocol):
    """What the egress verdict needs from a DNS cache (``fqdnguard.DnsCache`` has it)."""

    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]: ...


class DnsVerdict(Protocol):
    """The type of :attr:`Policy.dns_verdict`."""

    def __call__(
        self,
        endpoint: Endpoint | None,
        server: str | None,
        port: int,
        protocol: str,
        qname: str | bytes,
    ) -> Verdict:
        """May ``endpoint`` ask ``server`` (None: any server a rule admits) on ``port`` /
        ``protocol`` ("UDP", "TCP", "SCTP") for ``qname``? ``endpoint`` None (an unknown source)
        is denied."""
        ...


@dataclass
class _PortEntry:
    ranges: list[tuple[int, int, str]]
    dns: list[tuple[bool, str]] | None
    #: It admits nothing: it listed ports, none of which fqdnguard can enforce, or it has L7
    #: rules fqdnguard cannot enforce (under ``unenforced_l7: deny``).
    inert: bool = False
    #: Named ports as (lower-cased name, protocol): resolved at compile time against the named
    #: ports the rule's destination endpoints declare.
    named: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Rule:
    index: int
    fqdns: list[tuple[bool, str]] = field(default_factory=list)
    to_endpoints: list[Selector] = field(default_factory=list)
    cidrs: list[tuple[str, int, list[tuple[str, int]], str]] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    services: list[ServiceRef] = field(default_factory=list)
    #: Where ``toEntities`` / ``toServices`` are, for warnings decided at compile time:
    #: field -> (line, path).
    at: dict[str, tuple[int, str]] = field(default_factory=dict)
    has_l3: bool = False
    has_ports: bool = False
    ports: list[_PortEntry] = field(default_factory=list)


@dataclass
class _Spec:
    kind: str
    namespace: str | None
    name: str
    policy: str
    label: str
    #: None for a host policy (nodeSelector): it selects no endpoint.
    selector: Selector | None
    default_deny: bool
    egress: list[_Rule]
    file: str
    line: int


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy document."""

    kind: str
    namespace: str | None
    name: str
    file: str
    line: int

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


#: Ports a rule admits: None for every port and protocol, else ``(port, endPort, protocol)``
#: ranges with protocol TCP, UDP, SCTP or ANY, port 0 meaning every port of the protocol.
Ports = tuple[tuple[int, int, str], ...] | None
#: Destinations a rule admits: None for any, else (addresses, CIDRs as (address, prefix length,
#: excepted (address, prefix length) pairs)).
Peers = tuple[tuple[str, ...], tuple[tuple[str, int, tuple[tuple[str, int], ...]], ...]] | None


@dataclass(frozen=True)
class EgressPlan:
    """A restricted endpoint's egress allowances, for programming a firewall."""

    #: One entry per ``toFQDNs`` rule: its ports and its (is_pattern, text) name selectors.
    fqdn: tuple[tuple[Ports, tuple[tuple[bool, str], ...]], ...]
    #: One entry per other rule (``toEndpoints``, ``toCIDR``, ``toCIDRSet``, ``toEntities``,
    #: ``toServices``, L4-only), also when its selectors pick no address today (then it admits
    #: nothing), and one per Service ClusterIP a rule admits (its mapped ports).
    peers: tuple[tuple[Peers, Ports], ...]
    #: The rule each ``peers`` entry comes from, e.g. ``CiliumNetworkPolicy default/web
    #: egress[0]``: the same across reloads and for every endpoint the rule applies to, so a
    #: firewall can keep a rule's addresses in one set of their own and update it in place.
    #: Shorter than ``peers`` when not known (the firewall then names sets by position).
    peer_rules: tuple[str, ...] = ()


class Policy:
    """A compiled, immutable policy set. Build with :meth:`load` or :meth:`from_yaml`."""

    __slots__ = (
        "_compiled",
        "_endpoints",
        "_resolver",
        "_specs",
        "cluster",
        "dns_verdict",
        "policies",
        "warnings",
    )

    _compiled: CompiledPolicy
    _endpoints: Endpoints | None
    _resolver: Resolver
    #: The cluster facts ``toEntities``, ``toServices`` and ``toEndpoints`` were resolved
    #: against (None: only the endpoint registry).
    cluster: Cluster | None
    _specs: tuple[_Spec, ...]
    #: Every policy document loaded, in load order.
    policies: tuple[PolicyInfo, ...]
    #: Valid features that fqdnguard does not enforce, one per occurrence.
    warnings: tuple[PolicyWarning, ...]
    #: ``dns_verdict(endpoint, server, port, protocol, qname) -> Verdict``: may ``endpoint`` ask
    #: ``server`` (None: any server a rule admits) on ``port`` / ``protocol`` ("UDP", "TCP",
    #: "SCTP") for ``qname``? ``endpoint`` None (an unknown source) is denied. It is the compiled
    #: policy's own method, so a query costs no Python frame.
    dns_verdict: DnsVerdict

    def __init__(self) -> None:
        raise TypeError("use Policy.load(paths) or Policy.from_yaml(text)")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Policy objects are immutable; load a new one")

    @classmethod
    def _make(
        cls,
        specs: list[_Spec],
        infos: list[PolicyInfo],
        warnings: list[PolicyWarning],
        endpoints: Endpoints | None,
        cluster: Cluster | None = None,
    ) -> Policy:
        self = object.__new__(cls)
        put = object.__setattr__
        put(self, "_specs", tuple(specs))
        put(self, "_endpoints", endpoints)
        put(self, "cluster", cluster)
        put(self, "policies", tuple(infos))
        res = Resolver(endpoints, cluster)
        put(self, "_resolver", res)
        problems: list[tuple[_Spec, _Rule, str, str]] = []
        lowered = [_lower(s, res, problems) for s in specs]
        # What the cluster facts cannot resolve allows nothing: say so where it is written.
        if problems:
            rank = {f: i for i, f in enumerate(dict.fromkeys(i.file for i in infos))}
            warnings = sorted(
                warnings
                + [
                    PolicyWarning(spec.file, rule.at[what][0], rule.at[what][1], msg)
                    for spec, rule, what, msg in problems
                ],
                key=lambda w: (rank.get(w.file, -1), w.line),
            )
        put(self, "warnings", tuple(warnings))
        # The registry's endpoints get their identity kept in the compiled policy (looked up by
        # object, on first use); any other endpoint object is resolved through its labels.
        known = list(endpoints) if endpoints is not None else []
        compiled = CompiledPolicy(lowered, known, _selects(specs))
        put(self, "_compiled", compiled)
        put(self, "dns_verdict", compiled.endpoint_dns_verdict)
        for w in dict.fromkeys(warnings):
            log.warning("%s", w)
        return self

    @classmethod
    def load(
        cls,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        endpoints: Endpoints | None = None,
        *,
        allow_empty: bool = False,
        unenforced_l7: str = "deny",
        cluster: Cluster | None = None,
    ) -> Policy:
        """Loads every policy file under ``paths`` (files or directories, ``*.yaml``, ``*.yml``,
        ``*.json``). ``endpoints`` resolves ``toEndpoints`` (e.g. kube-dns) and named ports;
        ``cluster`` resolves ``toEntities`` and ``toServices``, and when it lists the cluster's
        pods (``peers``), ``toEndpoints`` too.
        Raises :class:`PolicyError` listing every problem; nothing is half-loaded. A file with
        no policy document, or a directory with no policy file, is an error (an emptied or
        truncated file must not lift restrictions) unless ``allow_empty``. ``unenforced_l7``
        (one of :data:`UNENFORCED_L7`) says what a port rule with L7 rules fqdnguard cannot
        enforce admits."""
        sources = [(f, _read_text(f)) for f in _files(paths, allow_empty=allow_empty)]
        return cls._from_sources(
            sources,
            endpoints,
            allow_empty=allow_empty,
            unenforced_l7=unenforced_l7,
            cluster=cluster,
        )

    @classmethod
    def from_yaml(
        cls,
        text: str,
        endpoints: Endpoints | None = None,
        filename: str = "<string>",
        *,
        allow_empty: bool = False,
        unenforced_l7: str = "deny",
        cluster: Cluster | None = None,
    ) -> Policy:
        """Compiles the policies in one YAML text (one or more documents); see :meth:`load`."""
        return cls._from_sources(
            [(filename, text)],
            endpoints,
            allow_empty=allow_empty,
            unenforced_l7=unenforced_l7,
            cluster=cluster,
        )

    @classmethod
    def empty(cls, endpoints: Endpoints | None = None) -> Policy:
        """A set with no policy (every endpoint of ``endpoints`` unrestricted)."""
        return cls._make([], [], [], endpoints)

    @classmethod
    def _from_sources(
        cls,
        sources: list[tuple[str, str | PolicyError]],
        endpoints: Endpoints | None,
        *,
        allow_empty: bool = False,
        unenforced_l7: str = "deny",
        cluster: Cluster | None = None,
    ) -> Policy:
        if unenforced_l7 not in UNENFORCED_L7:
            raise ValueError(
                f"unenforced_l7: {unenforced_l7!r}: choose one of {', '.join(UNENFORCED_L7)}"
            )
        if not sources and not allow_empty:
            raise PolicyError("<policy set>", 0, "", f"no policy file at all; {_EMPTY_HINT}")
        with gc_paused():
            specs, infos, errors, warnings = _read_sources(
                sources, unenforced_l7=unenforced_l7, allow_empty=allow_empty
            )
            if errors:
                raise PolicyError.of(errors)
            return cls._make(specs, infos, warnings, endpoints, cluster)

    def with_endpoints(
        self, endpoints: Endpoints | None, *, cluster: Cluster | _Keep | None = _KEEP
    ) -> Policy:
        """The same policies resolved against another endpoint registry (and other cluster
        facts when ``cluster`` is given; by default, the same)."""
        facts = self.cluster if isinstance(cluster, _Keep) else cluster
        return Policy._make(list(self._specs), list(self.policies), [], endpoints, facts)

    def restricted(self) -> frozenset[tuple[str, str]]:
        """(namespace, name) of the registry's endpoints whose egress some policy restricts
        (a spec with egress default-deny selects them)."""
        compiled = self._compiled
        return frozenset(
            (ep.namespace, ep.name)
            for ep in self._endpoints or ()
            if compiled.is_restricted(compiled.identity_of(ep))
        )

    def egress_verdict(
        self, endpoint: Endpoint | None, ip: str, port: int, protocol: str, cache: NamesFor
    ) -> Verdict:
        """May ``endpoint`` reach ``ip`` on ``port`` / ``protocol``, given the names ``cache``
        holds that address under for it?"""
        if endpoint is None:
            return self._compiled.egress_verdict(None, ip, port, protocol, [])
        names = cache.names_for(ip, endpoint=endpoint.id)
        ident = self._compiled.identity_of(endpoint)
        return self._compiled.egress_verdict(ident, ip, port, protocol, names)

    def engine_table(
        self, unknown: str | None = None
    ) -> tuple[CompiledPolicy, dict[str, tuple[int, int | None]], tuple[int, int | None] | None]:
        """What the proxy engine needs: the compiled policy; every address of every endpoint of
        the registry (canonical text, IPv4 and IPv6) mapped to (endpoint id, identity), the
        identity None when no egress policy selects the endpoint (unrestricted); and the same
        pair for the endpoint named ``unknown`` (``namespace/name``, or a ``name`` unique in the
        registry), which stands for sources that are no endpoint; None without one."""
        compiled = self._compiled
        eps = self._endpoints
        pairs: dict[int, tuple[int, int | None]] = {}  # by endpoint id (unique in a registry)

        def pair(ep: Endpoint) -> tuple[int, int | None]:
            found = pairs.get(ep.id)
            if found is None:
                ident = compiled.identity_of(ep)
                found = pairs[ep.id] = (ep.id, ident if compiled.is_restricted(ident) else None)
            return found

        table = {str(ipaddress.ip_address(ip)): pair(ep) for ep in eps or () for ip in ep.ips}
        if unknown is None:
            return compiled, table, None
        return compiled, table, pair(_endpoint_named(eps, unknown))

    def selecting(self, endpoint: Endpoint) -> list[str]:
        """Labels of the policy specs selecting ``endpoint``."""
        return [
            s.label
            for s in self._specs
            if s.selector is not None and s.selector.matches(endpoint.labels)
        ]

    def has_dns_rules(self, endpoint: Endpoint) -> bool:
        """Does a policy with DNS rules (``toPorts[].rules.dns``) select ``endpoint``? Its DNS
        is what transparent interception sends to the proxy (as Cilium redirects it)."""
        return any(
            entry.dns is not None
            for s in self._specs
            if s.selector is not None and s.selector.matches(endpoint.labels)
            for rule in s.egress
            for entry in rule.ports
        )

    def dns_ports(self, endpoint: Endpoint) -> set[int]:
        """The ports the DNS rules of the policies selecting ``endpoint`` are on (Cilium sends
        DNS on each of them to its proxy); empty when none has DNS rules."""
        return {
            lo
            for s in self._specs
            if s.selector is not None and s.selector.matches(endpoint.labels)
            for rule in s.egress
            for entry in rule.ports
            if entry.dns is not None
            for lo, _hi, _proto in entry.ranges
        }

    def dns_service_ports(self, endpoint: Endpoint) -> set[int]:
        """The Service ports (of the cluster the policy was compiled with) that lead to a port
        the DNS rules of ``endpoint``'s policies are on: DNS sent to such a Service reaches a
        DNS rule's port after the Service translation, so it must be intercepted too."""
        dns = self.dns_ports(endpoint)
        if not dns or self.cluster is None:
            return set()
        return {p.port for svc in self.cluster.services for p in svc.ports if p.target in dns}

    def egress_plan(
        self, endpoint: Endpoint, endpoints: Endpoints | None = None
    ) -> EgressPlan | None:
        """What a firewall must let ``endpoint`` reach, or None when no default-deny policy
        selects it (unrestricted). ``endpoints`` resolves ``toEndpoints`` (default: the registry
        the policy was loaded with; the cluster's ``peers`` win when the policy has them). The
        same rules as :meth:`egress_verdict`, laid out for programming: per ``toFQDNs`` rule its
        ports and name selectors, per other rule its peers and ports, and per Service ClusterIP
        a rule admits, that address and its mapped ports."""
        selecting = [s for s in self._specs if s.selector and s.selector.matches(endpoint.labels)]
        if not any(s.default_deny for s in selecting):
            return None
        res = self._resolver
        if endpoints is not None and endpoints is not self._endpoints:
            res = Resolver(endpoints, self.cluster)
        fqdn: list[tuple[Ports, tuple[tuple[bool, str], ...]]] = []
        peers: list[tuple[Peers, Ports]] = []
        peer_rules: list[str] = []
        for spec in selecting:
            for rule in spec.egress:
                rule_id = f"{spec.label} egress[{rule.index}]"
                l3 = _resolve(rule, res)
                entries = _effective_ports(rule, l3.dests)
                if entries is None:
                    continue  # no port entry admits anything
                ports = _plan_ports(entries)
                if rule.fqdns:
                    fqdn.append((ports, tuple(rule.fqdns)))
                elif not rule.has_l3:
                    if rule.has_ports:
                        peers.append((None, ports))  # no L3 selector: any destination
                        peer_rules.append(rule_id)
                else:
                    cidrs = tuple((a, b, tuple(x)) for a, b, x, _ in l3.cidrs)
                    # Kept when it selects nothing, so that a selector's first address is an
                    # update of the rule's set, not a new rule.
                    peers.append(((tuple(sorted(set(l3.ips))), cidrs), ports))
                    peer_rules.append(rule_id)
                    for ips, kept, label in _cluster_ip_rules(rule, l3, entries, res):
                        peers.append(((tuple(sorted(ips)), ()), _plan_ports(kept)))
                        peer_rules.append(f"{rule_id} {label}")  # one per Service
        return EgressPlan(tuple(fqdn), tuple(peers), tuple(peer_rules))

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"Policy(<{len(self.policies)} policies, {len(self.warnings)} warnings>)"


def lint(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    allow_empty: bool = False,
    unenforced_l7: str = "deny",
) -> tuple[list[PolicyError], list[PolicyWarning]]:
    """Every problem and every not-enforced feature under ``paths``, as Cilium would see them
    (and as :meth:`Policy.load` with the same options would report them)."""
    try:
        files = _files(paths, allow_empty=allow_empty)
    except PolicyError as e:
        return list(e.errors), []
    with gc_paused():
        _, _, errors, warnings = _read_sources(
            [(f, _read_text(f)) for f in files],
            unenforced_l7=unenforced_l7,
            allow_empty=allow_empty,
        )
    return errors, warnings


def lifted(old: Policy | None, new: Policy) -> list[str]:
    """``namespace/name`` of the endpoints that ``old`` restricted and ``new`` leaves
    unrestricted (endpoints ``new``'s registry no longer has are not counted: they are gone)."""
    if old is None:
        return []
    now = new.restricted()
    present = {(ep.namespace, ep.name) for ep in new._endpoints or ()}
    return sorted(f"{ns}/{name}" for ns, name in old.restricted() - now if (ns, name) in present)


def _selects(specs: list[_Spec]) -> Callable[[Endpoint], list[int]]:
    """``selects(endpoint)``: positions of the specs whose selector matches the endpoint,
    worked out once per distinct (namespace, labels)."""
    selectors = [(i, s.selector) for i, s in enumerate(specs) if s.selector is not None]
    found: dict[tuple[str, frozenset[tuple[str, str]]], list[int]] = {}

    def selects(endpoint: Endpoint) -> list[int]:
        got = found.get(endpoint.key)
        if got is None:
            labels = endpoint.labels
            got = found[endpoint.key] = [i for i, sel in selectors if sel.matches(labels)]
        return got

    return selects


def _endpoint_named(endpoints: Endpoints | None, name: str) -> Endpoint:
    """The registry's endpoint called ``namespace/name``, or ``name`` when only one has it."""
    namespace, sep, short = name.rpartition("/")
    found = [
        ep for ep in endpoints or () if ep.name == short and (not sep or ep.namespace == namespace)
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        where = "the registry" if endpoints is not None else "no registry (the policy has none)"
        raise ValueError(f"unknown endpoint {name!r}: no endpoint of that name in {where}")
    raise ValueError(
        f"unknown endpoint {name!r}: the name is ambiguous ("
        + ", ".join(ep.display for ep in found)
        + "); give it as namespace/name"
    )


# -- files -------------------------------------------------------------------------------------


def _files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, allow_empty: bool = True
) -> list[str]:
    """The policy files under ``paths``. Without ``allow_empty``, a directory holding none is an
    error (emptied by mistake, its endpoints would lose every restriction)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    empty: list[PolicyError] = []
    for given in paths:
        p = os.fspath(given)
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    os.path.join(root, n)
                    for n in names
                    if n.endswith(_SUFFIXES) and not n.startswith(".")
                ]
            if not found and not allow_empty:
                empty.append(
                    PolicyError(p, 0, "", f"no policy file (*.yaml, *.yml, *.json); {_EMPTY_HINT}")
                )
            out += sorted(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise PolicyError(p, 0, "", "no such file or directory")
    if empty:
        raise PolicyError.of(empty)
    return out


def _read_text(path: str) -> str | PolicyError:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        return PolicyError(path, 0, "", read_problem(e))


class _Reader(Reader):
    """A policy file's reader: the options that change what a rule means."""

    def __init__(self, file: str, unenforced_l7: str) -> None:
        super().__init__(file)
        self.unenforced_l7 = unenforced_l7
        #: The policy (and spec) being read, named in the errors of what Cilium rejects.
        self.label = ""


def _reject(r: Reader, node: YamlNode | int, path: str, reason: str) -> None:
    """An error for what Cilium rejects (its CRD schema or its rule sanitising), naming the
    policy as well as the field."""
    label = r.label if isinstance(r, _Reader) else ""
    r.error(node, path, f"{reason} ({label}; Cilium rejects it)" if label else reason)


def _read_sources(
    sources: list[tuple[str, str | PolicyError]],
    *,
    unenforced_l7: str = "deny",
    allow_empty: bool = True,
) -> tuple[list[_Spec], list[PolicyInfo], list[PolicyError], list[PolicyWarning]]:
    specs: list[_Spec] = []
    infos: list[PolicyInfo] = []
    errors: list[PolicyError] = []
    warnings: list[PolicyWarning] = []
    seen: dict[tuple[str, str | None, str], PolicyInfo] = {}
    for filename, text in sources:
        if isinstance(text, PolicyError):
            errors.append(text)
            continue
        r = _Reader(filename, unenforced_l7)
        before = len(infos)
        for doc in r.documents(text):
            if doc is not None and not is_null(doc):
                _read_document(r, doc, "", specs, infos, seen)
        if len(infos) == before and not r.errors and not allow_empty:
            # Emptied, reduced to `---`, or cut before its first document was whole.
            r.error(1, "", f"no policy document in the file (empty or truncated?); {_EMPTY_HINT}")
        errors += r.errors
        warnings += r.warnings
    return specs, infos, errors, warnings


# -- documents ---------------------------------------------------------------------------------


def _read_document(  # noqa: PLR0911, PLR0917
    r: Reader,
    doc: YamlNode,
    path: str,
    specs: list[_Spec],
    infos: list[PolicyInfo],
    seen: dict[tuple[str, str | None, str], PolicyInfo],
) -> None:
    top = r.mapping(doc, path, None)
    if top is None:
        return
    p = f"{path}." if path else ""
    kind = r.string(top["kind"], f"{p}kind") if "kind" in top else None
    if "kind" not in top:
        r.error(doc, f"{p}kind", "required field is missing")
    if kind is None:
        return
    if kind in _LIST_KINDS:
        fields = r.mapping(doc, path, _LIST)
        if fields is None:
            return
        for i, item in enumerate(r.sequence(fields.get("items", doc), f"{p}items") or []):
            _read_document(r, item, f"{p}items[{i}]", specs, infos, seen)
        return
    if kind not in (CNP, CCNP):
        r.warn(doc, f"{p}kind", f"kind {kind!r} is not a Cilium network policy; skipped")
        return
    fields = r.mapping(doc, path, _TOP)
    if fields is None:
        return
    api = r.string(fields["apiVersion"], f"{p}apiVersion") if "apiVersion" in fields else None
    if "apiVersion" not in fields:
        r.error(doc, f"{p}apiVersion", "required field is missing")
    elif api is not None and api != API_VERSION:
        r.error(fields["apiVersion"], f"{p}apiVersion", f"must be {API_VERSION!r}, not {api!r}")
    name, namespace = _read_metadata(r, doc, fields, p, kind)
    if is_null(fields.get("spec")) and is_null(fields.get("specs")):
        # Cilium: "empty policy" (ErrEmptyCNP); `spec:` with nothing after it reads as absent.
        r.error(doc, f"{p}spec", "a policy needs spec or specs (a null spec counts as none)")
    if name is None:
        return
    key = (kind, namespace, name)
    info = PolicyInfo(kind, namespace, name, r.file, line_of(doc))
    if key in seen:
        first = seen[key]
        r.error(
            doc,
            f"{p}metadata.name",
            f"{kind} {info.display} is also defined at {first.file}:{first.line}",
        )
        return
    seen[key] = info
    infos.append(info)
    policy = info.display
    nodes: list[tuple[YamlNode, str, str]] = []
    if "spec" in fields and not is_null(fields["spec"]):
        nodes.append((fields["spec"], f"{p}spec", f"{kind} {policy}"))
    if "specs" in fields:
        for i, n in enumerate(r.sequence(fields["specs"], f"{p}specs") or []):
            nodes.append((n, f"{p}specs[{i}]", f"{kind} {policy} specs[{i}]"))
    for node, spath, label in nodes:
        spec = _read_spec(r, node, spath, kind, namespace, name, policy, label)
        if spec is not None:
            specs.append(spec)


def _read_metadata(
    r: Reader, doc: YamlNode, fields: dict[str, YamlNode], p: str, kind: str
) -> tuple[str | None, str | None]:
    if "metadata" not in fields:
        r.error(doc, f"{p}metadata", "required field is missing")
        return None, None
    meta = r.mapping(fields["metadata"], f"{p}metadata", _META)
    if meta is None:
        return None, None
    name = r.string(meta["name"], f"{p}metadata.name") if "name" in meta else None
    if "name" not in meta:
        r.error(fields["metadata"], f"{p}metadata.name", "required field is missing")
    elif name == "":
        r.error(meta["name"], f"{p}metadata.name", "must not be empty")
        name = None
    namespace: str | None = None
    if "namespace" in meta:
        namespace = r.string(meta["namespace"], f"{p}metadata.namespace")
        if kind == CCNP:
            r.warn(
                meta["namespace"],
                f"{p}metadata.namespace",
                "a clusterwide policy has no namespace; ignored",
            )
            namespace = None
    elif kind == CNP:
        namespace = "default"
    return name, namespace


def _read_spec(  # noqa: PLR0917
    r: Reader,
    node: YamlNode,
    path: str,
    kind: str,
    namespace: str | None,
    name: str,
    policy: str,
    label: str,
) -> _Spec | None:
    errors = len(r.errors)
    if isinstance(r, _Reader):
        r.label = label
    f = r.mapping(node, path, _RULE)
    if f is None:
        return None
    has_es, has_ns = "endpointSelector" in f, "nodeSelector" in f
    if has_es == has_ns:
        r.error(node, path, "must have exactly one of endpointSelector and nodeSelector")
    selector = None
    if has_es:
        selector = _read_selector(r, f["endpointSelector"], f"{path}.endpointSelector")
        if selector is not None and namespace is not None:
            selector = selector.in_namespace(namespace)
    if has_ns:
        _read_selector(r, f["nodeSelector"], f"{path}.nodeSelector")
        r.warn(f["nodeSelector"], f"{path}.nodeSelector", "host policies (nodeSelector)")
    has_ingress = False
    for key in ("ingress", "ingressDeny"):
        items = r.sequence(f[key], f"{path}.{key}") if key in f else []
        has_ingress = has_ingress or items != []  # rules, or an error already reported
        if items:
            r.warn(f[key], f"{path}.{key}", f"{key} rules")
        for i, n in enumerate(items or []):
            _check_unenforced_rule(
                r, n, f"{path}.{key}[{i}]", deny=key == "ingressDeny", host=has_ns
            )
    deny = r.sequence(f["egressDeny"], f"{path}.egressDeny") if "egressDeny" in f else []
    for i, n in enumerate(deny or []):
        _check_unenforced_rule(r, n, f"{path}.egressDeny[{i}]", deny=True)
    if deny:
        r.warn(
            f["egressDeny"],
            f"{path}.egressDeny",
            "egressDeny rules (they still make egress default-deny, as in Cilium)",
        )
    if "log" in f:
        r.warn(f["log"], f"{path}.log", "policy logging")
    if "description" in f:
        r.string(f["description"], f"{path}.description")
    if "labels" in f:
        r.sequence(f["labels"], f"{path}.labels")
    egress_nodes = r.sequence(f["egress"], f"{path}.egress") if "egress" in f else []
    if egress_nodes == [] and deny == [] and not has_ingress:
        # Cilium (1.19+) rejects such a rule; it is also what a file cut at or inside `egress:`
        # reads as, which must not lift the restrictions the whole file put in force.
        r.error(
            node,
            path,
            "a rule must have at least one of ingress, ingressDeny, egress and egressDeny "
            "(empty or null counts as absent: a truncated file?); write `egress: [{}]` to deny "
            "all egress",
        )
    default_deny = bool(egress_nodes) or bool(deny)
    if "enableDefaultDeny" in f:
        dd = r.mapping(f["enableDefaultDeny"], f"{path}.enableDefaultDeny", _DEFAULT_DENY)
        for k, v in (dd or {}).items():
            b = r.boolean(v, f"{path}.enableDefaultDeny.{k}")
            if k == "egress" and b is not None:
                default_deny = b
    egress = [
        _read_egress(r, n, f"{path}.egress[{i}]", i, namespace, host=has_ns)
        for i, n in enumerate(egress_nodes or [])
    ]
    if len(r.errors) > errors:
        return None
    return _Spec(
        kind,
        namespace,
        name,
        policy,
        label,
        selector if has_es else None,
        default_deny,
        [e for e in egress if e is not None],
        r.file,
        line_of(node),
    )


_FROM = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes", "fromGroups")


def _check_unenforced_rule(
    r: Reader, node: YamlNode, path: str, *, deny: bool, host: bool = False
) -> None:
    """An ingress, ingressDeny (``deny``) or egressDeny (``deny``) rule: not enforced, but what
    Cilium rejects in it (its ports, DNS rules on ingress, L7 rules on a host's ingress, two
    peer selectors, unknown entities, bad CIDRs, ICMP fields) is an error all the same."""
    f = r.mapping(node, path, None)
    if f is None:
        return
    present = {k: r.sequence(f[k], f"{path}.{k}") for k in _FROM if k in f}
    used = [k for k in _FROM if present.get(k)]
    if len(used) > 1:
        _reject(r, node, path, f"combining {used[0]} and {used[1]} is not supported")
    for i, n in enumerate(present.get("fromEntities") or []):
        ent = r.string(n, f"{path}.fromEntities[{i}]")
        if ent is not None and ent not in _ENTITIES:
            _reject(r, n, f"{path}.fromEntities[{i}]", f"unsupported entity {ent!r}")
    for i, n in enumerate(present.get("fromCIDR") or []):
        _read_cidr(r, n, f"{path}.fromCIDR[{i}]", allow_address=True)
    for i, n in enumerate(present.get("fromCIDRSet") or []):
        _read_cidr_rule(r, n, f"{path}.fromCIDRSet[{i}]", _Rule(0), i)
    ports = r.sequence(f["toPorts"], f"{path}.toPorts") if "toPorts" in f else []
    icmps = r.sequence(f["icmps"], f"{path}.icmps") if "icmps" in f else []
    if ports and icmps:
        _reject(r, f["icmps"], f"{path}.icmps", "icmps may only be present without toPorts")
    _check_icmps(r, icmps or [], f"{path}.icmps")
    for i, n in enumerate(ports or []):
        p = f"{path}.toPorts[{i}]"
        if deny:
            # A PortDenyRule: only ports.
            pf = r.mapping(n, p, frozenset({"ports"}))
            items = r.sequence(pf["ports"], f"{p}.ports") if pf and "ports" in pf else []
            if items is not None and len(items) > _MAX_PORTS:
                _reject(r, n, f"{p}.ports", f"too many ports, the max is {_MAX_PORTS}")
            for j, pn in enumerate(items or []):
                _read_port(r, pn, f"{p}.ports[{j}]")
        else:
            _read_port_rule(r, n, p, ingress=True)
            rules = r.mapping(n, p, None) or {}
            if host and "rules" in rules:
                _reject(
                    r,
                    rules["rules"],
                    f"{p}.rules",
                    "L7 rules are not supported on a host's ingress",
                )


def _check_icmps(r: Reader, items: list[YamlNode], path: str) -> None:
    """Cilium's ``ICMPRule.verify`` and its CRD: at most 40 fields, family IPv4 or IPv6."""
    for i, n in enumerate(items):
        f = r.mapping(n, f"{path}[{i}]", None)
        fields = r.sequence(f["fields"], f"{path}[{i}].fields") if f and "fields" in f else []
        if fields is not None and len(fields) > _MAX_PORTS:
            _reject(r, n, f"{path}[{i}].fields", f"too many types, the max is {_MAX_PORTS}")
        for j, fn in enumerate(fields or []):
            ff = r.mapping(fn, f"{path}[{i}].fields[{j}]", None)
            if ff and "family" in ff:
                fam = r.string(ff["family"], f"{path}[{i}].fields[{j}].family")
                if fam not in (None, "", "IPv4", "IPv6"):
                    _reject(
                        r,
                        ff["family"],
                        f"{path}[{i}].fields[{j}].family",
                        f"wrong family {fam!r} (expected IPv4 or IPv6)",
                    )


def _read_selector(r: Reader, node: YamlNode, path: str) -> Selector | None:
    errors = len(r.errors)
    f = r.mapping(node, path, _SELECTOR)
    if f is None:
        return None
    labels = r.string_map(f["matchLabels"], f"{path}.matchLabels") if "matchLabels" in f else {}
    exprs: list[tuple[str, str, list[str]]] = []
    items = r.sequence(f["matchExpressions"], f"{path}.matchExpressions") if (
        "matchExpressions" in f) else []  # fmt: skip
    for i, e in enumerate(items or []):
        ep = f"{path}.matchExpressions[{i}]"
        ef = r.mapping(e, ep, _EXPR)
        if ef is None:
            continue
        for req in ("key", "operator"):
            if req not in ef:
                r.error(e, f"{ep}.{req}", "required field is missing")
        key = r.string(ef["key"], f"{ep}.key") if "key" in ef else None
        op = r.string(ef["operator"], f"{ep}.operator") if "operator" in ef else None
        values = r.strings(ef["values"], f"{ep}.values") if "values" in ef else []
        if op is not None and op not in OPERATORS:
            r.error(
                ef["operator"],
                f"{ep}.operator",
                f"unknown operator {op!r} (expected one of: {', '.join(OPERATORS)})",
            )
        elif op in ("In", "NotIn") and values is not None and not values:
            r.error(e, f"{ep}.values", f"must not be empty when the operator is {op}")
        elif op in ("Exists", "DoesNotExist") and values:
            r.error(ef["values"], f"{ep}.values", f"must be empty when the operator is {op}")
        if key is not None and op is not None and values is not None:
            exprs.append((key, op, values))
    if len(r.errors) > errors:
        return None
    for key in [*(labels or {}), *(k for k, _, _ in exprs)]:
        source = key.partition(":")[0] if ":" in key else None
        if source not in (None, "k8s", "any"):
            r.warn(
                node,
                path,
                f"label source {source!r} in {key!r}: it selects no endpoint fqdnguard knows",
            )
    return Selector.build(labels, exprs)


def _read_egress(
    r: Reader, node: YamlNode, path: str, index: int, namespace: str | None, *, host: bool = False
) -> _Rule | None:
    errors = len(r.errors)
    f = r.mapping(node, path, _EGRESS)
    if f is None:
        return None
    rule = _Rule(index)
    present = {k: r.sequence(f[k], f"{path}.{k}") for k in _L3 if k in f}
    used = [k for k in _L3 if present.get(k)]
    if len(used) > 1:
        _reject(
            r,
            node,
            path,
            f"combining {used[0]} and {used[1]} in one rule is not supported: use two rules",
        )
    rule.has_l3 = bool(used)
    for i, n in enumerate(present.get("toEndpoints") or []):
        sel = _read_selector(r, n, f"{path}.toEndpoints[{i}]")
        if sel is not None:
            if namespace is not None and not sel.mentions(NAMESPACE_LABEL):
                sel = sel.in_namespace(namespace)
            rule.to_endpoints.append(sel)
    for i, n in enumerate(present.get("toCIDR") or []):
        c = _read_cidr(r, n, f"{path}.toCIDR[{i}]", allow_address=True)
        if c is not None:
            rule.cidrs.append((c[0], c[1], [], f"toCIDR[{i}] {c[2]}"))
    for i, n in enumerate(present.get("toCIDRSet") or []):
        _read_cidr_rule(r, n, f"{path}.toCIDRSet[{i}]", rule, i)
    if present.get("toFQDNs"):
        rule.fqdns = _read_name_selectors(r, present["toFQDNs"] or [], f"{path}.toFQDNs")
    for k in ("toGroups", "toNodes"):
        if present.get(k):
            r.warn(f[k], f"{path}.{k}", f"{k} selectors (this rule allows nothing)")
    for i, n in enumerate(present.get("toEntities") or []):
        ent = r.string(n, f"{path}.toEntities[{i}]")
        if ent is not None and ent not in _ENTITIES:
            r.error(n, f"{path}.toEntities[{i}]", f"unsupported entity {ent!r}")
        elif ent in CILIUM_ONLY:
            r.warn(
                n, f"{path}.toEntities[{i}]", f"entity {ent!r}: {CILIUM_ONLY[ent]} (allows nothing)"
            )
        elif ent is not None:
            rule.entities.append(ent)
    for i, n in enumerate(present.get("toServices") or []):
        ref = _read_service(r, n, f"{path}.toServices[{i}]")
        if ref is not None:
            rule.services.append(ref)
    for k in ("toEntities", "toServices"):
        if present.get(k):
            rule.at[k] = (r.line(f[k]), f"{path}.{k}")
    for k in ("toRequires", "icmps", "authentication"):
        if k in f:
            r.warn(f[k], f"{path}.{k}", k)
    ports = r.sequence(f["toPorts"], f"{path}.toPorts") if "toPorts" in f else []
    icmps = r.sequence(f["icmps"], f"{path}.icmps") if "icmps" in f else []
    if ports and icmps:
        _reject(r, f["icmps"], f"{path}.icmps", "icmps may only be present without toPorts")
    _check_icmps(r, icmps or [], f"{path}.icmps")
    rule.has_ports = bool(ports)
    for i, n in enumerate(ports or []):
        entry = _read_port_rule(r, n, f"{path}.toPorts[{i}]", host=host)
        if entry is not None:
            rule.ports.append(entry)
    return rule if len(r.errors) == errors else None


def _read_service(r: Reader, node: YamlNode, path: str) -> ServiceRef | None:  # noqa: PLR0911
    """A ``toServices`` entry. As in Cilium, ``k8sServiceSelector`` wins when both forms are
    given, an entry with neither selects no Service, and an omitted namespace matches a
    Service of any namespace."""
    f = r.mapping(node, path, _SERVICE)
    if f is None:
        return None
    if "k8sServiceSelector" in f:
        spath = f"{path}.k8sServiceSelector"
        sf = r.mapping(f["k8sServiceSelector"], spath, _SERVICE_SELECTOR)
        if sf is None:
            return None
        if "selector" not in sf:
            r.error(f["k8sServiceSelector"], f"{spath}.selector", "required field is missing")
            return None
        sel = _read_selector(r, sf["selector"], f"{spath}.selector")
        ns = r.string(sf["namespace"], f"{spath}.namespace") if "namespace" in sf else ""
        return None if sel is None or ns is None else ServiceRef(selector=sel, namespace=ns or None)
    if "k8sService" in f:
        spath = f"{path}.k8sService"
        sf = r.mapping(f["k8sService"], spath, _SERVICE_NAME)
        if sf is None:
            return None
        name = r.string(sf["serviceName"], f"{spath}.serviceName") if "serviceName" in sf else ""
        ns = r.string(sf["namespace"], f"{spath}.namespace") if "namespace" in sf else ""
        if name is None or ns is None:
            return None
        return ServiceRef(name=name or None, namespace=ns or None)
    return ServiceRef()


def _read_name_selectors(r: Reader, items: list[YamlNode], path: str) -> list[tuple[bool, str]]:
    """The valid entries of a ``toFQDNs`` / ``rules.dns`` list. The common case (one string field
    whose text is valid) builds no path string and checks each text once per file; anything else
    goes through :func:`_read_name_selector`, which reports problems."""
    out: list[tuple[bool, str]] = []
    valid = r.valid_names
    for i, n in enumerate(items):
        f = n.value if n.kind == MAPPING and n.pairs is None else None
        if f is not None and len(f) == 1:
            ((key, value),) = f.items()
            if value.tag == STR and value.kind == SCALAR and key in _FQDN:
                sel = (key == "matchPattern", value.value)
                if sel not in valid:
                    try:
                        (validate_pattern if sel[0] else validate_name)(sel[1])
                    except PatternError:
                        pass  # reported below, with its path
                    else:
                        valid.add(sel)
                if sel in valid:
                    out.append(sel)
                    continue
        checked = _read_name_selector(r, n, f"{path}[{i}]")
        if checked is not None:
            valid.add(checked)
            out.append(checked)
    return out


def _read_name_selector(r: Reader, node: YamlNode, path: str) -> tuple[bool, str] | None:
    f = r.mapping(node, path, _FQDN)
    if f is None:
        return None
    if len(f) != 1:
        r.error(node, path, "must have exactly one of matchName and matchPattern")
    checked = [_check_name_selector(r, key, value, path) for key, value in f.items()]
    return checked[0] if len(checked) == 1 else None


def _check_name_selector(
    r: Reader, key: str, value: YamlNode, path: str
) -> tuple[bool, str] | None:
    text = r.string(value, f"{path}.{key}")
    if text is None:
        return None
    try:
        (validate_pattern if key == "matchPattern" else validate_name)(text)
    except PatternError as e:
        r.error(value, f"{path}.{key}", str(e))
        return None
    return key == "matchPattern", text


def _read_cidr(
    r: Reader, node: YamlNode, path: str, allow_address: bool
) -> tuple[str, int, str] | None:
    text = r.string(node, path)
    if text is None:
        return None
    try:
        if "/" not in text and allow_address:
            addr = ipaddress.ip_address(text)
            return str(addr), addr.max_prefixlen, text
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        what = "an IP address or prefix" if allow_address else "a prefix (address/length)"
        r.error(node, path, f"{text!r} is not {what}")
        return None
    return str(net.network_address), net.prefixlen, text


def _read_cidr_rule(r: Reader, node: YamlNode, path: str, rule: _Rule, i: int) -> None:
    f = r.mapping(node, path, _CIDR_RULE)
    if f is None:
        return
    given = [k for k in ("cidr", "cidrGroupRef", "cidrGroupSelector") if k in f]
    if len(given) != 1:
        r.error(node, path, "must have exactly one of cidr, cidrGroupRef and cidrGroupSelector")
        return
    if given[0] != "cidr":
        r.warn(f[given[0]], f"{path}.{given[0]}", "CiliumCIDRGroup references (allows nothing)")
        return
    c = _read_cidr(r, f["cidr"], f"{path}.cidr", allow_address=False)
    excepts: list[tuple[str, int]] = []
    texts: list[str] = []
    for j, n in enumerate((r.sequence(f["except"], f"{path}.except") or []) if "except" in f
                          else []):  # fmt: skip
        e = _read_cidr(r, n, f"{path}.except[{j}]", allow_address=False)
        if e is None or c is None:
            continue
        net = ipaddress.ip_network(f"{c[0]}/{c[1]}")
        sub = ipaddress.ip_address(e[0])
        if sub.version != net.version or sub not in net:
            r.error(n, f"{path}.except[{j}]", f"{e[2]} is not inside {c[2]}")
        excepts.append((e[0], e[1]))
        texts.append(e[2])
    if c is not None:
        label = f"toCIDRSet[{i}] {c[2]}" + (f" except {', '.join(texts)}" if texts else "")
        rule.cidrs.append((c[0], c[1], excepts, label))


def _read_port_rule(
    r: Reader, node: YamlNode, path: str, *, ingress: bool = False, host: bool = False
) -> _PortEntry | None:
    """A ``toPorts`` entry. ``ingress``: one of an ingress rule, only checked (fqdnguard does not
    enforce ingress), for what Cilium rejects there. ``host``: of a host policy
    (``nodeSelector``), where Cilium rejects HTTP and Kafka rules on egress."""
    errors = len(r.errors)
    f = r.mapping(node, path, _PORT_RULE)
    if f is None:
        return None
    for k in ("terminatingTLS", "originatingTLS"):
        if k in f and not ingress:
            r.warn(f[k], f"{path}.{k}", k)
    server_names = r.strings(f["serverNames"], f"{path}.serverNames") if "serverNames" in f else []
    if "serverNames" in f and server_names == []:
        _reject(r, f["serverNames"], f"{path}.serverNames", "must not be an empty list")
    for i, sn in enumerate(server_names or []):
        if sn == "":
            _reject(r, f["serverNames"], f"{path}.serverNames[{i}]", "empty server name")
        elif len(sn) > 255 or not _SERVER_NAME.fullmatch(sn):
            _reject(
                r,
                f["serverNames"],
                f"{path}.serverNames[{i}]",
                f"{sn!r} is not a server name (labels of [-a-zA-Z0-9_], at most 255 characters, "
                "optionally after a leading '*.' or '**.')",
            )
    items = r.sequence(f["ports"], f"{path}.ports") if "ports" in f else []
    if items is not None and len(items) > _MAX_PORTS:
        r.error(f["ports"], f"{path}.ports", f"too many ports, the max is {_MAX_PORTS}")
    ports = [_read_port(r, n, f"{path}.ports[{i}]") for i, n in enumerate(items or [])]
    rules = r.mapping(f["rules"], f"{path}.rules", _L7) if "rules" in f else {}
    dns: list[tuple[bool, str]] | None = None
    #: The L7 features present that only an L7 proxy could enforce: (what, node, path).
    unenforced: list[tuple[str, YamlNode, str]] = []
    if server_names:
        unenforced.append(("serverNames (TLS SNI)", f["serverNames"], f"{path}.serverNames"))
    if "listener" in f:
        unenforced.append(("listener (an Envoy listener)", f["listener"], f"{path}.listener"))
    if rules is not None and "rules" in f and not any(k in rules for k in _L7_KINDS):
        # Cilium's CRD schema: rules is oneOf http, kafka, dns, l7proto.
        _reject(
            r,
            f["rules"],
            f"{path}.rules",
            "must have exactly one of http, kafka, dns and l7proto (an empty rules object is "
            "not allowed)",
        )
    if ingress and rules and "dns" in rules:
        _reject(r, rules["dns"], f"{path}.rules.dns", "DNS rules are not allowed on ingress")
    if ingress and "listener" in f:
        _reject(r, f["listener"], f"{path}.listener", "listener is not allowed on ingress")
    for k in ("http", "kafka"):
        if host and not ingress and rules and k in rules:
            _reject(
                r, rules[k], f"{path}.rules.{k}", f"L7 {k} rules are not supported on host egress"
            )
    if rules and "listener" in f:
        _reject(r, f["listener"], f"{path}.listener", "listener is not allowed with L7 rules")
    if rules:
        kinds = [k for k in _L7_KINDS if k in rules]
        if "l7" in rules and "l7proto" not in rules:
            r.error(rules["l7"], f"{path}.rules.l7", "'l7' needs 'l7proto'")
        for i, n in enumerate(r.sequence(rules["l7"], f"{path}.rules.l7") or [] if "l7" in rules
                              else []):  # fmt: skip
            if "" in (r.mapping(n, f"{path}.rules.l7[{i}]", None) or {}):
                _reject(r, n, f"{path}.rules.l7[{i}]", "empty key not allowed")
        if len(kinds) > 1:
            r.error(node, f"{path}.rules", "multiple L7 protocol rule types in one port rule")
        if any(p is not None and p[0] == 0 for p in ports):
            r.error(node, f"{path}.rules", "L7 rules can not be used when a port is 0")
        if server_names and "terminatingTLS" not in f:
            r.error(
                f["serverNames"],
                f"{path}.serverNames",
                "serverNames are not allowed with L7 rules without terminatingTLS",
            )
        if "dns" in rules:
            dpath = f"{path}.rules.dns"
            if not items:
                r.error(rules["dns"], dpath, "Port 53 must be specified for DNS rules (add ports)")
            for p, n in zip(ports, items or [], strict=True):
                if p is not None and p[3] is None and p[1] > p[0]:
                    r.error(n, f"{path}.ports", "DNS rules do not support port ranges (endPort)")
            dns = _read_name_selectors(r, r.sequence(rules["dns"], dpath) or [], dpath)
        else:
            unenforced += [(f"{k} rules", rules[k], f"{path}.rules.{k}") for k in kinds]
            for p, n in zip(ports, items or [], strict=True):
                if p is not None and p[2] != "TCP":
                    r.error(
                        n,
                        f"{path}.ports",
                        f"L7 rules can only apply to TCP (not {p[2]}) except for DNS rules",
                    )
    deny_l7 = bool(unenforced) and getattr(r, "unenforced_l7", "deny") == "deny"
    for what, at, where in [] if ingress else unenforced:
        r.warn(
            at,
            where,
            f"L7 {what}: this port rule allows nothing, as fqdnguard has no L7 proxy to enforce "
            "them (unenforced_l7: allow-port opens the port at L4 instead)"
            if deny_l7
            else f"L7 {what}: the port is allowed at L4 without them (unenforced_l7: allow-port)",
        )
    if len(r.errors) > errors:
        return None
    ranges = [(lo, hi, proto) for p in ports if p is not None for lo, hi, proto, name in [p]
              if name is None and proto in _PROTOCOLS and lo >= 0]  # fmt: skip
    named = [(name, proto) for p in ports if p is not None for _, _, proto, name in [p]
             if name is not None and proto in _PROTOCOLS]  # fmt: skip
    inert = deny_l7 or (bool(items) and not ranges and not named)
    return _PortEntry(ranges, dns, inert=inert, named=named)


def _read_port(r: Reader, node: YamlNode, path: str) -> tuple[int, int, str, str | None] | None:
    """(port, endPort, protocol, None), or (-1, 0, protocol, lower-cased name) for a named
    port."""
    f = r.mapping(node, path, _PORT)
    if f is None:
        return None
    # Every field is checked, so that one lint run reports each of its problems.
    errors = len(r.errors)
    if "port" not in f:
        r.error(node, f"{path}.port", "required field is missing")
    text = r.string(f["port"], f"{path}.port") if "port" in f else None
    end = r.integer(f["endPort"], f"{path}.endPort") if "endPort" in f else 0
    proto = r.string(f["protocol"], f"{path}.protocol") if "protocol" in f else "ANY"
    if proto is not None and proto not in _CRD_PROTOCOLS:
        hint = (
            " (ICMP rules go in icmps, beside toPorts)" if proto.upper().startswith("ICMP") else ""
        )
        _reject(
            r,
            f["protocol"],
            f"{path}.protocol",
            f"unsupported protocol {proto!r} (expected one of: {', '.join(_CRD_PROTOCOLS)}){hint}",
        )
    elif proto in _OTHER_PROTOCOLS:
        r.warn(f["protocol"], f"{path}.protocol", f"protocol {proto} (this port allows nothing)")
        if text not in (None, "0"):
            _reject(r, f["port"], f"{path}.port", f"port must be empty or 0 for {proto}")
    if end is not None and not 0 <= end <= 65535:
        r.error(f["endPort"], f"{path}.endPort", f"{end} is not between 0 and 65535")
    port: int | None = None
    name: str | None = None
    if text is None:
        pass
    elif text.isdigit() and len(text) <= 5:
        port = int(text)
        if port > 65535:
            r.error(f["port"], f"{path}.port", f"{text} is not between 0 and 65535")
    elif _SVC_NAME.fullmatch(text):
        # Cilium compares port names case-insensitively.
        name = text.lower()
    else:
        r.error(f["port"], f"{path}.port", f"{text!r} is neither a port number nor a port name")
    if len(r.errors) > errors or proto is None or end is None:
        return None
    if name is not None:
        return -1, 0, proto, name
    assert port is not None
    return port, end, proto, None


# -- compile -----------------------------------------------------------------------------------


def _resolve(rule: _Rule, res: Resolver) -> Resolved:
    """A rule's L3 part resolved: its addresses and prefixes, and the endpoints it selects
    (``dests``, for named ports): those of its ``toEndpoints`` and of the ``toServices`` with a
    selector, every endpoint for a rule with no L3 selector (any destination), None for a rule
    naming no endpoint (``toFQDNs``, ``toCIDR``, ``toEntities``...)."""
    if rule.fqdns:
        return Resolved([], [], "", None, [])
    if not rule.has_l3:
        return Resolved([], [], "", list(res.registry or ()), [])
    ips: dict[str, None] = {}
    cidrs = [(a, b, list(x), label) for a, b, x, label in rule.cidrs]
    problems: list[tuple[str, str]] = []
    found: dict[int, Endpoint] | None = None
    label = "toEndpoints"
    if rule.to_endpoints:
        found = {}
        for sel in rule.to_endpoints:
            found.update((ep.id, ep) for ep in res.select(sel))
    for ent in dict.fromkeys(rule.entities):
        label = "toEntities " + ", ".join(dict.fromkeys(rule.entities))
        e_ips, e_cidrs, problem = res.entity(ent)
        ips.update(dict.fromkeys(e_ips))
        cidrs += e_cidrs
        if problem:
            problems.append(("toEntities", f"entity {ent!r}: {problem}"))
    if rule.services:
        # Cilium 1.19: a Service with a selector stands for that selector in its namespace (a
        # generated toEndpoints); one without, for its backends as CIDRs, which never select a
        # pod or a node.
        label, found = "toServices", found or {}
        services, problem = res.services(rule.services)
        if problem:
            problems.append(("toServices", problem))
        outside = None
        for svc in services:
            if svc.selector:
                sel = Selector.build(svc.selector).in_namespace(svc.namespace)
                found.update((ep.id, ep) for ep in res.select(sel))
                continue
            outside = outside or res.cluster_addresses()
            for b in svc.backends:
                if not outside(b):
                    ips[str(ipaddress.ip_address(b))] = None
    dests = list(found.values()) if found is not None else None
    for ep in dests or ():
        ips.update(dict.fromkeys(ep.ips))
    return Resolved(list(ips), cidrs, label, dests, problems)


def _plan_ports(entries: _Entries) -> Ports:
    """The ports of a rule's entries for a firewall: None (every port) when an entry lists
    none."""
    if entries and all(ranges for ranges, _ in entries):
        return tuple(sorted({r for ranges, _ in entries for r in ranges}))
    return None


def _port_admits(r: tuple[int, int, str], port: int, proto: str) -> bool:
    lo, hi, p = r
    return p in ("ANY", proto) and (lo == 0 or lo <= port <= max(hi, lo))


#: Port entries as ``CompiledPolicy`` takes them: (ranges, rules.dns or None).
_Entries = list[tuple[list[tuple[int, int, str]], list[tuple[bool, str]] | None]]


def _cluster_ip_rules(
    rule: _Rule, l3: Resolved, entries: _Entries, res: Resolver
) -> list[tuple[list[str], _Entries, str]]:
    """A pod asks a Service's ClusterIP, and Cilium applies policy after the Service
    translation: so a rule whose L3 part admits every ready backend of a Service also admits
    the Service's ClusterIPs, on each Service port whose target port (the backends' port, a
    number or a name the EndpointSlices resolved) the rule's ports admit, with the rule's DNS
    rules. A rule on 5353 so admits ClusterIP:53 of a Service sending 53 to 5353, and a rule on
    53 does not: the verdict sees the port the backends see. A target port not known (a name
    no EndpointSlice resolved) admits nothing. (ClusterIPs, port entries, label) per Service;
    none without cluster facts."""
    if res.cluster is None or rule.fqdns or not rule.has_l3 or not (l3.ips or l3.cidrs):
        return []
    key = (
        tuple(rule.to_endpoints),
        tuple(rule.entities),
        tuple(rule.services),
        tuple((a, b, tuple(x)) for a, b, x, _ in rule.cidrs),
    )
    by_service: dict[str, tuple[Service, list[str]]] = {}
    for svc, cip in res.cluster_ips(key, l3):
        by_service.setdefault(svc.display, (svc, []))[1].append(cip)
    out = []
    for svc, cips in by_service.values():
        mapped = [(p.port, p.target, p.protocol) for p in svc.ports if p.target is not None]
        kept_entries: _Entries = []
        if not entries and mapped:
            kept_entries.append(([(n, n, proto) for n, _, proto in mapped], None))
        for ranges, dns in entries:
            kept = [(n, n, proto) for n, to, proto in mapped
                    if not ranges or any(_port_admits(r, to, proto) for r in ranges)]  # fmt: skip
            if kept:
                kept_entries.append((kept, dns))
        if kept_entries:
            out.append((cips, kept_entries, f"{l3.label} (ClusterIP of Service {svc.display})"))
    return out


def _named_port(dests: list[Endpoint] | None, name: str, proto: str) -> list[tuple[int, int, str]]:
    """A named port resolved as Cilium does: per concrete protocol (ANY: TCP, UDP and SCTP), the
    one port number the destination endpoints declaring ``name`` for it agree on; nothing when
    none declares it, or when they declare different numbers (Cilium: duplicate named ports)."""
    out: list[tuple[int, int, str]] = []
    for p in ("TCP", "UDP", "SCTP") if proto == "ANY" else (proto,):
        numbers = {n for ep in dests or () for n in ep.named_ports(name, p)}
        if len(numbers) == 1:
            (n,) = numbers
            out.append((n, n, p))
    return out


def _effective_ports(rule: _Rule, dests: list[Endpoint] | None) -> _Entries | None:
    """The rule's port entries as (ranges, rules.dns) with named ports resolved against
    ``dests``; an empty list of ranges is every port. [] for a rule with no ``toPorts`` (every
    port); None when it has some but none admits anything (unenforceable, L7 denied, names
    that resolve to no port): the rule then allows nothing."""
    out = []
    for e in rule.ports:
        if e.inert:
            continue
        if not e.named:
            out.append((list(e.ranges), e.dns))
            continue
        ranges = e.ranges + [r for name, proto in e.named for r in _named_port(dests, name, proto)]
        if ranges:  # a listed port that resolves to nothing must never read as "every port"
            out.append((ranges, e.dns))
    if rule.has_ports and not out:
        return None
    return out


def _lower(
    spec: _Spec, res: Resolver, problems: list[tuple[_Spec, _Rule, str, str]]
) -> tuple[str, str, bool, list[object]]:
    """A spec in the shape ``CompiledPolicy`` takes, resolved by ``res``; why parts of its rules
    allow nothing goes to ``problems`` as (spec, rule, field, message)."""
    rules: list[object] = []
    for rule in spec.egress:
        l3 = _resolve(rule, res)
        problems += [(spec, rule, what, msg) for what, msg in l3.problems]
        ports = _effective_ports(rule, l3.dests)
        if ports is None:
            rules.append((rule.index, [], ([], [], ""), []))  # no port entry admits anything
            continue
        if rule.fqdns:
            rules.append((rule.index, rule.fqdns, ([], [], ""), ports))
            continue
        if rule.has_l3:
            peers: object = (l3.ips, l3.cidrs, l3.label)
        else:
            # No L3 selector: any destination when toPorts says which ports; nothing for `{}`.
            peers = None if rule.has_ports else ([], [], "")
        rules.append((rule.index, [], peers, ports))
        for ips, entries, label in _cluster_ip_rules(rule, l3, ports, res):
            rules.append((rule.index, [], (ips, [], label), entries))
    return spec.policy, spec.label, spec.default_deny, rules


# -- one object at a time (the Kubernetes source) ----------------------------------------------


@dataclass(frozen=True)
class ParsedObject:
    """One CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object, read on its own: its
    specs when it is valid, else the problems that make it invalid."""

    specs: tuple[_Spec, ...]
    infos: tuple[PolicyInfo, ...]
    warnings: tuple[PolicyWarning, ...]
    errors: tuple[PolicyError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_object(
    obj: dict[str, object], origin: str, *, unenforced_l7: str = "deny"
) -> ParsedObject:
    """Reads one policy object as the API server returns it (``origin`` names it in errors,
    e.g. ``CiliumNetworkPolicy ns/name``): the same checks as a file's document."""
    import json  # noqa: PLC0415

    text = json.dumps(obj, indent=1)
    with gc_paused():
        specs, infos, errors, warnings = _read_sources(
            [(origin, text)], unenforced_l7=unenforced_l7, allow_empty=True
        )
    # An object has no file or line of its own: its origin names it.
    infos = [PolicyInfo(i.kind, i.namespace, i.name, i.file, 0) for i in infos]
    return ParsedObject(tuple(specs), tuple(infos), tuple(warnings), tuple(errors))


def deny_specs(obj: dict[str, object], kind: str, origin: str) -> list[_Spec]:
    """What stands in for a new policy object that is invalid: egress default deny, with no
    rule, for the endpoints it selects (fail closed: it was meant to restrict them). Its
    ``endpointSelector`` is read as far as it can be; one that cannot be read selects every
    endpoint of the policy's namespace (every endpoint, for a clusterwide policy)."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or "?")
    namespace = (str(meta.get("namespace") or "default")) if kind == CNP else None
    display = f"{namespace}/{name}" if namespace else name
    raw_specs: list[object] = []
    if isinstance(obj.get("spec"), dict):
        raw_specs.append(obj["spec"])
    more = obj.get("specs")
    if isinstance(more, list):
        raw_specs += more
    selectors: list[Selector] = []
    for raw in raw_specs or [None]:
        if isinstance(raw, dict) and "nodeSelector" in raw and "endpointSelector" not in raw:
            continue  # a host policy: it selects no endpoint here
        selector = _selector_of(raw.get("endpointSelector") if isinstance(raw, dict) else None)
        selectors.append(selector.in_namespace(namespace) if namespace else selector)
    return [
        _Spec(kind, namespace, name, display, f"{kind} {display} (invalid: default deny)", sel,
              True, [], origin, 0)
        for sel in dict.fromkeys(selectors)
    ]  # fmt: skip


def _selector_of(raw: object) -> Selector:
    """A selector read leniently; every endpoint (the empty selector) when it cannot be."""
    if not isinstance(raw, dict):
        return Selector()
    try:
        labels = raw.get("matchLabels") or {}
        exprs = [
            (str(e["key"]), str(e["operator"]), [str(v) for v in e.get("values") or []])
            for e in raw.get("matchExpressions") or []
        ]
        if not isinstance(labels, dict):
            return Selector()
        return Selector.build({str(k): str(v) for k, v in labels.items()}, exprs)
    except (KeyError, TypeError, ValueError, AttributeError):
        return Selector()


def assemble(
    objects: Iterable[ParsedObject | list[_Spec]],
    endpoints: Endpoints,
    *,
    cluster: Cluster | None = None,
    selects: Callable[[Selector], bool] | None = None,
) -> Policy:
    """A policy from objects read one at a time (:func:`parse_object`; a list of specs stands
        for an invalid object, :func:`deny_specs`), compiled for the endpoints of ``endpoints``:
        only the specs that select one of them are lowered, so a node pays for the policies of its
        own pods, not the whole cluster's (``selects(selector)`` tells whether a selector matches
    one of ``endpoints``; a caller that builds often remembers the answers). Warnings are not
    logged again (they were when read)."""
    specs: list[_Spec] = []
    infos: list[PolicyInfo] = []
    warnings: list[PolicyWarning] = []
    for o in objects:
        if isinstance(o, ParsedObject):
            specs += o.specs
            infos += o.infos
            warnings += o.warnings
        else:
            specs += o
            infos += [PolicyInfo(s.kind, s.namespace, s.name, s.file, 0) for s in o[:1]]
    if selects is None:
        label_sets = {ep.key: ep.labels for ep in endpoints}.values()

        def selects(sel: Selector) -> bool:
            return any(sel.matches(labels) for labels in label_sets)

    relevant = [s for s in specs if s.selector is not None and selects(s.selector)]
    policy = Policy._make(relevant, infos, [], endpoints, cluster)
    object.__setattr__(policy, "warnings", tuple(warnings))
    return policy


def to_endpoints_selectors(objects: Iterable[ParsedObject]) -> set[Selector]:
    """Every distinct ``toEndpoints`` selector of the objects' egress rules (what the source
    narrows its watch of other nodes' pods to)."""
    return {sel for o in objects for s in o.specs for rule in s.egress for sel in rule.to_endpoints}
