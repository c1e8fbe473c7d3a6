"""Endpoints: IPs, labels and namespace; label selectors as Cilium evaluates them.

For hosts without Kubernetes the registry comes from a YAML file::

    endpoints:
      - name: web-0
        namespace: default
        ips: [10.0.1.5, fd00::105]
        labels: {app: web}
        serviceAccount: web        # optional: io.cilium.k8s.policy.serviceaccount
        id: 7                      # optional: defaults to the position in the list (1-based)
        ports:                     # optional: named container ports (policies' `port: dns`)
          - {name: dns, port: 53, protocol: UDP}   # protocol: TCP (default), UDP or SCTP

Labels are Kubernetes labels (a ``k8s:`` prefix is accepted and dropped). Every endpoint also
carries ``io.kubernetes.pod.namespace`` (and the service account label when given), as Cilium's
endpoints do, so selectors may use them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from fqdnguard._core import YamlNode
from fqdnguard._schema import PolicyError, Reader, read_problem

if TYPE_CHECKING:
    from fqdnguard.cluster import Cluster, Node, Service, ServicePort

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SERVICEACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")
#: An IANA service name, as Kubernetes requires of a container port's name.
PORT_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-zA-Z])[a-zA-Z0-9](?:-?[a-zA-Z0-9])*")


def label_name(key: str) -> str | None:
    """The label name a selector key refers to: ``k8s:app`` and ``any:app`` (and ``app``) refer
    to ``app``. A key of another source (``reserved:host``, ``cidr:...``) can match no endpoint
    fqdnguard knows: None."""
    source, sep, name = key.partition(":")
    if not sep:
        return key
    return name if source in ("k8s", "any") else None


@dataclass(frozen=True)
class Selector:
    """An ``endpointSelector`` / ``toEndpoints`` entry: requirements that must all hold.

    Each requirement is ``(label name or None, operator, values)``; ``matchLabels`` entries are
    ``In`` with one value. The empty selector matches every endpoint.
    """

    requirements: tuple[tuple[str | None, str, frozenset[str]], ...] = ()

    @classmethod
    def build(
        cls,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Iterable[tuple[str, str, Iterable[str]]] = (),
    ) -> Selector:
        reqs: list[tuple[str | None, str, frozenset[str]]] = []
        for key, value in (match_labels or {}).items():
            reqs.append((label_name(key), "In", frozenset((value,))))
        for key, op, values in match_expressions:
            if op not in OPERATORS:
                raise ValueError(f"unknown operator {op!r}")
            reqs.append((label_name(key), op, frozenset(values)))
        return cls(tuple(reqs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        for name, op, values in self.requirements:
            value = labels.get(name) if name is not None else None
            if op == "In":
                ok = value is not None and value in values
            elif op == "NotIn":
                ok = value is None or value not in values
            elif op == "Exists":
                ok = value is not None
            else:
                ok = value is None
            if not ok:
                return False
        return True

    def mentions(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.requirements)

    def in_namespace(self, namespace: str) -> Selector:
        """This selector restricted to one namespace (what a namespaced policy implies)."""
        return Selector((*self.requirements, (NAMESPACE_LABEL, "In", frozenset((namespace,)))))


@dataclass(frozen=True)
class Endpoint:
    """A workload: an id, its addresses, its labels (namespace label included)."""

    id: int
    name: str
    namespace: str
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: Named container ports: (lower-cased name, port, protocol TCP/UDP/SCTP).
    ports: tuple[tuple[str, int, str], ...] = ()
    #: Hashable form of (namespace, labels): endpoints with equal keys are selected alike.
    key: tuple[str, frozenset[tuple[str, str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = dict(self.labels)
        labels[NAMESPACE_LABEL] = self.namespace
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(self, "key", (self.namespace, frozenset(labels.items())))

    @property
    def ips(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_ports(self, name: str, protocol: str) -> list[int]:
        """The port numbers this endpoint declares under ``name`` (any case) for ``protocol``."""
        name = name.lower()
        return [port for n, port, proto in self.ports if n == name and proto == protocol]

    @classmethod
    def create(
        cls,
        *,
        id: int = 0,
        name: str = "",
        namespace: str | None = None,
        ips: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        service_account: str | None = None,
        ports: Iterable[tuple[str, int, str]] = (),
    ) -> Endpoint:
        """Builds an endpoint, normalising addresses and label keys. The namespace defaults to
        the ``io.kubernetes.pod.namespace`` label, then to ``default``. ``ports`` are named
        container ports, (name, port, protocol)."""
        norm: dict[str, str] = {}
        for key, value in (labels or {}).items():
            n = key.removeprefix("k8s:")
            if ":" in n:
                raise ValueError(f"label {key!r}: only Kubernetes labels (k8s:) are supported")
            norm[n] = value
        ns = namespace or norm.get(NAMESPACE_LABEL) or "default"
        if service_account:
            norm[SERVICEACCOUNT_LABEL] = service_account
        v4: list[str] = []
        v6: list[str] = []
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            (v4 if addr.version == 4 else v6).append(str(addr))
        named: list[tuple[str, int, str]] = []
        for pname, port, proto in ports:
            if not PORT_NAME.fullmatch(pname):
                raise ValueError(f"port name {pname!r} is not an IANA service name")
            if not 0 < port < 65536 or proto not in PORT_PROTOCOLS:
                raise ValueError(f"port {pname!r}: {port}/{proto} is not a port and TCP/UDP/SCTP")
            named.append((pname.lower(), port, proto))
        return cls(id, name, ns, tuple(v4), tuple(v6), norm, tuple(named))


_ENTRY_FIELDS = frozenset({"id", "name", "namespace", "ips", "labels", "serviceAccount", "ports"})
_PORT_FIELDS = frozenset({"name", "port", "protocol"})


class Endpoints:
    """The endpoint registry: which endpoint is this source IP (one dict lookup)."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._list = tuple(endpoints)
        self._by_ip: dict[str, Endpoint] = {}
        self._by_name: dict[tuple[str, str], Endpoint] = {}
        ids: set[int] = set()
        for ep in self._list:
            if ep.id in ids:
                raise ValueError(f"endpoint {ep.display}: id {ep.id} is used twice")
            ids.add(ep.id)
            for ip in ep.ips:
                other = self._by_ip.setdefault(ip, ep)
                if other is not ep:
                    raise ValueError(f"address {ip} belongs to {other.display} and {ep.display}")
            self._by_name[(ep.namespace, ep.name)] = ep

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Endpoints:
        return load_with_cluster(path)[0]

    @classmethod
    def from_yaml(cls, text: str, filename: str = "<string>") -> Endpoints:
        return from_yaml_with_cluster(text, filename)[0]

    def by_ip(self, ip: str) -> Endpoint | None:
        ep = self._by_ip.get(ip)
        if ep is None:
            try:
                ep = self._by_ip.get(str(ipaddress.ip_address(ip)))
            except ValueError:
                return None
        return ep

    def by_name(self, namespace: str, name: str) -> Endpoint | None:
        return self._by_name.get((namespace, name))

    def select(self, selector: Selector) -> list[Endpoint]:
        return [ep for ep in self._list if selector.matches(ep.labels)]

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._list)

    def __len__(self) -> int:
        return len(self._list)

    def __repr__(self) -> str:
        return f"Endpoints(<{len(self._list)} endpoints>)"


