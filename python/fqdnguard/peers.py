"""The destinations of an egress rule that names cluster facts: ``toEndpoints`` against every pod
the cluster knows, ``toEntities`` and ``toServices`` as Cilium 1.19 defines them, and the
ClusterIP of a Service whose backends a rule admits (what a pod sends its DNS queries to).

Cilium decides these from its identities; fqdnguard decides them from addresses, using what a
:class:`~fqdnguard.cluster.Cluster` holds (nodes and their pod CIDRs, Services and their ready
backends, the API server's addresses). docs/policy.md lists each entity's meaning and what it
maps to. Whatever cannot be resolved with those facts allows nothing, and says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from fqdnguard.cluster import Cluster, Service
from fqdnguard.endpoints import Endpoint, Endpoints, Selector

__all__ = ["CILIUM_ONLY", "Resolver", "ServiceRef"]

#: Entities whose members only Cilium has (its health endpoints, endpoints waiting for an
#: identity, its Envoy ingress, pods it does not manage): they allow nothing here.
CILIUM_ONLY = {
    "health": "Cilium's health endpoints",
    "init": "endpoints whose identity Cilium has not resolved yet",
    "ingress": "Cilium's Envoy ingress",
    "unmanaged": "endpoints Cilium does not manage",
}
_NO_CLUSTER = (
    "it needs the cluster's facts (the endpoints file's `cluster:` section, or the Kubernetes "
    "source), and none were given: it allows nothing"
)

_NO_APISERVER = "no API server address is known: it allows nothing"
_NO_NODE = (
    "the node fqdnguard runs on is not among the cluster's nodes (cluster.node), so the host "
    "and the remote nodes cannot be told apart: it allows nothing"
)
_NO_POD_CIDR_CLUSTER = (
    "no pod CIDR is known (nodes' podCIDRs, cluster.podCIDRs): it covers only the pods, nodes "
    "and API server known now"
)
_NO_POD_CIDR_WORLD = (
    "no pod CIDR is known (nodes' podCIDRs, cluster.podCIDRs), so the cluster's addresses "
    "cannot be told from the world's: it allows nothing"
)
_SINGLE_STACK = (
    "Cilium gives world-ipv4 and world-ipv6 only in a dual-stack cluster, and this cluster's "
    "pod CIDRs are of one family: it allows nothing, as in Cilium"
)

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (network address, prefix length, excepted (address, prefix length) pairs, label).
CidrOut = tuple[str, int, list[tuple[str, int]], str]


@dataclass(frozen=True)
class ServiceRef:
    """A ``toServices`` entry: ``k8sService`` (``name``) or ``k8sServiceSelector``
    (``selector``, matched against the Service's labels). ``namespace`` None matches a Service
    of any namespace, as in Cilium (the policy's own namespace is not implied)."""

    name: str | None = None
    selector: Selector | None = None
    namespace: str | None = None

    def matches(self, svc: Service) -> bool:
        if self.namespace is not None and self.namespace != svc.namespace:
            return False
        if self.selector is not None:
            return self.selector.matches(svc.labels)
        return self.name is not None and self.name == svc.name


@dataclass
class Resolved:
    """A rule's resolved L3 part: single addresses (named ``label`` in verdicts), prefixes, the
    endpoints it selects (for named ports; None when it names no endpoint), and why parts of
    it allow nothing (one message per unresolved entity or form)."""

    ips: list[str]
    cidrs: list[CidrOut]
    label: str
    dests: list[Endpoint] | None
    problems: list[tuple[str, str]]


class _Admits:
    """Does a rule's L3 part admit an address? Host-length prefixes and excepts are looked up
    in sets, so a world with thousands of node addresses costs one lookup."""

    def __init__(self, ips: Iterable[str], cidrs: Iterable[CidrOut]) -> None:
        self.ips = set(ips)
        self.nets: list[tuple[Net, set[str], list[Net]]] = []
        for addr, bits, excepts, _ in cidrs:
            net = ipaddress.ip_network(f"{addr}/{bits}")
            if bits == net.max_prefixlen:
                self.ips.add(addr)
                continue
            hosts = {a for a, b in excepts if b == (32 if ":" not in a else 128)}
            wide = [ipaddress.ip_network(f"{a}/{b}") for a, b in excepts if a not in hosts]
            self.nets.append((net, hosts, wide))

    def __call__(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        text = str(addr)
        if text in self.ips:
            return True
        return any(
            addr in net and text not in hosts and not any(addr in w for w in wide)
            for net, hosts, wide in self.nets
        )


def _collapse(nets: Iterable[Net]) -> list[tuple[str, int]]:
    """Non-overlapping prefixes covering ``nets`` (nftables refuses overlapping intervals)."""
    out: list[tuple[str, int]] = []
    for version in (4, 6):
        family = [n for n in nets if n.version == version]
        for n in ipaddress.collapse_addresses(family):  # type: ignore[type-var]
            out.append((str(n.network_address), n.prefixlen))
    return out


class Resolver:
    """Resolves rules against one endpoint registry and one :class:`Cluster` (or None). It
    caches what several rules share, so one resolver serves a whole compile."""

    def __init__(self, endpoints: Endpoints | None, cluster: Cluster | None) -> None:
        self.cluster = cluster
        #: Whom ``toEndpoints`` selects: every pod the cluster knows, when it says so.
        self.registry = (
            cluster.peers if cluster is not None and cluster.peers is not None else endpoints
        )
        self.sources = endpoints
        self.selected: dict[Selector, list[Endpoint]] = {}
        self._entity: dict[str, tuple[list[str], list[CidrOut], str | None]] = {}
        self._facts: tuple[list[Net], set[str], list[str], list[str]] | None = None
        self._cluster_ips: dict[tuple[object, ...], list[tuple[Service, str]]] = {}

    # -- toEndpoints ----------------------------------------------------------------------

    def select(self, sel: Selector) -> list[Endpoint]:
        found = self.selected.get(sel)
        if found is None:
            reg = self.registry
            found = self.selected[sel] = reg.select(sel) if reg is not None else []
        return found

    # -- cluster facts --------------------------------------------------------------------

    def _cluster_facts(self) -> tuple[list[Net], set[str], list[str], list[str]]:
        """(pod CIDRs, addresses of the pods known outside them, this node's addresses, the
        other nodes' addresses)."""
        if self._facts is None:
            c = self.cluster
            assert c is not None
            pod_nets = [ipaddress.ip_network(p, strict=False) for p in c.all_pod_cidrs()]
            pods: set[str] = set()
            for reg in (self.registry, self.sources):
                for ep in reg or ():
                    for ip in ep.ips:
                        addr = ipaddress.ip_address(ip)
                        if not any(addr in n for n in pod_nets):
                            pods.add(ip)
            host = [str(ipaddress.ip_address(a)) for n in c.nodes if n.name == c.node
                    for a in n.addresses]  # fmt: skip
            remote = [str(ipaddress.ip_address(a)) for n in c.nodes if n.name != c.node
                      for a in n.addresses]  # fmt: skip
            self._facts = (pod_nets, pods, host, remote)
        return self._facts

    def entity(self, name: str) -> tuple[list[str], list[CidrOut], str | None]:
        """An entity's (addresses, prefixes, problem); the problem says why it allows nothing
        (or less than Cilium would), None when it resolved whole."""
        got = self._entity.get(name)
        if got is None:
            got = self._entity[name] = self._resolve_entity(name)
        return got

    def _resolve_entity(  # noqa: PLR0911 (one return per entity)
        self, name: str
    ) -> tuple[list[str], list[CidrOut], str | None]:
        label = f"toEntities {name}"
        c = self.cluster
        if name == "all":
            return [], [("0.0.0.0", 0, [], label), ("::", 0, [], label)], None
        if name == "none":
            return [], [], None
        if name in CILIUM_ONLY:
            return [], [], f"fqdnguard knows no {CILIUM_ONLY[name]}: it allows nothing"
        if c is None:
            return [], [], _NO_CLUSTER
        pod_nets, pods, host, remote = self._cluster_facts()
        apiserver = [str(ipaddress.ip_address(a)) for a in c.apiserver]
        if name == "kube-apiserver":
            return apiserver, [], None if apiserver else _NO_APISERVER
        if name in ("host", "remote-node"):
            if c.node is None or c.this_node() is None:
                return [], [], _NO_NODE
            return (host if name == "host" else remote), [], None
        if name == "cluster":
            ips = sorted({*host, *remote, *pods, *apiserver})
            ranges: list[CidrOut] = [
                (str(n.network_address), n.prefixlen, [], label) for n in pod_nets
            ]
            return ips, ranges, None if pod_nets else _NO_POD_CIDR_CLUSTER
        return self._world(name, label, pod_nets, [*pods, *host, *remote])

    def _world(
        self, name: str, label: str, pod_nets: list[Net], addresses: list[str]
    ) -> tuple[list[str], list[CidrOut], str | None]:
        """``world`` (``world-ipv4``, ``world-ipv6``): every address but the pod CIDRs, the
        nodes', the known pods' and the Services' ClusterIPs."""
        if not pod_nets:
            return [], [], _NO_POD_CIDR_WORLD
        if name != "world" and {n.version for n in pod_nets} != {4, 6}:
            return [], [], _SINGLE_STACK
        assert self.cluster is not None
        inside: list[Net] = [*pod_nets]
        cluster_ips = (ip for s in self.cluster.services for ip in s.cluster_ips)
        inside += [ipaddress.ip_network(a) for a in (*addresses, *cluster_ips)]
        excepts = _collapse(inside)
        cidrs: list[CidrOut] = []
        for root, version in (("0.0.0.0", 4), ("::", 6)):
            if name in ("world", f"world-ipv{version}"):
                mine = [(a, b) for a, b in excepts if (":" in a) == (version == 6)]
                cidrs.append((root, 0, mine, label))
        return [], cidrs, None

    # -- toServices -----------------------------------------------------------------------

    def services(self, refs: list[ServiceRef]) -> tuple[list[Service], str | None]:
        """The Services the refs select, or a problem when no cluster facts are known."""
        if self.cluster is None:
            return [], _NO_CLUSTER
        return [s for s in self.cluster.services if any(r.matches(s) for r in refs)], None

    def cluster_addresses(self) -> _Admits:
        """Addresses a CIDR selector never selects in Cilium (pods, nodes)."""
        pod_nets, pods, host, remote = self._cluster_facts()
        nets: list[CidrOut] = [(str(n.network_address), n.prefixlen, [], "") for n in pod_nets]
        return _Admits([*pods, *host, *remote], nets)

    # -- ClusterIPs ------------------------------------------------------------------------

    def cluster_ips(self, key: tuple[object, ...], peers: Resolved) -> list[tuple[Service, str]]:
        """(Service, ClusterIP) of each Service with a ClusterIP and ready backends, every one
        of which ``peers`` admits (a partial match admits none). ``key`` identifies the rule's
        L3 part, so rules that share it share the work."""
        found = self._cluster_ips.get(key)
        if found is None:
            found = []
            admits = _Admits(peers.ips, peers.cidrs)
            for svc in self.cluster.services if self.cluster is not None else ():
                if svc.cluster_ips and svc.backends and all(admits(b) for b in svc.backends):
                    found += [(svc, str(ipaddress.ip_address(ip))) for ip in svc.cluster_ips]
            self._cluster_ips[key] = found
        return found
