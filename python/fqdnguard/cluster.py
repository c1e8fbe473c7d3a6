"""What a policy needs to know about the cluster beyond its endpoints: nodes, Services and the
pods a ``toEndpoints`` can select that are not sources here.

The Kubernetes source (:mod:`fqdnguard.sources.kubernetes`) builds one from the API server's
Nodes, Services, EndpointSlices and pods; on a host without Kubernetes it comes from the
``cluster:`` section of the endpoints file. A :class:`Cluster` never changes: a change builds a
new one, and the policy compiled against it is swapped in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fqdnguard.endpoints import Endpoints

__all__ = ["Cluster", "Node", "Service", "ServicePort"]


def _frozen(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(labels or {}))


@dataclass(frozen=True)
class Node:
    """A cluster node: its addresses (InternalIP and ExternalIP, canonical text) and the pod
    CIDRs it hands out (``spec.podCIDRs``)."""

    name: str
    addresses: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service: what clients ask (``port``) and where the backends listen
    (``target``: a number, or None when ``targetPort`` is a name that the backends resolve)."""

    name: str
    port: int
    protocol: str
    target: int | None


@dataclass(frozen=True)
class Service:
    """A Service: its ClusterIPs, its selector (None for a Service without one, whose endpoints
    someone manages by hand) and the addresses of its ready backends, from its EndpointSlices."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    cluster_ips: tuple[str, ...] = ()
    selector: Mapping[str, str] | None = None
    backends: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Cluster:
    """Everything about the cluster a compiled policy may resolve against.

    ``peers``: every pod a ``toEndpoints`` may select, on this node and on others (None: only
    the source registry the policy is compiled with). ``apiserver``: the API server's addresses
    (the endpoints of ``default/kubernetes``). ``node``: the name of the node fqdnguard runs on
    (``host`` is its addresses; ``remote-node`` the others'). ``pod_cidrs``: pod ranges of the
    whole cluster beside the nodes' own ``pod_cidrs`` (an IPAM that gives nodes no
    ``spec.podCIDRs``, e.g. Cilium's cluster-pool)."""

    node: str | None = None
    nodes: tuple[Node, ...] = ()
    services: tuple[Service, ...] = ()
    peers: Endpoints | None = None
    apiserver: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()

    def this_node(self) -> Node | None:
        return next((n for n in self.nodes if n.name == self.node), None)

    def all_pod_cidrs(self) -> tuple[str, ...]:
        """Every pod range known: the cluster-wide ones and each node's."""
        return tuple(
            dict.fromkeys((*self.pod_cidrs, *(c for n in self.nodes for c in n.pod_cidrs)))
        )