def load_with_cluster(path: str | os.PathLike[str]) -> tuple[Endpoints, Cluster | None]:
    """The endpoints file's registry and its ``cluster:`` section (None without one)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(os.fspath(path), 0, "", read_problem(e)) from None
    return from_yaml_with_cluster(text, filename=os.fspath(path))


def from_yaml_with_cluster(
    text: str, filename: str = "<string>"
) -> tuple[Endpoints, Cluster | None]:
    """See :func:`load_with_cluster`; raises :class:`PolicyError` listing every problem."""
    r = Reader(filename)
    eps: list[Endpoint] = []
    cluster: Cluster | None = None
    ip_owner: dict[str, str] = {}
    docs = [d for d in r.documents(text) if d is not None]
    if not r.errors and len(docs) != 1:
        r.error(1, "", f"expected one YAML document, found {len(docs)}")
    for doc in docs[:1]:
        top = r.mapping(doc, "", frozenset({"endpoints", "cluster"}))
        if top is None:
            break
        if "endpoints" not in top:
            r.error(doc, "endpoints", "required field is missing")
        items = r.sequence(top["endpoints"], "endpoints") if "endpoints" in top else []
        for i, node in enumerate(items or []):
            ep = _read_endpoint(r, node, f"endpoints[{i}]", i + 1)
            if ep is None:
                continue
            for ip in ep.ips:
                if ip in ip_owner:
                    r.error(node, f"endpoints[{i}].ips", f"{ip} also belongs to {ip_owner[ip]}")
                ip_owner[ip] = ep.display
            if any(e.id == ep.id for e in eps):
                r.error(node, f"endpoints[{i}].id", f"id {ep.id} is used twice")
            eps.append(ep)
        if "cluster" in top:
            cluster = _read_cluster(r, top["cluster"], "cluster")
    if r.errors:
        raise PolicyError.of(r.errors)
    return Endpoints(eps), cluster


_CLUSTER_FIELDS = frozenset({"node", "nodes", "podCIDRs", "services", "apiserver"})
_NODE_FIELDS = frozenset({"name", "addresses", "podCIDRs", "labels"})
_SERVICE_FIELDS = frozenset(
    {"namespace", "name", "labels", "clusterIPs", "selector", "backends", "ports"}
)
_SERVICE_PORT_FIELDS = frozenset({"name", "port", "protocol", "targetPort"})


def _read_addresses(r: Reader, node: YamlNode, path: str, prefixes: bool = False) -> list[str]:
    """A list of IP addresses (canonical text), or of prefixes (``prefixes``)."""
    out: list[str] = []
    for i, text in enumerate(r.strings(node, path) or []):
        try:
            if prefixes:
                out.append(str(ipaddress.ip_network(text, strict=False)))
            else:
                out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            what = "a prefix (address/length)" if prefixes else "an IP address"
            r.error(node.value[i], f"{path}[{i}]", f"{text!r} is not {what}")
    return out


def _items(r: Reader, f: dict[str, YamlNode], key: str, path: str) -> list[YamlNode]:
    """The items of the list field ``key`` (none when absent or not a list)."""
    return (r.sequence(f[key], f"{path}.{key}") or []) if key in f else []


def _read_prefixes(r: Reader, f: dict[str, YamlNode], path: str) -> list[str]:
    """The ``podCIDRs`` field (none when absent)."""
    return _read_addresses(r, f["podCIDRs"], f"{path}.podCIDRs", True) if "podCIDRs" in f else []


def _read_cluster(r: Reader, node: YamlNode, path: str) -> Cluster | None:
    """The ``cluster:`` section: the facts ``toEntities`` and ``toServices`` resolve against."""
    from fqdnguard.cluster import Cluster  # noqa: PLC0415 (cluster imports this module)

    errors = len(r.errors)
    f = r.mapping(node, path, _CLUSTER_FIELDS)
    if f is None:
        return None
    name = r.string(f["node"], f"{path}.node") if "node" in f else None
    nodes = [
        _read_node(r, n, f"{path}.nodes[{i}]") for i, n in enumerate(_items(r, f, "nodes", path))
    ]
    seen: set[str] = set()
    for i, n in enumerate(nodes):
        if n is not None and n.name in seen:
            r.error(f["nodes"].value[i], f"{path}.nodes[{i}].name", f"node {n.name!r} twice")
        seen.add(n.name if n is not None else "")
    if name is not None and name not in seen:
        r.error(f["node"], f"{path}.node", f"{name!r} is none of the nodes listed under nodes")
    pod_cidrs = _read_prefixes(r, f, path)
    services = [
        _read_service(r, n, f"{path}.services[{i}]")
        for i, n in enumerate(_items(r, f, "services", path))
    ]
    apiserver: list[str] = []
    if "apiserver" in f:
        af = r.mapping(f["apiserver"], f"{path}.apiserver", frozenset({"addresses"}))
        if af is not None and "addresses" in af:
            apiserver = _read_addresses(r, af["addresses"], f"{path}.apiserver.addresses")
    if len(r.errors) > errors:
        return None
    return Cluster(
        node=name,
        nodes=tuple(n for n in nodes if n is not None),
        services=tuple(s for s in services if s is not None),
        apiserver=tuple(apiserver),
        pod_cidrs=tuple(pod_cidrs),
    )


def _read_node(r: Reader, node: YamlNode, path: str) -> Node | None:
    from fqdnguard.cluster import Node  # noqa: PLC0415

    f = r.mapping(node, path, _NODE_FIELDS)
    if f is None:
        return None
    if "name" not in f:
        r.error(node, f"{path}.name", "required field is missing")
    name = r.string(f["name"], f"{path}.name") if "name" in f else None
    addresses = _read_addresses(r, f["addresses"], f"{path}.addresses") if "addresses" in f else []
    cidrs = _read_prefixes(r, f, path)
    labels = r.string_map(f["labels"], f"{path}.labels") if "labels" in f else {}
    if name is None or labels is None:
        return None
    return Node(name, tuple(addresses), tuple(cidrs), MappingProxyType(labels))


def _read_service(r: Reader, node: YamlNode, path: str) -> Service | None:
    from fqdnguard.cluster import Service  # noqa: PLC0415

    errors = len(r.errors)
    f = r.mapping(node, path, _SERVICE_FIELDS)
    if f is None:
        return None
    if "name" not in f:
        r.error(node, f"{path}.name", "required field is missing")
    name = r.string(f["name"], f"{path}.name") if "name" in f else None
    namespace = r.string(f["namespace"], f"{path}.namespace") if "namespace" in f else "default"
    labels = r.string_map(f["labels"], f"{path}.labels") if "labels" in f else {}
    selector = r.string_map(f["selector"], f"{path}.selector") if "selector" in f else None
    ips = _read_addresses(r, f["clusterIPs"], f"{path}.clusterIPs") if "clusterIPs" in f else []
    backends = _read_addresses(r, f["backends"], f"{path}.backends") if "backends" in f else []
    ports = [
        _read_service_port(r, n, f"{path}.ports[{i}]")
        for i, n in enumerate(_items(r, f, "ports", path))
    ]
    if len(r.errors) > errors or name is None or namespace is None or labels is None:
        return None
    return Service(
        namespace,
        name,
        MappingProxyType(labels),
        tuple(ips),
        MappingProxyType(selector) if selector else None,
        tuple(backends),
        tuple(p for p in ports if p is not None),
    )


def _read_service_port(r: Reader, node: YamlNode, path: str) -> ServicePort | None:
    """``{name, port, protocol (TCP), targetPort (a number, or a name the backends resolve;
    default: port)}``."""
    from fqdnguard.cluster import ServicePort  # noqa: PLC0415

    f = r.mapping(node, path, _SERVICE_PORT_FIELDS)
    if f is None:
        return None
    if "port" not in f:
        r.error(node, f"{path}.port", "required field is missing")
    name = r.string(f["name"], f"{path}.name") if "name" in f else ""
    port, proto = _port_protocol(r, f, path)
    target: int | None = port
    if "targetPort" in f:
        t = f["targetPort"]
        if t.tag == "tag:yaml.org,2002:int":
            target = r.integer(t, f"{path}.targetPort")
            if target is not None and not 0 < target < 65536:
                r.error(t, f"{path}.targetPort", f"{target} is not between 1 and 65535")
        else:
            tname = r.string(t, f"{path}.targetPort")
            if tname is not None and not PORT_NAME.fullmatch(tname):
                r.error(t, f"{path}.targetPort", f"{tname!r} is neither a port nor a port name")
            target = None  # a named target port: the backends resolve it
    if name is None or port is None or proto is None:
        return None
    return ServicePort(name, port, proto, target)


def _read_endpoint(r: Reader, node: YamlNode, path: str, default_id: int) -> Endpoint | None:
    errors = len(r.errors)
    f = r.mapping(node, path, _ENTRY_FIELDS)
    if f is None:
        return None
    name = r.string(f["name"], f"{path}.name") if "name" in f else None
    if "name" not in f:
        r.error(node, f"{path}.name", "required field is missing")
    namespace = r.string(f["namespace"], f"{path}.namespace") if "namespace" in f else "default"
    ident = r.integer(f["id"], f"{path}.id") if "id" in f else default_id
    if ident is not None and not 0 <= ident < 2**32:
        r.error(f["id"], f"{path}.id", f"{ident} is not between 0 and 2^32-1")
    ips = r.strings(f["ips"], f"{path}.ips") if "ips" in f else []
    for i, ip in enumerate(ips or []):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            r.error(f["ips"].value[i], f"{path}.ips[{i}]", f"{ip!r} is not an IP address")
    labels = r.string_map(f["labels"], f"{path}.labels") if "labels" in f else {}
    for key in labels or {}:
        if ":" in key.removeprefix("k8s:"):
            r.error(f["labels"], f"{path}.labels.{key}", "only Kubernetes labels (k8s:) allowed")
    sa = r.string(f["serviceAccount"], f"{path}.serviceAccount") if "serviceAccount" in f else None
    ports = _read_ports(r, f["ports"], f"{path}.ports") if "ports" in f else []
    if len(r.errors) > errors:
        return None
    assert name is not None and namespace is not None and ident is not None
    return Endpoint.create(
        id=ident,
        name=name,
        namespace=namespace,
        ips=ips or (),
        labels=labels,
        service_account=sa,
        ports=ports,
    )


def _port_protocol(r: Reader, f: dict[str, YamlNode], path: str) -> tuple[int | None, str | None]:
    """A port entry's ``port`` (1-65535) and ``protocol`` (TCP, UDP, SCTP; default TCP), each
    None after reporting a problem."""
    port = r.integer(f["port"], f"{path}.port") if "port" in f else None
    proto = r.string(f["protocol"], f"{path}.protocol") if "protocol" in f else "TCP"
    if port is not None and not 0 < port < 65536:
        r.error(f["port"], f"{path}.port", f"{port} is not between 1 and 65535")
        port = None
    if proto is not None and proto not in PORT_PROTOCOLS:
        r.error(
            f["protocol"],
            f"{path}.protocol",
            f"unsupported protocol {proto!r} (expected one of: {', '.join(PORT_PROTOCOLS)})",
        )
        proto = None
    return port, proto


def _read_ports(r: Reader, node: YamlNode, path: str) -> list[tuple[str, int, str]]:
    """An endpoint's named ports: ``[{name: dns, port: 53, protocol: UDP}, ...]``."""
    out: list[tuple[str, int, str]] = []
    for i, item in enumerate(r.sequence(node, path) or []):
        ipath = f"{path}[{i}]"
        f = r.mapping(item, ipath, _PORT_FIELDS)
        if f is None:
            continue
        for req in ("name", "port"):
            if req not in f:
                r.error(item, f"{ipath}.{req}", "required field is missing")
        name = r.string(f["name"], f"{ipath}.name") if "name" in f else None
        port, proto = _port_protocol(r, f, ipath)
        if name is not None and not PORT_NAME.fullmatch(name):
            r.error(
                f["name"],
                f"{ipath}.name",
                f"{name!r} is not a port name (an IANA service name: at most 15 letters, "
                "digits and single hyphens, with a letter)",
            )
            name = None
        if name is None or port is None or proto is None:
            continue
        if any(n == name.lower() and p == proto for n, _, p in out):
            r.error(item, f"{ipath}.name", f"port name {name!r} is declared twice for {proto}")
            continue
        out.append((name.lower(), port, proto))
    return out
